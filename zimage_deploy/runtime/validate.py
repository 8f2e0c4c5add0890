"""One request validator for the CLI, the runtime API, the HTTP server and the Ray Serve app.

    from zimage_deploy.runtime.validate import Limits, check_request
    limits = Limits.for_build(manifest)                  # or ZImageRuntime(...).limits
    req = check_request(limits, "a fox", seed=3, height=256, width=256)   # -> Request, or RequestError
    runtime.run(req)                                     # what ZImageRuntime.generate does itself
    pipeline.run(req, images, mask, control_image)       # the pipelines sample only checked requests

Everything is checked before any model loads or any image is decoded (image inputs are checked from their
sizes: PIL reads a file's header without decoding its pixels). The rules, the same everywhere:

- prompt: a non-empty string (not only white space) of at most `max_prompt_chars` (10 000) characters of
  valid Unicode; the same bound for `negative_prompt`, which needs a guidance scale > 0.
- seed: an integer in 0 .. 2**63 - 1 (`SEED_MAX`); a batch of B prompts takes one seed or B seeds.
- steps: an integer in 1 .. `max_steps` (100); default: the variant's.
- height / width: integers, positive multiples of the build's resolution multiple, within the build's size
  range: its engine profile (min/max side, or the static size) when it has engines, else the range the default
  engine profile of the same checkpoint has (64..512 px for small test checkpoints, 512..2048 for real ones).
- guidance_scale in [0, 30], cfg_normalization in [0, 10], cfg_truncation in [0, 1], strength in (0, 1] (with
  an input image only; default 0.6, Edit: 1): finite numbers.
- input images (PNG, JPEG or WebP when given as bytes or files): at most `max_input_pixels` (4096 x 4096)
  pixels before resizing, and after the documented resize rule within the profile:
  img2img / inpainting: the output takes the image's size rounded down to the multiple, which must be within
  the size range (a mask has the image's size); Edit: 1 .. `max_conditions` (2) condition images of at least
  64 px a side and at most 8:1, each scaled to 1024 x 1024 px of area (or the requested output's) when larger,
  then cropped to the multiple, and then at most max_side**2 pixels with each side within the size range (the
  VAE encoder's profile: condition images are encoded one at a time); the output defaults to the last one's size;
  with a mask (the first condition image's size) or a strength below 1 it is the first one's prepared size.
- ControlNet builds: one control image (the same formats and pixel limit, at least 16 px a side and at most 8:1;
  resized to the output size, which is the given height / width or the build's default), `controlnet_scale` a
  finite number in [0, 2] (default 0.75) and only with a control image; with an inpainting ControlNet
  (control_in_dim 33) an input image and its mask (the same size) condition the ControlNet too, without strength
  (the output is the given or default size, sampled from noise, as diffusers does).
- pixel cost of a request = images out x output pixels (+ the prepared condition images of an Edit request):
  at most `max_request_pixels` when set (the server's `--max-batch-pixels`). Images beyond the profile or the
  budgets raise `TooLarge` (HTTP 413); undecodable data `BadInput` (400); other violations `RequestError` (422).
"""

from __future__ import annotations

import io
import math
import numbers
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import RequestError
from ..facts import SMALL_SIDES, small_model
from ..manifest import parse
from ..variants import MAX_CONDITION_IMAGES, is_omni
from .backends import backend_entry, resolve_backend

SEED_MAX = 2**63 - 1
MAX_STEPS = 100
MAX_PROMPT_CHARS = 10_000
MAX_INPUT_PIXELS = 4096 * 4096
MAX_BATCH = 4  # images per runtime call without engines (the default engine profile's batch)
GUIDANCE_MAX, CFG_NORMALIZATION_MAX = 30.0, 10.0
DEFAULT_STRENGTH = 0.6
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
CONDITION_AREA = 1024 * 1024  # Edit: larger condition images are scaled to this area (diffusers' rule)
STRENGTH_NEEDS_IMAGE = "strength needs an input image (img2img / inpainting)"
CONTROLNET_SCALE_MAX = 2.0
CONTROL_MIN_SIDE = 16
SCALE_NEEDS_CONTROL = "controlnet_scale needs a control image"
NO_CONTROLNET = ("this build has no ControlNet: a control image needs a build made with --controlnet PATH (or from "
                 "a ZImageControlNetPipeline checkpoint)")
