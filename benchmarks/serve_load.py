"""Load test of the HTTP server on loopback: N requests, C at a time, against `python -m zimage_deploy.serve`
started here on the tiny build. Reports status counts, throughput and latency percentiles. A benchmark,
not a test; loopback only.

    .venv/bin/python benchmarks/serve_load.py [--requests 200] [--concurrency 16] [--max-queue 64] [--size 64]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

from zimage_deploy import build as build_mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    out = build_mod.default_out("tiny", "turbo", "cpu", "fp32")
    build_mod.build("tiny", "turbo", "cpu", "fp32", out, parity=False, log=lambda *_: None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "zimage_deploy.serve", "--engine-dir", str(out), "--port",
                               str(port), "--max-queue", str(args.max_queue), "--max-batch", str(args.max_batch)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)

        def one(i):
            t0 = time.perf_counter()
            r = httpx.post(f"{url}/v1/generate", timeout=300, json={
                "prompt": f"a red fox number {i}", "seed": i, "height": args.size, "width": args.size,
                "steps": args.steps})
            return r.status_code, time.perf_counter() - t0, r.json().get("batch_size")

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(args.concurrency) as ex:
            results = list(ex.map(one, range(args.requests)))
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=30)
    ok = sorted(t for c, t, _ in results if c == 200)
    codes = {c: sum(1 for r in results if r[0] == c) for c in sorted({r[0] for r in results})}
    pct = lambda p: ok[min(len(ok) - 1, int(round(p / 100 * len(ok))) - 1)] if ok else float("nan")  # noqa: E731
    batches = [b for c, _, b in results if c == 200]
    print(f"# HTTP server load test, tiny Turbo fp32 (ONNX Runtime), {args.size}x{args.size}, {args.steps} steps\n")
    print(f"Date {dt.date.today()}, {os.cpu_count()} CPU cores, loopback. {args.requests} requests, "
          f"{args.concurrency} concurrent, max queue {args.max_queue}, max batch {args.max_batch}.\n")
    print("| answered | status counts | served/s | p50 s | p90 s | p99 s | mean batch |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {len(results)}/{args.requests} | {codes} | {len(ok) / wall:.1f} | {pct(50):.3f} | {pct(90):.3f} | "
          f"{pct(99):.3f} | {statistics.mean(batches):.2f} |")


if __name__ == "__main__":
    main()
