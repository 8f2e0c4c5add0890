"""Real-size builds measured: wall time, peak RSS (whole process tree) and peak disk per build and stage, engine
sizes per component, and the VRAM plan for each target.

    python -m zimage_deploy.realsize --out /data/zimage-real-random
    python benchmarks/realsize_build.py --model /data/zimage-real-random --work /data/rs-builds \
        --report benchmarks/reports/realsize-build-2026-11-26

Each build runs as its own `python -m zimage_deploy.build` process, sampled every `--interval` seconds; the stage
is read from the build's log lines ([export], [quantize], [engines], [plan], [parity]). Build folders are deleted
after they are measured unless `--keep` (the free disk on small machines moves).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

BUILDS = {  # name -> (target, precision, extra build arguments)
    "bf16": ("rtx4090", "bf16", []),
    "fp8": ("rtx4090", "fp8", ["--calib-size", "1", "--calib-side", "256", "--calib-steps", "2",
                               "--no-quality-gate"]),
    "int4": ("rtx4090", "int4", ["--int4-method", "rtn", "--no-quality-gate"]),
    "nvfp4": ("rtx5090", "nvfp4", ["--calib-size", "1", "--calib-side", "256", "--calib-steps", "2",
                                   "--no-quality-gate"]),
    "bf16-drop": ("rtx4090", "bf16", ["--drop-intermediate"]),
    "int4-drop": ("rtx4090", "int4", ["--int4-method", "rtn", "--no-quality-gate", "--drop-intermediate"]),
}
PLAN_TARGETS = ("rtx4090", "rtx5090", "l40s", "h100", "h200", "b200")
# a stage starts with its first log line or progress bar ("export:", "engines (...)", "calibrating ...")
STAGE = re.compile(r"^\[?(checkpoint|export|quantize|calibrat|engines|plan|parity|drop|done)")


def tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """(RSS, anonymous RSS) of the process tree; anonymous = RSS less file-backed and shared pages (page cache a
    memory limit can reclaim: memory-mapped weights, for one)."""
    total = anon = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_info()
        except psutil.Error:
            continue
        total += info.rss
        anon += info.rss - info.shared
    return total, anon


def folder_bytes(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            pass
    return total


def memory_cgroup(limit_gib: float) -> Path:
    """A cgroup-v1 memory cgroup limited to `limit_gib` (what a machine with that much RAM leaves a build: page
    cache is reclaimed under the limit, anonymous memory over it is killed)."""
    cg = Path("/sys/fs/cgroup/memory") / f"zimage-build-{int(limit_gib)}g"
    cg.mkdir(exist_ok=True)
    (cg / "memory.limit_in_bytes").write_text(str(int(limit_gib * 2**30)))
    return cg


def measure(cmd: list[str], out: Path, interval: float, log_path: Path, cgroup: Path | None = None) -> dict:
    """Run `cmd`; sample RSS and `out`'s size; attribute samples to the stage named by the latest log line."""
    t0 = time.perf_counter()
    if cgroup is not None:  # the child enters the cgroup before it execs the build
        cmd = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *cmd]
        (cgroup / "memory.max_usage_in_bytes").write_text("0")
        (cgroup / "memory.failcnt").write_text("0")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ps = psutil.Process(proc.pid)
    state = {"stage": "checkpoint"}
    stages: dict[str, dict] = {}

    def reader():
        with open(log_path, "wb") as log:
            buf = b""
            for chunk in iter(lambda: proc.stdout.read1(1 << 16), b""):
                log.write(chunk)
                buf += chunk
                *lines, buf = re.split(rb"[\r\n]", buf)
                for line in lines:
                    m = STAGE.match(line.decode(errors="replace").strip())
                    if m:
                        state["stage"] = {"calibrat": "quantize", "drop": state["stage"]}.get(m.group(1), m.group(1))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    peak_rss = peak_anon = peak_disk = 0
    while proc.poll() is None:
        (rss, anon), disk = tree_rss(ps), folder_bytes(out) if out.exists() else 0
        now = time.perf_counter() - t0
        s = stages.setdefault(state["stage"], {"start_s": now, "end_s": now, "peak_rss": 0, "peak_anon": 0,
                                               "peak_disk": 0})
        s["end_s"] = now
        s["peak_rss"], s["peak_anon"] = max(s["peak_rss"], rss), max(s["peak_anon"], anon)
        s["peak_disk"] = max(s["peak_disk"], disk)
        peak_rss, peak_anon, peak_disk = max(peak_rss, rss), max(peak_anon, anon), max(peak_disk, disk)
        time.sleep(interval)
    thread.join()
    return {"returncode": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1), "peak_rss": peak_rss,
            "peak_anon": peak_anon, "peak_disk": peak_disk,
            "final_disk": folder_bytes(out) if out.exists() else 0, "stages": stages}


