"""Real-size Z-Image-Turbo on one GPU: diffusers eager BF16 against our Torch runtime's paths, 1024x1024, 8 steps,
batch 1, same prompt and seed, end to end and per stage.

Rows (`--rows`; the first six, DEFAULT_ROWS, by default: a device call brings back 8 files, so 6 images + report +
log; each row survives the others' failures):
  diffusers         diffusers eager BF16 (the reference)
  diffusers-compile diffusers + torch.compile, as diffusers documents it: the DiT's repeated blocks compiled
                    (`compile_repeated_blocks(fullgraph=True)`) and the VAE decoder compiled (the peer to beat)
  eager             ours, eager BF16 (dense attention when every key is valid, no host sync inside a step)
  step              ours, DiT blocks compiled + one CUDA graph per denoising step; text encoder + VAE compiled
  fp8-step          as step, DiT block projections in FP8 with static scales calibrated here (another seed), fast
                    accumulation
  step-cudnn        as step, SDPA's cuDNN attention kernel first (flash attention is SDPA's default choice)
  fp8-step-cudnn    as fp8-step, cuDNN attention first

The real configs (6.15B DiT, Qwen3-4B text encoder, Flux VAE) get random weights allocated on the GPU in BF16 (no
float32 copy, no download); our modules take the same weights as diffusers' (converted in memory, one tensor at a
time), so the images are comparable. Per row, as soon as it ends: its image (PNG), its differences from diffusers'
image (and for FP8 rows the PSNR against our BF16 image), and the JSON report are written, atomically. Per row
also: the first call (compilation, CUDA-graph capture) apart from the steady-state runs, dynamo's counters (graphs,
graph breaks, recompiles, CUDA-graph skips; a compiled row without graphs says it fell back to eager), CUDA graphs
captured, host syncs inside the denoising loop (CUDA sync debug mode, one extra call), the peak memory of that row
alone. The eager row also checks that SDPA's flash kernel takes the unmasked attention (and not the masked one)
and times one DiT step masked vs unmasked.

Bounds: no row starts after `--deadline-s` seconds from the process start; no further timed repeat or extra check
starts after `--stop-s`; SIGTERM (the outer `timeout` of benchmarks/gpu_run.sh) marks the running row as killed and
writes the report. `--reduced` runs the same code on a small config (CPU-checkable: what the tests run).

    PYTHONPATH=. python3 benchmarks/gpu_turbo_1024.py --out $OUT/gpu                  # on an H100 / H200
    python benchmarks/gpu_turbo_1024.py --reduced --device cpu --out /tmp/gpu         # a check on any machine
    python benchmarks/gpu_turbo_1024.py --table /tmp/gpu/gpu_turbo_report.json        # the table of a report
"""

from __future__ import annotations

import time

START = time.monotonic()  # the whole-run clock starts with the process, before the imports

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the checkout's package

REPORT = "gpu_turbo_report.json"
REAL = dict(
    dit=dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
             n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0,
             t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512]),
    text=dict(vocab_size=151936, hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
              num_key_value_heads=8, head_dim=128, intermediate_size=9728, rms_norm_eps=1e-6,
              rope_theta=1_000_000.0, max_position_embeddings=40960, tie_word_embeddings=True),
    vae=dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
             layers_per_block=2, norm_num_groups=32, down_block_types=["DownEncoderBlock2D"] * 4,
             up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.3611, shift_factor=0.1159,
             use_quant_conv=False, use_post_quant_conv=False),
)
REDUCED = dict(
    # small enough for torch's CPU `_scaled_mm` (a slow reference kernel) in the FP8 rows; every projection's
    # size stays a multiple of 16, as the GPU's FP8 GEMMs need
    dit={**REAL["dit"], "dim": 48, "n_heads": 3, "n_kv_heads": 3, "n_layers": 2, "n_refiner_layers": 1,
         "cap_feat_dim": 512, "axes_dims": [4, 6, 6]},
    text={**REAL["text"], "vocab_size": 1024, "hidden_size": 512, "num_hidden_layers": 3, "num_attention_heads": 8,
          "num_key_value_heads": 4, "head_dim": 64, "intermediate_size": 1024},
    vae={**REAL["vae"], "block_out_channels": [32, 64, 64, 64], "norm_num_groups": 16, "layers_per_block": 1},
)
PROMPT = "一只橘猫坐在窗台上，午后阳光，电影感，高细节 / an orange cat on a windowsill, afternoon light"
SEED, CALIBRATION_SEED = 0, 1


