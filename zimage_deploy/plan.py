"""`python -m zimage_deploy.plan`: will a build fit the target's GPU memory, in which runtime mode, and how fast
could it be at best?

For each component: weights (from the engine plans where a build has them, else the graphs' recorded weight
bytes, else computed from the model configs and the precision) and activations at the profile's opt and max
shapes (an estimate from the configs: the tensors alive at the widest point of one layer, batch included, with
fused attention); then whether text encoder, DiT and VAE sit together on the target's memory:

- `all-resident`: every engine in GPU memory at once (fastest: nothing moves between requests);
- `low-vram`: one stage's engines in GPU memory at a time, loaded stage by stage (the runtime's `--low-vram`; costs
  a host-to-device copy of each engine per request);
- `text-encoder-cpu`: low-VRAM with the text encoder run in host memory (where only its stage is too wide);
- `weight-streaming`: even the DiT alone does not fit: the large engines (text encoder, DiT, ControlNet) keep a
  budget of their weights resident and stream the rest from host memory every call (engines built with
  `--weight-streaming`; `build` turns it on where the plan needs it); slow, the last resort;
- `does-not-fit`: not even the streamed stages fit.

The first that fits 95% of the card's memory is the plan's. Where it is not `all-resident`, the plan says which
other precision, text-encoder precision or smaller size would do better (`advice`). Each target's memory, compute
capability and datasheet peaks are in targets.py.

The floor latency is the larger of compute (FLOPs / the target's datasheet dense tensor peak for the precision)
and memory traffic (weights read once per call / datasheet bandwidth), per stage: text encoder once, DiT per step
(CFG doubles the batch), VAE decoder once; plus the mode's host-to-device copies over the card's PCIe link. Real
pipelines reach a fraction of it; it says what cannot be beaten.

Several builds on one card (`plan --build-dir A --build-dir B [--vram-gib G]`, `plan_set`): resident together, as
many as fit swapped in at a time, or not at all; recorded (`--json`); `serve` follows it (serve/residency.py).

An Edit build adds the SigLIP2 vision tower (`vision_encoder`) and the DiT's `siglip_refiner`, run once per request
on the condition images, and the DiT's sequence carries each condition image's latent patches (counted at the
output's size) and SigLIP rows: one condition image at the optimal shape, the most a request may send at the
largest. Its configs come from the build's (or `--model`'s) checkpoint.

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

from .cli import run_cli
from .components import stage_of, with_controlnet, with_controlnet_precision
from .errors import UserError
from .facts import SMALL_SIDES, small_model
from .manifest import Manifest, RuntimePlan, parse
from .quantize.options import DEFAULT_EXCLUDE
from .schemes import SCHEMES
from .targets import PRECISIONS, QUANTIZED, TARGETS, TEXT_ENCODER_PRECISIONS, get_target, precision_plan
from .variants import MAX_CONDITION_IMAGES, VARIANTS, get_variant

GIB = 1 << 30
CUDA_OVERHEAD = int(0.75 * GIB)  # CUDA context, TensorRT runtime, cuBLAS/cuDNN handles, allocator slack
USABLE = 0.95  # of the card's memory (fragmentation, display on desktop cards)

PCIE_FRACTION = 0.8  # of the link's one-way peak that host-to-device copies reach
MIN_STREAM_BUDGET = 2 * GIB  # resident weights weight streaming keeps at least (below it, it crawls)
STREAMABLE = ("text_encoder", "transformer", "controlnet")  # the large engines built with --weight-streaming
# runtime modes, best first (see the module doc)
MODES = ("all-resident", "low-vram", "text-encoder-cpu", "weight-streaming")
BYTES = {"fp32": 4.0, "bf16": 2.0, **{n: s.weight_bytes for n, s in SCHEMES.items()}}  # + block scales


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
    stream_budgets: dict = field(default_factory=dict)  # weight-streaming: component -> resident weight bytes
    advice: list = field(default_factory=list)  # choices that reach a better mode

    def as_dict(self) -> dict:
        return asdict(self)


# -- model facts from configs ------------------------------------------------------------------------------------

def _configs(model: str | None, manifest: Manifest | dict | None, edit: bool = False) -> dict:
    """Configs of the DiT, text encoder and VAE (Edit: and the SigLIP2 tower, `siglip`): from a checkpoint, a
    build's recorded checkpoint, or the real Z-Image (Turbo / Base) configs."""
    from .checkpoint import read_config

    path = None
    if manifest is not None:
        path = Path(parse(manifest).model.path)
    elif model is not None:
        from .checkpoint import resolve

        path = resolve(model)[0]
    if path is not None and (path / "transformer" / "config.json").is_file():
        cfgs = {k: read_config(path, k) for k in ("transformer", "text_encoder", "vae")}
        if cfgs["transformer"].get("siglip_feat_dim"):  # Edit: the SigLIP2 tower and its processor's patch budget
            sig = read_config(path, "siglip")
            cfgs["siglip"] = {**sig.get("vision_config", sig), "max_num_patches": read_config(
                path, "siglip_processor", "preprocessor_config.json").get("max_num_patches", 256)}
        return cfgs
    if path is not None:
        raise UserError(f"the build's checkpoint {path} is gone: pass --model with its configs")
    if edit:
        raise UserError("the real Z-Image-Edit configs are not embedded here: plan an Edit build (--build-dir) or "
                        "pass --model with an Edit checkpoint")
    from .realsize import REAL_DIT, REAL_TEXT, REAL_VAE

    return {"transformer": REAL_DIT, "text_encoder": REAL_TEXT, "vae": REAL_VAE}