def plans(precision: str) -> dict:
    from zimage_deploy.plan import make_plan

    table = {}
    for target in PLAN_TARGETS:
        try:
            p = make_plan(target, precision)
        except Exception as e:  # noqa: BLE001 - precision not on this target
            table[target] = {"error": str(e)}
            continue
        table[target] = {"mode": p.mode, "needs_gib": {m: round(b / 2**30, 2) for m, b in p.modes.items()},
                         "floor_s": round(p.floor_seconds["total"], 3), "memory_gib": round(p.memory / 2**30, 1)}
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a real-size checkpoint (python -m zimage_deploy.realsize)")
    ap.add_argument("--work", type=Path, required=True, help="folder for the build folders")
    ap.add_argument("--builds", default=",".join(BUILDS), help="comma-separated, from: " + ", ".join(BUILDS))
    ap.add_argument("--report", type=Path, required=True, help="report path without suffix (.json and .md)")
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--keep", action="store_true", help="keep the build folders")
    ap.add_argument("--memory-limit-gib", type=float, default=None,
                    help="run each build in a cgroup-v1 memory cgroup of this size (root, Linux)")
    args = ap.parse_args(argv)
    report_json = args.report.with_suffix(".json")
    result = json.loads(report_json.read_text()) if report_json.is_file() else {"builds": {}}
    result.update(date=dt.date.today().isoformat(), machine={
        "cpu": platform.processor() or platform.machine(), "cores": psutil.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "gpu": "none", "python": platform.python_version()})
    import tensorrt_rtx
    import torch

    result["versions"] = {"torch": torch.__version__, "tensorrt_rtx": tensorrt_rtx.__version__}
    for name in args.builds.split(","):
        target, precision, extra = BUILDS[name]
        out = args.work / f"build-{name}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "zimage_deploy.build", "--model", args.model, "--target", target,
               "--precision", precision, "--out", str(out), "--skip-parity", *extra]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        cgroup = memory_cgroup(args.memory_limit_gib) if args.memory_limit_gib else None
        row = measure(cmd, out, args.interval, args.work / f"build-{name}.log", cgroup)
        if cgroup is not None:
            row["memory_limit_gib"] = args.memory_limit_gib
            row["cgroup_max_usage_gib"] = round(int((cgroup / "memory.max_usage_in_bytes").read_text()) / 2**30, 2)
            row["cgroup_limit_hits"] = int((cgroup / "memory.failcnt").read_text())
        row.update(command=" ".join(["python", *cmd[1:]]), target=target, precision=precision)
        if (out / "manifest.json").is_file():
            manifest = json.loads((out / "manifest.json").read_text())
            row["manifest_stages"] = manifest.get("stages")
            row["runtime"] = manifest.get("runtime")
            row["components"] = {
                c: {"onnx_bytes": e.get("bytes"), "weight_bytes": e.get("weight_bytes"),
                    "engine_bytes": (e.get("engine") or {}).get("bytes"),
                    "engine_seconds": (e.get("engine") or {}).get("build_seconds"),
                    "stripped": (e.get("engine") or {}).get("stripped")}
                for c, e in manifest["components"].items()}
        row["plans"] = plans(precision)
        result["builds"][name] = row
        report_json.parent.mkdir(parents=True, exist_ok=True)
        report_json.write_text(json.dumps(result, indent=2) + "\n")
        args.report.with_suffix(".md").write_text(markdown(result))
        print(f"   rc {row['returncode']}, {row['wall_s']} s, peak RSS {row['peak_rss'] / 2**30:.2f} GiB "
              f"(anonymous {row['peak_anon'] / 2**30:.2f}), "
              f"peak disk {row['peak_disk'] / 2**30:.2f} GiB", flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    return 0


def markdown(result: dict) -> str:
    g = lambda b: "-" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
    m = result["machine"]
    lines = [f"# Real-size builds ({result['date']}, {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, no GPU)",
             "", f"Random weights of the real Z-Image-Turbo configs (6.15B DiT, Qwen3-4B, Flux VAE); versions "
             f"{result['versions']}. Peak RSS: the build's whole process tree, sampled each second; peak disk: the "
             "build folder. Reduced calibration on this CPU (1 prompt, 256², 2 steps); quality gate and parity "
             "skipped (real-size numerics are checked by the tests on reduced-depth real-width checkpoints).", "",
             "| build | command | rc | wall s | memory limit GiB | peak RSS GiB | peak anonymous GiB | peak disk GiB "
             "| final disk GiB | runtime mode |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["builds"].items():
        mode = (r.get("runtime") or {}).get("mode", "-")
        lines.append(f"| {name} | `{r['command']}` | {r['returncode']} | {r['wall_s']} | "
                     f"{r.get('memory_limit_gib') or 'none'} | {g(r['peak_rss'])} | {g(r.get('peak_anon'))} | "
                     f"{g(r['peak_disk'])} | {g(r['final_disk'])} | {mode} |")
    lines += ["", "Per stage (from the build's log lines; a stage's samples run until the next stage's first line):", "",
              "| build | stage | seconds | peak RSS GiB | peak anonymous GiB | peak disk GiB |", "|---|---|---|---|---|---|"]
    for name, r in result["builds"].items():
        for stage, s in r["stages"].items():
            lines.append(f"| {name} | {stage} | {s['end_s'] - s['start_s']:.0f} | {g(s['peak_rss'])} | "
                         f"{g(s.get('peak_anon'))} | {g(s['peak_disk'])} |")
    lines += ["", "| build | component | graph GiB | weights GiB | engine GiB | engine build s |", "|---|---|---|---|---|---|"]
    for name, r in result["builds"].items():
        for c, e in (r.get("components") or {}).items():
            lines.append(f"| {name} | {c} | {g(e['onnx_bytes'])} | {g(e['weight_bytes'])} | {g(e['engine_bytes'])} | "
                         f"{e['engine_seconds'] if e['engine_seconds'] is not None else '-'} |")
    lines += ["", "VRAM plan at 1024², 8 steps (python -m zimage_deploy.plan; config-computed weights):", "",
              "| build | target | mode | all-resident GiB | low-vram GiB | card GiB | floor s |", "|---|---|---|---|---|---|---|"]
    for name, r in result["builds"].items():
        for target, p in r["plans"].items():
            if "error" in p:
                continue
            lines.append(f"| {name} | {target} | {p['mode']} | {p['needs_gib']['all-resident']} | "
                         f"{p['needs_gib']['low-vram']} | {p['memory_gib']} | {p['floor_s']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