@dataclass(frozen=True)
class Row:
    label: str
    mode: str = "eager"  # FastTorchBackend mode; "diffusers" / "diffusers-compile" for diffusers' pipeline
    fp8: bool = False
    static_scales: bool = False
    fast_accum: bool = False
    compile_stages: bool = False  # text encoder + VAE decoder compiled too
    attention: str = "default"  # FastTorchBackend attention_kernel


ROWS = {
    "diffusers": Row("diffusers eager bf16", mode="diffusers"),
    "diffusers-compile": Row("diffusers + torch.compile (repeated blocks, VAE decoder)", mode="diffusers-compile"),
    "eager": Row("ours eager bf16"),
    "step": Row("ours compiled, one CUDA graph per step", mode="step", compile_stages=True),
    "fp8-step": Row("ours fp8 static+fast accum, graph per step", mode="step", fp8=True, static_scales=True,
                    fast_accum=True, compile_stages=True),
    "step-cudnn": Row("as step, cuDNN attention first", mode="step", compile_stages=True, attention="cudnn"),
    "fp8-step-cudnn": Row("as fp8-step, cuDNN attention first", mode="step", fp8=True, static_scales=True,
                          fast_accum=True, compile_stages=True, attention="cudnn"),
}
DEFAULT_ROWS = list(ROWS)[:6]


class Killed(BaseException):
    """SIGTERM (the outer timeout): ends the running row, which is reported as killed."""