def _controlnet_config(arg, model: str | None, manifest: Manifest | None, dit_cfg):
    """The ControlNet's config: the build's record, or `--controlnet PATH` checked against the DiT config."""
    if manifest is not None:
        rec = manifest.controlnet
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


def _meta_vision(sig: dict | None):
    """The Edit build's SigLIP2 vision tower on the meta device (None for Turbo / Base)."""
    if sig is None:
        return None
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    known = {k: v for k, v in sig.items() if not k.startswith("_") and k not in ("architectures", "dtype",
                                                                                  "max_num_patches")}
    with torch.device("meta"):
        return Siglip2VisionModel(Siglip2VisionConfig(**known))


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
    return name.startswith(("layers.", "noise_refiner.")) and not any(e in name for e in DEFAULT_EXCLUDE)


def _text_quantizable(name: str) -> bool:
    return name.startswith("layers.")


SHARED_WITH_CONTROLNET = ("x_embedder.", "x_pad_token", "t_embedder.", "noise_refiner.")


def controlnet_params(dit, branch) -> list[tuple[str, torch.Tensor]]:
    """The controlnet graph's weights: the branch's, and the DiT embedders and noise refiner it runs too."""
    shared = [(n, p) for n, p in dit.named_parameters() if n.startswith(SHARED_WITH_CONTROLNET)]
    return shared + [("control." + n, p) for n, p in branch.named_parameters()]


def _controlnet_quantizable(name: str) -> bool:
    return name.startswith(("control.control_layers.", "control.control_noise_refiner.", "noise_refiner.")) and \
        not any(e in name for e in DEFAULT_EXCLUDE)


def config_weights(modules, plan_of: dict[str, str], branch=None, vision=None) -> dict[str, int]:
    """Bytes of each component's graph weights, from the (meta-device) modules and the per-component precision
    (`branch`: a ControlNet's meta-device ControlBranch; `vision`: an Edit build's meta-device SigLIP2 tower, which
    adds the `vision_encoder` and `siglip_refiner` graphs)."""
    dit, text, vae = modules
    split = _dit_split(dit)
    keep32 = fp32_params(dit, text, vae, *(() if branch is None else (branch,)),
                         *(() if vision is None else (vision,)))
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
    if vision is not None:  # the graph is the tower's last hidden state: its pooling head is not in it
        params["siglip_refiner"] = (split["siglip_refiner"], lambda n: False)
        params["vision_encoder"] = ([(n, p) for n, p in vision.named_parameters() if ".head." not in f".{n}"],
                                    lambda n: False)
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


def vision_activations(sig: dict, tokens: int, images: int, elem: float) -> int:
    """Widest point of one SigLIP2 encoder layer on each condition image's patches: residual and normed input
    (2 S h), q/k/v and attention output (4 S h), the MLP's hidden and activated (2 S i); fused attention."""
    return int(images * tokens * (6 * sig["hidden_size"] + 2 * sig["intermediate_size"]) * elem)


def vision_flops(sig: dict, tokens: int, images: int) -> float:
    h, i = sig["hidden_size"], sig["intermediate_size"]
    return float(images * sig["num_hidden_layers"] * (2 * tokens * (4 * h * h + 2 * h * i) + 4 * tokens * tokens * h))


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

_CACHE: dict = {}  # (what, config key, ...) -> meta modules / VAE FLOPs: the all-targets table plans ~70 times


