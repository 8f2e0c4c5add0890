#!/usr/bin/env bash
# Here, before a GPU session's one device call: download the wheels the lent H100/H200 lacks into .whl/, which git
# ignores through .git/info/exclude and the device call carries (`carry: [".whl"]`). Then, in ONE device call:
#     bash benchmarks/gpu_run.sh          (timeout_s 600; see that script)
#
# What the machine lacks: its image (Python 3.12, torch 2.11 + CUDA 13) has transformers, tokenizers,
# huggingface_hub, safetensors, onnx, onnxruntime, pillow, numpy, tqdm, jinja2, regex, requests, filelock, zipp
# (the device README's package list), but not diffusers (nor torchao, for bench's diffusers-fp8 peer row: 3.4 MB),
# nor nvidia-modelopt (the fp8 build's calibration: 2.2 MB) and what it imports that the image lacks: pulp (4.2.0,
# 0.7 MB: its solvers are a separate package since 4.0; modelopt calls it only in its LP search), omegaconf,
# pydantic + pydantic-core, annotated-types, typing-inspection (the versions this project's venv runs).
# diffusers' other need, importlib_metadata, is imported only on Python < 3.8, so those two are carried. The
# working tree plus the wheels must stay under the
# device call's 64 MiB: checked below.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 torchao==0.18.0 nvidia-modelopt==0.47.0 pulp==4.2.0 omegaconf==2.4.0 pydantic==2.14.4 \
    pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
ls -la .whl
# what travels: tracked and untracked-not-ignored files, plus the carried .whl
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
whl_bytes=$(du -cb .whl | tail -1 | cut -f1)
total=$((tree_bytes + whl_bytes))
echo "working tree $((tree_bytes / 1024)) KiB + wheels $((whl_bytes / 1024)) KiB = $((total / 1024 / 1024)) MiB (limit 64)"
if [ "$total" -gt $((60 * 1024 * 1024)) ]; then
    echo "error: over 60 MiB: the device call would refuse it (limit 64 MiB); remove large untracked files" >&2
    exit 1
fi