def elapsed() -> float:
    return time.monotonic() - START


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# -- the models -------------------------------------------------------------------------------------------------
@torch.no_grad()
def randomize(module, gen_seed: int):
    """Random weights in place, in the parameters' own dtype and device: fan-in scaled normals, gains around 1,
    random pad tokens (never the zero inits that hide bugs)."""
    g = torch.Generator(device=next(module.parameters()).device).manual_seed(gen_seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            p.normal_(0, p[0].numel() ** -0.5, generator=g)
        elif "norm" in name and name.endswith("weight"):
            p.normal_(1.0, 0.1, generator=g)
        elif "pad_token" in name:
            p.normal_(0, 1.0, generator=g)
        else:
            p.normal_(0, 0.02, generator=g)


def allocate(module, device, dtype):
    """A meta-device module allocated on `device` directly in `dtype` (never in float32 first)."""
    return module.to(dtype).to_empty(device=device)


def build_diffusers(cfg: dict, device, dtype):
    """diffusers' / transformers' modules of the given configs, random weights, allocated on `device` in `dtype`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from zimage_deploy.tiny import build_tokenizer

    with torch.device("meta"):
        dit = ZImageTransformer2DModel(**cfg["dit"])
        text = Qwen3Model(Qwen3Config(**cfg["text"]))
        vae = AutoencoderKL(**cfg["vae"])
    dit, text, vae = (allocate(m, device, dtype) for m in (dit, text, vae))
    text.rotary_emb = type(text.rotary_emb)(text.config).to(device)  # buffers are not weights: rebuild
    for seed, m in enumerate((dit, text, vae), start=1):
        randomize(m, seed)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
                          vae=vae, text_encoder=text, tokenizer=build_tokenizer(), transformer=dit)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_ours(pipe, cfg: dict, device, dtype, out: Path) -> dict:
    """Our export-friendly modules with diffusers' weights (allocated in their compute dtype, filled one tensor at
    a time), and a build folder (manifest, tokenizer, scheduler) for the runtime: no ONNX, Torch runs the modules."""
    from zimage_deploy import manifest as manifest_io
    from zimage_deploy.buildfolder import BuildFolder
    from zimage_deploy.facts import model_facts
    from zimage_deploy.export.specs import describe_io, specs_for
    from zimage_deploy.models.dit import DiTConfig, TimestepEmbedder, ZImageDiT, iter_fused
    from zimage_deploy.models.fast import share_copy
    from zimage_deploy.models.layers import to_compute_dtype
    from zimage_deploy.models.load import _load, _restore_buffers
    from zimage_deploy.models.text_encoder import TextEncoder, TextEncoderConfig, iter_converted
    from zimage_deploy.models.vae import VAEDecoder

    dcfg = DiTConfig.from_diffusers(cfg["dit"])
    with torch.device("meta"):
        dit = ZImageDiT(dcfg)
    dit = to_compute_dtype(dit, dtype, keep_fp32=(TimestepEmbedder,)).to_empty(device=device)
    _restore_buffers(dit, dcfg)
    dit.to(device)
    _load(dit, iter_fused(pipe.transformer.state_dict().items()), Path("diffusers transformer"))
    tcfg = TextEncoderConfig.from_transformers(cfg["text"])
    with torch.device("meta"):
        text = TextEncoder(tcfg)
    text = to_compute_dtype(text, dtype).to_empty(device=device)
    d = tcfg.head_dim
    text.inv_freq = 1.0 / (tcfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    _load(text, iter_converted(pipe.text_encoder.state_dict().items(), tcfg.used_layers),
          Path("transformers text encoder"))
    vae = VAEDecoder(share_copy(pipe.vae)).use_fp32_norms()  # own processors and norms, diffusers' tensors
    modules = {"transformer": dit.eval().requires_grad_(False), "text_encoder": text.eval().requires_grad_(False),
               "vae_decoder": vae.eval().requires_grad_(False)}

    out.mkdir(parents=True, exist_ok=True)
    pipe.tokenizer.save_pretrained(BuildFolder(out).tokenizer)
    pipe.scheduler.save_config(BuildFolder(out).scheduler)
    for name, conf in (("transformer", cfg["dit"]), ("text_encoder", cfg["text"]), ("vae", cfg["vae"])):
        (out / "ckpt" / name).mkdir(parents=True, exist_ok=True)
        (out / "ckpt" / name / "config.json").write_text(json.dumps(conf))
    facts = model_facts(out / "ckpt")
    specs = specs_for("turbo")
    comps = {n: {**describe_io(specs[n], facts, dtype), "status": "complete", "engine": None}
             for n in ("text_encoder", "context_refiner", "transformer", "vae_decoder")}
    manifest_io.save(out, {
        "schema": manifest_io.SCHEMA, "variant": "turbo", "target": "torch", "precision": str(dtype),
        "model": {"source": "random real-config weights", "path": str(out / "ckpt"), "facts": facts},
        "defaults": {"steps": 8, "guidance_scale": 0.0, "height": 1024, "width": 1024,
                     "resolution_multiple": 16, "max_sequence_length": 512},
        "tensorrt": {}, "components": comps, "stages": {},
    })
    return modules


# -- measuring --------------------------------------------------------------------------------------------------
def time_runs(fn, repeats: int, device, stop_s: float) -> tuple[dict, object]:
    """Steady-state runs (after the first call, timed by the caller): median / min end to end and per stage.
    No further run starts after `stop_s` (at least one runs)."""
    times, stages, image = [], [], None
    for _ in range(repeats):
        if times and elapsed() > stop_s:
            break
        sync(device)
        t0 = time.perf_counter()
        image, st = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        stages.append(st)
    return {
        "median_s": statistics.median(times), "min_s": min(times), "runs": len(times),
        "stages_s": {k: statistics.median(s[k] for s in stages) for k in stages[0]},
    }, image


def sync_warnings(messages) -> list[str]:
    """The host syncs among warnings caught in CUDA's sync debug mode; its own once-per-process notice ("... is a
    prototype feature ...") is not one."""
    return [m.splitlines()[0][:160] for m in messages
            if "synchroniz" in m.lower() and "prototype feature" not in m]