def _cached(key, make):
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def make_plan(target: str, precision: str, height: int = 1024, width: int = 1024, variant: str = "turbo",
              steps: int | None = None, engine_dir: Path | None = None, model: str | None = None,
              caption_tokens: int = 128, max_caption_tokens: int = 512, max_side: int | None = None,
              controlnet=None, text_encoder: str | None = None, on_target: str | None = None,
              advise: bool = True, lora: tuple[int, int] | None = None) -> Plan:
    """`text_encoder`: the text encoder's precision where it differs from the precision's (as build
    --text-encoder-precision); `on_target` (with `engine_dir`): plan the build on another card of the same compute
    capability; `advise`: where not everything stays resident, say which other precision, text-encoder precision
    or smaller size would do better (`Plan.advice`); `lora`: (max_lora_rank, max_loras) of run-time LoRA branches
    (lora/adapters.py), counted as a part."""
    manifest = None
    if engine_dir is not None:
        from . import manifest as manifest_io

        manifest = manifest_io.load(engine_dir)
        target, precision, variant = _built_on(manifest, engine_dir, on_target)
    t = get_target(target)
    v = _checked(t, variant, precision, text_encoder, height, width)
    cfgs = _configs(model, manifest, edit=v.layout == "omni")
    plan_of = precision_plan(precision, t.base, text_encoder)
    if manifest is not None:
        plan_of.update(manifest.plan or {})
    args = dict(steps=steps or v.default_steps, caption_tokens=caption_tokens, max_caption_tokens=max_caption_tokens,
                max_side=max_side, lora=lora)
    plan = _make(t, v, precision, plan_of, height, width, cfgs, manifest, controlnet, model, **args)
    if advise and plan.mode != MODES[0]:
        plan.advice = _advice(plan, t, v, precision, plan_of, cfgs, manifest, controlnet, model, **args)
    return plan


def _built_on(manifest: Manifest, engine_dir: Path, on_target: str | None) -> tuple[str, str, str]:
    """A build's target (or `on_target`, a card of the same compute capability; any GPU card for a CPU build, whose
    graphs are then planned as if built for it), precision and variant."""
    target = manifest.target
    if on_target is not None and on_target != target:
        built, other = get_target(target), get_target(on_target)
        if built.compute_capability is None and other.compute_capability is not None:
            pass  # a CPU build's graphs: what they would need on that card
        elif built.compute_capability != other.compute_capability:
            raise UserError(f"{engine_dir} was built for {target} ({built.sm}); its engines do not run on "
                            f"{on_target} ({other.sm})")
        target = on_target
    return target, manifest.precision, manifest.variant


def _checked(t, variant: str, precision: str, text_encoder: str | None, height: int, width: int):
    """The variant, where the planner covers the request: a GPU target running the precisions, the basic layout,
    sizes of multiples of 16."""
    if t.compute_capability is None:
        raise UserError("the cpu target runs in host memory: plan a GPU target")
    t.check_precision(precision)
    if text_encoder is not None and text_encoder != "bf16":
        t.check_precision(text_encoder)
    v = get_variant(variant)
    for side, name in ((height, "height"), (width, "width")):
        if side <= 0 or side % 16:
            raise UserError(f"--{name} {side} must be a positive multiple of 16")
    return v


@dataclass(frozen=True)
class _Shapes:
    """The sizes a plan counts activations and work at: the optimal (asked) size and the profile's largest."""
    height: int
    width: int
    side_max: int
    img_opt: int  # image tokens at height x width
    img_max: int  # ... at side_max x side_max
    batch: int  # 2 with CFG
    caption_tokens: int
    max_caption_tokens: int
    elem: float  # bytes per activation element
    sig_tokens: int = 0  # Edit: SigLIP patches per condition image
    conditions: tuple[int, int] = (0, 0)  # Edit: condition images counted (at the optimal size, at the largest)


