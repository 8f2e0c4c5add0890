"""Is the HTTP server's memory flat under fuzzing and hostile requests? A benchmark, not a test; loopback only.

`python -m zimage_deploy.serve` is started here on the tiny Turbo and Base fp32 builds (sizes capped at 64 px and
2 steps, background jobs on, `--max-resident 1` so that every switch of model releases one runtime and opens the
other again). Its resident set size (VmRSS, /proc) is read after the warm-up, then after each round of:

1. schemathesis from the server's /openapi.json: every operation, valid and invalid inputs (`--cases` each);
2. hostile requests: malformed JSON, bad base64 and images, oversized declared and streamed bodies, unknown models
   and fields, unknown jobs, a multipart body with too many parts, wrong content types;
3. model switches: requests alternating between the two models (each one a release and a reload).

Flat means: after the first round (allocator pools, caches and lazy imports fill up), later rounds add little.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/serve_fuzz_memory.py [--rounds 5] [--cases 8] [--report F.md]
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import platform
import re
import tempfile
import time
from pathlib import Path

import httpx

from serve_load import Server, proc_stats  # noqa: I001 - a sibling script


def build(name: str, variant: str) -> Path:
    from zimage_deploy import build as build_mod

    out = build_mod.default_out(name, variant, "cpu", "fp32")
    build_mod.build(name, variant, "cpu", "fp32", out, parity=False, log=lambda *_: None)
    return out


def fuzz(url: str, cases: int) -> dict:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    codes: dict[int, int] = {}
    for operation in (r.ok() for r in schema.get_all_operations()):
        for mode in schemathesis.GenerationMode:
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=cases, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def check(case):
                status = case.call(base_url=url, timeout=60).status_code
                codes[status] = codes.get(status, 0) + 1

            try:
                check()
            except Unsatisfiable:
                pass
    return codes


def hostile(url: str) -> dict:
    big = b"{" + b" " * (64 << 20) + b"}"
    png_junk = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 4096).decode()
    many_parts = b"".join(b"--b\r\nContent-Disposition: form-data; name=\"f%d\"\r\n\r\nx\r\n" % i for i in range(5000))
    asks = [
        ("POST", "/v1/generate", dict(content=b"{not json", headers={"content-type": "application/json"})),
        ("POST", "/v1/generate", dict(json={"prompt": "a", "images": ["%%%"]})),
        ("POST", "/v1/generate", dict(json={"prompt": "a", "images": [png_junk], "height": 64, "width": 64})),
        ("POST", "/v1/generate", dict(json={"prompt": "a", "model": "dall-e-3"})),
        ("POST", "/v1/generate", dict(json={"prompt": "a", "height": 4096, "width": 4096})),
        ("POST", "/v1/generate", dict(json={"prompt": "a" * 20000})),
        ("POST", "/v1/generate", dict(json={"prompt": "a", "nonsense": 1})),
        ("POST", "/v1/generate", dict(content=big, headers={"content-type": "application/json"})),
        ("POST", "/v1/generate", dict(content=iter([big[:1 << 20]] * 64), headers={"content-type": "application/json"})),
        ("POST", "/v1/generate", dict(content=b"x", headers={"content-type": "text/plain"})),
        ("POST", "/v1/images/edits", dict(content=many_parts + b"--b--\r\n",
                                          headers={"content-type": "multipart/form-data; boundary=b"})),
        ("POST", "/v1/images/generations", dict(json={"prompt": "a", "response_format": "url"})),
        ("GET", "/v1/jobs/does-not-exist", {}),
        ("DELETE", "/v1/jobs/does-not-exist", {}),
        ("POST", "/v1/jobs", dict(json={"prompt": "a", "steps": 10 ** 9})),
        ("PUT", "/v1/models", {}),
    ]
    codes: dict[int, int] = {}
    with httpx.Client(timeout=60) as client:
        for _ in range(3):
            for method, path, kwargs in asks:
                try:
                    status = client.request(method, url + path, **kwargs).status_code
                except httpx.HTTPError:
                    status = 0  # the server closed the connection on a body it refused
                codes[status] = codes.get(status, 0) + 1
    return codes


def switches(url: str, n: int) -> dict:
    codes: dict[int, int] = {}
    with httpx.Client(timeout=120) as client:
        for i in range(n):
            r = client.post(f"{url}/v1/generate", json={"prompt": "a fox", "model": ("turbo", "base")[i % 2],
                                                       "seed": i, "height": 64, "width": 64, "steps": 1})
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
    return codes


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cases", type=int, default=8, help="schemathesis cases per operation and mode")
    ap.add_argument("--switches", type=int, default=10, help="model switches per round")
    ap.add_argument("--report", type=Path, default=None)
    args = ap.parse_args()
    turbo, base = build("tiny", "turbo"), build("tiny-base", "base")
    jobs = tempfile.mkdtemp(prefix="fuzz-jobs-")
    options = ["--build-dir", f"base={base}", "--max-resident", "1", "--max-side", "64", "--max-steps", "2",
               "--timeout", "30", "--batch-wait-ms", "0", "--jobs-dir", jobs, "--max-jobs", "8"]
    server = Server(f"turbo={turbo}", *options)
    rows = []
    try:
        start = proc_stats(server.proc.pid)
        rows.append({"round": 0, "phase": "after warm-up", **start, "codes": {}})
        for r in range(1, args.rounds + 1):
            for phase, run in (("schemathesis", lambda: fuzz(server.url, args.cases)),
                               ("hostile", lambda: hostile(server.url)),
                               ("switches", lambda: switches(server.url, args.switches))):
                t0 = time.perf_counter()
                codes = run()
                rows.append({"round": r, "phase": phase, "seconds": time.perf_counter() - t0,
                             **proc_stats(server.proc.pid), "codes": codes})
                print(json.dumps(rows[-1]), flush=True)
        metrics = httpx.get(f"{server.url}/metrics").text
        loads = sum(float(v) for v in re.findall(r"^zimage_model_loads_total\{[^}]*\} (\S+)$", metrics, re.M))
    finally:
        server.close()
    ends = [x["rss_mib"] for x in rows if x["phase"] == "switches"]
    lines = [f"# Server memory under fuzzing and hostile requests (CPU, {dt.date.today().isoformat()})", "",
             f"Machine: {platform.machine()}, {platform.python_version()}; tiny Turbo + Base fp32 builds, "
             f"`--max-resident 1`, sizes <= 64 px, <= 2 steps, jobs on; {args.cases} schemathesis cases per "
             f"operation and mode, {args.switches} model switches per round ({loads:.0f} runtime loads after swaps in "
             "`zimage_model_loads_total`).", "",
             "| round | phase | seconds | RSS MiB | peak RSS MiB | statuses |", "|---|---|---|---|---|---|"]
    for x in rows:
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(x["codes"].items()))
        lines.append(f"| {x['round']} | {x['phase']} | {x.get('seconds', 0):.1f} | {x['rss_mib']:.1f} | "
                     f"{x['peak_rss_mib']:.1f} | {codes or '-'} |")
    lines += ["", f"RSS after warm-up {rows[0]['rss_mib']:.1f} MiB; at the end of round 1 {ends[0]:.1f} MiB, of the "
              f"last round {ends[-1]:.1f} MiB: {ends[-1] - ends[0]:+.1f} MiB over {len(ends) - 1} more rounds."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.report:
        args.report.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
