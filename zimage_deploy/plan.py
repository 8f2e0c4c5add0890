"""`python -m zimage_deploy.plan`: will a build fit the target's GPU memory, in which runtime mode, and how fast
could it be at best?

For each component: weights (from the engine plans where a build has them, else the graphs' recorded weight
bytes, else computed from the model configs and the precision) and activations at the profile's opt and max
shapes (an estimate from the configs: the tensors alive at the widest point of one layer, batch included, with
fused attention); then whether text encoder, DiT and VAE sit together on the target's memory:

- `all-resident`: every engine in GPU memory at once (fastest: nothing moves between requests);
- `low-vram`: one component's engine in GPU memory at a time, loaded stage by stage (the runtime's
  `--low-vram`; costs a host-to-device copy of each engine per request);
- `weight-streaming`: even the DiT alone does not fit: its weights stream from host memory (engines built with
  `--weight-streaming`); slow, the last resort;
- `does-not-fit`: not even the DiT's activations fit.

The floor latency is the larger of compute (FLOPs / the target's datasheet dense tensor peak for the precision)
and memory traffic (weights read once per call / datasheet bandwidth), per stage: text encoder once, DiT per step
(CFG doubles the batch), VAE decoder once. Real pipelines reach a fraction of it; it says what cannot be beaten.

A ControlNet build (or `--controlnet PATH` before building) adds the `controlnet` graph: its own branch plus the DiT
embedders and noise refiner it shares, run every step beside the transformer — so the two count as one stage in
`low-vram` mode (swapping them every step would cost more than it saves), and the hints it hands over count in both.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .cli import add_build_dir, run_cli
from .errors import UserError
from .facts import SMALL_SIDES, small_model
from .schemes import SCHEMES
from .targets import PRECISIONS, QUANTIZED, TARGETS, get_target, precision_plan
from .variants import VARIANTS, get_variant

GIB = 1 << 30
CUDA_OVERHEAD = int(0.75 * GIB)  # CUDA context, TensorRT runtime, cuBLAS/cuDNN handles, allocator slack
USABLE = 0.95  # of the card's memory (fragmentation, display on desktop cards)

# Datasheet dense tensor-core peaks (TFLOP/s, no sparsity) and memory bandwidth (GB/s). BF16 with FP32
# accumulation; FP8 and FP4 as marketed (GeForce cards: FP16-accumulate rates). int4 here is W4A16 (weights
# dequantized to BF16): BF16 math. Approximate vendor figures: a floor, not a prediction.
PEAKS = {
    "rtx4090": dict(bf16=165.2, fp8=660.6, bandwidth=1008),
    "l40s": dict(bf16=362.1, fp8=733.0, bandwidth=864),
    "h800": dict(bf16=989.4, fp8=1978.9, bandwidth=3350),
    "h100": dict(bf16=989.4, fp8=1978.9, bandwidth=3350),
    "h200": dict(bf16=989.4, fp8=1978.9, bandwidth=4800),
    "rtx5090": dict(bf16=209.5, fp8=838.4, nvfp4=1676.0, bandwidth=1792),
    "b200": dict(bf16=2250.0, fp8=4500.0, nvfp4=9000.0, bandwidth=8000),
}
BYTES = {"fp32": 4.0, "bf16": 2.0, **{n: s.weight_bytes for n, s in SCHEMES.items()}}  # + block scales
DIT_QUANT_EXCLUDE = ("t_embedder", "adaLN_modulation", "x_embedder", "cap_linear", "siglip_linear", "final_layer")


@dataclass
class Part:
    name: str
    precision: str
    weights: int  # bytes
    source: str  # "engine plan" | "graph" | "config"
    act_opt: int
    act_max: int
    flops: float  # one call at the opt shape
    calls: int  # per image (DiT: steps)


@dataclass
class Plan:
    target: str
    precision: str
    variant: str
    height: int
    width: int
    steps: int
    batch: int
    memory: int
    parts: list[Part] = field(default_factory=list)
    modes: dict = field(default_factory=dict)  # mode -> bytes needed
    mode: str = ""
    floor_seconds: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


# -- model facts from configs ------------------------------------------------------------------------------------

def _configs(model: str | None, manifest: dict | None) -> dict:
    """Configs of the DiT, text encoder and VAE: from a checkpoint, a build's recorded checkpoint, or the real
    Z-Image configs."""
    from .checkpoint import read_config

    path = None
    if manifest is not None:
        path = Path(manifest["model"]["path"])
    elif model is not None:
        from .checkpoint import resolve

        path = resolve(model)[0]
    if path is not None and (path / "transformer" / "config.json").is_file():
        return {k: read_config(path, k) for k in ("transformer", "text_encoder", "vae")}
    if path is not None:
        raise UserError(f"the build's checkpoint {path} is gone: pass --model with its configs")
    from .realsize import REAL_DIT, REAL_TEXT, REAL_VAE

    return {"transformer": REAL_DIT, "text_encoder": REAL_TEXT, "vae": REAL_VAE}


def _controlnet_config(arg, model: str | None, manifest: dict | None, dit_cfg):
    """The ControlNet's config: the build's record, or `--controlnet PATH` checked against the DiT config."""
    if manifest is not None:
        rec = manifest.get("controlnet")
        if not rec:
            return None
        from .models.controlnet import ControlNetConfig

        return ControlNetConfig.from_record(rec["config"])
    if arg is None:
        return None
    from .controlnet import open_controlnet

    if model is not None:
        from .checkpoint import resolve

        return open_controlnet(arg, resolve(model)[0]).config
    return open_controlnet(arg, dit_cfg).config  # the real Z-Image transformer's config


def _meta_modules(cfgs: dict):
    from diffusers import AutoencoderKL

    from .models.dit import DiTConfig, ZImageDiT
    from .models.text_encoder import TextEncoder, TextEncoderConfig

    vae_cfg = {k: v for k, v in cfgs["vae"].items() if not k.startswith("_")}
    with torch.device("meta"):
        dit = ZImageDiT(DiTConfig.from_diffusers(cfgs["transformer"]))
        text = TextEncoder(TextEncoderConfig.from_transformers(cfgs["text_encoder"]))
        vae = AutoencoderKL(**vae_cfg)
    return dit, text, vae


def _dit_split(dit) -> dict[str, list[tuple[str, torch.Tensor]]]:
    parts = {"context_refiner": [], "siglip_refiner": [], "transformer": []}
    for name, p in dit.named_parameters():
        if name.startswith(("cap_norm", "cap_linear", "context_refiner", "cap_pad_token")):
            parts["context_refiner"].append((name, p))
        elif name.startswith(("siglip_norm", "siglip_linear", "siglip_refiner", "siglip_pad_token")):
            parts["siglip_refiner"].append((name, p))
        else:
            parts["transformer"].append((name, p))
    return parts


def fp32_params(*modules) -> set[int]:
    """ids of the parameters a BF16 graph keeps in float32: norms and the timestep embedder (as
    models.layers.to_compute_dtype does)."""
    from torch import nn

    from .models.dit import TimestepEmbedder
    from .models.layers import RMSNorm

    kept = set()
    for model in modules:
        for m in model.modules():
            if isinstance(m, (RMSNorm, nn.LayerNorm, nn.GroupNorm, TimestepEmbedder)):
                kept.update(id(p) for p in m.parameters())
    return kept


def weight_bytes(params: list[tuple[str, torch.Tensor]], precision: str, quantizable=lambda n: True,
                 keep_fp32: set[int] = frozenset()) -> int:
    """Bytes of these parameters at `precision`: 2-D weights of quantizable layers at the scheme's bytes (block
    scales included), the `keep_fp32` ones in float32, everything else in the unquantized dtype (BF16 on GPUs)."""
    base = "fp32" if precision == "fp32" else "bf16"
    total = 0.0
    for name, p in params:
        quant = precision in QUANTIZED and p.ndim == 2 and name.endswith(".weight") and quantizable(name)
        total += p.numel() * BYTES["fp32" if id(p) in keep_fp32 else precision if quant else base]
    return int(total)


def _dit_quantizable(name: str) -> bool:
    return name.startswith(("layers.", "noise_refiner.")) and not any(e in name for e in DIT_QUANT_EXCLUDE)


def _text_quantizable(name: str) -> bool:
    return name.startswith("layers.")


SHARED_WITH_CONTROLNET = ("x_embedder.", "x_pad_token", "t_embedder.", "noise_refiner.")


def controlnet_params(dit, branch) -> list[tuple[str, torch.Tensor]]:
    """The controlnet graph's weights: the branch's, and the DiT embedders and noise refiner it runs too."""
    shared = [(n, p) for n, p in dit.named_parameters() if n.startswith(SHARED_WITH_CONTROLNET)]
    return shared + [("control." + n, p) for n, p in branch.named_parameters()]


def _controlnet_quantizable(name: str) -> bool:
    return name.startswith(("control.control_layers.", "control.control_noise_refiner.", "noise_refiner.")) and \
        not any(e in name for e in DIT_QUANT_EXCLUDE)


def config_weights(modules, plan_of: dict[str, str], branch=None) -> dict[str, int]:
    """Bytes of each component's graph weights, from the (meta-device) modules and the per-component precision
    (`branch`: a ControlNet's meta-device ControlBranch)."""
    dit, text, vae = modules
    split = _dit_split(dit)
    keep32 = fp32_params(dit, text, vae, *(() if branch is None else (branch,)))
    vae_params = list(vae.named_parameters())
    params = {
        "text_encoder": (list(text.named_parameters()), _text_quantizable),
        "context_refiner": (split["context_refiner"], lambda n: False),
        "transformer": (split["transformer"], _dit_quantizable),
        "vae_decoder": ([(n, p) for n, p in vae_params if n.startswith(("decoder", "post_quant"))], lambda n: False),
        "vae_encoder": ([(n, p) for n, p in vae_params if n.startswith(("encoder", "quant_conv"))], lambda n: False),
    }
    if branch is not None:
        params["controlnet"] = (controlnet_params(dit, branch), _controlnet_quantizable)
    return {name: weight_bytes(named, plan_of[name], quantizable, keep32)
            for name, (named, quantizable) in params.items() if name in plan_of}


# -- activations and FLOPs ---------------------------------------------------------------------------------------

def _pad32(n: int) -> int:
    return -(-n // 32) * 32


def dit_activations(cfg, image_tokens: int, caption_tokens: int, batch: int, elem: float) -> int:
    """Widest point of one DiT block: residual stream and normed input (2 S d), q/k/v (3 S d), attention output
    (S d), the SwiGLU's two hidden projections and their product (3 S f); fused attention (no S x S scores)."""
    s = _pad32(image_tokens) + _pad32(caption_tokens)
    return int(batch * s * (6 * cfg.dim + 3 * cfg.ffn_dim) * elem)


def text_activations(cfg, tokens: int, batch: int, elem: float) -> int:
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    return int(batch * tokens * (2 * cfg.hidden_size + q + 2 * kv + 3 * cfg.intermediate_size) * elem)


def vae_activations(vae_cfg: dict, height: int, width: int, batch: int, elem: float) -> int:
    """Decoder (or encoder): four feature maps of the widest level alive around a resnet block (input, normed, conv
    output, residual); level i runs at 1/2**i of the image size with block_out_channels[i] channels. The mid
    block's self-attention is taken as fused (no tokens x tokens score matrix), as for the DiT."""
    chans = list(vae_cfg["block_out_channels"])
    widest = max(c * (height >> i) * (width >> i) for i, c in enumerate(chans))
    return int(batch * 4 * widest * elem)


def dit_step_flops(cfg, image_tokens: int, caption_tokens: int, batch: int) -> float:
    from .models.fast import dit_flops

    return dit_flops(cfg, image_tokens, caption_tokens, batch)


def context_flops(cfg, caption_tokens: int, batch: int) -> float:
    """The context refiner's blocks on the padded caption (once per prompt)."""
    from .models.fast import block_flops

    return float(batch * cfg.n_refiner_layers * block_flops(cfg, _pad32(caption_tokens)))


def text_flops(cfg, tokens: int, batch: int) -> float:
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    per_token = 2 * (cfg.hidden_size * (q + 2 * kv) + q * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size)
    return float(batch * cfg.used_layers * (tokens * per_token + 4 * tokens * tokens * q))


def controlnet_step_flops(cfg, cn, image_tokens: int, caption_tokens: int, batch: int) -> float:
    """One per-step controlnet call: the shared noise refiner and the control refiner blocks on the image tokens,
    the control blocks on image + caption tokens (plus their before/after projections), the embedders."""
    from .models.fast import block_flops

    d = cfg.dim
    x, s = _pad32(image_tokens), _pad32(image_tokens) + _pad32(caption_tokens)
    # the control stream's refinement on the image tokens: the control blocks themselves ("control_layers"
    # kind), else the control noise refiner's blocks
    refining = cn.n_hints if cn.add_control_noise_refiner == "control_layers" else cn.n_refiner_layers
    total = (cfg.n_refiner_layers + refining) * block_flops(cfg, x) + cn.n_hints * block_flops(cfg, s)
    total += 2 * s * d * d * (cn.n_hints + 1)  # after_proj per block, before_proj once
    total += 2 * image_tokens * d * cfg.patch_size ** 2 * (cfg.in_channels + cn.control_in_dim)  # embedders
    return float(batch * total)


def vae_decoder_flops(vae, latent_h: int, latent_w: int, batch: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    c = vae.config.latent_channels
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.decoder(torch.empty(batch, c, latent_h, latent_w, device="meta"))
    return float(counter.get_total_flops())


# -- the plan ----------------------------------------------------------------------------------------------------

def make_plan(target: str, precision: str, height: int = 1024, width: int = 1024, variant: str = "turbo",
              steps: int | None = None, engine_dir: Path | None = None, model: str | None = None,
              caption_tokens: int = 128, max_caption_tokens: int = 512, max_side: int | None = None,
              controlnet=None) -> Plan:
    manifest = None
    if engine_dir is not None:
        from . import manifest as manifest_io

        manifest = manifest_io.load(engine_dir)
        target, precision, variant = manifest["target"], manifest["precision"], manifest["variant"]
    t = get_target(target)
    if t.compute_capability is None:
        raise UserError("the cpu target runs in host memory: plan a GPU target")
    t.check_precision(precision)
    v = get_variant(variant)
    if v.layout != "basic":
        raise UserError("the planner covers Turbo and Base; Edit adds the SigLIP tower and condition images")
    for side, name in ((height, "height"), (width, "width")):
        if side <= 0 or side % 16:
            raise UserError(f"--{name} {side} must be a positive multiple of 16")
    steps = steps or v.default_steps
    batch = 2 if v.uses_cfg else 1
    cfgs = _configs(model, manifest)
    dit, text, vae = _meta_modules(cfgs)
    cn = _controlnet_config(controlnet, model, manifest, dit.cfg)
    branch = None
    if cn is not None:
        from .models.controlnet import ControlBranch

        with torch.device("meta"):
            branch = ControlBranch(cn, dit.cfg)
    plan_of = precision_plan(precision, t.base)
    scale = 2 ** (len(cfgs["vae"]["block_out_channels"]) - 1)
    patch = dit.cfg.patch_size
    side_max = max_side or max(height, width, SMALL_SIDES[1] if small_model(dit.cfg.dim) else v.max_side)

    def tokens(h, w):
        return (h // scale // patch) * (w // scale // patch)

    elem = 4.0 if precision == "fp32" else 2.0
    img_opt, img_max = tokens(height, width), tokens(side_max, side_max)
    tcfg = text.cfg
    acts = {
        "text_encoder": (text_activations(tcfg, caption_tokens, batch, elem),
                         text_activations(tcfg, max_caption_tokens, 4, elem)),
        "context_refiner": (dit_activations(dit.cfg, 0, caption_tokens, batch, elem),
                            dit_activations(dit.cfg, 0, max_caption_tokens, 4, elem)),
        "transformer": (dit_activations(dit.cfg, img_opt, caption_tokens, batch, elem),
                        dit_activations(dit.cfg, img_max, max_caption_tokens, 4, elem)),
        "vae_decoder": (vae_activations(cfgs["vae"], height, width, 1, elem),
                        vae_activations(cfgs["vae"], side_max, side_max, 4, elem)),
        "vae_encoder": (vae_activations(cfgs["vae"], height, width, 1, elem),
                        vae_activations(cfgs["vae"], side_max, side_max, 4, elem)),
    }
    if cn is not None:  # the branch's blocks are DiT blocks; its hints go to the transformer
        shapes = ((img_opt, caption_tokens, batch), (img_max, max_caption_tokens, 4))  # (opt, max)
        hints = [int(cn.n_hints * b * (_pad32(img) + _pad32(cap)) * dit.cfg.dim * elem) for img, cap, b in shapes]
        acts["controlnet"] = tuple(dit_activations(dit.cfg, *shape, elem) + h for shape, h in zip(shapes, hints))
        acts["transformer"] = tuple(a + h for a, h in zip(acts["transformer"], hints))
    flops = {
        "text_encoder": (text_flops(tcfg, caption_tokens, batch), 1),
        "context_refiner": (context_flops(dit.cfg, caption_tokens, batch), 1),
        "transformer": (dit_step_flops(dit.cfg, img_opt, caption_tokens, batch), steps),
        "vae_decoder": (vae_decoder_flops(vae, height // scale, width // scale, 1), 1),
        "vae_encoder": (0.0, 0),  # img2img / inpainting only
    }
    if cn is not None:
        flops["controlnet"] = (controlnet_step_flops(dit.cfg, cn, img_opt, caption_tokens, batch), steps)
    plan = Plan(target, precision, v.name, height, width, steps, batch, int(t.memory_gib * GIB))
    components = list(v.components)
    if cn is not None:
        plan_of = {**plan_of, "controlnet": plan_of["transformer"]}  # quantized like the DiT
        components.insert(components.index("transformer"), "controlnet")
    computed = config_weights((dit, text, vae), plan_of, branch)
    for name in components:
        comp_precision = plan_of[name]
        weights, source = computed[name], "config"
        if manifest is not None:
            entry = manifest["components"].get(name, {})
            engine = entry.get("engine") or {}
            if engine.get("bytes") and not engine.get("stripped"):
                weights, source = int(engine["bytes"]), "engine plan"
            elif entry.get("weight_bytes"):
                weights, source = int(entry["weight_bytes"]), "graph"
        plan.parts.append(Part(name, comp_precision, weights, source, *acts[name], *flops[name]))
    _choose_mode(plan)
    _floors(plan, t.name)
    return plan


def _choose_mode(plan: Plan) -> None:
    usable = int(plan.memory * USABLE)
    per = {p.name: p for p in plan.parts}
    biggest_act = max(p.act_opt for p in plan.parts)
    # the stages of low-vram mode: each component alone, but a ControlNet's branch beside the transformer
    cn = per.get("controlnet")
    stages = [p.weights + p.act_opt for p in plan.parts if p.name not in ("transformer", "controlnet")]
    stages.append(per["transformer"].weights + (cn.weights if cn else 0) +
                  max(per["transformer"].act_opt, cn.act_opt if cn else 0))
    streamed = per["transformer"].act_opt + min(per["transformer"].weights, 2 * GIB)
    if cn:  # the branch streams too
        streamed = max(streamed, cn.act_opt) + min(cn.weights, 2 * GIB)
    plan.modes = {
        "all-resident": sum(p.weights for p in plan.parts) + biggest_act + CUDA_OVERHEAD,
        "low-vram": max(stages) + CUDA_OVERHEAD,
        "weight-streaming": streamed + CUDA_OVERHEAD,
    }
    plan.mode = next((m for m, need in plan.modes.items() if need <= usable), "does-not-fit")


def _floors(plan: Plan, target: str) -> None:
    peaks = PEAKS[target]
    total = 0.0
    for p in plan.parts:
        if not p.calls:
            continue
        math = SCHEMES[p.precision].gemm if p.precision in SCHEMES else "bf16"
        compute = p.flops / (peaks.get(math, peaks["bf16"]) * 1e12)
        memory = p.weights / (peaks["bandwidth"] * 1e9)
        seconds = p.calls * max(compute, memory)
        plan.floor_seconds[p.name] = seconds
        total += seconds
    plan.floor_seconds["total"] = total


def format_plan(plan: Plan) -> str:
    gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    lines = [f"{plan.variant} on {plan.target} ({TARGETS[plan.target].description}, {gib(plan.memory)} GiB), "
             f"{plan.precision}, {plan.height}x{plan.width}, {plan.steps} steps, batch {plan.batch}",
             "", "| component | precision | weights GiB | from | activations GiB (opt / max) | floor s |",
             "|---|---|---|---|---|---|"]
    for p in plan.parts:
        floor = plan.floor_seconds.get(p.name)
        lines.append(f"| {p.name} | {p.precision} | {gib(p.weights)} | {p.source} | {gib(p.act_opt)} / "
                     f"{gib(p.act_max)} | {'-' if floor is None else f'{floor:.3f}'} |")
    lines += ["", "| mode | needs GiB | fits |", "|---|---|---|"]
    usable = plan.memory * USABLE
    for mode, need in plan.modes.items():
        lines.append(f"| {mode} | {gib(need)} | {'yes' if need <= usable else 'no'} |")
    lines += ["", f"runtime mode: {plan.mode}; floor latency {plan.floor_seconds['total']:.3f} s per image "
              f"(datasheet peaks, perfect overlap: a bound, not a prediction)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zimage_deploy.plan", description=__doc__.split("\n")[0])
    ap.add_argument("--target", choices=[t for t in TARGETS if t != "cpu"], default=None,
                    help="GPU target (default: the build's with --engine-dir, else rtx4090)")
    ap.add_argument("--precision", choices=PRECISIONS, default=None,
                    help="default: the build's with --engine-dir, else the target's default (bf16)")
    ap.add_argument("--variant", choices=[n for n, v in VARIANTS.items() if v.layout == "basic"], default="turbo",
                    help="default: %(default)s (the build's with --engine-dir)")
    ap.add_argument("--height", type=int, default=1024, help="image height in pixels (default: %(default)s)")
    ap.add_argument("--width", type=int, default=1024, help="image width in pixels (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the variant's)")
    add_build_dir(ap, "a build folder: its engines' (or graphs') sizes replace the computed weights", required=False)
    ap.add_argument("--model", default=None,
                    help="a checkpoint whose configs to plan (default: the real Z-Image configs)")
    ap.add_argument("--controlnet", default=None, metavar="PATH",
                    help="plan a ControlNet build (as build --controlnet: a ZImageControlNetModel folder or a "
                         "released .safetensors; only its config and header are read). A build's own is counted "
                         "with --build-dir")
    ap.add_argument("--json", type=Path, default=None, help="also write the plan as JSON here")
    args = ap.parse_args(argv)
    if args.controlnet is not None and args.build_dir is not None:
        raise UserError("--controlnet plans a build before it exists; with --build-dir the build's own ControlNet "
                        "(if any) is counted")
    target = args.target or "rtx4090"
    precision = args.precision or TARGETS[target].default_precision
    if args.steps is not None and args.steps < 1:
        raise UserError("--steps must be >= 1")
    plan = make_plan(target, precision, args.height, args.width, args.variant, args.steps, args.build_dir,
                     args.model, controlnet=args.controlnet)
    print(format_plan(plan))
    if args.json:
        from .fsutil import atomic_file

        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps(plan.as_dict(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
