"""`python -m zimage_deploy.bench --engine-dir DIR --report OUT`: one request on several backends, side by side
with diffusers, in one process.

Backends: `diffusers` (eager: the reference users start from), `diffusers-compile` (its repeated blocks and VAE
decoder under torch.compile, dynamic=False, `--diffusers-attention` its attention backend), `diffusers-fp8` (the
same after torchao float8 quantization of its DiT), our `torch` backend in its default mode for the device
(`torch-eager`, `torch-compiled`: the mode named; compiled: compiled blocks, a CUDA graph per step, an fp8 build's
DiT through FP8 matmuls), `onnxruntime`, `tensorrt`. Method (`bench_rows`): every row loads and runs the same
warm-ups (`--warmups` runs of every prompt), then `--repeats` rounds time one run of each row, the rows interleaved
(order rotated per round), the prompts (`--prompt`, repeatable; default short, long and Chinese) taken in turn;
every run is stored; timed runs carry no stage timers (no syncs inside), the stage split comes from one separate
run per row. The JSON records the command line, the git commit, and the GPU's clocks, temperature and power before
and after. Per stage (text encoder + prompt-only DiT part, DiT all steps and per step, VAE decode) and end to end:
median and p90 latency,
images/s, peak memory (GPU: allocator peak, and NVML when pynvml is there; CPU: process peak RSS), DiT FLOPs
per step, achieved TFLOP/s and its ratio to a matmul peak measured on the same device. Every backend's image is
compared with diffusers' (max abs difference, 0-255). Writes report.json, report.md and report.png.

A ControlNet build runs with a control image (`--control-image`, default a synthetic line drawing at the output
size; diffusers: `ZImageControlNetPipeline`), and the ControlNet graph's time per step (its share of the DiT's)
gets its own column.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from . import manifest as manifest_io
from .buildfolder import BuildFolder
from .cli import add_build_dir, run_cli
from .errors import UserError
from .runtime.backends import REGISTRY, make_backend
from .variants import is_omni

DIFFUSERS = ("diffusers", "diffusers-compile", "diffusers-fp8")
# ours: every registered backend, and one row per compile mode where it has them (torch-eager, torch-compiled)
OURS = tuple(row for name, entry in REGISTRY.items()
             for row in (name, *(f"{name}-{mode}" for mode in entry.abilities.compile_modes)))
BACKENDS = DIFFUSERS + OURS
# timed prompts: short, long, Chinese (none of them among the shipped calibration prompts: checked in the report)
PROMPTS = ("a red fox in the snow, watercolor",
           "a weathered lighthouse on a rocky cliff at dusk, waves crashing below, warm light in the lantern room, "
           "seagulls circling, long exposure clouds, cinematic wide shot, highly detailed, golden hour palette, "
           "35mm film grain, dramatic sky with streaks of orange and violet",
           "一只橘猫坐在窗台上，午后阳光，电影感，高细节")


# -- measuring ----------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Peak:
    """Peak memory over a block: GPU allocator (and NVML) on CUDA, process RSS high-water mark on the CPU."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        else:
            try:  # reset VmHWM (Linux): the peak then covers this block only
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        self.result = {}
        if self.device.startswith("cuda"):
            self.result["gpu_allocator_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            try:
                import pynvml

                pynvml.nvmlInit()
                handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
                self.result["nvml_used_gib"] = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30
            except Exception:  # noqa: BLE001 - NVML is optional
                pass
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.result["cpu_peak_rss_gib"] = int(line.split()[1]) / 2**20
        except OSError:
            pass


def matmul_peak_tflops(device: str, dtype: torch.dtype, n: int | None = None) -> float:
    """Measured dense matmul throughput on this device and dtype (the denominator of the utilisation ratio)."""
    n = n or (8192 if device.startswith("cuda") else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    reps = 10 if device.startswith("cuda") else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def summarize(times: list[float]) -> dict:
    ordered = sorted(times)
    return {"median_s": statistics.median(times), "p90_s": ordered[max(0, int(round(0.9 * len(times))) - 1)],
            "runs": len(times)}


# -- the backends -------------------------------------------------------------------------------------------
class StageTimer:
    """Wraps modules' forwards to add up their time per stage (diffusers' pipeline has no timing hooks). It syncs
    only while `active` (the separate stage runs); timed runs go straight through."""

    def __init__(self, device: str):
        self.device, self.times, self.active = device, {}, False

    def wrap(self, module, stage: str, method: str = "forward"):
        original = getattr(module, method)

        def timed(*args, **kwargs):
            if not self.active:
                return original(*args, **kwargs)
            sync(self.device)
            t0 = time.perf_counter()
            out = original(*args, **kwargs)
            sync(self.device)
            self.times[stage] = self.times.get(stage, 0.0) + time.perf_counter() - t0
            return out

        setattr(module, method, timed)


def control_image(req: dict):
    """The request's control image (a ControlNet build's benchmark), or None."""
    if req.get("control_image") is None:
        return None
    from PIL import Image

    if req["control_image"] == "synthetic":
        from .controlnet import line_drawing

        return line_drawing(req["width"], req["height"], req["seed"])
    return Image.open(req["control_image"]).convert("RGB")


def diffusers_controlnet(manifest: dict, dtype: torch.dtype):
    """diffusers' ZImageControlNetModel for the build's ControlNet (a folder as saved, a single file from its
    recorded config and its own keys)."""
    from diffusers import ZImageControlNetModel

    from .controlnet import ControlNetSource

    src = ControlNetSource.from_record(manifest["controlnet"])
    if src.origin != "single file":
        return ZImageControlNetModel.from_pretrained(src.path, dtype=dtype)
    cfg = src.config
    model = ZImageControlNetModel(
        control_layers_places=list(cfg.control_layers_places),
        control_refiner_layers_places=list(cfg.control_refiner_layers_places), control_in_dim=cfg.control_in_dim,
        add_control_noise_refiner=cfg.add_control_noise_refiner, all_patch_size=(cfg.patch_size,), dim=cfg.dim,
        n_refiner_layers=cfg.n_refiner_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads, norm_eps=cfg.norm_eps,
        qk_norm=cfg.qk_norm)
    model.load_state_dict(dict(src.raw_items()))
    return model.to(dtype)


def compile_diffusers(pipe, fp8: bool = False, attention: str | None = None) -> dict:
    """diffusers' best compiled setup: its attention backend (`attention`, e.g. "_native_cudnn"; None: its
    default), torchao float8 (dynamic activations, per-row scales) when `fp8`, the DiT's repeated blocks compiled
    with dynamic=False (fullgraph), the VAE decoder compiled -> what was set."""
    done = {}
    if attention:
        pipe.transformer.set_attention_backend(attention)
        done["attention_backend"] = attention
    if fp8:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        quantize_(pipe.transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        done["torchao"] = __import__("torchao").__version__
    pipe.transformer.compile_repeated_blocks(fullgraph=True, dynamic=False)
    pipe.vae.decoder.compile(dynamic=False)
    return {**done, "compile": "repeated blocks (fullgraph) + VAE decoder, dynamic=False"}


def diffusers_runner(ckpt: Path, device: str, dtype: torch.dtype, compiled: bool, manifest: dict | None = None,
                     fp8: bool = False, attention: str | None = None):
    from diffusers import ZImageControlNetPipeline, ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(ckpt, dtype=dtype)
    control = (manifest or {}).get("controlnet")
    if control:
        pipe = ZImageControlNetPipeline(**{k: v for k, v in pipe.components.items() if k != "controlnet"},
                                        controlnet=diffusers_controlnet(manifest, dtype))
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if compiled:
        compile_diffusers(pipe, fp8, attention)
    timer = StageTimer(device)
    timer.wrap(pipe.text_encoder, "encode")
    timer.wrap(pipe.transformer, "denoise")
    if control:
        timer.wrap(pipe.controlnet, "controlnet")
    timer.wrap(pipe.vae, "decode", "decode")

    def run(req, stages: bool = False):
        timer.times, timer.active = {}, stages
        g = torch.Generator("cpu").manual_seed(req["seed"])
        extra = dict(control_image=control_image(req), controlnet_conditioning_scale=req["controlnet_scale"]) \
            if control else {}
        image = pipe(req["prompt"], height=req["height"], width=req["width"], num_inference_steps=req["steps"],
                     guidance_scale=req["guidance_scale"], generator=g, **extra).images[0]
        times = dict(timer.times)
        if "controlnet" in times:  # the DiT's time in our runtime's terms: hints + transformer
            times["denoise"] = times.get("denoise", 0.0) + times["controlnet"]
        return image, times

    return run


def ours_runner(engine_dir: Path, backend: str, device: str):
    """Our pipeline on the row's backend (NAME, or NAME-MODE: one of its compile modes), in the build's planned
    memory mode; `device` goes to the backends that choose theirs (Torch)."""
    from .runtime.pipeline import Pipeline

    manifest = manifest_io.load(engine_dir)
    name, _, mode = backend.partition("-")
    be = make_backend(name, engine_dir, manifest, torch_mode=mode or None, device=device)
    pipe = Pipeline(engine_dir, be)

    def run(req, stages: bool = False):
        timings: dict | None = {} if stages else None  # stage timers sync: only on the stage runs
        extra = dict(control_image=control_image(req), controlnet_scale=req["controlnet_scale"]) \
            if req.get("control_image") else {}
        image = pipe(req["prompt"], req["height"], req["width"], req["steps"], req["seed"],
                     guidance_scale=req["guidance_scale"], progress=False, timings=timings, **extra)[0]
        return image, timings or {}

    run.backend = be
    return run


def timed_run(run, req: dict, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    run(req)
    sync(device)
    return time.perf_counter() - t0


def bench_rows(makers: dict, names: list[str], req: dict, repeats: int, warmups: int, device: str,
               deadline: float | None = None) -> list[dict]:
    """Every row loaded and warmed up alike (`warmups` runs of every prompt), then `repeats` rounds of timed runs,
    the rows interleaved (their order rotated each round), each round one prompt of the list in turn; every run is
    stored. Stage splits come from one separate run per row with the stage timers on (they sync), never from the
    timed runs. `deadline` (time.perf_counter): no row is loaded and no round started after it (the report says
    so): a one-shot run on a lent machine keeps what it measured."""
    prompts = req["prompts"]
    runners, rows = {}, {}
    late = lambda: deadline is not None and time.perf_counter() > deadline  # noqa: E731
    for name in tqdm(names, desc="loading + warm-up", unit="backend"):
        if late():
            rows[name] = {"name": name, "skipped": "deadline: not loaded (--deadline-s)"}
            continue
        try:
            with Peak(device) as peak:
                run = makers[name]()
                for _ in range(warmups):
                    for p in prompts:
                        run({**req, "prompt": p})
            runners[name] = run
            rows[name] = {"name": name, "memory": peak.result, "runs": []}
        except Exception as e:  # noqa: BLE001 - a backend that cannot run here is reported, not fatal
            rows[name] = {"name": name, "skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    order = list(runners)
    for i in tqdm(range(repeats), desc="timed rounds", unit="round"):
        if late() and i > 0:
            for name in order:
                rows[name]["cut_by_deadline"] = f"{i} of {repeats} timed rounds (--deadline-s)"
            break
        p = i % len(prompts)
        k = i % max(1, len(order))
        for name in order[k:] + order[:k]:
            rows[name]["runs"].append({"prompt": p, "s": timed_run(runners[name], {**req, "prompt": prompts[p]},
                                                                    device)})
    for name, run in runners.items():
        row = rows[name]
        sync(device)
        t0 = time.perf_counter()
        image, stages = run({**req, "prompt": prompts[0]}, stages=True)
        sync(device)
        row["stage_run_s"] = time.perf_counter() - t0
        row["stages_s"] = {k: stages[k] for k in ("encode", "denoise", "controlnet", "decode") if k in stages}
        times = [r["s"] for r in row["runs"]]
        row["end_to_end"] = summarize(times)
        row["per_prompt_median_s"] = {str(j): statistics.median(r["s"] for r in row["runs"] if r["prompt"] == j)
                                      for j in range(len(prompts)) if any(r["prompt"] == j for r in row["runs"])}
        row["images_per_s"] = 1.0 / row["end_to_end"]["median_s"]
        row["image"] = image
        backend = getattr(run, "backend", None)
        if callable(getattr(backend, "fallbacks", None)):
            row["torch_mode"], row["fallbacks"] = backend.torch_mode, backend.fallbacks()
            row["graphs"] = backend.graph_stats()
    return [rows[n] for n in names]


def run_bench(engine_dir: Path, backends: list[str], req: dict, repeats: int, device: str, warmups: int = 2,
              diffusers_attention: str | None = None, deadline_s: float | None = None) -> dict:
    manifest = manifest_io.load(engine_dir)
    ckpt = Path(manifest["model"]["path"])
    compute = manifest["components"]["transformer"]["compute_dtype"]
    dtype = torch.bfloat16 if compute == "bfloat16" else torch.float32
    from .models.dit import DiTConfig
    from .models.fast import dit_flops

    cfg = DiTConfig.from_diffusers(json.loads((ckpt / "transformer" / "config.json").read_text()))
    scale = manifest["model"]["facts"]["vae_scale_factor"]
    image_tokens = (req["height"] // scale // 2) * (req["width"] // scale // 2)
    from .runtime.prompt import PromptTokenizer

    caption_tokens = int(PromptTokenizer(BuildFolder(engine_dir).tokenizer)([req["prompt"]])[1].sum())
    flops = dit_flops(cfg, image_tokens, caption_tokens)
    peak = matmul_peak_tflops(device, dtype)

    makers = {
        "diffusers": lambda: diffusers_runner(ckpt, device, dtype, False, manifest),
        "diffusers-compile": lambda: diffusers_runner(ckpt, device, dtype, True, manifest,
                                                      attention=diffusers_attention),
        "diffusers-fp8": lambda: diffusers_runner(ckpt, device, dtype, True, manifest, fp8=True,
                                                  attention=diffusers_attention),
    }
    for b in OURS:
        makers[b] = (lambda b=b: ours_runner(engine_dir, b, device))
    gpu_before = gpu_state(device)
    rows, reference = [], None
    deadline = None if deadline_s is None else time.perf_counter() + deadline_s
    for row in bench_rows(makers, backends, req, repeats, warmups, device, deadline):
        rows.append(row)
        if "skipped" in row:
            continue
        image = np.asarray(row.pop("image")).astype(np.int16)
        if row["name"] == "diffusers":
            reference = image
        row["max_abs_diff_vs_diffusers"] = None if reference is None else int(np.abs(image - reference).max())
        denoise = row["stages_s"].get("denoise")
        if denoise:
            per_step = denoise / req["steps"]
            row["dit_per_step_s"] = per_step
            row["dit_tflops"] = flops / per_step / 1e12
            row["dit_fraction_of_matmul_peak"] = row["dit_tflops"] / peak
        if "controlnet" in row["stages_s"]:  # the ControlNet's hints, once per step (part of the DiT's time)
            row["controlnet_per_step_s"] = row["stages_s"]["controlnet"] / req["steps"]
    return {
        "tool": f"zimage-deploy {__version__}",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_state(),
        "machine": machine_info(device),
        "gpu_state": {"before": gpu_before, "after": gpu_state(device)},
        "method": {"warmups_per_prompt": warmups, "timed_runs": repeats, "interleaved": True, "deadline_s": deadline_s,
                   "stages": "one separate run per row with stage timers (they sync); timed runs have none"},
        "calibration": calibration_overlap(manifest, req["prompts"]),
        "request": req,
        "build": {"engine_dir": str(engine_dir), "variant": manifest["variant"], "precision": manifest["precision"],
                  "target": manifest["target"]},
        "dit_flops_per_step": flops,
        "matmul_peak_tflops": peak,
        "matmul_peak_dtype": str(dtype).replace("torch.", ""),
        "backends": rows,
    }


def git_state() -> dict:
    """The commit measured and whether the tree had changes (None outside a git checkout)."""
    root = Path(__file__).resolve().parents[1]
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True,  # noqa: E731
                                        timeout=30, check=True).stdout.strip()
        return {"commit": run("rev-parse", "HEAD"), "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}
    except Exception:  # noqa: BLE001 - no git, or not a checkout
        return {"commit": None, "dirty": None}


def gpu_state(device: str) -> dict | None:
    """Clocks, temperature, power and throttle reasons from nvidia-smi (None on the CPU or without it)."""
    if not device.startswith("cuda"):
        return None
    fields = ("clocks.sm", "clocks.mem", "clocks.max.sm", "temperature.gpu", "power.draw",
              "clocks_throttle_reasons.active")
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()[0]
        return dict(zip(fields, (v.strip() for v in out.split(","))))
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}


def calibration_overlap(manifest: dict, prompts: list[str]) -> dict | None:
    """For a calibrated build: whether any timed prompt was among its calibration prompts (they must not be)."""
    if not any((c.get("quantization") or {}) for c in manifest["components"].values()):
        return None
    from .quantize.options import load_prompts

    calib = set(load_prompts(None))  # the shipped calibration prompts (a build's own file is not recorded)
    return {"against": "shipped calibration prompts", "timed_prompts_in_calibration": [p for p in prompts
                                                                                       if p in calib]}


def machine_info(device: str) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "device": device}
    for mod in ("diffusers", "transformers", "onnxruntime", "tensorrt", "tensorrt_rtx"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda,
                    compute_capability=f"{props.major}.{props.minor}")
        try:
            import pynvml

            pynvml.nvmlInit()
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:  # noqa: BLE001 - no pynvml: ask nvidia-smi
            try:
                info["driver"] = subprocess.run(
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                    text=True, timeout=30, check=True).stdout.split("\n")[0].strip()
            except Exception:  # noqa: BLE001
                pass
    return info


# -- reports ------------------------------------------------------------------------------------------------
def write_report(result: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    m, r = result["machine"], result["request"]
    lines = [
        f"# zimage-deploy benchmark: {r['height']}x{r['width']}, {r['steps']} steps, batch 1",
        "",
        f"{result['date']} · {m.get('gpu', 'CPU')} · {m['platform']} · torch {m['torch']}"
        + "".join(f" · {k} {m[k]}" for k in ("cuda", "driver", "diffusers", "onnxruntime", "tensorrt",
                                              "tensorrt_rtx") if k in m),
        f"Build: {result['build']['variant']} {result['build']['precision']} ({result['build']['target']}). "
        f"DiT {result['dit_flops_per_step'] / 1e9:.2f} GFLOP per step; measured matmul peak "
        f"{result['matmul_peak_tflops']:.2f} TFLOP/s ({result['matmul_peak_dtype']}).",
        "",
        "| backend | end-to-end median s | p90 s | images/s | encode s | DiT all steps s | DiT per step s | "
        "ControlNet per step s | VAE decode s | DiT TFLOP/s | of peak | peak memory GiB | max diff vs diffusers |",
        "|" + "---|" * 13,
    ]
    for row in result["backends"]:
        if "skipped" in row:
            lines.append(f"| {row['name']} | skipped: {row['skipped']} |" + " |" * 11)
            continue
        st, mem = row["stages_s"], row["memory"]
        memory = mem.get("gpu_allocator_peak_gib", mem.get("cpu_peak_rss_gib"))
        f = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
        lines.append(
            f"| {row['name']} | {f(row['end_to_end']['median_s'])} | {f(row['end_to_end']['p90_s'])} | "
            f"{f(row['images_per_s'], 2)} | {f(st.get('encode'))} | {f(st.get('denoise'))} | "
            f"{f(row.get('dit_per_step_s'), 4)} | {f(row.get('controlnet_per_step_s'), 4)} | {f(st.get('decode'))} | "
            f"{f(row.get('dit_tflops'), 2)} | "
            f"{f(row.get('dit_fraction_of_matmul_peak'), 2)} | {f(memory, 2)} | "
            f"{row['max_abs_diff_vs_diffusers']} |")
    cut = next((row["cut_by_deadline"] for row in result["backends"] if "cut_by_deadline" in row), None)
    if cut:
        lines += ["", f"Cut short by the deadline: {cut}."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    chart(result, out / "report.png")
    return [out / "report.json", out / "report.md", out / "report.png"]


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["backends"] if "skipped" not in r]
    names = [r["name"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.5))
    left = np.zeros(len(rows))
    for stage, colour in (("encode", "#4c72b0"), ("denoise", "#dd8452"), ("decode", "#55a868")):
        vals = np.array([r["stages_s"].get(stage, 0.0) for r in rows])
        ax.barh(names, vals, left=left, color=colour, label=stage)
        left += vals
    ax.scatter([r["end_to_end"]["median_s"] for r in rows], names, color="black", zorder=3, label="end to end")
    r = result["request"]
    ax.set_xlabel("seconds (median)")
    ax.set_title(f"{r['height']}x{r['width']}, {r['steps']} steps · {result['machine'].get('gpu', 'CPU')}")
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zimage_deploy.bench", description=__doc__.split("\n")[0])
    add_build_dir(ap)
    ap.add_argument("--report", type=Path, required=True, help="folder for report.json, report.md, report.png")
    ap.add_argument("--backends", default=None,
                    help=f"comma-separated, from {', '.join(BACKENDS)} (default: what fits the device)")
    ap.add_argument("--prompt", action="append", default=None,
                    help="a timed prompt (repeatable; rounds take them in turn; default: a short, a long and a "
                         "Chinese prompt); the stage split and image comparison use the first")
    ap.add_argument("--warmups", type=int, default=2, help="warm-up runs of every prompt, the same for every row")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--guidance-scale", type=float, default=None)
    ap.add_argument("--repeats", type=int, default=10, help="timed runs per row, the rows interleaved")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="seconds after which no row is loaded and no timed round started; the report keeps what "
                         "was measured (default: none)")
    ap.add_argument("--diffusers-attention", default=None,
                    help="diffusers' attention backend for its compiled rows (e.g. _native_cudnn; default: its own)")
    ap.add_argument("--control-image", default=None,
                    help="ControlNet builds: the control image (default: a synthetic line drawing at the output size)")
    ap.add_argument("--controlnet-scale", type=float, default=0.75)
    ap.add_argument("--device", default=None, help="default: cuda when available")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmups < 0:
        raise UserError("--repeats must be >= 1 and --warmups >= 0")
    if args.deadline_s is not None and not 0 < args.deadline_s < float("inf"):
        raise UserError(f"--deadline-s must be a positive number of seconds, got {args.deadline_s}")
    manifest = manifest_io.load(args.build_dir)
    if is_omni(manifest["variant"]):
        raise UserError("the benchmark runs text-to-image builds (turbo, base)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",")]
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown:
            raise UserError(f"unknown backends {unknown}; choose from {', '.join(BACKENDS)}")
    elif device.startswith("cuda"):
        backends = ["diffusers", "diffusers-compile", "diffusers-fp8", "torch-eager", "torch-compiled", "tensorrt"]
    else:
        backends = ["diffusers", "torch", "onnxruntime"]
    d = manifest["defaults"]
    prompts = args.prompt or list(PROMPTS)
    req = {"prompt": prompts[0], "prompts": prompts, "height": args.height or d["height"], "width": args.width or d["width"],
           "steps": args.steps or d["steps"], "seed": args.seed,
           "guidance_scale": d["guidance_scale"] if args.guidance_scale is None else args.guidance_scale}
    if "controlnet" in manifest:
        req.update(control_image=args.control_image or "synthetic", controlnet_scale=args.controlnet_scale)
    elif args.control_image:
        raise UserError(f"{args.build_dir} has no ControlNet: --control-image needs a build made with --controlnet")
    result = run_bench(args.build_dir, backends, req, args.repeats, device, args.warmups, args.diffusers_attention,
                       args.deadline_s)
    result["command"] = [sys.executable, "-m", "zimage_deploy.bench", *(sys.argv[1:] if argv is None else argv)]
    for path in write_report(result, args.report):
        print(f"wrote {path}")
    print((args.report / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
