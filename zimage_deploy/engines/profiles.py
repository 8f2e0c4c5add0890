"""TensorRT optimization profiles, derived from variant x target x options: min/opt/max shape of every input,
from one range per dim name (batch, text_len, cap_len, latent_h/w, height/width, ...) applied to the inputs'
named dims that export/specs.py declares.

Real models: batch 1..4 (opt 1; 2 for CFG variants), sides 512..2048 px in 16-px steps at any aspect ratio,
text 1..512 tokens. Small test checkpoints (DiT dim < 1024, such as the embedded tiny one) use sides
64..512 px. A static profile (one H x W and batch, min = opt = max; captions of the basic layout fixed at 512
tokens, shorter ones zero-padded by the runtime) is what CUDA graphs want. Inputs of one shape (the LoRA
branch's factors of a build with run-time LoRA capacity, lora/tensorrt.py) get min = opt = max: `fixed_profile`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import UserError
from ..facts import FULL_SIDE, SMALL_SIDE, SMALL_SIDES, small_model
from ..export.specs import specs_for
from ..models.dit import SEQ_MULTIPLE
from ..models.omni import pad32
from ..variants import MAX_CONDITION_IMAGES

MAX_TEXT = 512


@dataclass(frozen=True)
class EngineOptions:
    opt_level: int = 3  # builder optimisation level 0..5
    max_batch: int = 4
    min_side: int | None = None  # pixels; None: from the variant (or the small-model range)
    max_side: int | None = None
    opt_side: int | None = None
    static: tuple[int, int] | None = None  # (height, width): static shapes
    static_batch: int = 1
    refittable: bool = False
    weight_streaming: bool = False
    strip_weights: str = "auto"  # "auto" (graphs with external data, > 512 MiB of weights), "on", "off"
    lora_bounds: tuple[int, int] | None = None  # (max rank, max LoRAs): DiT engines carry the LoRA branch

    def as_dict(self) -> dict:
        d = asdict(self)
        if d["lora_bounds"] is None:  # builds without the branch keep their engine keys
            del d["lora_bounds"]
        return d

    def strips(self, external_data: bool) -> bool:
        """Whether an engine is built weightless (STRIP_PLAN): its weights are refitted from the ONNX graph at
        load. Keeps the builder's host memory to about one copy of the weights, and the build folder to one copy
        on disk; costs a refit (a read of the graph's weights) each time the engine loads."""
        if self.strip_weights not in ("auto", "on", "off"):
            raise UserError(f"strip_weights must be auto, on or off, not {self.strip_weights!r}")
        return self.strip_weights == "on" or (self.strip_weights == "auto" and external_data)


def side_range(variant, facts: dict, opts: EngineOptions) -> tuple[int, int, int]:
    lo, hi, opt = (*SMALL_SIDES, SMALL_SIDE) if small_model(facts["dim"]) else \
        (variant.min_side, variant.max_side, FULL_SIDE)
    lo, hi = opts.min_side or lo, opts.max_side or hi
    opt = opts.opt_side or min(max(opt, lo), hi)
    multiple = facts["vae_scale_factor"] * facts["patch_size"]
    for name, v in (("min side", lo), ("max side", hi), ("opt side", opt)):
        if v <= 0 or v % multiple:
            raise UserError(f"{name} {v} must be a positive multiple of {multiple} pixels")
    if not lo <= opt <= hi:
        raise UserError(f"resolution range needs min <= opt <= max, got {lo} <= {opt} <= {hi}")
    return lo, opt, hi


def dim_ranges(variant, facts: dict, opts: EngineOptions) -> dict[str, tuple[int, int, int]]:
    """Each dynamic dim name of the graphs' I/O (export/specs.py) -> its (min, opt, max) size."""
    scale = facts["vae_scale_factor"]
    if opts.static:
        h, w = opts.static
        multiple = scale * facts["patch_size"]
        if h % multiple or w % multiple:
            raise UserError(f"static size {h}x{w} must be a multiple of {multiple} pixels")
        b = (opts.static_batch,) * 3
        lh, lw = (h // scale,) * 3, (w // scale,) * 3
    else:
        if opts.max_batch < 1:
            raise UserError("max batch must be >= 1")
        opt_b = 2 if variant.uses_cfg and opts.max_batch >= 2 else 1
        b = (1, opt_b, opts.max_batch)
        lo, opt, hi = side_range(variant, facts, opts)
        lh = lw = (lo // scale, opt // scale, hi // scale)
    tokens = tuple(pad32(h // 2 * (w // 2)) for h, w in zip(lh, lw))  # one image's patch tokens, padded to 32
    ranges = {"batch": b, "latent_h": lh, "latent_w": lw, "height": tuple(x * scale for x in lh),
              "width": tuple(x * scale for x in lw), "text_len": (1, 128, MAX_TEXT)}
    if variant.layout == "omni":
        return {**ranges, **_omni_ranges(facts, tokens)}
    # captions padded to 32; a static build fixes them at the longest (the runtime pads them: padding is masked)
    cap = (MAX_TEXT,) * 3 if opts.static else (SEQ_MULTIPLE, 128, MAX_TEXT)
    # a ControlNet's hints cover the joint sequence: image tokens padded to 32, then the caption slots
    return {**ranges, "cap_len": cap, "joint_len": tuple(t + n for t, n in zip(tokens, cap))}


def _omni_ranges(facts: dict, tokens: tuple) -> dict[str, tuple[int, int, int]]:
    """Edit: up to MAX_CONDITION_IMAGES condition images, each at most the largest output size; captions of up to
    512 tokens plus one 32-token segment per image boundary."""
    k = MAX_CONDITION_IMAGES
    cond = (tokens[0], tokens[1], k * tokens[2])
    sig_one = pad32(facts["vision_max_patches"])
    return {"cond_len": cond, "x_len": tuple(a + t for a, t in zip(cond, tokens)),
            "cap_len": (3 * SEQ_MULTIPLE, 4 * SEQ_MULTIPLE, MAX_TEXT + (k + 2) * SEQ_MULTIPLE),
            "sig_len": (2 * SEQ_MULTIPLE, sig_one + SEQ_MULTIPLE, k * sig_one + SEQ_MULTIPLE),
            "vision_len": (facts["vision_max_patches"],) * 3}


def fixed_profile(shapes: dict[str, list[int]]) -> dict[str, list[list[int]]]:
    """Input name -> [min, opt, max] of inputs that take one shape each."""
    return {name: [list(shape) for _ in range(3)] for name, shape in shapes.items()}


def profiles(variant, facts: dict, opts: EngineOptions) -> dict[str, dict[str, list[list[int]]]]:
    """component -> input name -> [min, opt, max] shapes: each input's dims (export/specs.py) resolved through
    `dim_ranges` (dynamic), the model facts (static names) or as written (ints)."""
    ranges = dim_ranges(variant, facts, opts)

    def triple(d) -> tuple[int, int, int]:
        if isinstance(d, int):
            return (d,) * 3
        return ranges[d] if d in ranges else (facts[d],) * 3

    return {name: {io.name: [[triple(d)[i] for d in io.dims] for i in range(3)] for io in spec.inputs}
            for name, spec in specs_for(variant.name, facts).items()}