MASK_NEEDS_IMAGE = "inpainting needs an input image as well as the mask"


class TooLarge(RequestError):
    """The request is beyond the build's profile or a memory budget (HTTP 413)."""

    status = 413


class BadInput(RequestError):
    """Data that cannot be read: not an image, an unsupported format, broken base64 (HTTP 400)."""

    status = 400


@dataclass(frozen=True)
class Limits:
    """What a build (and, for a server, its operator) accepts."""

    variant: str
    multiple: int
    min_side: int
    max_side: int
    default_steps: int
    default_guidance: float
    default_height: int
    default_width: int
    static: tuple[int, int] | None = None  # static engine profile: the one size it takes
    max_batch: int = MAX_BATCH  # images per runtime call
    cfg_doubles_batch: bool = False  # TensorRT with CFG as one batch-2B call: the profile's batch counts 2B
    max_conditions: int = MAX_CONDITION_IMAGES
    img2img: bool = True  # the build has a vae_encoder
    max_steps: int = MAX_STEPS
    max_prompt_chars: int = MAX_PROMPT_CHARS
    max_input_pixels: int = MAX_INPUT_PIXELS
    max_request_pixels: int | None = None
    controlnet: bool = False  # the build has a ControlNet (control images)
    control_inpaint: bool = False  # ... an inpainting one (control_in_dim 33: image + mask condition it too)

    @classmethod
    def for_build(cls, manifest: dict, backend: str = "auto", cfg_mode: str = "batch", **overrides) -> "Limits":
        """The build's limits; `backend` (as given to the runtime) decides whether the engine profile's batch
        applies to CFG's doubled batch. `overrides`: any field (None keeps the build's value)."""
        manifest = parse(manifest)
        defaults, facts = manifest.defaults, manifest.model.facts
        multiple = defaults.resolution_multiple
        opts = manifest.tensorrt.options if manifest.tensorrt else {}
        comps = manifest.components
        engines = manifest.has_engines
        lo, hi = SMALL_SIDES if small_model(facts.get("dim", 0)) else _variant_range(manifest.variant)
        static, max_batch = None, MAX_BATCH
        if engines:
            lo, hi = opts.get("min_side") or lo, opts.get("max_side") or hi
            max_batch = int(opts.get("max_batch") or MAX_BATCH)
            if opts.get("static"):
                static = tuple(int(v) for v in opts["static"])
                lo, hi, max_batch = min(static), max(static), int(opts.get("static_batch") or 1)
        lo, hi = -(-lo // multiple) * multiple, hi // multiple * multiple
        profile_batch = engines and backend_entry(resolve_backend(backend, manifest)).abilities.profile_batch
        limits = cls(
            variant=manifest.variant, multiple=multiple, min_side=lo, max_side=hi,
            default_steps=defaults.steps, default_guidance=float(defaults.guidance_scale),
            default_height=defaults.height, default_width=defaults.width, static=static,
            max_batch=max_batch, cfg_doubles_batch=cfg_mode == "batch" and profile_batch,
            img2img="vae_encoder" in comps, controlnet="controlnet" in comps,
            control_inpaint=bool((facts.get("controlnet") or {}).get("inpaint")))
        return replace(limits, **{k: v for k, v in overrides.items() if v is not None})

    def sizes_text(self) -> str:
        if self.static:
            return f"{self.static[1]}x{self.static[0]} only (static engines)"
        return f"sides {self.min_side}..{self.max_side} px in multiples of {self.multiple}"


def _variant_range(variant: str) -> tuple[int, int]:
    from ..variants import VARIANTS

    v = VARIANTS.get(variant)
    return (v.min_side, v.max_side) if v else (512, 2048)


@dataclass(frozen=True)
class ImageInfo:
    """An input image's size (and format, when read from bytes) as known before decoding."""

    width: int
    height: int
    format: str | None = None


@dataclass(frozen=True)
class Request:
    """A checked request: defaults filled in, every value normalised."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    height: int  # output size
    width: int
    guidance_scale: float
    cfg_normalization: float
    cfg_truncation: float
    negative_prompt: str | None = None
    strength: float | None = None  # img2img / inpainting only
    images: int = 0  # input images (img2img / inpainting: 1; Edit: condition images)
    mask: bool = False
    control_image: bool = False  # ControlNet builds
    controlnet_scale: float | None = None
    pixels: int = 0  # the request's pixel cost (see the module docstring)
    sizes_given: tuple[int | None, int | None] = field(default=(None, None), repr=False)

    @property
    def batch(self) -> int:
        return len(self.prompts)

    def generate_kwargs(self, variant: str) -> dict:
        """Keyword arguments for `ZImageRuntime.generate` (with the prompts, seeds and images) that check to this
        request again (Edit keeps the size as given: its resize rule depends on it)."""
        h, w = self.sizes_given if is_omni(variant) else (self.height, self.width)
        kwargs = dict(height=h, width=w, steps=self.steps, negative_prompt=self.negative_prompt,
                      guidance_scale=self.guidance_scale, cfg_normalization=self.cfg_normalization,
                      cfg_truncation=self.cfg_truncation)
        if self.strength is not None:
            kwargs["strength"] = self.strength
        if self.control_image:
            kwargs["controlnet_scale"] = self.controlnet_scale
        return kwargs


# -- scalar fields ------------------------------------------------------------------------------------------
def _int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise RequestError(f"{name} must be an integer, got {_show(v)}")
    return int(v)


def _float(name: str, v, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise RequestError(f"{name} must be a number, got {_show(v)}")
    try:
        f = float(v)
    except (OverflowError, ValueError):
        f = math.inf
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if not math.isfinite(f) or f > hi or f < lo or (lo_open and f == lo):
        raise RequestError(f"{name} must be in {interval}, got {_show(v)}")
    return f


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _text(name: str, v, limit: int) -> str:
    if not isinstance(v, str):
        raise RequestError(f"{name} must be a string, got {type(v).__name__}")
    if len(v) > limit:
        raise RequestError(f"{name} is {len(v)} characters; the limit is {limit}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{name} is not valid Unicode text (lone surrogate characters)") from None
    return v


def check_seed(v) -> int:
    seed = _int("seed", v)
    if not 0 <= seed <= SEED_MAX:
        raise RequestError(f"seed must be in 0..{SEED_MAX} (2**63 - 1), got {seed}")
    return seed


def _side(limits: Limits, name: str, v) -> int:
    v = _int(name, v)
    if v <= 0 or v % limits.multiple:
        raise RequestError(f"{name} must be a positive multiple of {limits.multiple}, got {v}")
    return v


def check_size(limits: Limits, height: int, width: int, what: str = "the output", too_large=RequestError) -> None:
    """Both sides within the build's profile (`too_large`: the error for a side beyond the largest)."""
    if limits.static:
        if (height, width) != limits.static:
            raise RequestError(f"{what} is {width}x{height}, but this build's engines take "
                               f"{limits.static[1]}x{limits.static[0]} only (static shapes)")
        return
    for name, v in (("height", height), ("width", width)):
        if v > limits.max_side:
            raise too_large(f"{what}: {name} {v} is above this build's largest side {limits.max_side} "
                           f"({limits.sizes_text()})")
        if v < limits.min_side:
            raise RequestError(f"{what}: {name} {v} is below this build's smallest side {limits.min_side} "
                               f"({limits.sizes_text()})")


# -- images -------------------------------------------------------------------------------------------------
def image_info(image) -> ImageInfo:
    """ImageInfo of an ImageInfo, a PIL image or a (width, height) pair."""
    if isinstance(image, ImageInfo):
        return image
    if hasattr(image, "size") and hasattr(image, "mode"):
        return ImageInfo(int(image.size[0]), int(image.size[1]))
    if isinstance(image, (tuple, list)) and len(image) == 2:
        return ImageInfo(int(image[0]), int(image[1]))
    raise RequestError(f"an input image must be a PIL image, got {type(image).__name__}")


def _open(source, what: str):
    """PIL image opened lazily (header read, pixels not decoded), PNG / JPEG / WebP only."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(source, formats=IMAGE_FORMATS)
    except FileNotFoundError:
        raise RequestError(f"{what} does not exist") from None
    except IsADirectoryError:
        raise RequestError(f"{what} is a folder, not an image") from None
    except PermissionError:
        raise RequestError(f"{what} cannot be read (permission denied)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise TooLarge(f"{what} declares more pixels than an input image may have ({MAX_INPUT_PIXELS})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise BadInput(f"{what} is not an image this build reads (PNG, JPEG or WebP)") from None


# EXIF orientation -> the transpose that shows the picture upright (as PIL's ImageOps.exif_transpose)
UPRIGHT = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
           7: "TRANSVERSE", 8: "ROTATE_90"}


def _orientation(im) -> int:
    """The EXIF orientation found in the header (PNG: an eXIf chunk before the pixels), 1 when none: the same
    for the size checked from the header and for the decoded picture."""
    if "exif" not in im.info:
        return 1
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: the picture as stored
        return 1
    return value if value in UPRIGHT else 1


def _upright_info(im) -> ImageInfo:
    swap = _orientation(im) in (5, 6, 7, 8)
    return ImageInfo(im.height, im.width, im.format) if swap else ImageInfo(im.width, im.height, im.format)


def probe_image(data: bytes | str | Path, what: str = "image") -> ImageInfo:
    """Format and size (upright, by the EXIF orientation) from the header of an image given as bytes or a file
    path, without decoding it."""
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    with _open(source, what) as im:
        return _upright_info(im)


def decode_image(data: bytes | str | Path, limits: Limits, what: str = "image"):
    """Decode an image (bytes or a path) after checking its format and pixel count from its header; the first
    frame of animated files; turned upright by its EXIF orientation, in 8 bits (images.py `to_8bit`: 16-bit gray
    scaled, palettes and CMYK converted, transparency kept as alpha). -> PIL image (its own copy of the pixels)."""
    from PIL import Image

    from .images import to_8bit

    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    with _open(source, what) as im:
        check_input_pixels(limits, _upright_info(im), what)
        orientation = _orientation(im)  # from the header, as probe_image reads it
        try:
            im.load()
            image = to_8bit(im)
            image = image.copy() if image is im else image
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise BadInput(f"{what} is a damaged {im.format} file ({type(e).__name__})") from None
    if orientation != 1:
        image = image.transpose(getattr(Image.Transpose, UPRIGHT[orientation]))
    return image


def check_input_pixels(limits: Limits, info: ImageInfo, what: str) -> None:
    if info.width <= 0 or info.height <= 0:
        raise BadInput(f"{what} has no pixels ({info.width}x{info.height})")
    if info.width * info.height > limits.max_input_pixels:
        raise TooLarge(f"{what} is {info.width}x{info.height} = {info.width * info.height} pixels; input images "
                       f"are limited to {limits.max_input_pixels} pixels")


def condition_size(w: int, h: int, multiple: int, height: int | None, width: int | None) -> tuple[int, int]:
    """An Edit condition image's prepared (height, width): diffusers' Flux2 image processor rules, as
    runtime/omni.py `prepare_condition` applies them (scale to an area when larger, crop to the multiple)."""
    if w * h > CONDITION_AREA:
        area = height * width if height and width else CONDITION_AREA
        scale = math.sqrt(area / (w * h))
        w, h = int(w * scale), int(h * scale)
    return (h // multiple) * multiple, (w // multiple) * multiple


def _check_condition(limits: Limits, info: ImageInfo, what: str, height, width) -> tuple[int, int]:
    w, h = info.width, info.height
    if w < 64 or h < 64:
        raise RequestError(f"{what}: condition image too small: {w}x{h}; both sides must be at least 64 px")
    if max(w / h, h / w) > 8:
        raise RequestError(f"{what}: condition image aspect ratio too extreme: {w}x{h} (at most 8:1)")
    ph, pw = condition_size(w, h, limits.multiple, height, width)
    if ph * pw > limits.max_side ** 2:
        raise TooLarge(f"{what} is {w}x{h}, {pw}x{ph} after the condition resize rule: above this build's "
                       f"{limits.max_side}x{limits.max_side} pixels per condition image; send a smaller image "
                       "(or a smaller height x width for images above 1024x1024 px)")
    if limits.static:  # the VAE encoder's profile: the one size
        check_size(limits, ph, pw, f"{what} ({w}x{h}, {pw}x{ph} after the condition resize rule)")
    elif max(ph, pw) > limits.max_side or min(ph, pw) < limits.min_side:  # the VAE encoder's profile, per image
        error = TooLarge if max(ph, pw) > limits.max_side else RequestError
        raise error(f"{what} is {w}x{h}, {pw}x{ph} after the condition resize rule: each side must lie in this "
                    f"build's {limits.min_side}..{limits.max_side} px (its engines' profile); resize it")
    return ph, pw


def check_image_count(limits: Limits, n: int) -> None:
    """How many input images the build takes (checked before anything is read)."""
    if is_omni(limits.variant) and n > limits.max_conditions:
        raise RequestError(f"{n} condition images; this build takes at most {limits.max_conditions}")
    if not is_omni(limits.variant) and n > 1:
        raise RequestError("several input images (condition images) need an Edit build (--variant edit); "
                           "img2img and inpainting take one image")


def check_pil_images(images, mask, control_image) -> None:
    """The images of a request that runs (not only checked): PIL images, `images` a list of them."""
    from PIL import Image

    for name, given in (("images", images), ("mask", None if mask is None else [mask]),
                        ("control_image", None if control_image is None else [control_image])):
        if given is not None and (not isinstance(given, (list, tuple)) or
                                  not all(isinstance(im, Image.Image) for im in given)):
            raise RequestError(f"{name} must be {'a list of PIL images' if name == 'images' else 'a PIL image'}")


# -- the request --------------------------------------------------------------------------------------------
def _check_control(limits: Limits, control_image, controlnet_scale, infos, mask_info, strength) -> float | None:
    """The ControlNet fields -> the scale (None without a control image)."""
    if control_image is None:
        if controlnet_scale is not None:
            raise RequestError(SCALE_NEEDS_CONTROL)
        return None
    if not limits.controlnet:
        raise RequestError(NO_CONTROLNET)
    info = image_info(control_image)
    check_input_pixels(limits, info, "the control image")
    if min(info.width, info.height) < CONTROL_MIN_SIDE or max(info.width / info.height, info.height / info.width) > 8:
        raise RequestError(f"the control image is {info.width}x{info.height}: it needs at least {CONTROL_MIN_SIDE} px "
                           "a side and at most an 8:1 aspect ratio (it is resized to the output size)")
    if infos or mask_info is not None:
        if not limits.control_inpaint:
            raise RequestError("an input image or mask with a control image needs an inpainting ControlNet "
                               "(control_in_dim 33); this build's takes a control image only")
        if not infos or mask_info is None:
            raise RequestError("inpainting with the ControlNet needs both an input image and a mask")
        check_image_count(limits, len(infos))
        _same_size(mask_info, infos[0])
        if strength is not None:
            raise RequestError("strength is not used with a control image: the inpainting ControlNet samples from "
                               "noise")
    from ..controlnet import DEFAULT_SCALE

    return DEFAULT_SCALE if controlnet_scale is None else _float("controlnet_scale", controlnet_scale, 0.0,
                                                          CONTROLNET_SCALE_MAX)


def _strength(steps: int, v) -> float:
    strength = _float("strength", v, 0.0, 1.0, lo_open=True)
    from .scheduler import start_step

    if start_step(steps, strength) >= steps:
        raise RequestError(f"strength {strength:g} with {steps} steps leaves no step to run")
    return strength


def _same_size(mask_info: ImageInfo, info: ImageInfo, image: str = "the image") -> None:
    if (mask_info.width, mask_info.height) != (info.width, info.height):
        raise RequestError(f"the mask is {mask_info.width}x{mask_info.height} but {image} is "
                           f"{info.width}x{info.height}: they must be the same size")


def _edit_output(strength: float | None, mask_info, first: ImageInfo, prepared, h_given, w_given):
    """An Edit request's output (height, width): the last condition image's prepared size; with a mask (the first
    image's size) or a strength below 1 (default 1), the first one's, which edits that image in place."""
    if mask_info is not None:
        _same_size(mask_info, first, "the first condition image")
    if mask_info is None and (strength is None or strength >= 1.0):
        return h_given or prepared[-1][0], w_given or prepared[-1][1]
    h, w = prepared[0]
    if (h_given and h_given != h) or (w_given and w_given != w):
        raise RequestError(f"with a mask or a strength below 1 the output is the first condition image's prepared "
                           f"size ({w}x{h}); got width {w_given}, height {h_given}")
    return h, w


def _check_scalars(limits: Limits, prompt, seed, steps, guidance_scale, cfg_normalization, cfg_truncation,
                   negative_prompt) -> dict:
    """The text and number fields -> Request fields (prompts, seeds, steps, the guidance settings)."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise RequestError("prompt must be a string (or a non-empty list of strings)")
    prompts = tuple(_text("prompt", p, limits.max_prompt_chars) for p in prompts)
    if any(not p.strip() for p in prompts):
        raise RequestError("prompt is empty: describe the image to generate")
    seeds = seed if isinstance(seed, (list, tuple)) else [seed] * len(prompts)
    if len(seeds) != len(prompts):
        raise RequestError(f"{len(prompts)} prompts and {len(seeds)} seeds: give one seed per prompt")
    seeds = tuple(check_seed(s) for s in seeds)
    steps = limits.default_steps if steps is None else _int("steps", steps)
    if not 1 <= steps <= limits.max_steps:
        raise RequestError(f"steps must be in 1..{limits.max_steps}, got {steps}")
    guidance = limits.default_guidance if guidance_scale is None else _float("guidance_scale", guidance_scale, 0.0,
                                                                              GUIDANCE_MAX)
    norm = _float("cfg_normalization", 0.0 if cfg_normalization is None else cfg_normalization, 0.0,
                  CFG_NORMALIZATION_MAX)
    trunc = _float("cfg_truncation", 1.0 if cfg_truncation is None else cfg_truncation, 0.0, 1.0)
    if negative_prompt is not None:
        negative_prompt = _text("negative_prompt", negative_prompt, limits.max_prompt_chars)
        if guidance <= 0:
            raise RequestError("a negative prompt needs classifier-free guidance: pass a guidance scale > 0")
    return dict(prompts=prompts, seeds=seeds, steps=steps, guidance_scale=guidance, cfg_normalization=norm,
                cfg_truncation=trunc, negative_prompt=negative_prompt)


def _image_infos(limits: Limits, images, mask) -> tuple[list[ImageInfo], ImageInfo | None]:
    """Sizes of the input images and the mask, each within the input pixel limit."""
    infos = [image_info(im) for im in list(images or [])]
    for i, info in enumerate(infos):
        check_input_pixels(limits, info, f"image {i}" if len(infos) > 1 else "the image")
    mask_info = None if mask is None else image_info(mask)
    if mask_info is not None:
        check_input_pixels(limits, mask_info, "the mask")
    return infos, mask_info


@dataclass(frozen=True)
class _Output:
    """What the input images make of a request: the output size, the strength, the condition images' pixels."""

    height: int
    width: int
    strength: float | None = None
    extra_pixels: int = 0


def _given_or_default(limits: Limits, h_given, w_given) -> _Output:
    return _Output(limits.default_height if h_given is None else h_given,
                   limits.default_width if w_given is None else w_given)


def _edit_request(limits: Limits, infos, mask_info, strength, steps: int, h_given, w_given) -> _Output:
    if not infos:
        raise RequestError("the Edit variant needs at least one condition image (--image)")
    check_image_count(limits, len(infos))
    prepared = [_check_condition(limits, info, f"condition image {i}", h_given, w_given)
                for i, info in enumerate(infos)]
    strength = None if strength is None else _strength(steps, strength)
    height, width = _edit_output(strength, mask_info, infos[0], prepared, h_given, w_given)
    return _Output(height, width, strength, sum(h * w for h, w in prepared))


def _img2img_request(limits: Limits, infos, mask_info, strength, steps: int, h_given, w_given) -> _Output:
    check_image_count(limits, len(infos))
    if not limits.img2img:
        raise RequestError("this build has no vae_encoder graph (needed for an input image): rebuild it")
    info = infos[0]
    img_h, img_w = info.height - info.height % limits.multiple, info.width - info.width % limits.multiple
    if img_h <= 0 or img_w <= 0:
        raise RequestError(f"image of {info.width}x{info.height} is smaller than {limits.multiple} pixels")
    if (h_given and h_given != img_h) or (w_given and w_given != img_w):
        raise RequestError(f"with an input image the output is the image's size ({img_w}x{img_h}, rounded "
                           f"down to {limits.multiple}); got width {w_given}, height {h_given}")
    if mask_info is not None:
        _same_size(mask_info, info)
    return _Output(img_h, img_w, _strength(steps, DEFAULT_STRENGTH if strength is None else strength))


def _text_request(limits: Limits, mask_info, strength, h_given, w_given) -> _Output:
    if mask_info is not None:
        raise RequestError(MASK_NEEDS_IMAGE)
    if strength is not None:
        raise RequestError(STRENGTH_NEEDS_IMAGE)
    return _given_or_default(limits, h_given, w_given)


def _check_output(limits: Limits, infos, mask_info, strength, steps: int, h_given, w_given,
                  controlled: bool) -> _Output:
    """The output size (within the profile), strength and condition pixels of the request's kind."""
    if controlled:  # the images only condition the ControlNet: sampled at the output size
        out = _given_or_default(limits, h_given, w_given)
    elif is_omni(limits.variant):
        out = _edit_request(limits, infos, mask_info, strength, steps, h_given, w_given)
    elif infos:
        out = _img2img_request(limits, infos, mask_info, strength, steps, h_given, w_given)
    else:
        out = _text_request(limits, mask_info, strength, h_given, w_given)
    if infos and not is_omni(limits.variant) and not controlled:
        check_size(limits, out.height, out.width, "the output (the input image's size)", too_large=TooLarge)
    else:
        check_size(limits, out.height, out.width)
    return out


def _check_cost(limits: Limits, b: int, out: _Output, image_conditioned: bool, guidance: float) -> int:
    """Images per runtime call within the build's batch, pixels within the budget -> the request's pixel cost."""
    per_call = 1 if image_conditioned else b  # image-conditioned batches run one seed at a time
    mult = 2 if guidance > 0 and limits.cfg_doubles_batch else 1
    if per_call * mult > limits.max_batch:
        if limits.max_batch < mult:
            raise RequestError("CFG as one batch needs engines built for batch >= 2: use cfg_mode 'sequential'")
        raise TooLarge(f"{b} images in one call: this build takes at most {limits.max_batch // mult}"
                       f"{' with classifier-free guidance (its batch counts twice)' if mult > 1 else ''}")
    pixels = b * out.height * out.width + out.extra_pixels
    if limits.max_request_pixels is not None and pixels > limits.max_request_pixels:
        extra = f" + {out.extra_pixels} of condition images" if out.extra_pixels else ""
        raise TooLarge(f"the request costs {pixels} pixels ({b} x {out.width}x{out.height}{extra}); the budget is "
                       f"{limits.max_request_pixels} pixels")
    return pixels


def check_request(limits: Limits, prompt, *, seed=0, steps=None, height=None, width=None, negative_prompt=None,
                  guidance_scale=None, cfg_normalization=0.0, cfg_truncation=1.0, strength=None, images=(),
                  mask=None, control_image=None, controlnet_scale=None) -> Request:
    """Check one request against `limits` -> Request (defaults filled in), or raise RequestError (TooLarge /
    BadInput for its 413 / 400 kinds). `prompt`: a string or a list (one image each); `seed`: an integer or
    one per prompt; `images` / `mask` / `control_image`: PIL images, ImageInfo (e.g. from `probe_image`) or
    (width, height)."""
    fields = _check_scalars(limits, prompt, seed, steps, guidance_scale, cfg_normalization, cfg_truncation,
                            negative_prompt)
    h_given = None if height is None else _side(limits, "height", height)
    w_given = None if width is None else _side(limits, "width", width)
    infos, mask_info = _image_infos(limits, images, mask)
    control_scale = _check_control(limits, control_image, controlnet_scale, infos, mask_info, strength)
    controlled = control_scale is not None
    out = _check_output(limits, infos, mask_info, strength, fields["steps"], h_given, w_given, controlled)
    pixels = _check_cost(limits, len(fields["prompts"]), out, bool(infos), fields["guidance_scale"])
    return Request(**fields, height=out.height, width=out.width,
                   strength=out.strength if infos and not controlled else None, images=len(infos),
                   mask=mask_info is not None, control_image=controlled, controlnet_scale=control_scale,
                   pixels=pixels, sizes_given=(h_given, w_given))