def count_syncs(runtime, call) -> dict:
    """One more call with CUDA's sync debug mode on inside the denoising loop: the host syncs a step makes."""
    original = runtime.denoise

    def audited(*a, **k):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return original(*a, **k)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                found.extend(sync_warnings(str(w.message) for w in caught))

    found: list[str] = []
    runtime.denoise = audited
    try:
        call()
    finally:
        del runtime.denoise
    return {"host_syncs_in_denoise": len(found), "first": found[:2]}


def attention_check(dit, caption_tokens: int, size: int, device) -> dict:
    """One eager DiT step at the benchmark's shapes: do SDPA's flash and cuDNN kernels take the unmasked attention
    (and the masked one)? Median time of a step, masked vs unmasked, with SDPA's default kernel order and with
    cuDNN's attention first (runtime/torch_fast.py `attention_kernel="cudnn"`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from zimage_deploy.models.fast import set_dense_attention, share_copy
    from zimage_deploy.runtime.torch_fast import attention_kernels

    model = share_copy(dit)
    seq = -(-caption_tokens // 32) * 32
    g = torch.Generator(device=device).manual_seed(0)
    dtype = model.x_embedder.weight.dtype
    args = (torch.randn(1, 16, size // 8, size // 8, device=device, generator=g), torch.full((1,), 0.5, device=device),
            torch.randn(1, seq, model.cfg.dim, device=device, generator=g).to(dtype),
            torch.tensor([caption_tokens], device=device))
    result = {}
    with torch.no_grad():
        for dense in (True, False):
            set_dense_attention(model, dense)
            name = "unmasked" if dense else "masked"
            for kernel, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                try:
                    with sdpa_kernel([backend]):
                        model(*args)
                    result[f"{kernel}_takes_{name}"] = True
                except RuntimeError as e:
                    result[f"{kernel}_takes_{name}"] = False
                    result[f"{kernel}_{name}_error"] = str(e).splitlines()[0][:160]
            for order, suffix in (("default", ""), ("cudnn", "_cudnn_first")):
                times = []
                with attention_kernels(order):
                    for _ in range(4):
                        sync(device)
                        t0 = time.perf_counter()
                        model(*args)
                        sync(device)
                        times.append(time.perf_counter() - t0)
                result[f"dit_step_{name}{suffix}_s"] = statistics.median(times[1:])
    return result


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


class Bench:
    """The rows, their results and the report, written after every row."""

    def __init__(self, args):
        self.args = args
        self.device = args.device
        self.cuda = self.device.startswith("cuda")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.cfg = REDUCED if args.reduced else REAL
        self.size = args.size or (256 if args.reduced else 1024)
        self.out = args.out
        self.results: dict[str, dict] = {}
        self.images: dict[str, np.ndarray] = {}
        self.report = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "config": "reduced" if args.reduced else "real (6.15B DiT, Qwen3-4B, Flux VAE), random weights",
            "size": self.size, "steps": args.steps, "batch": 1, "dtype": str(self.dtype), "prompt": PROMPT,
            "seed": SEED, "repeats": args.repeats, "compile_backend": args.compile_backend,
            "deadline_s": args.deadline_s, "stop_s": args.stop_s, "rows": args.rows, "results": self.results,
        }

    def write(self) -> None:
        from zimage_deploy.fsutil import atomic_file

        self.report["elapsed_s"] = round(elapsed(), 1)
        self.report["summary"] = summary(self.results, goal=self.cuda and not self.args.reduced)
        with atomic_file(self.out / REPORT, ".json") as tmp:
            tmp.write_text(json.dumps(self.report, indent=2, default=str) + "\n")

    def setup(self) -> None:
        from zimage_deploy import manifest as manifest_io
        from zimage_deploy.bench import machine_info
        from zimage_deploy.buildfolder import BuildFolder
        from zimage_deploy.runtime.prompt import PromptTokenizer

        self.report["machine"] = machine_info(self.device)
        self.write()  # a report exists from the start: machine and versions survive anything later
        t0 = time.perf_counter()
        self.pipe = build_diffusers(self.cfg, self.device, self.dtype)
        self.build_dir = Path(tempfile.mkdtemp(prefix="zimage-gpu-"))
        self.modules = build_ours(self.pipe, self.cfg, self.device, self.dtype, self.build_dir)
        self.manifest = manifest_io.load(self.build_dir)
        if not any(ROWS[k].mode.startswith("diffusers") for k in self.args.rows):  # they only gave their weights
            self.pipe = None
            gc.collect()
        self.caption_tokens = int(PromptTokenizer(BuildFolder(self.build_dir).tokenizer)([PROMPT])[1].sum())
        sync(self.device)
        self.report["setup_s"] = time.perf_counter() - t0
        if self.cuda:
            self.report["setup_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"setup {self.report['setup_s']:.1f} s ({self.report['config']}, {self.dtype}, {self.device}); "
              f"{elapsed():.0f} s since start", flush=True)
        self.write()

    # -- one row -------------------------------------------------------------------------------------------
    def row(self, key: str) -> None:
        spec = ROWS[key]
        if elapsed() > self.args.deadline_s:
            self.results[key] = {"label": spec.label,
                                 "skipped": f"time budget ({elapsed():.0f} s > {self.args.deadline_s:.0f} s)"}
            self.write()
            return
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()  # this row's peak, not the setup's or another row's
        image = None
        try:
            self.results[key] = {"label": spec.label, "status": "running", "started_at_s": round(elapsed(), 1)}
            self.write()
            print(f"{key}: running ({elapsed():.0f} s since start)", flush=True)
            result, image = (self.diffusers_row(key) if spec.mode.startswith("diffusers") else self.ours_row(spec))
            self.results[key] = {"label": spec.label, **result}
        except Killed:
            self.results[key] = {"label": spec.label, "error": f"killed by the outer timeout at {elapsed():.0f} s"}
            raise
        except Exception as e:  # noqa: BLE001 - one failing row must not lose the others
            self.results[key] = {"label": spec.label, "error": f"{type(e).__name__}: {e}"[:500],
                                 "traceback": traceback.format_exc().splitlines()[-12:]}
        finally:
            r = self.results[key]
            if self.cuda:
                r["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if image is not None:
                self.keep_image(key, image)
            self.write()
            print(f"{key}: {one_line(r)} ({elapsed():.0f} s since start)", flush=True)

    def keep_image(self, key: str, image) -> None:
        from zimage_deploy.fsutil import atomic_file

        r = self.results[key]
        arr = np.asarray(image)
        self.images[key] = arr
        with atomic_file(self.out / f"{key}.png", ".png") as tmp:
            image.save(tmp)
        r["image"] = f"{key}.png"
        ref = self.images.get("diffusers")
        if ref is not None and key != "diffusers":
            diff = np.abs(arr.astype(np.int16) - ref.astype(np.int16))
            r["max_abs_diff_vs_diffusers"] = int(diff.max())
            r["mean_abs_diff_vs_diffusers"] = float(diff.mean())
        bf16 = self.images.get("eager", self.images.get("step"))
        if bf16 is not None and key != "eager" and not ROWS[key].mode.startswith("diffusers"):
            r["psnr_vs_ours_bf16_db"] = psnr(arr, bf16)
            r["max_abs_diff_vs_ours_bf16"] = int(np.abs(arr.astype(np.int16) - bf16.astype(np.int16)).max())

    def diffusers_row(self, key: str):
        from zimage_deploy.bench import StageTimer
        from zimage_deploy.runtime.torch_fast import compile_counters, reset_compile_counters

        pipe = self.pipe
        if pipe is None:
            raise RuntimeError("diffusers' pipeline was freed by an earlier row (its rows must come first)")
        compiled = ROWS[key].mode == "diffusers-compile"
        timer = StageTimer(self.device)
        for module, stage, method in ((pipe.text_encoder, "encode", "forward"),
                                      (pipe.transformer, "denoise", "forward"), (pipe.vae, "decode", "decode")):
            if not hasattr(module, f"_untimed_{method}"):  # the first diffusers row's wrappers would add up twice
                setattr(module, f"_untimed_{method}", getattr(module, method))
            setattr(module, method, getattr(module, f"_untimed_{method}"))
            timer.wrap(module, stage, method)

        def run():
            timer.times = {}
            g = torch.Generator("cpu").manual_seed(SEED)
            image = pipe(PROMPT, height=self.size, width=self.size, num_inference_steps=self.args.steps,
                         guidance_scale=0.0, generator=g).images[0]
            return image, dict(timer.times)

        later = self.args.rows[self.args.rows.index(key) + 1:]
        try:
            if compiled:
                reset_compile_counters()
                pipe.transformer.compile_repeated_blocks(fullgraph=True, backend=self.args.compile_backend)
                pipe.vae.decoder.compile(backend=self.args.compile_backend)
            t0 = time.perf_counter()
            run()
            first = time.perf_counter() - t0
            after_first = compile_counters() if compiled else None
            result, image = time_runs(run, self.args.repeats, self.device, self.args.stop_s)
            if compiled:
                counters = compile_counters()
                result["compile"] = {
                    **counters, "recompiles_in_timed_runs": counters["recompiles"] - after_first["recompiles"],
                    "graphs_added_in_timed_runs": counters["unique_graphs"] - after_first["unique_graphs"]}
                result["notes"] = ([] if counters["unique_graphs"] else ["fell back to eager: dynamo made no graph"])
        finally:
            if compiled:
                for module in (*pipe.transformer.modules(), *pipe.vae.modules()):  # no compiled code left behind
                    module._compiled_call_impl = None
                reset_compile_counters()
            if not any(ROWS[k].mode.startswith("diffusers") for k in later):
                self.pipe = None  # diffusers' modules are not needed after its last row: free their memory
                del pipe, timer
                gc.collect()
                if self.cuda:
                    torch.cuda.empty_cache()
        return {**result, "first_call_s": first}, image

    def calibrate(self) -> dict:
        """Static FP8 activation ranges: every block projection's largest input over one BF16 call (another seed
        than the measured one), as a build's FP8 calibration records them."""
        from zimage_deploy.models.fast import block_projections, record_input_amax
        from zimage_deploy.runtime.pipeline import Pipeline
        from zimage_deploy.runtime.torch_fast import TorchBackend

        backend = TorchBackend(self.build_dir, self.manifest, device=self.device, torch_mode="eager",
                               modules=self.modules)
        dit = backend.model("transformer")
        with record_input_amax(dit, block_projections(dit)) as scales:
            Pipeline(self.build_dir, backend)(PROMPT, self.size, self.size, self.args.steps, CALIBRATION_SEED,
                                              progress=False)
        return scales

    def ours_row(self, spec: Row):
        from zimage_deploy.runtime.pipeline import Pipeline
        from zimage_deploy.runtime.torch_fast import TorchBackend, compile_counters, reset_compile_counters

        reset_compile_counters()
        t0 = time.perf_counter()
        scales = self.calibrate() if spec.static_scales else None
        mode = "eager" if spec.mode == "eager" else "compiled"
        backend = TorchBackend(  # the product's backend; static FP8 scales given for this random-weight build
            self.build_dir, self.manifest, device=self.device, torch_mode=mode,
            fp8_scales=scales, fast_accum=spec.fast_accum, caption_buckets=None,
            compile_backend=self.args.compile_backend, attention_kernel=spec.attention, modules=self.modules)
        runtime = Pipeline(self.build_dir, backend)
        setup_s = time.perf_counter() - t0

        def run(seed=SEED):
            timings: dict = {}
            image = runtime(PROMPT, self.size, self.size, self.args.steps, seed, progress=False, timings=timings)[0]
            return image, timings

        sync(self.device)
        t0 = time.perf_counter()
        _, first_stages = run()  # compilation, autotuning, the step graph's capture
        sync(self.device)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        run()  # per-block CUDA graphs (reduce-overhead) record on their second call
        sync(self.device)
        second = time.perf_counter() - t0
        after_first = compile_counters()
        result, image = time_runs(run, self.args.repeats, self.device, self.args.stop_s)
        counters = compile_counters()
        out = {**result, "setup_s": setup_s, "first_call_s": first, "first_call_stages_s": first_stages,
               "second_call_s": second,
               "compile": {**counters,
                           "recompiles_in_timed_runs": counters["recompiles"] - after_first["recompiles"],
                           "graphs_added_in_timed_runs": counters["unique_graphs"] - after_first["unique_graphs"]},
               "fallbacks": backend.fallbacks()}
        if spec.fp8:
            out["fp8_layers"] = backend.fp8_layers
            out["fp8_scales"] = "static (calibrated, seed 1)" if scales is not None else "dynamic"
        dit = backend.wrappers.get("transformer")
        if backend.graph_stats():
            out["step_graphs"] = {**backend.graph_stats(), "capture_error": dit.capture_error}
        notes = []
        if spec.mode != "eager" and counters["unique_graphs"] == 0:
            notes.append("fell back to eager: dynamo made no graph")
        if counters["graph_breaks"]:
            notes.append(f"{counters['graph_breaks']} graph breaks")
        if counters["cudagraph_skips"]:
            notes.append(f"CUDA graphs skipped {counters['cudagraph_skips']}x (those regions ran without graphs)")
        if backend.graph_stats() and self.cuda and dit.captured == 0:
            notes.append(f"no step graph captured ({dit.capture_error or 'no reason'})")
        notes += [f"{c}: {n} eager fallbacks" for c, n in backend.fallbacks().items()]
        out["notes"] = notes
        if self.cuda and elapsed() < self.args.stop_s:
            out["sync_audit"] = count_syncs(runtime, run)
        if spec.mode == "eager" and not spec.fp8 and elapsed() < self.args.stop_s:
            out["attention"] = attention_check(self.modules["transformer"], self.caption_tokens, self.size,
                                               self.device)
        del runtime, backend, dit
        reset_compile_counters()  # releases this row's compiled code and graph pools
        return out, image


