#!/usr/bin/env bash
# The one script a lent H100/H200 runs, in one device call, after `bash benchmarks/fetch_gpu_wheels.sh` here:
#     device run: command "bash benchmarks/gpu_run.sh", carry [".whl"], timeout_s 600
# It installs the carried wheels the machine lacks (diffusers), checks the imports, then runs the real-size
# benchmark (benchmarks/gpu_turbo_1024.py) under an outer `timeout` well below the call's limit; the benchmark
# starts no row after 300 s and writes each row's image and the JSON report as the row ends. Under $OUT:
#     gpu_run.log                    everything printed (nvidia-smi, versions, one line per row, the table)
#     gpu/gpu_turbo_report.json      the report (card, driver, versions, date, per-row results)
#     gpu/<row>.png                  each row's image (6 rows at most: $OUT brings back 8 files)
# The table is printed at the end, also when the benchmark was cut short (from the report it left).
# Measured 2026-11-27: the default rows took 150-160 s of the call on an H100 and an H200 (machine start apart).
#
# CPU dry run of the same plumbing (the tests run it): GPU_RUN_CPU=1 OUT=/tmp/x bash benchmarks/gpu_run.sh
# Knobs: PYTHON (python3), GPU_RUN_TIMEOUT (outer limit, s), GPU_RUN_ARGS (extra benchmark arguments),
# GPU_RUN_WHEELS (wheel folder, .whl).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
WHEELS=${GPU_RUN_WHEELS:-.whl}
if [ -n "${GPU_RUN_CPU:-}" ]; then
    LIMIT=${GPU_RUN_TIMEOUT:-900}
    ARGS="--reduced --device cpu --repeats 1 --size 64 --steps 2 --compile-backend eager"
else
    LIMIT=${GPU_RUN_TIMEOUT:-530}  # + install and table: the call's 600 s are never reached
    ARGS="--repeats 3 --deadline-s 300 --stop-s 470"
fi
ARGS="$ARGS ${GPU_RUN_ARGS:-}"
mkdir -p "$OUT/gpu"

# GPU_RUN_PRODUCT=1: the product's commands instead of gpu_turbo_1024.py (not yet run on a GPU): a random checkpoint
# of the real configs and a bf16 and an fp8 build for the compiled Torch runtime (TensorRT absent), made once and
# kept in the git-ignored GPU_RUN_WORK (default engines/gpu-bench; a warm machine keeps them between calls), then
# `python -m zimage_deploy.bench` (same warm-ups per row, 10 interleaved timed runs per row, all stored, short /
# long / Chinese prompts, commit, command line, GPU clocks and temperature in report.json). The fp8 build is
# calibrated on the shipped calibration prompts, disjoint from the timed ones (checked in its report). All rows of
# one bench call are resident at once: on an 80 GB card give fewer rows (GPU_RUN_BACKENDS).
product() {
    local work=${GPU_RUN_WORK:-engines/gpu-bench} target=${GPU_RUN_TARGET:-h100} p
    local size=${GPU_RUN_SIZE:-1024} steps=${GPU_RUN_STEPS:-8}
    # shellcheck disable=SC2086  # GPU_RUN_REALSIZE_ARGS / _BUILD_ARGS: lists of words (a CPU dry run: --layers 2 ...)
    [ -f "$work/ckpt/model_index.json" ] || "$PY" -m zimage_deploy.realsize --out "$work/ckpt" \
        ${GPU_RUN_REALSIZE_ARGS:-} || return 3
    # graphless builds (no TensorRT: the compiled Torch runtime loads the checkpoint; no ONNX export); the fp8 one
    # calibrated on GPU_RUN_CALIB of the shipped calibration prompts (disjoint from the timed ones)
    for p in bf16 fp8; do
        [ -f "$work/$p/manifest.json" ] || "$PY" -m zimage_deploy.build --model "$work/ckpt" --target "$target" \
            --precision "$p" --calib-size "${GPU_RUN_CALIB:-16}" --out "$work/$p" ${GPU_RUN_BUILD_ARGS:-} || return 3
        "$PY" -c "import json, sys; m = json.load(open(sys.argv[1])); print('build', sys.argv[2], \
m['stages'].get('total_seconds'), 's, graphs:', m.get('export', {}).get('graphs', True), ', gate:', \
(m['stages'].get('quantize', {}).get('quality_gate') or {}).get('min_psnr_db'))" "$work/$p/manifest.json" "$p"
    done
    timeout -k 15 "$LIMIT" "$PY" -m zimage_deploy.bench --build-dir "$work/bf16" --report "$OUT/gpu/bench-bf16" \
        --backends "${GPU_RUN_BACKENDS:-diffusers,diffusers-compile,diffusers-fp8,torch-eager,torch-compiled}" \
        --height "$size" --width "$size" --steps "$steps" --repeats 10 ${GPU_RUN_ARGS:-} || return $?
    timeout -k 15 "$LIMIT" "$PY" -m zimage_deploy.bench --build-dir "$work/fp8" --report "$OUT/gpu/bench-fp8" \
        --backends torch-compiled --height "$size" --width "$size" --steps "$steps" --repeats 10 ${GPU_RUN_ARGS:-}
}

run() {
    date -u +"start %Y-%m-%dT%H:%M:%SZ"
    if [ -z "${GPU_RUN_CPU:-}" ]; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "warning: nvidia-smi failed"
    fi
    site=$(mktemp -d)/site
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    if [ ${#wheels[@]} -gt 0 ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[@]}" \
            || { echo "error: installing the carried wheels failed"; return 3; }
        echo "installed: $(cd "$site" && ls -d ./*.dist-info | sed 's|^\./||; s|\.dist-info$||' | tr '\n' ' ')"
    else
        echo "no wheels in $WHEELS (run bash benchmarks/fetch_gpu_wheels.sh here and carry .whl)"
    fi
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" -c "import torch, transformers, diffusers; print('python', __import__('sys').version.split()[0], \
'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, \
'diffusers', diffusers.__version__)" \
        || { echo "error: a needed package is missing (diffusers: run bash benchmarks/fetch_gpu_wheels.sh here, carry .whl)"; return 3; }
    if [ -n "${GPU_RUN_PRODUCT:-}" ]; then
        product
        return $?
    fi
    # shellcheck disable=SC2086  # ARGS is a list of words
    timeout -k 15 "$LIMIT" "$PY" benchmarks/gpu_turbo_1024.py --out "$OUT/gpu" $ARGS
    rc=$?
    if [ $rc -ne 0 ]; then
        echo "benchmark exit status $rc ($([ $rc -eq 124 ] && echo "outer timeout after $LIMIT s" || echo failed))"
        if [ -f "$OUT/gpu/gpu_turbo_report.json" ]; then
            "$PY" benchmarks/gpu_turbo_1024.py --table "$OUT/gpu/gpu_turbo_report.json"
        else
            echo "no report was written"
        fi
    fi
    date -u +"end %Y-%m-%dT%H:%M:%SZ"
    return $rc
}

run 2>&1 | tee "$OUT/gpu_run.log"
