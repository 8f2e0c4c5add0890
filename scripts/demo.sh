#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then runs the main job on the embedded tiny model: build (export to ONNX,
# parity check) and generate an image with ONNX Runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m zimage_deploy.build --model tiny --target cpu --precision fp32
.venv/bin/python -m zimage_deploy.generate --engine-dir export/tiny-turbo-fp32 \
    --prompt "a red fox in the snow, watercolor" --seed 42 --height 256 --width 256 --output tiny-fox.png
