"""Load and hostile-client benchmark of the HTTP server on loopback, against `python -m zimage_deploy.serve`
started here on the tiny Turbo fp32 build. A benchmark, not a test; loopback only.

1. load: N requests, C at a time: status counts, throughput, latency percentiles of the 200s and of the 429s,
   images per runtime call (from /metrics), the server's peak RSS.
2. timeouts: K maximum-size 100-step requests with a short --timeout: the server's CPU seconds burned after the
   last 504 (work that was not cancelled keeps burning), and whether the slots were freed.
3. hostile bodies: a 1536x1536 PNG for img2img, a 64 MB chunked body, a 64 MB declared Content-Length: status,
   time to the answer and the server's RSS growth.
4. optional (--ray-replicas N): the same load against the Ray Serve app; how many replicas answered.

    .venv/bin/python benchmarks/serve_load.py [--requests 200] [--concurrency 16] [--max-queue 64,8] [--report F]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import io
import os
import platform
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from zimage_deploy import build as build_mod

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_stats(pid: int) -> dict:
    """CPU seconds (user + system), current and peak RSS (MiB) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    status = Path(f"/proc/{pid}/status").read_text()
    kib = {k: int(v) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M)}
    return {"cpu_s": (int(fields[11]) + int(fields[12])) / TICK, "rss_mib": kib["VmRSS"] / 1024,
            "peak_rss_mib": kib["VmHWM"] / 1024}


class Server:
    def __init__(self, engine_dir: Path, *options: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "zimage_deploy.serve", "--engine-dir", str(engine_dir),
                                      "--port", str(self.port), *options],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 180
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"server did not start: {self.proc.stderr.read()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise SystemExit("server did not become ready")
            time.sleep(0.1)

    def stats(self) -> dict:
        return proc_stats(self.proc.pid)

    def metric(self, name: str) -> float:
        m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", httpx.get(f"{self.url}/metrics").text, re.M)
        return float(m.group(1)) if m else float("nan")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(p / 100 * len(values))) - 1))]


def load(url: str, requests: int, concurrency: int, size: int, steps: int) -> dict:
    local = threading.local()  # one keep-alive client per thread: the client's own CPU stays small

    def one(i):
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=300)
        t0 = time.perf_counter()
        r = local.client.post(f"{url}/v1/generate", json={
            "prompt": f"a red fox number {i}", "seed": i, "height": size, "width": size, "steps": steps})
        body = r.json()
        return r.status_code, time.perf_counter() - t0, body.get("replica")

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as ex:
        results = list(ex.map(one, range(requests)))
    wall = time.perf_counter() - t0
    codes = {c: sum(1 for r in results if r[0] == c) for c in sorted({r[0] for r in results})}
    ok = [t for c, t, _ in results if c == 200]
    busy = [t for c, t, _ in results if c == 429]
    return {"codes": codes, "wall": wall, "served_per_s": len(ok) / wall, "p50": pct(ok, 50), "p90": pct(ok, 90),
            "p99": pct(ok, 99), "busy_p50": pct(busy, 50), "busy_p99": pct(busy, 99), "busy_max": max(busy or [0]),
            "replicas": len({r for _, _, r in results if r})}


def timeouts(engine_dir: Path, k: int) -> dict:
    """K long requests that time out after 1 s: CPU burned by the server after the last 504."""
    server = Server(engine_dir, "--timeout", "1", "--max-queue", str(k + 1))
    try:
        body = {"prompt": "a slow one", "height": 512, "width": 512, "steps": 100}
        with cf.ThreadPoolExecutor(k) as ex:
            codes = list(ex.map(lambda i: httpx.post(f"{server.url}/v1/generate", json={**body, "seed": i},
                                                     timeout=300).status_code, range(k)))
        at_last = server.stats()["cpu_s"]
        live = httpx.get(f"{server.url}/health").json()["live_requests"]
        time.sleep(5)
        after = server.stats()["cpu_s"]
        cancelled = server.metric("zimage_cancelled_batches_total")
        return {"codes": {c: codes.count(c) for c in set(codes)}, "cpu_after_s": after - at_last,
                "live_after": live, "cancelled": cancelled}
    finally:
        server.close()


