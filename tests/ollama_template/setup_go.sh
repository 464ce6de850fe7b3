#!/usr/bin/env bash
# Install Debian's Go (golang-go, about 13 s here after apt-get update) when it is missing: the
# Ollama Modelfile test renders the TEMPLATE with Go's own text/template, as Ollama does.
set -euo pipefail
if ! command -v go >/dev/null 2>&1; then
    echo "Installing Debian's golang-go ..." >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq golang-go >&2
fi
