"""The Z-Image variants, declared once: everything the other stages need to know about each."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class Variant:
    name: str
    hub_id: str
    default_steps: int
    default_guidance: float
    scheduler_shift: float  # used when the checkpoint's scheduler config does not say
    min_side: int  # real-model resolution range, pixels (multiples of 16)
    max_side: int
    components: tuple[str, ...]
    uses_cfg: bool
    layout: str = "basic"  # the DiT's sequence layout: "basic" (text -> image) or "omni" (condition images too)
    quantizable: bool = True  # the quantize stage can calibrate it (the omni layout: with condition images)
    optional: tuple[str, ...] = ()  # components only some requests use: a build without them still generates

    @property
    def required(self) -> tuple[str, ...]:
        """The components every request runs: a build lacking one (or with one rejected) is refused at load."""
        return tuple(c for c in self.components if c not in self.optional)


# Components, in pipeline order. "context_refiner" is the prompt-only part of the DiT
# (caption embedder + context refiner): it runs once per prompt, "transformer" once per step.
# "vae_encoder" serves img2img and inpainting.
TURBO_COMPONENTS = ("text_encoder", "context_refiner", "transformer", "vae_decoder", "vae_encoder")
# Edit / Omni: the context refiner and transformer take an explicit sequence layout (models/omni.py); the
# SigLIP2 vision tower and the DiT's SigLIP refiner encode the condition images once per request.
EDIT_COMPONENTS = ("text_encoder", "context_refiner", "siglip_refiner", "transformer", "vae_decoder",
                   "vae_encoder", "vision_encoder")
# the omni layout: condition images per request (the Edit engines' profile range and the request limit)
MAX_CONDITION_IMAGES = 2

VARIANTS: dict[str, Variant] = {
    "turbo": Variant(
        name="turbo",
        hub_id="Tongyi-MAI/Z-Image-Turbo",
        default_steps=8,
        default_guidance=0.0,
        scheduler_shift=3.0,
        min_side=512,
        max_side=2048,
        components=TURBO_COMPONENTS,
        uses_cfg=False,
        optional=("vae_encoder",),  # img2img and inpainting only
    ),
    "base": Variant(
        name="base",
        hub_id="Tongyi-MAI/Z-Image",
        default_steps=50,
        default_guidance=4.0,
        scheduler_shift=3.0,
        min_side=512,
        max_side=2048,
        components=TURBO_COMPONENTS,
        uses_cfg=True,
        optional=("vae_encoder",),
    ),
    "edit": Variant(
        name="edit",
        hub_id="Tongyi-MAI/Z-Image-Edit",
        default_steps=50,
        default_guidance=4.0,
        scheduler_shift=3.0,
        min_side=512,
        max_side=2048,
        components=EDIT_COMPONENTS,
        uses_cfg=True,
        layout="omni",
    ),
}


def is_omni(name: str) -> bool:
    """Whether the variant called `name` runs the omni sequence layout: condition images instead of img2img,
    inpainting and ControlNet."""
    v = VARIANTS.get(name)
    return v is not None and v.layout == "omni"


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise UserError(f"unknown variant {name!r}; choose one of: {', '.join(VARIANTS)}") from None