def busy_probe(engine_dir: Path, probes: int = 300) -> dict:
    """--max-queue 1 with one long request running: `probes` sequential requests on one keep-alive connection,
    each answered 429; their round trips (the server's own 429 latency while its runtime works)."""
    server = Server(engine_dir, "--max-queue", "1", "--timeout", "300")
    try:
        with cf.ThreadPoolExecutor(1) as ex:
            ex.submit(httpx.post, f"{server.url}/v1/generate", timeout=300,
                      json={"prompt": "a slow one", "height": 512, "width": 512, "steps": 100})
            while httpx.get(f"{server.url}/health").json()["live_requests"] < 1:
                time.sleep(0.01)
            times, codes = [], []
            with httpx.Client() as client:
                for _ in range(probes):
                    t0 = time.perf_counter()
                    codes.append(client.post(f"{server.url}/v1/generate", json={"prompt": "b"}).status_code)
                    times.append(time.perf_counter() - t0)
            server.proc.terminate()  # ends the long request too
        return {"codes": {c: codes.count(c) for c in set(codes)}, "p50": pct(times, 50), "p99": pct(times, 99),
                "max": max(times)}
    finally:
        server.close()


def _raw(port: int, head: bytes, body_chunks, limit_bytes: int) -> tuple[str, int, float]:
    """Send a request (stopping at `limit_bytes` of body or when the server closes); -> status line, body
    bytes sent, seconds to the answer."""
    t0 = time.perf_counter()
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head)
        sock.settimeout(0.0)
        for chunk in body_chunks:
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break  # the server answered early
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                break
            try:
                sock.settimeout(60)
                sock.sendall(chunk)
                sock.settimeout(0.0)
            except OSError:
                break
            sent += len(chunk)
            if sent >= limit_bytes:
                break
        sock.settimeout(60)
        try:
            answer = sock.recv(4096)
        except OSError:
            answer = b""
    return answer.split(b"\r\n", 1)[0].decode(errors="replace"), sent, time.perf_counter() - t0


