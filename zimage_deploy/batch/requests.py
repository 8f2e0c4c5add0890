"""A row's request checked by the project's one request validator (runtime/validate.py: the rules and messages
of `generate`, `ZImageRuntime` and the server), so that a batch row and an HTTP request are refused for the
same reasons. What only batch rows have is handled here: the fields typed from CSV text, and image *files*
(read, hashed, and checked from their headers like the generate command's `--image`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import RequestError, UserError
from ..runtime.validate import ImageInfo, Limits, Request, check_request, probe_image
from .inputs import LIST_SEPARATOR

# the server's POST /v1/generate fields (serve/schema.py GENERATE_FIELDS); `images` / `mask` / `control_image`
# name files here, `loras` names files in --lora-dir; `model` (the server's routing field) must name the one build
# a batch runs (check_model)
REQUEST_FIELDS = ("prompt", "negative_prompt", "seed", "steps", "height", "width", "guidance_scale",
                  "cfg_normalization", "cfg_truncation", "strength", "images", "mask", "loras", "control_image",
                  "controlnet_scale", "model")
PATH_FIELDS = ("image", "images", "mask", "control_image")  # `image`: one file, for img2img / inpainting rows
BATCH_FIELDS = ("id", "image")
INT_FIELDS = ("seed", "steps", "height", "width")
FLOAT_FIELDS = ("guidance_scale", "cfg_normalization", "cfg_truncation", "strength", "controlnet_scale")
MAX_FILE_BYTES = 64 << 20  # one input image file


class RowError(RequestError):
    """Why one row (or one request of it) cannot be served; recorded, and the batch goes on."""


@dataclass
class InputFile:
    given: str  # as the row names it
    path: str  # absolute
    sha256: str
    info: ImageInfo


def typed(fields: dict) -> dict:
    """CSV cells are text: numbers for the numeric fields, as JSON would give them."""
    out = dict(fields)
    for name in INT_FIELDS + FLOAT_FIELDS:
        v = out.get(name)
        if not isinstance(v, str):
            continue
        try:
            out[name] = int(v) if name in INT_FIELDS else float(v)
        except ValueError:
            kind = "an integer" if name in INT_FIELDS else "a number"
            raise RowError(f"{name} must be {kind}, got {v[:40]!r}") from None
    return out


def check_fields(fields: dict) -> None:
    unknown = sorted(str(k)[:40] for k in fields if k not in REQUEST_FIELDS)
    if unknown:
        raise RowError(f"unknown field `{unknown[0]}` (accepted: {', '.join(REQUEST_FIELDS + BATCH_FIELDS)})")


def check_model(value, variant: str) -> None:
    """A row's `model`: a batch runs one build, so a row may name it only as the server would answer to it alone
    (its variant, or `z-image-<variant>`); anything else is refused, never run on the wrong model."""
    if value is None:
        return
    names = (variant, f"z-image-{variant}")
    if not isinstance(value, str) or value not in names:
        raise RowError(f"model {str(value)[:60]!r}: this batch runs one {variant} build (--engine-dir), which a row "
                       f"may name {' or '.join(names)}; run another build's rows with its own --engine-dir")


def read_file(value, what: str, base: Path, allow_outside: bool) -> InputFile:
    """A file a row names. Relative paths start at the input file's folder (`base`); the file must stay inside
    that folder (symbolic links resolved) unless `allow_outside`."""
    if not isinstance(value, str) or not value.strip():
        raise RowError(f"{what} must be a file path (a non-empty string), got {str(value)[:120]!r}")
    shown = repr(value if len(value) <= 200 else value[:197] + "...")
    try:
        base = base.resolve()
        path = (base / value.strip()).resolve()  # an absolute value replaces the base
        if not allow_outside and not path.is_relative_to(base):
            raise RowError(f"{what} {shown} is outside the input file's folder {base} (--allow-outside allows "
                           "it)")
        if not path.is_file():
            raise RowError(f"{what} {shown}: no such file")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise RowError(f"{what} {shown} is {size} bytes; the limit is {MAX_FILE_BYTES}")
        data = path.read_bytes()
    except (OSError, ValueError) as e:  # ValueError: a NUL character in the path
        raise RowError(f"{what} {shown} cannot be read: {getattr(e, 'strerror', None) or e}") from None
    return InputFile(value, str(path), hashlib.sha256(data).hexdigest(), probe_image(data, f"{what} {shown}"))


def check(limits: Limits, fields: dict, images: list[InputFile], mask: InputFile | None,
          control: InputFile | None = None) -> Request:
    """The row's request through the validator (images checked from their headers) -> Request."""
    try:
        prompt = fields.get("prompt")
        if not isinstance(prompt, str):
            raise RowError("prompt is required, as a string" if prompt is None else
                           f"prompt must be a string, got {type(prompt).__name__}")
        seed = fields.get("seed")
        return check_request(limits, prompt, seed=0 if seed is None else seed, steps=fields.get("steps"),
                             height=fields.get("height"), width=fields.get("width"),
                             negative_prompt=fields.get("negative_prompt"),
                             guidance_scale=fields.get("guidance_scale"),
                             cfg_normalization=fields.get("cfg_normalization", 0.0),
                             cfg_truncation=fields.get("cfg_truncation", 1.0), strength=fields.get("strength"),
                             images=[f.info for f in images], mask=mask.info if mask else None,
                             control_image=control.info if control else None,
                             controlnet_scale=fields.get("controlnet_scale"))
    except RequestError as e:
        raise RowError(str(e)) from None


def resolve_loras(value, lora_dir: Path | None, text: bool) -> list[list]:
    """A row's `loras` (the server's rules: names in `--lora-dir`, never paths; a CSV cell: "a:0.8|b") ->
    [[name, scale, absolute path, sha256], ...]."""
    from ..lora.spec import check_scale, file_sha256, parse_lora_list, resolve_lora_name

    try:
        names = parse_lora_list(value, separator=LIST_SEPARATOR if text else None)
        if names and lora_dir is None:
            raise RowError("this row names LoRAs: give the folder that holds them with --lora-dir")
        out = []
        for name, scale in names:
            path = resolve_lora_name(lora_dir, name)
            out.append([name, check_scale(scale), str(path), file_sha256(path)])
    except RequestError as e:  # RowError included
        raise RowError(str(e)) from None
    except (OSError, UserError) as e:
        raise RowError(f"LoRA cannot be read: {e}") from None
    return out
