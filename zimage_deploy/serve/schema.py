"""Requests of the HTTP server and the Ray Serve app: `POST /v1/generate` (JSON, or multipart with a `request`
field) and the OpenAI Images API (`POST /v1/images/generations`, JSON; `POST /v1/images/edits`, multipart),
parsed from a body already read under its cap, checked by runtime/validate.py (the rules and messages of the
CLI and the runtime API) and only then decoded. Synchronous: the server runs these off the event loop."""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import secrets
from dataclasses import dataclass, field, replace

from PIL import Image

from ..errors import RequestError, UserError
from ..runtime.validate import (CONDITION_AREA, SEED_MAX, Limits, Request, check_image_count, check_request,
                                check_seed, decode_image, probe_image)
from ..variants import is_omni
from .errors import ApiError
from .multipart import Part, parse_multipart

GENERATE_FIELDS = {"model", "prompt", "negative_prompt", "seed", "steps", "height", "width", "guidance_scale",
                   "cfg_normalization", "cfg_truncation", "strength", "images", "mask", "loras", "control_image",
                   "controlnet_scale"}
EXTENSIONS = {"seed", "steps", "negative_prompt", "guidance_scale", "cfg_normalization", "cfg_truncation", "loras",
              "controlnet_scale"}

# OpenAI fields without a meaning here: accepted (bounded) and ignored
IGNORED = {"model", "user", "safety_identifier", "quality", "style", "moderation", "input_fidelity",
           "output_compression", "complexity"}
OPENAI_FIELDS = {"prompt", "n", "size", "response_format", "output_format", "stream", "background",
                 "partial_images", "control_image"} | EXTENSIONS | IGNORED
INT_FIELDS, FLOAT_FIELDS = {"n", "seed", "steps", "height", "width", "partial_images", "output_compression"}, {
    "guidance_scale", "cfg_normalization", "cfg_truncation", "strength", "controlnet_scale"}
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
RANDOM_SEEDS = 2**31  # a request without a seed gets one drawn from 0 .. 2**31 - 1 (returned in the answer)


