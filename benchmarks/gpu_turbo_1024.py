"""Real-size Z-Image-Turbo on one GPU: diffusers eager BF16 against our Torch backend (BF16 eager, BF16 with
compiled blocks + CUDA graphs, FP8 blocks + compiled), 1024x1024, 8 steps, batch 1, end to end and per stage.

The real configs (6.15B DiT, Qwen3-4B text encoder, Flux VAE) are built with random BF16 weights directly on the
GPU (no download); our modules take the same weights as diffusers' (converted in memory), so the images are
comparable. Prints a short table last and writes the JSON report. `--reduced` runs the same code on a small
config (CPU-checkable: what the tests run).

    PYTHONPATH=. python3 benchmarks/gpu_turbo_1024.py --out $OUT/gpu            # on an H100 / H200
    python benchmarks/gpu_turbo_1024.py --reduced --device cpu --out /tmp/gpu  # a check on any machine
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

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
    dit={**REAL["dit"], "dim": 768, "n_heads": 6, "n_kv_heads": 6, "n_layers": 2, "n_refiner_layers": 1,
         "cap_feat_dim": 512},
    text={**REAL["text"], "vocab_size": 1024, "hidden_size": 512, "num_hidden_layers": 3, "num_attention_heads": 8,
          "num_key_value_heads": 4, "head_dim": 64, "intermediate_size": 1024},
    vae={**REAL["vae"], "block_out_channels": [32, 64, 64, 64], "norm_num_groups": 16, "layers_per_block": 1},
)
PROMPT = "一只橘猫坐在窗台上，午后阳光，电影感，高细节 / an orange cat on a windowsill, afternoon light"


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def randomize(module, gen_seed: int):
    """Random weights in place on the module's device: fan-in scaled normals, gains around 1, random pad
    tokens (never the zero inits that hide bugs)."""
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


def build_diffusers(cfg: dict, device, dtype):
    """diffusers' / transformers' modules of the given configs, random weights, built on `device`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from zimage_deploy.tiny import build_tokenizer

    with torch.device("meta"):
        dit = ZImageTransformer2DModel(**cfg["dit"])
        text = Qwen3Model(Qwen3Config(**cfg["text"]))
    dit = dit.to_empty(device=device).to(dtype)
    text = text.to_empty(device=device).to(dtype)
    text.rotary_emb = type(text.rotary_emb)(text.config).to(device)  # buffers are not weights: rebuild
    randomize(dit, 1)
    randomize(text, 2)
    vae = AutoencoderKL(**cfg["vae"]).to(device)
    randomize(vae, 3)
    vae = vae.to(dtype)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
                          vae=vae, text_encoder=text, tokenizer=build_tokenizer(), transformer=dit)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def upcast_sensitive(model, extra: tuple = ()):
    """Norms (and `extra` module types) back to float32, as the runtime's precision rule wants; exact here,
    the weights came from BF16."""
    from zimage_deploy.models.layers import RMSNorm

    for m in model.modules():
        if isinstance(m, (RMSNorm, torch.nn.LayerNorm, torch.nn.GroupNorm) + extra):
            m.float()


