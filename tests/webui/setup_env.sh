#!/usr/bin/env bash
# Build the WebUI test environment (idempotent): Debian's chromium, and a virtual environment of its
# own with gradio 3.41.2 (requirements-gradio3.txt), like an AUTOMATIC1111 install's Python (no torch).
#   tests/webui/setup_env.sh [3|4]     -> prints the environment's python path on its last line
# 4 builds the optional Forge environment (gradio 4.40, requirements-gradio4.txt) instead.
# The folder: $LORA_WEBUI_TEST_VENV, else ${XDG_CACHE_HOME:-~/.cache}/lora-daemon/venv-gradio<N>.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
FLAVOUR="${1:-3}"
case "$FLAVOUR" in 3|4) ;; *) echo "usage: $0 [3|4]" >&2; exit 2 ;; esac
REQ="$HERE/requirements-gradio$FLAVOUR.txt"
VENV="${LORA_WEBUI_TEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/lora-daemon/venv-gradio$FLAVOUR}"

if ! command -v chromium >/dev/null 2>&1; then
    echo "Installing Debian's chromium ..." >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >&2
fi

want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" = "$want" ]; then
    echo "$VENV/bin/python"
    exit 0
fi
PY=""
for candidate in python3.11 python3.10 python3; do  # gradio 3.41's pins have wheels up to 3.11
    if command -v "$candidate" >/dev/null 2>&1; then PY="$candidate"; break; fi
done
echo "Building the gradio $FLAVOUR test environment in $VENV with $PY ..." >&2
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQ" >&2
"$VENV/bin/python" -c "import gradio, playwright, websockets; print('gradio', gradio.__version__)" >&2
echo "$want" > "$VENV/.requirements.sha256"
echo "$VENV/bin/python"