@dataclass(frozen=True)
class ServeLimits:
    """The server's own bounds on top of the build's request limits (`request`)."""

    request: Limits  # with max_request_pixels = max_batch_pixels: every request fits in a batch
    max_batch_pixels: int
    max_image_bytes: int  # one encoded input image
    max_body_bytes: int  # a request body with images (JSON or multipart)
    max_json_bytes: int  # a request body without images
    max_text_bytes: int  # one multipart text field
    max_images: int  # input images per request
    max_n: int  # images out per request
    body_timeout_s: float = 30.0

    @classmethod
    def for_build(cls, limits: Limits, *, max_batch_pixels: int | None = None, max_image_bytes: int | None = None,
                  max_body_bytes: int | None = None, max_steps: int | None = None, max_side: int | None = None,
                  max_prompt_chars: int | None = None, body_timeout_s: float | None = None) -> "ServeLimits":
        """Defaults: a batch costs at most one maximum-size image (Edit: plus its maximum-size condition
        images); an input image file at most 8 bytes per pixel of the largest useful input (16 MiB at most);
        a body at most its images in base64 plus 1 MiB. Options only narrow the build's own limits."""
        if max_side is not None:
            if max_side < limits.min_side or max_side % limits.multiple:
                raise UserError(f"--max-side {max_side} must be a multiple of {limits.multiple} and at least "
                                f"{limits.min_side}")
            limits = replace(limits, max_side=min(max_side, limits.max_side))
        limits = replace(limits, max_steps=min(max_steps or limits.max_steps, limits.max_steps),
                         max_prompt_chars=min(max_prompt_chars or limits.max_prompt_chars, limits.max_prompt_chars))
        edit = is_omni(limits.variant)
        max_images = limits.max_conditions if edit else 1
        side2 = limits.max_side ** 2
        budget = max_batch_pixels or side2 * (1 + (max_images if edit else 0))
        smallest = (limits.static[0] * limits.static[1]) if limits.static else limits.min_side ** 2
        if budget < smallest:
            raise UserError(f"--max-batch-pixels {budget} is below the smallest image this build makes ({smallest})")
        useful = limits.max_input_pixels if edit else (limits.max_side + limits.multiple) ** 2
        image_bytes = max_image_bytes or min(16 << 20, 8 * useful + (64 << 10))
        text = 12 * limits.max_prompt_chars + 4096  # JSON-escaped worst case (\uXXXX pairs)
        files = max_images + 1 + (1 if limits.controlnet else 0)  # images, mask, a ControlNet build's control image
        body = max_body_bytes or files * (4 * image_bytes // 3 + 4) + 2 * text + (1 << 20)
        n = max(1, min(limits.max_batch, budget // max(1, limits.min_side ** 2)))
        return cls(request=replace(limits, max_request_pixels=budget), max_batch_pixels=budget,
                   max_image_bytes=image_bytes, max_body_bytes=body, max_json_bytes=min(body, 2 * text + 65536),
                   max_text_bytes=2 * text, max_images=max_images, max_n=n,
                   body_timeout_s=body_timeout_s or 30.0)


@dataclass
class Parsed:
    request: Request
    images: list[Image.Image] = field(default_factory=list)
    mask: Image.Image | None = None
    openai: bool = False
    output_format: str = "PNG"
    loras: tuple[tuple[str, float], ...] = ()  # (name in the server's --lora-dir, scale), checked for shape only
    lora_set: object = None  # the runtime's prepared set (the server resolves the names)
    control_image: Image.Image | None = None  # ControlNet builds


def _lora_names(value) -> tuple[tuple[str, float], ...]:
    """`loras` (lora/spec.py's rules): names looked up in the server's --lora-dir only, never taken as paths."""
    from ..lora.spec import parse_lora_list

    try:
        return parse_lora_list(value)
    except RequestError as e:
        raise ApiError(422, str(e), param="loras") from None


# -- values -------------------------------------------------------------------------------------------------
def _json_object(body: bytes) -> dict:
    try:
        value = json.loads(body)
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, over-long integers, bad UTF-8
        raise ApiError(400, f"malformed JSON: {str(e)[:200]}") from None
    if not isinstance(value, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return value


def _unknown(fields, allowed: set[str]) -> None:
    extra = sorted(str(k)[:40] for k in fields if k not in allowed)
    if extra:
        raise ApiError(422, f"unknown field `{extra[0]}` (accepted: {', '.join(sorted(allowed))})", param=extra[0])


_DATA_URL = re.compile(r"data:[\w.+/-]{1,40};base64,")


def _b64(text, what: str, limits: ServeLimits) -> bytes:
    if not isinstance(text, str):
        raise ApiError(422, f"{what} must be a base64 string")
    if len(text) > 4 * limits.max_image_bytes // 3 + 4 + 64:
        raise ApiError(413, f"{what} is above the limit of {limits.max_image_bytes} bytes per image")
    data_url = _DATA_URL.match(text)  # data:image/png;base64,... as browsers and some clients send
    try:
        return base64.b64decode(text[data_url.end():] if data_url else text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{what} is not valid base64") from None


def _check_bytes(data: bytes, what: str, limits: ServeLimits) -> bytes:
    if len(data) > limits.max_image_bytes:
        raise ApiError(413, f"{what} is {len(data)} bytes; the limit is {limits.max_image_bytes} per image")
    return data


def _ignored(name: str, value) -> None:
    if isinstance(value, str) and len(value) > 256 or not isinstance(value, (str, int, float, bool, type(None))):
        raise ApiError(422, f"{name} must be a short string or a number", param=name)


def _from_text(name: str, text: str):
    """A multipart text field's value, typed as JSON would give it."""
    if name in INT_FIELDS:
        try:
            return int(text.strip())
        except ValueError:
            raise ApiError(422, f"{name} must be an integer, got {text[:40]!r}", param=name) from None
    if name in FLOAT_FIELDS:
        try:
            return float(text.strip())
        except ValueError:
            raise ApiError(422, f"{name} must be a number, got {text[:40]!r}", param=name) from None
    if name == "stream":
        return text.strip().lower() in ("true", "1")
    return text


# -- building the checked request ---------------------------------------------------------------------------
def _check(limits: ServeLimits, fields: dict, images: list[bytes], mask: bytes | None, n: int = 1,
           openai: bool = False, output_format: str = "PNG", alpha_mask: bool = False,
           control: bytes | None = None) -> Parsed:
    """Validate the fields and the images' headers, then decode the images."""
    if fields.get("prompt") is None:
        raise ApiError(422, "prompt is required", param="prompt")
    if not isinstance(fields["prompt"], str):
        raise ApiError(422, "prompt must be a string", param="prompt")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limits.max_n:
        raise ApiError(422, f"n must be an integer in 1..{limits.max_n}, got {str(n)[:40]}", param="n")
    check_image_count(limits.request, len(images))
    what = [f"image {i}" if len(images) > 1 else "the image" for i in range(len(images))]
    infos = [probe_image(_check_bytes(b, w, limits), w) for b, w in zip(images, what)]
    mask_info = probe_image(_check_bytes(mask, "the mask", limits), "the mask") if mask is not None else None
    control_info = probe_image(_check_bytes(control, "the control image", limits), "the control image") \
        if control is not None else None
    seed = fields.get("seed")
    seed = secrets.randbelow(RANDOM_SEEDS) if seed is None else check_seed(seed)
    if seed + n - 1 > SEED_MAX:
        raise RequestError(f"seed must be at most {SEED_MAX - n + 1} for n = {n} (one seed per image)")
    req = check_request(limits.request, [fields["prompt"]] * n, seed=[seed + i for i in range(n)],
                        steps=fields.get("steps"),
                        height=fields.get("height"), width=fields.get("width"),
                        negative_prompt=fields.get("negative_prompt"), guidance_scale=fields.get("guidance_scale"),
                        cfg_normalization=fields.get("cfg_normalization"),
                        cfg_truncation=fields.get("cfg_truncation"), strength=fields.get("strength"),
                        images=infos, mask=mask_info, control_image=control_info,
                        controlnet_scale=fields.get("controlnet_scale"))
    decoded = [decode_image(b, limits.request, w) for b, w in zip(images, what)]
    if is_omni(limits.request.variant):  # queued at their prepared area, not their upload size (same result)
        decoded = [_condition_area(im, *req.sizes_given) for im in decoded]
    mask_image = decode_image(mask, limits.request, "the mask") if mask is not None else None
    if mask_image is not None and alpha_mask:
        mask_image = openai_mask(mask_image)
    control_image = decode_image(control, limits.request, "the control image") if control is not None else None
    return Parsed(req, decoded, mask_image, openai, output_format, loras=_lora_names(fields.get("loras")),
                  control_image=control_image)


def _condition_area(image: Image.Image, height: int | None, width: int | None) -> Image.Image:
    """The Edit pipeline's first resize (runtime/omni.py `prepare_condition`), done before queueing: an image
    above 1024x1024 px of area is scaled to that area (or the output's); the pipeline then leaves it as is, and
    the result is the same. Not when the scaled image would fail the pipeline's 64 px check, which it makes on
    the image it is given (only for outputs far below real models' smallest size): then the upload is kept."""
    from ..runtime.omni import resize_to_area

    if image.width * image.height <= CONDITION_AREA:
        return image
    area = height * width if height and width else CONDITION_AREA
    scale = (area / (image.width * image.height)) ** 0.5
    if min(int(image.width * scale), int(image.height * scale)) < 64:
        return image
    return resize_to_area(image, area)


def openai_mask(mask: Image.Image) -> Image.Image:
    """OpenAI's mask rule (fully transparent = edit) when the mask has transparency; else white = repaint."""
    if "A" in mask.getbands() or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha.point(lambda a: 255 if a == 0 else 0, mode="L")
    return mask


# -- routing ------------------------------------------------------------------------------------------------
def peek_model(endpoint: str, content_type: str | None, body: bytes):
    """The request's `model` field (None when absent, or when the body is malformed: parsing it for the model
    then says what is wrong). JSON: the top-level field; multipart: the `model` text field, or `/v1/generate`'s
    `request` JSON field's."""
    kind = (content_type or "").split(";")[0].strip().lower()
    try:
        if kind == "application/json":
            return _json_object(body).get("model")
        if kind == "multipart/form-data":
            cap = len(body) + 1
            parts = parse_multipart(content_type, body, max_files=64, max_fields=64, max_field_bytes=cap,
                                    max_file_bytes=cap)
            texts = [p for p in parts if not p.is_file and p.name in ("model", "request")]
            for p in texts:
                if p.name == "model":
                    return p.text().strip()
            for p in texts:
                return _json_object(p.text().encode()).get("model")
    except ApiError:
        return None
    return None


# -- POST /v1/generate ----------------------------------------------------------------------------------------
def parse_generate_json(body: bytes, limits: ServeLimits) -> Parsed:
    fields = _json_object(body)
    _unknown(fields, GENERATE_FIELDS)
    images = fields.get("images") or []
    if not isinstance(images, list):
        raise ApiError(422, "images must be a list of base64 strings", param="images")
    check_image_count(limits.request, len(images))
    blobs = [_b64(s, f"images[{i}]", limits) for i, s in enumerate(images)]
    mask = _b64(fields["mask"], "mask", limits) if fields.get("mask") is not None else None
    return _check(limits, fields, blobs, mask, control=_control_b64(fields, limits))


def _control_b64(fields: dict, limits: ServeLimits) -> bytes | None:
    """The JSON `control_image` field (base64, ControlNet builds)."""
    value = fields.get("control_image")
    return None if value is None else _b64(value, "control_image", limits)


def parse_generate_multipart(content_type: str, body: bytes, limits: ServeLimits) -> Parsed:
    """A `request` text field with the JSON object, `image` files (repeatable), a `mask` file, a `control_image`
    file (ControlNet builds)."""
    parts = _parts(content_type, body, limits)
    _unknown({p.name for p in parts}, {"request", "image", "mask", "control_image"})
    requests = [p for p in parts if p.name == "request"]
    if len(requests) != 1:
        raise ApiError(422, "multipart requests need exactly one `request` field (the JSON object)")
    fields = _json_object(requests[0].text().encode())
    _unknown(fields, GENERATE_FIELDS - {"images", "mask", "control_image"})
    images = [_file(p) for p in parts if p.name == "image"]
    masks = [_file(p) for p in parts if p.name == "mask"]
    if len(masks) > 1:
        raise ApiError(422, "at most one `mask` file")
    return _check(limits, fields, images, masks[0] if masks else None, control=_control_file(parts))


def _control_file(parts: list[Part]) -> bytes | None:
    controls = [_file(p) for p in parts if p.name == "control_image"]
    if len(controls) > 1:
        raise ApiError(422, "at most one `control_image` file", param="control_image")
    return controls[0] if controls else None


def _parts(content_type: str, body: bytes, limits: ServeLimits) -> list[Part]:
    return parse_multipart(content_type, body, max_files=limits.max_images + 2, max_fields=len(OPENAI_FIELDS) + 8,
                           max_field_bytes=limits.max_text_bytes, max_file_bytes=limits.max_image_bytes)


def _file(part: Part) -> bytes:
    if not part.is_file:
        raise ApiError(400, f"`{part.name}` must be a file upload, not a text field")
    return bytes(part.data)


# -- OpenAI Images API ----------------------------------------------------------------------------------------
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*$")


def _openai_common(fields: dict) -> tuple[dict, int, str]:
    """OpenAI fields -> (validator fields, n, output format); refuses what this server cannot do."""
    for name in IGNORED & set(fields):
        _ignored(name, fields[name])
    if fields.get("response_format") not in (None, "b64_json"):
        if fields["response_format"] == "url":
            raise ApiError(400, "response_format 'url' is not supported: this server returns the images in the "
                                "answer; use 'b64_json'", param="response_format")
        raise ApiError(422, "response_format must be 'b64_json'", param="response_format")
    if fields.get("stream"):
        raise ApiError(400, "streaming is not supported: leave `stream` out", param="stream")
    if fields.get("partial_images"):
        raise ApiError(400, "partial images are not supported", param="partial_images")
    if fields.get("background") not in (None, "auto", "opaque"):
        raise ApiError(400, "only opaque backgrounds are supported", param="background")
    fmt = fields.get("output_format") or "png"
    if not isinstance(fmt, str) or fmt.lower() not in OUTPUT_FORMATS:
        raise ApiError(422, f"output_format must be one of {', '.join(OUTPUT_FORMATS)}", param="output_format")
    out = {k: fields[k] for k in EXTENSIONS | {"prompt", "strength"} if k in fields}
    size = fields.get("size")
    if size not in (None, "auto"):
        m = _SIZE.match(size) if isinstance(size, str) else None
        if not m:
            raise ApiError(422, f"size must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto', got {str(size)[:40]!r}",
                           param="size")
        out["width"], out["height"] = int(m.group(1)), int(m.group(2))
    n = 1 if fields.get("n") is None else fields["n"]
    return out, n, OUTPUT_FORMATS[fmt.lower()]


def parse_openai_generations(body: bytes, limits: ServeLimits) -> Parsed:
    fields = _json_object(body)
    _unknown(fields, OPENAI_FIELDS)
    values, n, fmt = _openai_common(fields)
    return _check(limits, values, [], None, n=n, openai=True, output_format=fmt, control=_control_b64(fields, limits))


def parse_openai_edits(content_type: str, body: bytes, limits: ServeLimits) -> Parsed:
    """multipart: `image` / `image[]` files, optional `mask` file, text fields as in generations (+ strength);
    ControlNet builds: a `control_image` file (with `image` and `mask` for an inpainting ControlNet, or alone)."""
    parts = _parts(content_type, body, limits)
    files = {"image", "image[]", "mask", "control_image"}
    _unknown({p.name for p in parts}, OPENAI_FIELDS | files | {"strength"})
    fields = {}
    for p in parts:
        if p.name in files:
            continue
        if p.name in fields:
            raise ApiError(422, f"`{p.name}` given twice", param=p.name)
        fields[p.name] = _from_text(p.name, p.text())
    values, n, fmt = _openai_common(fields)
    images = [_file(p) for p in parts if p.name in ("image", "image[]")]
    masks = [_file(p) for p in parts if p.name == "mask"]
    control = _control_file(parts)
    if not images and control is None:
        raise ApiError(422, "an `image` file is required (img2img, inpainting with `mask`, Edit builds' condition "
                            "images; or a `control_image` on ControlNet builds)", param="image")
    if len(masks) > 1:
        raise ApiError(422, "at most one `mask` file", param="mask")
    return _check(limits, values, images, masks[0] if masks else None, n=n, openai=True, output_format=fmt,
                  alpha_mask=True, control=control)


def encode_image(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()
