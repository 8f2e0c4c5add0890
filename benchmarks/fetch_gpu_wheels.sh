#!/usr/bin/env bash
# Here, before a GPU session: download the wheels the lent H100/H200 lacks (Python 3.12 there) into .whl/,
# which git ignores through .git/info/exclude and the device call carries (`carry: [".whl"]`).
# Then, on the device: bash benchmarks/gpu_run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 importlib_metadata zipp
ls -la .whl
