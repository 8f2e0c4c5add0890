#!/usr/bin/env bash
# The one script a lent H100/H200 runs (device tool, with `carry: [".whl"]`; benchmarks/fetch_gpu_wheels.sh
# fetches them here first): install the carried wheels the
# machine lacks (diffusers and its two missing needs), then the real-size benchmark. Full output under $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 benchmarks/gpu_turbo_1024.py --out "$OUT/gpu" --repeats 3 --deadline-s 420 2>&1 | tee "$OUT/gpu_turbo.log"