def build_ours(pipe, cfg: dict, device, dtype, out: Path):
    """Our export-friendly modules with diffusers' weights, and a build folder (manifest, tokenizer, scheduler)
    for the runtime: no ONNX, the Torch backend runs the modules."""
    from zimage_deploy import manifest as manifest_io
    from zimage_deploy.build import model_facts
    from zimage_deploy.export.specs import describe_io, specs_for
    from zimage_deploy.models.dit import DiTConfig, TimestepEmbedder, ZImageDiT, fuse_state_dict
    from zimage_deploy.models.load import _restore_buffers
    from zimage_deploy.models.text_encoder import TextEncoder, TextEncoderConfig, convert_transformers_items
    from zimage_deploy.models.vae import VAEDecoder

    dcfg = DiTConfig.from_diffusers(cfg["dit"])
    with torch.device("meta"):
        dit = ZImageDiT(dcfg)
    dit = dit.to_empty(device=device).to(dtype)  # built in the weights' dtype: no float32 copy of 6B params
    _restore_buffers(dit, dcfg)
    dit.to(device)
    dit.load_state_dict(fuse_state_dict(pipe.transformer.state_dict().items()), strict=True)
    upcast_sensitive(dit, (TimestepEmbedder,))
    tcfg = TextEncoderConfig.from_transformers(cfg["text"])
    with torch.device("meta"):
        text = TextEncoder(tcfg)
    text = text.to_empty(device=device).to(dtype)
    d = tcfg.head_dim
    text.inv_freq = 1.0 / (tcfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    text.load_state_dict(convert_transformers_items(pipe.text_encoder.state_dict().items(), tcfg.used_layers),
                         strict=True)
    upcast_sensitive(text)
    vae = VAEDecoder(copy.deepcopy(pipe.vae)).use_fp32_norms()
    modules = {"transformer": dit.eval(), "text_encoder": text.eval(), "vae_decoder": vae.eval()}

    # the build folder the runtime reads
    out.mkdir(parents=True, exist_ok=True)
    pipe.tokenizer.save_pretrained(out / "tokenizer")
    pipe.scheduler.save_config(out / "scheduler")
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


def time_runs(fn, repeats, device):
    fn()  # warm-up (and compilation)
    times, stages, image = [], [], None
    for _ in range(repeats):
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


def time_ours(variant, build_dir, manifest, modules, device, size, args):
    """Our runtime over the in-memory modules: first call (compilation, CUDA-graph capture) timed apart."""
    from zimage_deploy.runtime.backends import TorchBackend
    from zimage_deploy.runtime.pipeline import Pipeline

    mods = dict(modules)
    if "fp8" in variant:  # FP8 swaps the DiT's block projections: keep the BF16 DiT for the other rows
        mods["transformer"] = copy.deepcopy(modules["transformer"])
    t0 = time.perf_counter()
    backend = TorchBackend(build_dir, manifest, device=device, compile="compiled" in variant,
                           fp8="fp8" in variant, modules=mods)
    runtime = Pipeline(build_dir, backend)

    def run_ours():
        timings: dict = {}
        image = runtime(PROMPT, size, size, args.steps, 0, progress=False, timings=timings)[0]
        return image, timings

    first = time.perf_counter()
    run_ours()
    compile_s = time.perf_counter() - first
    result, image = time_runs(run_ours, args.repeats, device)
    return {**result, "first_call_s": compile_s, "setup_s": first - t0}, image


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reduced", action="store_true", help="small config (checks the code, not the speed)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=None, help="default 1024 (256 with --reduced)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="diffusers,ours-bf16,ours-bf16-compiled,ours-fp8-compiled")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="start no further row after this many seconds (the report keeps what ran)")
    args = ap.parse_args()
    from zimage_deploy import manifest as manifest_io
    from zimage_deploy.bench import StageTimer, machine_info

    device = args.device
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = REDUCED if args.reduced else REAL
    size = args.size or (256 if args.reduced else 1024)
    variants = args.variants.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    t_setup = time.perf_counter()
    pipe = build_diffusers(cfg, device, dtype)
    build_dir = Path(tempfile.mkdtemp(prefix="zimage-gpu-"))
    modules = build_ours(pipe, cfg, device, dtype, build_dir)
    setup_s = time.perf_counter() - t_setup
    manifest = manifest_io.load(build_dir)
    results, images = {}, {}
    print(f"setup {setup_s:.1f} s ({'reduced' if args.reduced else 'real'} configs, {dtype}, {device})", flush=True)
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(device),
              "config": "reduced" if args.reduced else "real (6.15B DiT, Qwen3-4B, Flux VAE), random weights",
              "size": size, "steps": args.steps, "batch": 1, "dtype": str(dtype), "setup_s": setup_s,
              "results": results}

    def row(label, fn):
        """One row, whatever happens: out of time, an error (kept in the report with its traceback's tail) or
        a result; the report is rewritten after each row, so a run cut short still leaves what it measured."""
        elapsed = time.perf_counter() - t_setup
        if args.deadline_s is not None and elapsed > args.deadline_s:
            results[label] = {"skipped": f"time budget ({elapsed:.0f} s > {args.deadline_s:.0f} s)"}
        else:
            try:
                results[label], images[label] = fn()
            except Exception as e:  # noqa: BLE001 - one failing row must not lose the others
                results[label] = {"error": f"{type(e).__name__}: {e}"[:500],
                                  "traceback": traceback.format_exc().splitlines()[-12:]}
            if cuda:
                results[label]["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
        print(label, results[label], flush=True)
        (args.out / "gpu_turbo_report.json").write_text(json.dumps(report, indent=2) + "\n")

    if "diffusers" in variants:
        timer = StageTimer(device)
        timer.wrap(pipe.text_encoder, "encode")
        timer.wrap(pipe.transformer, "denoise")
        timer.wrap(pipe.vae, "decode", "decode")

        def run_diffusers():
            timer.times = {}
            g = torch.Generator("cpu").manual_seed(0)
            image = pipe(PROMPT, height=size, width=size, num_inference_steps=args.steps, guidance_scale=0.0,
                         generator=g).images[0]
            return image, dict(timer.times)

        row("diffusers eager", lambda: time_runs(run_diffusers, args.repeats, device))

    for variant, label in (("ours-bf16", "ours eager"), ("ours-bf16-compiled", "ours compiled+cudagraphs"),
                           ("ours-fp8-compiled", "ours fp8 compiled+cudagraphs")):
        if variant not in variants:
            continue
        if ("compiled" in variant or "fp8" in variant) and not cuda:
            results[label] = {"skipped": "needs a CUDA GPU"}
            continue
        row(label, lambda: time_ours(variant, build_dir, manifest, modules, device, size, args))
        if cuda:
            torch.cuda.empty_cache()

    ref = images.get("diffusers eager")
    for label, image in images.items():
        if ref is not None:
            diff = np.abs(np.asarray(image).astype(int) - np.asarray(ref).astype(int))
            results[label]["max_abs_diff_vs_diffusers"] = int(diff.max())
            results[label]["mean_abs_diff_vs_diffusers"] = float(diff.mean())
        image.save(args.out / f"{label.replace(' ', '_').replace('+', '_')}.png")
    (args.out / "gpu_turbo_report.json").write_text(json.dumps(report, indent=2) + "\n")
    base = results.get("diffusers eager", {}).get("median_s")
    print(f"\n{report['machine'].get('gpu', device)} · torch {torch.__version__} · {size}x{size}, {args.steps} steps")
    print("| pipeline | end-to-end median s | encode s | DiT all steps s | decode s | speed-up | max diff |")
    print("|---|---|---|---|---|---|---|")
    for label, r in results.items():
        if "median_s" not in r:
            why = f"skipped: {r['skipped']}" if "skipped" in r else f"failed: {r['error'][:80]}"
            print(f"| {label} | {why} | | | | | |")
            continue
        st = r["stages_s"]
        speed = f"{base / r['median_s']:.2f}x" if base else "-"
        print(f"| {label} | {r['median_s']:.3f} | {st.get('encode', 0):.3f} | {st.get('denoise', 0):.3f} | "
              f"{st.get('decode', 0):.3f} | {speed} | {r.get('max_abs_diff_vs_diffusers', '-')} |")


if __name__ == "__main__":
    main()