# -- the report -------------------------------------------------------------------------------------------------
def summary(results: dict, goal: bool = True) -> dict:
    """The fastest of our rows and its speed-up over diffusers (and over diffusers + torch.compile where that row
    ran); `goal` (the real configs on a GPU): whether it is the issue's 2x over diffusers eager."""
    base = results.get("diffusers", {}).get("median_s")
    ours = {k: r["median_s"] for k, r in results.items()
            if k in ROWS and not ROWS[k].mode.startswith("diffusers") and "median_s" in r}
    if not ours:
        return {}
    best = min(ours, key=ours.get)
    out = {"best": best, "best_median_s": ours[best]}
    if base:
        out["speedup_vs_diffusers"] = base / ours[best]
        if goal:
            out["goal_2x_met"] = base / ours[best] >= 2.0
    compiled = results.get("diffusers-compile", {}).get("median_s")
    if compiled:
        out["speedup_vs_diffusers_compile"] = compiled / ours[best]
    return out


def one_line(r: dict) -> str:
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    if "error" in r:
        return f"failed: {r['error'][:200]}"
    if "median_s" not in r:
        return r.get("status", "?")
    st = r["stages_s"]
    c = r.get("compile", {})
    parts = [f"{r['median_s']:.3f} s median ({r['runs']} runs)", f"first call {r['first_call_s']:.1f} s",
             "stages " + " ".join(f"{k} {v:.3f}" for k, v in st.items())]
    if c:
        parts.append(f"graphs {c['unique_graphs']} breaks {c['graph_breaks']} recompiles {c['recompiles']} "
                     f"cudagraph skips {c['cudagraph_skips']}")
    parts += r.get("notes", [])
    return "; ".join(parts)


