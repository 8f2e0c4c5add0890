#!/usr/bin/env bash
# Creates .venv and installs zimage-deploy with its test extras. CPU torch first: otherwise pip would pull a
# multi-GB CUDA build as a dependency. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
# TensorRT-RTX builds RTX engines ahead of time without a GPU, so CI builds real engines
.venv/bin/python -m pip install -q -e ".[test,tensorrt-rtx,serve,ray,bench,quantize]"