def hostile(server: Server) -> list[tuple[str, str, str, float]]:
    from PIL import Image

    rows = []
    buf = io.BytesIO()
    Image.new("RGB", (1536, 1536), (90, 120, 30)).save(buf, format="PNG")
    before = server.stats()["rss_mib"]
    t0 = time.perf_counter()
    r = httpx.post(f"{server.url}/v1/generate", data={"request": '{"prompt": "a field"}'},
                   files={"image": ("big.png", buf.getvalue(), "image/png")}, timeout=120)
    rows.append((f"img2img with a 1536x1536 PNG ({len(buf.getvalue()) // 1024} KiB)", str(r.status_code),
                 f"{(time.perf_counter() - t0) * 1000:.0f} ms", server.stats()["rss_mib"] - before))
    chunk = b"x" * (1 << 16)
    head = (b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    before = server.stats()["rss_mib"]
    status, sent, secs = _raw(server.port, head, (b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(1024)),
                              64 << 20)
    rows.append((f"64 MiB chunked body (sent {sent / 2**20:.1f} MiB before the answer)", status,
                 f"{secs * 1000:.0f} ms", server.stats()["rss_mib"] - before))
    head = (b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 67108864\r\n\r\n")
    before = server.stats()["rss_mib"]
    status, sent, secs = _raw(server.port, head, (chunk for _ in range(1024)), 64 << 20)
    rows.append((f"64 MiB Content-Length (sent {sent / 2**20:.1f} MiB before the answer)", status,
                 f"{secs * 1000:.0f} ms", server.stats()["rss_mib"] - before))
    return rows


def ray_load(engine_dir: Path, replicas: int, requests: int, concurrency: int, size: int, steps: int) -> dict:
    import ray
    from ray import serve

    from zimage_deploy.serve.ray_app import deployment

    ray.init(num_cpus=max(2, replicas), include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(str(engine_dir), replicas=replicas), route_prefix="/")
        return load(f"http://127.0.0.1:{port}", requests, concurrency, size, steps)
    finally:
        serve.shutdown()
        ray.shutdown()


def versions() -> str:
    from importlib.metadata import version

    names = ("torch", "onnxruntime", "fastapi", "uvicorn", "starlette")
    return ", ".join(f"{n} {version(n)}" for n in names)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-queue", default="64,8", help="one load row per value (comma-separated)")
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--timeouts", type=int, default=8, help="long requests for the timeout phase (0: skip)")
    ap.add_argument("--ray-replicas", type=int, default=0)
    ap.add_argument("--report", type=Path, default=None, help="write the Markdown report here too")
    args = ap.parse_args()
    out = build_mod.default_out("tiny", "turbo", "cpu", "fp32")
    build_mod.build("tiny", "turbo", "cpu", "fp32", out, parity=False, log=lambda *_: None)

    lines = ["# HTTP server load and hostile clients, tiny Turbo fp32 (ONNX Runtime), loopback\n",
             f"Date {dt.date.today()}, {platform.machine()} with {os.cpu_count()} CPU cores (load average "
             f"{os.getloadavg()[0]:.1f} at the start: other work shares them), Python {platform.python_version()}, "
             f"{versions()}. The client runs on the same cores.\n"]
    lines += [f"## Load: {args.requests} requests, {args.concurrency} concurrent (keep-alive clients), "
              f"{args.size}x{args.size}, {args.steps} steps, --max-batch {args.max_batch}\n",
              "| --max-queue | status counts | served/s | 200: p50 / p90 / p99 s | 429: p50 / p99 / max ms | images "
              "per runtime call | server peak RSS MiB | server CPU s |", "|---|---|---|---|---|---|---|---|"]
    queues = [int(q) for q in args.max_queue.split(",")]
    for i, q in enumerate(queues):
        server = Server(out, "--max-queue", str(q), "--max-batch", str(args.max_batch))
        try:
            res = load(server.url, args.requests, args.concurrency, args.size, args.steps)
            st = server.stats()
            images = server.metric("zimage_batch_size_sum") / max(1.0, server.metric("zimage_batch_size_count"))
            lines.append(f"| {q} | {res['codes']} | {res['served_per_s']:.1f} | {res['p50']:.3f} / {res['p90']:.3f} "
                         f"/ {res['p99']:.3f} | {res['busy_p50'] * 1000:.1f} / {res['busy_p99'] * 1000:.1f} / "
                         f"{res['busy_max'] * 1000:.1f} | {images:.2f} | {st['peak_rss_mib']:.0f} | "
                         f"{st['cpu_s']:.1f} |")
            if i == len(queues) - 1:
                rows = hostile(server)
                lines += ["\n## Hostile bodies (the last server above)\n",
                          "| request | status | answered after | server RSS growth MiB |", "|---|---|---|---|"]
                lines += [f"| {a} | {b} | {c} | {d:+.1f} |" for a, b, c, d in rows]
                lines.append(f"\nServer peak RSS after all of the above: {server.stats()['peak_rss_mib']:.0f} MiB.\n")
        finally:
            server.close()
    probe = busy_probe(out)
    lines += ["## 429 round trips while the runtime works (--max-queue 1, one 512x512 100-step request running, "
              "300 sequential requests on one keep-alive connection)\n", "| status counts | p50 ms | p99 ms | max ms |",
              "|---|---|---|---|", f"| {probe['codes']} | {probe['p50'] * 1000:.1f} | {probe['p99'] * 1000:.1f} | "
              f"{probe['max'] * 1000:.1f} |\n"]
    if args.timeouts:
        t = timeouts(out, args.timeouts)
        lines += [f"## Timeouts: {args.timeouts} concurrent 512x512 100-step requests, --timeout 1\n",
                  "| status counts | live requests right after | cancelled runtime calls | server CPU s burned in the "
                  "5 s after the last 504 |", "|---|---|---|---|",
                  f"| {t['codes']} | {t['live_after']} | {t['cancelled']:.0f} | {t['cpu_after_s']:.2f} |\n"]
    if args.ray_replicas:
        r = ray_load(out, args.ray_replicas, args.requests, args.concurrency, args.size, args.steps)
        lines += [f"## Ray Serve, {args.ray_replicas} replicas, same load\n",
                  "| status counts | served/s | p50 / p99 s | replicas that answered |", "|---|---|---|---|",
                  f"| {r['codes']} | {r['served_per_s']:.1f} | {r['p50']:.3f} / {r['p99']:.3f} | {r['replicas']} |\n"]
    text = "\n".join(lines)
    print(text)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        from zimage_deploy.fsutil import atomic_file

        with atomic_file(args.report) as tmp:
            tmp.write_text(text)


if __name__ == "__main__":
    main()
