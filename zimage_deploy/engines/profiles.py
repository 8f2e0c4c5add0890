"""TensorRT optimization profiles, derived from variant x target x options: min/opt/max shape of every input.

Real models: batch 1..4 (opt 1; 2 for CFG variants), sides 512..2048 px in 16-px steps at any aspect ratio,
text 1..512 tokens. Small test checkpoints (DiT dim < 1024, such as the embedded tiny one) use sides
64..512 px. A static profile (one H x W and batch, min = opt = max) is what CUDA graphs want.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import UserError
from ..facts import FULL_SIDE, SMALL_SIDE, SMALL_SIDES, small_model
from ..models.dit import SEQ_MULTIPLE

MAX_TEXT = 512
MAX_CONDITION_IMAGES = 2  # Edit engines: condition images per request


def pad32(n: int) -> int:
    return -(-n // SEQ_MULTIPLE) * SEQ_MULTIPLE


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

    def as_dict(self) -> dict:
        return asdict(self)

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


def profiles(variant, facts: dict, opts: EngineOptions) -> dict[str, dict[str, list[list[int]]]]:
    """component -> input name -> [min, opt, max] shapes."""
    scale = facts["vae_scale_factor"]
    c, dim, cap = facts["latent_channels"], facts["dim"], facts["cap_feat_dim"]
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
    text = (1, 128, MAX_TEXT)
    capl = (SEQ_MULTIPLE, 128, MAX_TEXT)

    def shapes(*dims):  # each dim a (min, opt, max) triple or an int
        triples = [d if isinstance(d, tuple) else (d, d, d) for d in dims]
        return [[t[i] for t in triples] for i in range(3)]

    shared = {
        "text_encoder": {"input_ids": shapes(b, text), "attention_mask": shapes(b, text)},
        "vae_decoder": {"latents": shapes(b, c, lh, lw)},
        "vae_encoder": {"image": shapes(b, 3, tuple(x * scale for x in lh), tuple(x * scale for x in lw))},
    }
    if variant.name == "edit":
        return {**shared, **_omni_profiles(facts, b, c, lh, lw, shapes)}
    step = {"latents": shapes(b, c, lh, lw), "timestep": shapes(b), "cap_states": shapes(b, capl, dim),
            "cap_lens": shapes(b)}
    out = {**shared, "context_refiner": {"cap_feats": shapes(b, capl, cap), "cap_lens": shapes(b)},
           "transformer": dict(step)}
    if facts.get("n_hints"):  # a ControlNet: its hints graph, and the transformer taking the hints
        joint = tuple(pad32(h // 2 * (w // 2)) + n for h, w, n in zip(lh, lw, capl))
        hints = shapes(facts["n_hints"], b, joint, dim)
        out["controlnet"] = {**step, "control": shapes(b, facts["control_in_dim"], lh, lw), "scale": shapes(b)}
        out["transformer"]["hints"] = hints
    return out


def _omni_profiles(facts, b, c, lh, lw, shapes):
    """Edit: up to MAX_CONDITION_IMAGES condition images, each at most the largest output size; captions of
    up to 512 tokens plus one 32-token segment per image boundary."""
    k = MAX_CONDITION_IMAGES
    tokens = tuple(pad32(h // 2 * (w // 2)) for h, w in zip(lh, lw))  # one image's patch tokens (min/opt/max)
    cond = (tokens[0], tokens[1], k * tokens[2])
    x = tuple(a + t for a, t in zip(cond, tokens))
    cap = (3 * SEQ_MULTIPLE, 4 * SEQ_MULTIPLE, MAX_TEXT + (k + 2) * SEQ_MULTIPLE)
    sig_one = pad32(facts["vision_max_patches"])
    sig = (2 * SEQ_MULTIPLE, sig_one + SEQ_MULTIPLE, k * sig_one + SEQ_MULTIPLE)
    dim, cap_dim, sig_dim = facts["dim"], facts["cap_feat_dim"], facts["siglip_feat_dim"]
    return {
        "context_refiner": {"cap_feats": shapes(b, cap, cap_dim), "cap_pad": shapes(b, cap),
                            "cap_pos": shapes(b, cap, 3), "cap_valid": shapes(b, cap)},
        "siglip_refiner": {"sig_feats": shapes(b, sig, sig_dim), "sig_pad": shapes(b, sig),
                           "sig_pos": shapes(b, sig, 3), "sig_valid": shapes(b, sig)},
        "transformer": {
            "latents": shapes(b, c, lh, lw), "timestep": shapes(b), "cond_patches": shapes(b, cond, facts["patch_dim"]),
            "x_pad": shapes(b, x), "x_pos": shapes(b, x, 3), "x_noise": shapes(b, x),
            "cap_states": shapes(b, cap, dim), "cap_pos": shapes(b, cap, 3), "cap_valid": shapes(b, cap),
            "cap_noise": shapes(b, cap), "sig_states": shapes(b, sig, dim), "sig_pos": shapes(b, sig, 3),
            "sig_valid": shapes(b, sig), "sig_noise": shapes(b, sig),
        },
        "vision_encoder": {"pixel_values": shapes(b, facts["vision_max_patches"], facts["vision_patch_dim"]),
                           "pixel_attention_mask": shapes(b, facts["vision_max_patches"]),
                           "spatial_shapes": shapes(b, 2)},
    }
