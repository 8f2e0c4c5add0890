"""Cold vs warm start of the compiled Torch runtime: the same request in two fresh processes sharing one compile
cache folder (runtime/torch_fast.py `compile_cache_dir`), the first with the folder empty.

    python benchmarks/compile_cache.py --build-dir BUILD [--size 64] [--steps 2] [--out report.json]

Per process: the runtime's opening, the first request (compilation or cache reads, plus the run) and a second request
(steady state), in seconds, and dynamo's counters. The cache folder is a fresh temporary one unless --cache-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from zimage_deploy.runtime.api import ZImageRuntime
from zimage_deploy.runtime.torch_fast import compile_counters
build, size, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rt = ZImageRuntime(build, backend="torch", torch_mode="compiled")
t1 = time.perf_counter()
rt.generate("a lighthouse at dusk", seed=0, steps=steps, height=size, width=size)
t2 = time.perf_counter()
rt.generate("a lighthouse at dusk", seed=1, steps=steps, height=size, width=size)
t3 = time.perf_counter()
c = compile_counters()
print(json.dumps({"open_s": t1 - t0, "first_request_s": t2 - t1, "second_request_s": t3 - t2,
                  "fallbacks": rt.fallbacks(), "unique_graphs": c["unique_graphs"]}))
"""


def run_once(build: str, size: int, steps: int, cache: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, build, str(size), str(steps)], capture_output=True, text=True,
                       env=env, check=True)
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build-dir", required=True)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    cache = args.cache_dir or tempfile.mkdtemp(prefix="zimage-compile-cache-")
    result = {"build_dir": args.build_dir, "size": args.size, "steps": args.steps, "cache_dir": cache,
              "cold": run_once(args.build_dir, args.size, args.steps, cache),
              "warm": run_once(args.build_dir, args.size, args.steps, cache)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