def table(report: dict) -> str:
    results = report.get("results", {})
    m = report.get("machine", {})
    base = results.get("diffusers", {}).get("median_s")
    lines = [f"{m.get('gpu', m.get('device', '?'))} · driver {m.get('driver', '-')} · torch {m.get('torch', '?')} · "
             f"diffusers {m.get('diffusers', '-')} · {report.get('size')}² · {report.get('steps')} steps · "
             f"{report.get('date')}",
             "| row | e2e median s | first call s | encode s | DiT all steps s | decode s | speed-up | max diff "
             "vs diffusers | PSNR vs bf16 dB | graphs/breaks/recompiles (first call+timed) | notes |",
             "|" + "---|" * 11]
    f = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    for key, r in results.items():
        if "median_s" not in r:
            why = r.get("skipped") or r.get("error") or r.get("status", "?")
            lines.append(f"| {key} | {why[:120]} |" + " |" * 9)
            continue
        st, c = r["stages_s"], r.get("compile")
        speed = f"{base / r['median_s']:.2f}x" if base else "-"
        gbr = (f"{c['unique_graphs']}/{c['graph_breaks']}/{c['recompiles'] - c['recompiles_in_timed_runs']}+"
               f"{c['recompiles_in_timed_runs']}") if c else "-"
        notes = "; ".join(r.get("notes", []))[:120]
        lines.append(f"| {key} | {f(r['median_s'])} | {f(r.get('first_call_s'), 1)} | {f(st.get('encode'))} | "
                     f"{f(st.get('denoise'))} | {f(st.get('decode'))} | {speed} | "
                     f"{r.get('max_abs_diff_vs_diffusers', '-')} | {f(r.get('psnr_vs_ours_bf16_db'), 1)} | {gbr} | "
                     f"{notes} |")
    s = report.get("summary") or {}
    if s.get("speedup_vs_diffusers"):
        goal = "" if "goal_2x_met" not in s else f" (goal 2x {'met' if s['goal_2x_met'] else 'not met'})"
        peer = (f", {s['speedup_vs_diffusers_compile']:.2f}x diffusers + torch.compile"
                if s.get("speedup_vs_diffusers_compile") else "")
        lines.append(f"best: {s['best']} {s['best_median_s']:.3f} s, {s['speedup_vs_diffusers']:.2f}x diffusers{peer}"
                     f"{goal}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reduced", action="store_true", help="small config (checks the code, not the speed)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=None, help="default 1024 (256 with --reduced)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                    help=f"comma-separated, from {', '.join(ROWS)} (default: {', '.join(DEFAULT_ROWS)})")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend (inductor; aot_eager or eager check the plumbing quickly)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--deadline-s", type=float, default=300.0,
                    help="start no row after this many seconds from the process start (the report keeps what ran)")
    ap.add_argument("--stop-s", type=float, default=470.0,
                    help="start no further timed run or extra check after this many seconds from the start")
    ap.add_argument("--table", type=Path, help="print the table of this report and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    if args.out is None:
        ap.error("--out is required")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if len(set(rows)) != len(rows):
        ap.error(f"each row once: {', '.join(rows)}")
    if args.repeats < 1 or args.steps < 1:
        ap.error("--repeats and --steps must be >= 1")
    args.rows = rows
    args.out.mkdir(parents=True, exist_ok=True)

    def on_term(signum, frame):
        raise Killed()

    signal.signal(signal.SIGTERM, on_term)
    bench = Bench(args)
    try:
        return _run(bench, rows)
    finally:  # the build folder the benchmark made (tokenizer, configs, manifest): no temp folder left behind
        if getattr(bench, "build_dir", None) is not None:
            import shutil

            shutil.rmtree(bench.build_dir, ignore_errors=True)


def _run(bench, rows) -> int:
    try:
        try:
            bench.setup()
        except Exception as e:  # noqa: BLE001 - the report says why nothing ran
            bench.report["setup_error"] = {"error": f"{type(e).__name__}: {e}"[:500],
                                           "traceback": traceback.format_exc().splitlines()[-12:]}
            bench.write()
            raise
        for key in rows:
            bench.row(key)
    except Killed:
        for r in bench.results.values():  # a signal between two statements of `row` lands here
            if r.get("status") == "running":
                r.pop("status")
                r["error"] = f"killed by the outer timeout at {elapsed():.0f} s"
        bench.report["killed_at_s"] = round(elapsed(), 1)
        bench.write()
        print(f"killed by the outer timeout at {elapsed():.0f} s; the report keeps what ran", flush=True)
        return 124
    print("\n" + table(bench.report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