def _make(t, v, precision, plan_of, height, width, cfgs, manifest, controlnet, model, steps, caption_tokens,
          max_caption_tokens, max_side, lora=None) -> Plan:
    key = json.dumps(cfgs, sort_keys=True, default=str)
    dit, text, vae = _cached(("modules", key), lambda: _meta_modules(cfgs))
    cn = _controlnet_config(controlnet, model, manifest, dit.cfg)
    branch = None
    if cn is not None:
        from .models.controlnet import ControlBranch

        with torch.device("meta"):
            branch = ControlBranch(cn, dit.cfg)
    scale = 2 ** (len(cfgs["vae"]["block_out_channels"]) - 1)
    patch = dit.cfg.patch_size
    side_max = max_side or max(height, width, SMALL_SIDES[1] if small_model(dit.cfg.dim) else v.max_side)

    sig = cfgs.get("siglip")
    sig_tokens = sig["max_num_patches"] if sig else 0
    conditions = (1, MAX_CONDITION_IMAGES) if v.layout == "omni" else (0, 0)

    def tokens(h, w, n=0):
        """The DiT's image-side rows: the target's, and (Edit) each condition image's latent patches (counted at
        the output's size) and SigLIP rows."""
        return (h // scale // patch) * (w // scale // patch) * (1 + n) + sig_tokens * n

    shapes = _Shapes(height, width, side_max, tokens(height, width, conditions[0]),
                     tokens(side_max, side_max, conditions[1]), 2 if v.uses_cfg else 1, caption_tokens,
                     max_caption_tokens, 4.0 if precision == "fp32" else 2.0, sig_tokens, conditions)
    acts = _activations(dit.cfg, text.cfg, cfgs["vae"], cn, shapes, sig)
    vae_flops = _cached(("vae", key, height, width),
                        lambda: vae_decoder_flops(vae, height // scale, width // scale, 1))
    flops = _flops(dit.cfg, text.cfg, cn, shapes, steps, vae_flops, sig)
    plan = Plan(t.name, precision, v.name, height, width, steps, shapes.batch, int(t.memory_gib * GIB))
    components = v.components
    if cn is not None:
        plan_of, components = with_controlnet_precision(plan_of), with_controlnet(components)
    weights_key = ("weights", key, tuple(sorted(plan_of.items())))
    vision = _cached(("vision", key), lambda: _meta_vision(sig))
    computed = config_weights((dit, text, vae), plan_of, branch, vision) if branch is not None else \
        _cached(weights_key, lambda: config_weights((dit, text, vae), plan_of, vision=vision))
    for name in components:
        weights, source = _built_weights(manifest, name) or (computed[name], "config")
        plan.parts.append(Part(name, plan_of[name], weights, source, *acts[name], *flops[name]))
    if lora:
        from .lora.adapters import plan_cost

        nbytes, step_flops = plan_cost(dit, *lora, shapes.img_opt, caption_tokens, shapes.batch)
        plan.parts.append(Part("lora_branches", "bf16", nbytes, "config", 0, 0, step_flops, steps))
    _choose_mode(plan)
    _floors(plan, t)
    return plan


def _activations(dcfg, tcfg, vae_cfg: dict, cn, s: _Shapes, sig: dict | None = None) -> dict[str, tuple[int, int]]:
    """Each component's activation bytes (at the optimal size, at the largest)."""
    elem, batch = s.elem, s.batch
    acts = {
        "text_encoder": (text_activations(tcfg, s.caption_tokens, batch, elem),
                         text_activations(tcfg, s.max_caption_tokens, 4, elem)),
        "context_refiner": (dit_activations(dcfg, 0, s.caption_tokens, batch, elem),
                            dit_activations(dcfg, 0, s.max_caption_tokens, 4, elem)),
        "transformer": (dit_activations(dcfg, s.img_opt, s.caption_tokens, batch, elem),
                        dit_activations(dcfg, s.img_max, s.max_caption_tokens, 4, elem)),
        "vae_decoder": (vae_activations(vae_cfg, s.height, s.width, 1, elem),
                        vae_activations(vae_cfg, s.side_max, s.side_max, 4, elem)),
        "vae_encoder": (vae_activations(vae_cfg, s.height, s.width, 1, elem),
                        vae_activations(vae_cfg, s.side_max, s.side_max, 4, elem)),
    }
    if cn is not None:  # the branch's blocks are DiT blocks; its hints go to the transformer
        shapes = ((s.img_opt, s.caption_tokens, batch), (s.img_max, s.max_caption_tokens, 4))  # (opt, max)
        hints = [int(cn.n_hints * b * (_pad32(img) + _pad32(cap)) * dcfg.dim * elem) for img, cap, b in shapes]
        acts["controlnet"] = tuple(dit_activations(dcfg, *shape, elem) + h for shape, h in zip(shapes, hints))
        acts["transformer"] = tuple(a + h for a, h in zip(acts["transformer"], hints))
    if sig is not None:  # Edit: once per request, on the condition images
        acts["vision_encoder"] = tuple(vision_activations(sig, s.sig_tokens, n, elem) for n in s.conditions)
        acts["siglip_refiner"] = tuple(dit_activations(dcfg, 0, s.sig_tokens * n, 1, elem) for n in s.conditions)
    return acts


def _flops(dcfg, tcfg, cn, s: _Shapes, steps: int, vae_flops: float,
           sig: dict | None = None) -> dict[str, tuple[float, int]]:
    """Each component's work per call, and its calls per image."""
    flops = {
        "text_encoder": (text_flops(tcfg, s.caption_tokens, s.batch), 1),
        "context_refiner": (context_flops(dcfg, s.caption_tokens, s.batch), 1),
        "transformer": (dit_step_flops(dcfg, s.img_opt, s.caption_tokens, s.batch), steps),
        "vae_decoder": (vae_flops, 1),
        "vae_encoder": (0.0, 0),  # img2img / inpainting only
    }
    if cn is not None:
        flops["controlnet"] = (controlnet_step_flops(dcfg, cn, s.img_opt, s.caption_tokens, s.batch), steps)
    if sig is not None:
        from .models.fast import block_flops

        n = s.conditions[0]
        flops["vision_encoder"] = (vision_flops(sig, s.sig_tokens, n), 1)
        flops["siglip_refiner"] = (float(n * dcfg.n_refiner_layers * block_flops(dcfg, _pad32(s.sig_tokens))), 1)
    return flops


def _built_weights(manifest: Manifest | None, name: str) -> tuple[int, str] | None:
    """A built component's weight bytes and where they come from: its engine plan (unless weightless), else its
    graph; None where the build does not say (or there is no build)."""
    if manifest is None:
        return None
    entry = manifest.components.get(name)
    if entry is None:
        return None
    if entry.engine and entry.engine.bytes and not entry.engine.stripped:
        return entry.engine.bytes, "engine plan"
    if entry.weight_bytes:
        return entry.weight_bytes, "graph"
    return None


def _stages(plan: Plan) -> list[list[Part]]:
    """The stages of low-VRAM mode (components.py `stage_of`), in the order of their first part."""
    stages: dict[str, list[Part]] = {}
    for p in plan.parts:
        stages.setdefault(stage_of(p.name), []).append(p)
    return list(stages.values())


def _stage_need(stage: list[Part], streamed: bool = False) -> int:
    """GPU memory of one stage: its weights (streamed: at most MIN_STREAM_BUDGET of each large engine's) and the
    widest activations among its components."""
    weights = sum(min(p.weights, MIN_STREAM_BUDGET) if streamed and p.name in STREAMABLE else p.weights
                  for p in stage)
    return weights + max(p.act_opt for p in stage)


def _choose_mode(plan: Plan) -> None:
    """What each mode needs; the first that fits in MODES' order is the plan's. `text-encoder-cpu` is low-VRAM
    mode with the text encoder run in host memory: it helps only where the text encoder's stage is the widest."""
    usable = int(plan.memory * USABLE)
    stages = _stages(plan)
    gpu_stages = [s for s in stages if s[0].name != "text_encoder"]
    plan.modes = {
        "all-resident": sum(p.weights for p in plan.parts) + max(p.act_opt for p in plan.parts) + CUDA_OVERHEAD,
        "low-vram": max(map(_stage_need, stages)) + CUDA_OVERHEAD,
        "text-encoder-cpu": max(map(_stage_need, gpu_stages)) + CUDA_OVERHEAD,
        "weight-streaming": max(_stage_need(s, streamed=True) for s in stages) + CUDA_OVERHEAD,
    }
    plan.mode = next((m for m in MODES if plan.modes[m] <= usable), "does-not-fit")
    plan.stream_budgets = {}
    if plan.mode == "weight-streaming":  # each large engine keeps what its stage leaves free of its weights
        for stage in stages:
            for p in stage:
                if p.name in STREAMABLE:
                    others = _stage_need(stage, streamed=True) - min(p.weights, MIN_STREAM_BUDGET)
                    plan.stream_budgets[p.name] = min(p.weights, usable - CUDA_OVERHEAD - others)


def _transfers(plan: Plan) -> int:
    """Bytes copied host-to-device per image in the plan's mode: nothing all resident; every used engine once in
    low-VRAM mode (the text encoder's not, where it runs on the CPU); the streamed part of a large engine's weights
    on every call."""
    if plan.mode in ("all-resident", "does-not-fit"):
        return 0
    total = 0
    for p in plan.parts:
        if not p.calls or (p.name == "text_encoder" and plan.mode == "text-encoder-cpu"):
            continue
        budget = plan.stream_budgets.get(p.name)
        total += p.weights if budget is None else budget + (p.weights - budget) * p.calls
    return total


def _floors(plan: Plan, t) -> None:
    total = 0.0
    for p in plan.parts:
        if not p.calls:
            continue
        math = SCHEMES[p.precision].gemm if p.precision in SCHEMES else "bf16"
        compute = p.flops / (t.peaks.tflops(math) * 1e12)
        memory = p.weights / (t.peaks.bandwidth * 1e9)
        seconds = p.calls * max(compute, memory)
        if p.name == "text_encoder" and plan.mode == "text-encoder-cpu":
            seconds = 0.0  # on the CPU: not estimated (see format_plan)
        plan.floor_seconds[p.name] = seconds
        total += seconds
    plan.floor_seconds["transfers"] = _transfers(plan) / (t.peaks.pcie * PCIE_FRACTION * 1e9)
    plan.floor_seconds["total"] = total + plan.floor_seconds["transfers"]


def _advice(plan, t, v, precision, plan_of, cfgs, manifest, controlnet, model, **args) -> list[str]:
    """Other choices that reach a better mode than `plan`'s: an INT4 text encoder, another precision, a smaller
    size (the largest that does better)."""
    rank = lambda p: MODES.index(p.mode) if p.mode in MODES else len(MODES)  # noqa: E731
    tried = []
    # the text encoder in the leanest scheme the target runs (INT4 today), if it is not already
    lean = min((p for p in TEXT_ENCODER_PRECISIONS if p in SCHEMES and p in t.precisions),
               key=lambda p: SCHEMES[p].weight_bytes, default=None)
    if lean is not None and plan_of.get("text_encoder") != lean:
        tried.append((f"--text-encoder-precision {lean}", precision, {**plan_of, "text_encoder": lean},
                      plan.height, plan.width))
    for other in ("fp8", "nvfp4", "int4"):
        if other != precision and other in t.precisions and BYTES[other] < BYTES[plan_of["transformer"]]:
            tried.append((f"--precision {other}", other, precision_plan(other, t.base), plan.height, plan.width))
    advice = []
    for hint, prec, of, h, w in tried:
        alt = _make(t, v, prec, of, h, w, cfgs, None, controlnet, model, **args)
        if rank(alt) < rank(plan):
            advice.append(f"{hint}: {alt.mode}, {alt.modes[alt.mode] / GIB:.2f} GiB")
    for side in (896, 768, 640, 512):
        if side < max(plan.height, plan.width):
            alt = _make(t, v, precision, plan_of, min(side, plan.height), min(side, plan.width), cfgs, manifest,
                        controlnet, model, **args)
            if rank(alt) < rank(plan):
                advice.append(f"--height {alt.height} --width {alt.width}: {alt.mode}, "
                              f"{alt.modes[alt.mode] / GIB:.2f} GiB")
                break
    return advice


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
    lines += ["", f"runtime mode: {plan.mode}; floor latency {plan.floor_seconds['total']:.3f} s per image, "
              f"{plan.floor_seconds['transfers']:.3f} s of it host-to-device copies "
              f"(datasheet peaks, perfect overlap: a bound, not a prediction)"]
    if plan.mode == "text-encoder-cpu":
        lines.append("the text encoder runs on the CPU: its time is not in the floor")
    for name, budget in plan.stream_budgets.items():
        lines.append(f"weight streaming: {name} keeps {gib(budget)} GiB of its weights resident")
    if plan.advice:
        lines += ["", "does better:"] + [f"- {a}" for a in plan.advice]
    return "\n".join(lines)


# -- what a build records ----------------------------------------------------------------------------------------

def runtime_record(plan: Plan) -> RuntimePlan:
    """The manifest's `runtime`: the mode the runtimes follow, what each mode needs, the weight-streaming budgets."""
    return RuntimePlan(mode=plan.mode, planned_at=(plan.height, plan.width),
                       needs_gib={m: round(b / GIB, 2) for m, b in plan.modes.items()},
                       memory_gib=round(plan.memory / GIB, 1), stream_budget_bytes=dict(plan.stream_budgets),
                       advice=tuple(plan.advice), absent=frozenset({"backend"}))


def planned_engine_options(target: str, precision: str, side: int, variant: str, model: str | None,
                           text_encoder: str | None, controlnet, opts, log):
    """Before the engines are built: the plan from the checkpoint's configs (`model`; None: the real Z-Image's) at
    the build's default size. Where it picks weight streaming, the engines must be built for it: the options turn
    it on, and the log says so."""
    from dataclasses import replace

    p = make_plan(target, precision, side, side, variant, model=model, controlnet=controlnet,
                  text_encoder=text_encoder, advise=False, lora=opts.lora_bounds)
    log(f"[plan] {target}: {p.mode} at {side}x{side} ({p.modes.get(p.mode, 0) / GIB:.2f} GiB planned of "
        f"{p.memory / GIB:.0f})")
    if p.mode == "weight-streaming" and not opts.weight_streaming:
        log("[plan] the DiT does not fit the card even alone: building the engines with weight streaming")
        return replace(opts, weight_streaming=True)
    return opts


# -- every card at once, and several builds on one card ----------------------------------------------------------

def target_rows(height: int = 1024, width: int = 1024, steps: int | None = None, variant: str = "turbo") -> list:
    """One row per GPU target and precision it supports (fp32 left out): the mode the plan picks, what it needs,
    the floor latency; `default` marks the target's default precision."""
    rows = []
    for t in TARGETS.values():
        if t.compute_capability is None:
            continue
        for precision in t.precisions:
            if precision == "fp32":
                continue
            p = make_plan(t.name, precision, height, width, variant, steps,
                          text_encoder=t.default_text_encoder if precision == t.default_precision else None)
            need = p.modes.get(p.mode)
            text_encoder = next(x.precision for x in p.parts if x.name == "text_encoder")
            rows.append(dict(target=t.name, memory_gib=t.memory_gib, sm=t.sm, precision=precision,
                             text_encoder=text_encoder, mode=p.mode,
                             needs_gib=None if need is None else round(need / GIB, 2),
                             floor_s=round(p.floor_seconds["total"], 2), default=precision == t.default_precision,
                             advice=p.advice))
    return rows


def format_rows(rows: list, height: int, width: int, steps: int) -> str:
    lines = [f"Turbo at {height}x{width}, {steps} steps (python -m zimage_deploy.plan --all-targets); "
             "* = the target's default precision", "",
             "| target | GiB | SM | precision | text encoder | mode | needs GiB | floor s | does better |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        need = "-" if r["needs_gib"] is None else f"{r['needs_gib']:.2f}"
        lines.append(f"| {r['target']} | {r['memory_gib']} | {r['sm']} | {r['precision']}{'*' if r['default'] else ''}"
                     f" | {r['text_encoder']} | {r['mode']} | {need} | {r['floor_s']:.2f} | {'; '.join(r['advice']) or '-'} |")
    return "\n".join(lines)


@dataclass
class SetPlan:
    """Several builds on one card: `resident-together` (every build's engines in GPU memory at once, one CUDA
    context), `one-at-a-time` (at most `max_resident` builds' engines in memory, the others swapped in on demand,
    each in its own plan's mode; a switch costs a copy of that build's weights), or `does-not-fit`. What a server
    that holds the set follows (serve/residency.py)."""
    target: str
    memory: int
    builds: list = field(default_factory=list)  # per build: dir, variant, precision, mode alone, GiB, swap seconds
    together: int = 0  # bytes
    one_at_a_time: int = 0  # bytes
    mode: str = ""
    max_resident: int = 0  # builds resident at once whichever they are (all of them: resident-together)

    def as_dict(self) -> dict:
        return asdict(self)


def plan_set(dirs: list[Path], target: str | None = None, height: int | None = None,
             width: int | None = None, memory_gib: float | None = None) -> SetPlan:
    """Plan builds that one server holds (each at its default size, or `height` x `width`) on one card: the
    builds' own target where they share it, else `target` (of the same compute capability; any GPU card for CPU
    builds); `memory_gib` replaces the card's memory (a card shared with other work, or a test's small budget)."""
    from . import manifest as manifest_io

    manifests = [manifest_io.load(d) for d in dirs]
    targets = {m.target for m in manifests}
    if target is None and len(targets) > 1:
        raise UserError(f"the builds are for different targets ({', '.join(sorted(targets))}): pass --target, the "
                        "card they share")
    target = target or targets.pop()
    if get_target(target).compute_capability is None:
        raise UserError("CPU builds run in host memory: pass --target, the card to plan them on")
    if memory_gib is not None and memory_gib <= 0:
        raise UserError(f"--vram-gib must be > 0, got {memory_gib:g}")
    plans = [make_plan(m.target, m.precision, height or m.defaults.height, width or m.defaults.width, engine_dir=d,
                       on_target=target, advise=False)
             for d, m in zip(dirs, manifests)]
    t = get_target(target)
    out = SetPlan(target, int((memory_gib or t.memory_gib) * GIB))
    usable = int(out.memory * USABLE)
    for p in plans:  # each build's own mode on this memory
        p.memory = out.memory
        _choose_mode(p)
    acts = [max(p.act_opt for p in plan.parts) for plan in plans]
    weights = [sum(p.weights for p in plan.parts) for plan in plans]
    out.together = sum(weights) + max(acts) + CUDA_OVERHEAD
    out.one_at_a_time = max(plan.modes.get(plan.mode, plan.modes["weight-streaming"]) for plan in plans)
    for d, plan, w in zip(dirs, plans, weights):
        out.builds.append(dict(dir=str(d), variant=plan.variant, precision=plan.precision, mode=plan.mode,
                               needs_gib=round(plan.modes.get(plan.mode, plan.modes["all-resident"]) / GIB, 2),
                               weights_gib=round(w / GIB, 2),
                               swap_seconds=round(w / (t.peaks.pcie * PCIE_FRACTION * 1e9), 3)))
    if any(plan.mode == "does-not-fit" for plan in plans):
        out.mode = "does-not-fit"
    elif out.together <= usable and all(plan.mode == "all-resident" for plan in plans):
        out.mode, out.max_resident = "resident-together", len(plans)
    else:
        out.mode, out.max_resident = "one-at-a-time", 1
        if all(plan.mode == "all-resident" for plan in plans):  # as many as fit, whichever they are
            heaviest = sorted(weights, reverse=True)
            while out.max_resident < len(plans) - 1 and \
                    sum(heaviest[:out.max_resident + 1]) + max(acts) + CUDA_OVERHEAD <= usable:
                out.max_resident += 1
    return out


def format_set(s: SetPlan) -> str:
    gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    lines = [f"{len(s.builds)} builds on {s.target} ({TARGETS[s.target].description}, {gib(s.memory)} GiB)", "",
             "| build | variant | precision | mode alone | needs GiB | weights GiB | swap-in s |",
             "|---|---|---|---|---|---|---|"]
    for b in s.builds:
        lines.append(f"| {b['dir']} | {b['variant']} | {b['precision']} | {b['mode']} | {b['needs_gib']:.2f} | "
                     f"{b['weights_gib']:.2f} | {b['swap_seconds']:.3f} |")
    lines += ["", f"resident together: {gib(s.together)} GiB; one at a time: {gib(s.one_at_a_time)} GiB "
              f"(usable {gib(s.memory * USABLE)} GiB)",
              f"set mode: {s.mode}" + (f" (at most {s.max_resident} resident at once)" if s.mode == "one-at-a-time"
                                       else "")]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zimage_deploy.plan", description=__doc__.split("\n")[0])
    ap.add_argument("--target", choices=[t for t in TARGETS if t != "cpu"], default=None,
                    help="GPU target (default: the build's with --build-dir, else rtx4090); with --build-dir: "
                         "another card of the same compute capability")
    ap.add_argument("--precision", choices=PRECISIONS, default=None,
                    help="default: the build's with --build-dir, else the target's default")
    ap.add_argument("--text-encoder-precision", choices=TEXT_ENCODER_PRECISIONS, default=None,
                    help="as build --text-encoder-precision (default: the precision's)")
    ap.add_argument("--variant", choices=list(VARIANTS), default="turbo",
                    help="default: %(default)s (the build's with --build-dir; edit: with --model, an Edit checkpoint)")
    ap.add_argument("--height", type=int, default=None, help="image height in pixels (default: 1024; a build's own)")
    ap.add_argument("--width", type=int, default=None, help="image width in pixels (default: 1024; a build's own)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the variant's)")
    ap.add_argument("--build-dir", "--engine-dir", dest="build_dirs", type=Path, action="append", default=None,
                    metavar="DIR", help="a build folder: its engines' (or graphs') sizes replace the computed "
                                        "weights; twice or more: whether the builds fit one card together "
                                        "(--engine-dir: the same)")
    ap.add_argument("--all-targets", action="store_true",
                    help="one row per GPU target and precision: the mode that fits, what it needs, the floor")
    ap.add_argument("--model", default=None,
                    help="a checkpoint whose configs to plan (default: the real Z-Image configs)")
    ap.add_argument("--controlnet", default=None, metavar="PATH",
                    help="plan a ControlNet build (as build --controlnet: a ZImageControlNetModel folder or a "
                         "released .safetensors; only its config and header are read). A build's own is counted "
                         "with --build-dir")
    ap.add_argument("--max-lora-rank", type=int, default=None, metavar="R",
                    help="count run-time LoRA branches of this rank bound (Torch backend; see README LoRA)")
    ap.add_argument("--max-loras", type=int, default=None, metavar="N",
                    help="LoRAs per set the branches hold (default 4 with --max-lora-rank)")
    ap.add_argument("--vram-gib", type=float, default=None, metavar="GIB",
                    help="with two or more --build-dir: the card's memory to plan the set on, instead of the "
                         "target's (a card shared with other work)")
    ap.add_argument("--json", type=Path, default=None, help="also write the plan as JSON here")
    args = ap.parse_args(argv)
    lora = None
    if args.max_lora_rank is not None or args.max_loras is not None:
        from .lora.adapters import MAX_LORAS, MAX_RANK

        lora = (MAX_RANK if args.max_lora_rank is None else args.max_lora_rank,
                MAX_LORAS if args.max_loras is None else args.max_loras)
        if min(lora) < 1:
            raise UserError("--max-lora-rank and --max-loras must be >= 1")
    dirs = args.build_dirs or []
    if args.controlnet is not None and dirs:
        raise UserError("--controlnet plans a build before it exists; with --build-dir the build's own ControlNet "
                        "(if any) is counted")
    if args.steps is not None and args.steps < 1:
        raise UserError("--steps must be >= 1")
    if args.vram_gib is not None and len(dirs) < 2:
        raise UserError("--vram-gib plans a set: give two or more --build-dir")
    if args.all_targets and dirs:
        raise UserError("--all-targets plans from the configs: leave out --build-dir")
    size = [1024 if x is None else x for x in (args.height, args.width)]
    if args.all_targets:
        (h, w), steps = size, args.steps or VARIANTS[args.variant].default_steps
        rows = target_rows(h, w, steps, args.variant)
        text, record = format_rows(rows, h, w, steps), {"height": h, "width": w, "steps": steps, "rows": rows}
    elif len(dirs) > 1:
        s = plan_set(dirs, args.target, args.height, args.width, args.vram_gib)
        text, record = format_set(s), s.as_dict()
    else:
        target = args.target or "rtx4090"
        precision = args.precision or TARGETS[target].default_precision
        plan = make_plan(target, precision, *size, args.variant, args.steps,
                         dirs[0] if dirs else None, args.model, controlnet=args.controlnet,
                         text_encoder=TARGETS[target].text_encoder_for(args.precision, args.text_encoder_precision),
                         on_target=args.target, lora=lora)
        text, record = format_plan(plan), plan.as_dict()
    print(text)
    if args.json:
        from .fsutil import atomic_file

        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
