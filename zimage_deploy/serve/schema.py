"""The request schema of `POST /v1/generate`, shared by the HTTP server and the Ray Serve deployment, and its
validation against the build (resolution rules and limits)."""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_PIXELS = 4096 * 4096


class ApiError(Exception):
    """An error answer: HTTP status and a message for the client."""

    def __init__(self, status: int, message: str, kind: str = "bad_request"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    negative_prompt: str | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    steps: int | None = Field(default=None, ge=1)
    height: int | None = Field(default=None, ge=16)
    width: int | None = Field(default=None, ge=16)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=30.0)
    cfg_normalization: float = Field(default=0.0, ge=0.0, le=10.0)
    cfg_truncation: float = Field(default=1.0, ge=0.0, le=1000.0)
    strength: float | None = Field(default=None, gt=0.0, le=1.0)
    images: list[str] = Field(default_factory=list, max_length=4, description="base64 PNG/JPEG/WebP")
    mask: str | None = Field(default=None, description="base64 image, white = repaint")


@dataclass
class Limits:
    min_side: int
    max_side: int
    multiple: int
    max_steps: int = 100
    max_prompt_chars: int = 4000
    max_image_bytes: int = 16 << 20

    @classmethod
    def for_build(cls, manifest: dict, **overrides) -> "Limits":
        """Sizes the build can serve: its engine profile when it has engines, else a generous CPU range."""
        defaults = manifest["defaults"]
        small = manifest["model"]["facts"]["dim"] < 1024
        lo, hi = (64, 1024) if small else (256, 2048)
        opts = (manifest.get("tensorrt") or {}).get("options") or {}
        if any((c.get("engine") or {}).get("status") == "complete" for c in manifest["components"].values()):
            if opts.get("static"):
                lo, hi = min(opts["static"]), max(opts["static"])
            else:
                lo, hi = opts.get("min_side") or (64 if small else 512), opts.get("max_side") or (512 if small
                                                                                                   else 2048)
        limits = cls(min_side=lo, max_side=hi, multiple=defaults["resolution_multiple"])
        for k, v in overrides.items():
            if v is not None:
                setattr(limits, k, v)
        return limits


@dataclass
class ParsedRequest:
    request: GenerateRequest
    images: list[Image.Image]
    mask: Image.Image | None


def _decode_image(data: bytes, what: str, limits: Limits) -> Image.Image:
    if len(data) > limits.max_image_bytes:
        raise ApiError(413, f"{what} is {len(data)} bytes; the limit is {limits.max_image_bytes}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ApiError(413, f"{what} is {im.width}x{im.height} pixels; the limit is {MAX_PIXELS}")
            im.load()
            return im.copy()
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ApiError(400, f"{what} is not an image this server can read ({type(e).__name__})") from None


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{what} is not valid base64") from None


def parse(body: bytes | dict, limits: Limits, files: dict[str, list[bytes]] | None = None) -> ParsedRequest:
    """JSON body (or a dict from a multipart `request` field) + optional uploaded files -> checked request."""
    if not isinstance(body, dict):
        try:
            body = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"malformed JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
    try:
        req = GenerateRequest.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(422, f"{where}: {first['msg']}") from None
    if len(req.prompt) > limits.max_prompt_chars:
        raise ApiError(422, f"prompt is {len(req.prompt)} characters; the limit is {limits.max_prompt_chars}")
    if req.steps is not None and req.steps > limits.max_steps:
        raise ApiError(422, f"steps {req.steps} above the limit {limits.max_steps}")
    for name, v in (("height", req.height), ("width", req.width)):
        if v is not None and (v % limits.multiple or not limits.min_side <= v <= limits.max_side):
            raise ApiError(422, f"{name} must be a multiple of {limits.multiple} between {limits.min_side} and "
                                f"{limits.max_side}, got {v}")
    files = files or {}
    images = [_decode_image(_b64(s, f"images[{i}]"), f"images[{i}]", limits) for i, s in enumerate(req.images)]
    images += [_decode_image(d, f"uploaded image {i}", limits) for i, d in enumerate(files.get("image", []))]
    mask = _decode_image(_b64(req.mask, "mask"), "mask", limits) if req.mask else None
    if files.get("mask"):
        mask = _decode_image(files["mask"][0], "uploaded mask", limits)
    if len(images) > 4:
        raise ApiError(422, "at most 4 images")
    return ParsedRequest(req, images, mask)


def encode_png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
