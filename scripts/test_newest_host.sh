#!/usr/bin/env bash
# Run Stride's host-facing tests (tests/host, tests/workflows, tests/server, tests/reliability) against
# another ComfyUI work tree, e.g. the newest one, in a virtual environment of its own.
#
#   bash scripts/test_newest_host.sh /path/to/ComfyUI [extra pytest arguments]
#   make test-newest-host COMFYUI_NEWEST=/path/to/ComfyUI
#
# The checkout must be a work tree (main.py + comfy/) outside this repository; CI (.ci/run) extracts
# ../shared/hosts/ComfyUI-0.33.0.tar.gz to a temporary folder for it. From a bare git mirror, export one first:
#   mkdir -p /tmp/ComfyUI && git --git-dir=/path/to/mirror archive HEAD | tar -x -C /tmp/ComfyUI
#
# The environment (default .cache/newest-host-venv, or $NEWEST_HOST_VENV) is layered on the project's .venv
# (scripts/provision.sh makes it): a .pth file puts .venv's site-packages behind its own, so torch, torchvision
# and Stride's requirements are reused, not installed again (5 GiB with CUDA), and only what this host pins
# differently (e.g. its frontend package) is installed into it, where it shadows .venv's copy; pip never
# changes .venv, since that lies outside the environment it installs into. No torchaudio wheel matches
# torch 2.14.1, and newer ComfyUI imports torchaudio at start-up (audio nodes, text encoders), so the
# environment gets a stand-in torchaudio package whose attributes do not exist: importing works, using audio
# fails (no test does). A second run with the same requirements and the same .venv installs nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

say() { printf '[newest host] %s\n' "$*"; }
fail() { printf '[newest host] ERROR: %s\n' "$*" >&2; exit 2; }

[ $# -ge 1 ] || fail "usage: bash scripts/test_newest_host.sh /path/to/ComfyUI [pytest arguments]"
HOST="$(cd "$1" 2>/dev/null && pwd)" || fail "$1 does not exist"
shift
[ -f "$HOST/main.py" ] && [ -d "$HOST/comfy" ] || fail "$HOST is not a ComfyUI work tree (no main.py / comfy/)"
case "$HOST/" in "$ROOT"/*) fail "keep the ComfyUI checkout outside this repository ($HOST)";; esac

MAIN_PY="$ROOT/.venv/bin/python"
[ -x "$MAIN_PY" ] || fail "no project environment at $ROOT/.venv: run \`make setup\` first"
read -r BASE_PY MAIN_SITE < <("$MAIN_PY" -c 'import sys, sysconfig; print(sys._base_executable, sysconfig.get_paths()["purelib"])')
MAIN_SITE="$(cd "$MAIN_SITE" && pwd -P)"

VENV="${NEWEST_HOST_VENV:-$ROOT/.cache/newest-host-venv}"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  say "creating virtual environment in $VENV"
  "$BASE_PY" -m venv --without-pip "$VENV" || fail "could not create $VENV (install the python3-venv package)"
fi
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$MAIN_SITE" > "$SITE/stride-project-venv.pth"

requirements="$VENV/stride-host-requirements.txt"
grep -v -E '^\s*(torch|torchvision|torchaudio)\s*([<>=~!].*)?$' "$HOST/requirements.txt" > "$requirements"
# The stamp covers this script, the host's requirements and what .venv holds (its distributions' names and
# versions), so a change to any of them checks the environment again.
stamp="$VENV/stride-stamp-$( (cat "$requirements" "${BASH_SOURCE[0]}"; ls "$MAIN_SITE" | grep -E '\.dist-info$') \
  | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  say "installing what this host requires beyond the project's .venv"
  "$MAIN_PY" -m pip --python "$PY" install --quiet --disable-pip-version-check -r "$requirements" \
    || fail "pip install of the host's requirements failed"
  if ! "$PY" -c "import torchaudio" 2>/dev/null; then
    mkdir -p "$SITE/torchaudio"
    cat > "$SITE/torchaudio/__init__.py" <<'EOF'
"""Stand-in torchaudio written by Stride's scripts/test_newest_host.sh: no torchaudio wheel matches this torch,
and ComfyUI imports torchaudio at start-up. It has no attributes, so any audio use fails; no Stride test uses audio."""
EOF
    echo '"""Stand-in torchaudio.functional (see torchaudio/__init__.py): empty."""' > "$SITE/torchaudio/functional.py"
  fi
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
