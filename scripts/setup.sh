#!/usr/bin/env bash
# Creates .venv (about 2.5 GB) and installs zimage-deploy with its test extras; 2-3 minutes on a fresh machine,
# each step announced. CPU torch first: otherwise pip would pull a multi-GB CUDA build as a dependency.
# Idempotent: a second run only checks. SETUP_QUIET=1 hides pip's own output.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
step() { echo "[setup] $*"; }
pip_install() {
    if [ -n "${SETUP_QUIET:-}" ]; then
        .venv/bin/python -m pip install -q "$@"
    else  # pip's download progress and a line per installed package, not the 'already satisfied' noise
        .venv/bin/python -m pip install --progress-bar on "$@" 2>&1 \
            | { grep -v -e "already satisfied" -e "^WARNING: Location" || true; }  # pipefail: pip's status counts
    fi
}
[ -x .venv/bin/python ] || { step "creating .venv with $("$PY" --version)"; "$PY" -m venv .venv; }
step "upgrading pip"
.venv/bin/python -m pip install -q --upgrade pip
step "installing CPU torch 2.13.0 (~1 GB with its dependencies)"
pip_install "torch==2.13.0"
# TensorRT-RTX builds RTX engines ahead of time without a GPU, so CI builds real engines
step "installing zimage-deploy and its extras: diffusers, transformers, onnx, onnxruntime, tensorrt-rtx, fastapi, ray, modelopt (~1.5 GB)"
pip_install -e ".[test,tensorrt-rtx,serve,ray,bench,quantize]"
# headless Chromium for the serving page's browser test (tests/test_serve_page.py); only as root with apt, and a
# failure (offline, no apt) is a warning: the test then skips, except in CI where it fails
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        step "installing chromium (Debian) for the page test"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
            >/dev/null; } || echo "[setup] warning: chromium could not be installed; the page test will skip"
    else
        echo "[setup] chromium not installed (needs root and apt-get): the page test will skip"
    fi
fi
step "done: $(du -sh .venv 2>/dev/null | cut -f1) in .venv"
