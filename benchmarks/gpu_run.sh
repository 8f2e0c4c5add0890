#!/usr/bin/env bash
# The one script a lent H100/H200 runs, in one device call, after `bash benchmarks/fetch_gpu_wheels.sh` here:
#     device run: command "bash benchmarks/gpu_run.sh", carry [".whl"], timeout_s 600
# It installs the carried wheels the machine lacks (diffusers, torchao), checks the imports, then measures through
# the product's own commands (`product` below: realsize -> build -> bench) under an outer time budget well below the
# call's limit. Under $OUT:
#     gpu_run.log                    everything printed (nvidia-smi, versions, build lines, the bench tables)
#     gpu/bench-bf16/report.{json,md,png}   diffusers peers + our Torch rows on the bf16 build
#     gpu/bench-fp8/report.{json,md,png}    the compiled Torch runtime on the fp8 build
# GPU_RUN_LEGACY=1: the earlier benchmark-only script instead (benchmarks/gpu_turbo_1024.py: its own rows, the
# 2026-11-27 report's; gpu/gpu_turbo_report.json + one PNG per row; it took 150-160 s of the call then).
#
# CPU dry run of the same plumbing (the tests run both): GPU_RUN_CPU=1 OUT=/tmp/x bash benchmarks/gpu_run.sh
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

# The product run (the default; not yet run on a GPU, dry-run on the CPU by the tests): a random checkpoint
# of the real configs and a bf16 and an fp8 build for the compiled Torch runtime (TensorRT absent), made once and
# kept in the git-ignored GPU_RUN_WORK (default engines/gpu-bench; a warm machine keeps them between calls), then
# `python -m zimage_deploy.bench` (same warm-ups per row, 10 interleaved timed runs per row, all stored, short /
# long / Chinese prompts, commit, command line, GPU clocks and temperature in report.json). The fp8 build is
# calibrated on the shipped calibration prompts, disjoint from the timed ones (checked in its report). All rows of
# one bench call are resident at once: on an 80 GB card give fewer rows (GPU_RUN_BACKENDS). Knobs for a CPU dry run
# (tests/test_gpu_script.py): GPU_RUN_MODEL (a checkpoint instead of the real-size one, e.g. tiny), GPU_RUN_SIZE,
# GPU_RUN_STEPS, GPU_RUN_CALIB, GPU_RUN_BUILD_ARGS, GPU_RUN_REALSIZE_ARGS, GPU_RUN_BACKENDS, GPU_RUN_FP8_BACKENDS.
product() {
    local work=${GPU_RUN_WORK:-engines/gpu-bench} target=${GPU_RUN_TARGET:-h100} p rc l
    local size=${GPU_RUN_SIZE:-1024} steps=${GPU_RUN_STEPS:-8} t0=$SECONDS model=${GPU_RUN_MODEL:-$work/ckpt}
    local rows=diffusers,diffusers-compile,diffusers-fp8,torch-eager,torch-compiled mib
    # the rows of one bench call are resident together (~20 GiB each at real size): fewer below 100 GB (H100 80 GB)
    mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
    [ -n "$mib" ] && [ "$mib" -lt 100000 ] && rows=diffusers,diffusers-compile,torch-compiled
    left() { echo $((LIMIT - (SECONDS - t0))); }  # of the LIMIT seconds the whole product run has
    # shellcheck disable=SC2086  # GPU_RUN_REALSIZE_ARGS / _BUILD_ARGS: lists of words (a CPU dry run: --layers 2 ...)
    [ -n "${GPU_RUN_MODEL:-}" ] || [ -f "$work/ckpt/model_index.json" ] || timeout -k 15 "$(left)" "$PY" -m zimage_deploy.realsize \
        --out "$work/ckpt" ${GPU_RUN_REALSIZE_ARGS:-} || { echo "error: the checkpoint was not written"; return 3; }
    # graphless builds (no TensorRT: the compiled Torch runtime loads the checkpoint; no ONNX export); the fp8 one
    # calibrated on GPU_RUN_CALIB of the shipped calibration prompts (disjoint from the timed ones)
    for p in bf16 fp8; do
        # shellcheck disable=SC2086
        [ -f "$work/$p/manifest.json" ] || timeout -k 15 "$(left)" "$PY" -m zimage_deploy.build --model "$model" \
            --target "$target" --precision "$p" --calib-size "${GPU_RUN_CALIB:-16}" --out "$work/$p" \
            ${GPU_RUN_BUILD_ARGS:-} || { echo "error: the $p build failed or ran out of time"; return 3; }
        "$PY" -c "import json, sys; m = json.load(open(sys.argv[1])); print('build', sys.argv[2], \
m['stages'].get('total_seconds'), 's, graphs:', m.get('export', {}).get('graphs', True), ', gate:', \
(m['stages'].get('quantize', {}).get('quality_gate') or {}).get('min_psnr_db'))" "$work/$p/manifest.json" "$p"
    done
    # each bench stops loading rows and starting rounds at its --deadline-s and keeps what it measured; the bf16
    # one (the diffusers peers) gets 3/5 of what is left, the fp8 one the rest; 90 s each for the stage runs + report
    l=$(left)
    [ "$l" -gt 200 ] || { echo "error: only $l s left for the benchmarks"; return 3; }
    # shellcheck disable=SC2086
    timeout -k 15 "$((l * 3 / 5))" "$PY" -m zimage_deploy.bench --build-dir "$work/bf16" \
        --report "$OUT/gpu/bench-bf16" --deadline-s "$((l * 3 / 5 - 90))" \
        --backends "${GPU_RUN_BACKENDS:-$rows}" \
        --height "$size" --width "$size" --steps "$steps" --repeats 10 ${GPU_RUN_ARGS:-}
    rc=$?
    [ $rc -eq 0 ] || echo "bench bf16 exit status $rc"
    l=$(left)
    [ "$l" -gt 120 ] || { echo "error: only $l s left for the fp8 benchmark"; return 3; }
    # shellcheck disable=SC2086
    timeout -k 15 "$l" "$PY" -m zimage_deploy.bench --build-dir "$work/fp8" --report "$OUT/gpu/bench-fp8" \
        --deadline-s "$((l - 90))" --backends "${GPU_RUN_FP8_BACKENDS:-torch-compiled}" --height "$size" --width "$size" --steps "$steps" \
        --repeats 10 ${GPU_RUN_ARGS:-} || { rc=$?; echo "bench fp8 exit status $rc"; }
    return $rc
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
    "$PY" -c "import modelopt.torch.quantization, modelopt; print('nvidia-modelopt', modelopt.__version__)" 2>&1 \
        | tail -1  # the fp8 build's calibration needs it (carried); a failure shows here and in the build
    if [ -z "${GPU_RUN_LEGACY:-}" ]; then
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
