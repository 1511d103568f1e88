#!/usr/bin/env bash
# Run Stride's host-facing tests (tests/host, tests/workflows, tests/server, tests/reliability) against
# another ComfyUI checkout, e.g. the newest one, in a virtual environment of its own.
#
#   bash scripts/test_newest_host.sh /path/to/ComfyUI [extra pytest arguments]
#   make test-newest-host COMFYUI_NEWEST=/path/to/ComfyUI
#
# The checkout must be a work tree (main.py + comfy/); from a bare mirror, export one first:
#   mkdir -p /tmp/ComfyUI && git --git-dir=/path/to/mirror archive HEAD | tar -x -C /tmp/ComfyUI
# The environment (default .cache/newest-host-venv, or $NEWEST_HOST_VENV) gets torch 2.14.1 and
# torchvision 0.29.1 (the versions of the project's .venv), the checkout's requirements.txt, torchaudio
# (newer ComfyUI imports it unconditionally) and Stride's requirements minus playwright (no browser
# tests here). Only pip downloads anything; a second run with unchanged requirements installs nothing.
# Not part of `make test` or CI: it needs a second ComfyUI checkout and ~5 minutes on 2 cores.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

say() { printf '[newest host] %s\n' "$*"; }
fail() { printf '[newest host] ERROR: %s\n' "$*" >&2; exit 2; }

[ $# -ge 1 ] || fail "usage: bash scripts/test_newest_host.sh /path/to/ComfyUI [pytest arguments]"
HOST="$(cd "$1" 2>/dev/null && pwd)" || fail "$1 does not exist"
shift
[ -f "$HOST/main.py" ] && [ -d "$HOST/comfy" ] || fail "$HOST is not a ComfyUI work tree (no main.py / comfy/)"
case "$HOST/" in "$ROOT"/*) fail "keep the ComfyUI checkout outside this repository ($HOST)";; esac

VENV="${NEWEST_HOST_VENV:-$ROOT/.cache/newest-host-venv}"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  say "creating virtual environment in $VENV"
  python3 -m venv "$VENV" || fail "could not create $VENV (install the python3-venv package)"
fi
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

requirements="$VENV/stride-host-requirements.txt"
grep -v -E '^\s*(torch|torchvision|torchaudio)\s*([<>=~!].*)?$' "$HOST/requirements.txt" > "$requirements"
grep -v -E '^\s*playwright' "$ROOT/requirements-dev.txt" >> "$requirements"
cat "$ROOT/requirements.txt" >> "$requirements"
stamp="$VENV/stride-stamp-$( (cat "$requirements"; cat "${BASH_SOURCE[0]}") | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  say "installing torch, torchaudio, the host's and Stride's requirements (first run only)"
  "$PY" -c "import torch, torchvision" 2>/dev/null || pip_install "torch==2.14.1" "torchvision==0.29.1" \
    || fail "could not install torch 2.14.1 / torchvision 0.29.1"
  pip_install -r "$requirements" || fail "pip install of the host's / Stride's requirements failed"
  "$PY" -c "import torchaudio" 2>/dev/null || pip_install torchaudio \
    || fail "could not install torchaudio, which this ComfyUI imports at start-up"
  rm -f "$VENV"/stride-stamp-*; touch "$stamp"
fi

version=$("$PY" -c "import sys; sys.path.insert(0, '$HOST'); import comfyui_version; print(comfyui_version.__version__)") \
  || fail "the host at $HOST does not import in $VENV"
say "host: ComfyUI $version at $HOST; torch $("$PY" -c 'import torch; print(torch.__version__)')"

cd "$ROOT"
export COMFYUI_PATH="$HOST" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [ $# -gt 0 ]; then
  exec "$PY" -m pytest -q -ra "$@"
fi
exec "$PY" -m pytest -q -ra tests/host tests/workflows tests/server tests/reliability
