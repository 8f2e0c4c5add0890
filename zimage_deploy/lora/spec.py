"""Which LoRA, at which strength: `PATH[:SCALE]` arguments, a folder holding one file, names inside a configured
folder (the server's `--lora-dir`: never a path taken from a request), and file hashes remembered per file version."""

from __future__ import annotations

import json
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import RequestError, UserError
from ..hashing import file_sha256 as plain_sha256

MAX_SCALE = 100.0  # |scale| above this is a typo, not a strength (weights would overflow long before)
SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class LoraSpec:
    path: Path
    scale: float = 1.0


def check_scale(scale, what: str = "LoRA scale") -> float:
    """A finite number with |scale| <= MAX_SCALE (negative scales subtract the LoRA)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise UserError(f"{what} must be a number, got {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
        raise UserError(f"{what} must be a finite number in [-{MAX_SCALE:g}, {MAX_SCALE:g}], got {scale!r}")
    return scale


def parse_lora_arg(text: str) -> LoraSpec:
    """`PATH` or `PATH:SCALE` (scale default 1.0). A path that itself contains ':' is taken whole when it exists."""
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"--lora needs PATH[:SCALE], got {text!r}")
    path, sep, scale = text.rpartition(":")
    if not sep or (Path(text).exists() and not Path(path).exists()):
        return LoraSpec(find_lora_file(Path(text)), 1.0)
    if not path:
        raise UserError(f"--lora {text!r}: no path before the scale")
    try:
        value = float(scale)
    except ValueError:
        raise UserError(f"--lora {text!r}: malformed scale {scale!r} (expected PATH[:SCALE], e.g. "
                        "style.safetensors:0.8)") from None
    return LoraSpec(find_lora_file(Path(path)), check_scale(value, f"--lora {text!r}: scale"))


def as_spec(item) -> LoraSpec:
    """A LoraSpec from what a caller may pass: LoraSpec, (path, scale), or a `PATH[:SCALE]` string / Path."""
    if isinstance(item, LoraSpec):
        return LoraSpec(find_lora_file(item.path), check_scale(item.scale))
    if isinstance(item, (tuple, list)):
        if len(item) != 2:
            raise UserError(f"a LoRA is (path, scale), got {item!r}")
        return LoraSpec(find_lora_file(Path(item[0])), check_scale(item[1]))
    if isinstance(item, Path):
        return LoraSpec(find_lora_file(item), 1.0)
    if isinstance(item, str):
        return parse_lora_arg(item)
    raise UserError(f"a LoRA is (path, scale) or 'PATH[:SCALE]', got {type(item).__name__}")


def find_lora_file(path: Path) -> Path:
    """The LoRA file `path` names: the file itself, or the one .safetensors file of a folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == SUFFIX and p.is_file())
        if len(files) != 1:
            found = ", ".join(p.name for p in files[:5]) or "none"
            raise UserError(f"LoRA folder {path} must hold exactly one {SUFFIX} file (found {found}); "
                            "pass the file itself")
        return files[0].resolve()
    if not path.is_file():
        raise UserError(f"LoRA {path}: no such file or folder")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"LoRA {path} is a pickle file ({path.suffix}): only safetensors LoRAs are read; convert it")
    return path.resolve()


def resolve_lora_name(folder: Path, name: str) -> Path:
    """The file for LoRA `name` inside the configured `folder` (the server's `--lora-dir`). `name` is a plain file
    name (letters, digits, `._-`; `.safetensors` may be left out), never a path: the result is inside `folder`
    even through symlinks, or RequestError."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise RequestError(f"LoRA name {str(name)[:80]!r} is not a valid name (letters, digits, '.', '_', '-'; "
                           "at most 128 characters; no paths)")
    root = Path(folder).resolve()
    candidate = root / (name if name.endswith(SUFFIX) else name + SUFFIX)
    real = candidate.resolve()
    if root not in real.parents or not real.is_file():
        raise RequestError(f"unknown LoRA {name!r}")
    return real


MAX_PER_REQUEST = 4  # LoRAs one request (server) or batch row may name


def parse_lora_list(value, separator: str | None = None) -> tuple[tuple[str, float], ...]:
    """A request's `loras` field: a list of {"name": NAME, "scale": S} (scale default 1) or "NAME" / "NAME:S"
    strings; a string is the JSON list (a multipart text field), or with `separator` (a batch CSV cell) names
    separated by it. Names are checked for shape only; `resolve_lora_name` finds them in a folder. RequestError."""
    if value is None:
        return ()
    if isinstance(value, str):
        if separator is not None and not value.lstrip().startswith("["):
            value = [v.strip() for v in value.split(separator) if v.strip()]
        else:
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):
                raise RequestError("loras must be a JSON list") from None
    if not isinstance(value, list) or len(value) > MAX_PER_REQUEST:
        raise RequestError(f"loras must be a list of at most {MAX_PER_REQUEST} entries")
    out = []
    for item in value:
        if isinstance(item, str):  # "NAME" or "NAME:SCALE"
            name, _, scale = item.rpartition(":") if ":" in item else (item, "", "1")
            try:
                item = {"name": name, "scale": float(scale)}
            except ValueError:
                raise RequestError(f"LoRA scale must be a number, got {scale[:40]!r}") from None
        if not isinstance(item, dict) or set(item) - {"name", "scale"} or not isinstance(item.get("name"), str):
            raise RequestError('each LoRA is {"name": NAME, "scale": S} or "NAME:S"')
        scale = item.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise RequestError(f"LoRA scale must be a number, got {str(scale)[:40]!r}")
        out.append((item["name"][:200], float(scale)))
    return tuple(out)


def list_lora_names(folder: Path) -> list[str]:
    """The names `resolve_lora_name` accepts in `folder`."""
    root = Path(folder)
    names = []
    for p in sorted(root.glob("*" + SUFFIX)):
        name = p.name[: -len(SUFFIX)]
        if NAME_RE.fullmatch(name) and ".." not in name:
            try:
                resolve_lora_name(root, name)
            except RequestError:
                continue
            names.append(name)
    return names


_HASHES: dict[tuple, str] = {}
_HASH_LOCK = threading.Lock()


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered per file version (path, inode, size, modification time in ns)."""
    st = os.stat(path)
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    with _HASH_LOCK:
        if key in _HASHES:
            return _HASHES[key]
    sha = plain_sha256(path)
    with _HASH_LOCK:
        if len(_HASHES) > 1024:
            _HASHES.clear()
        _HASHES[key] = sha
    return _HASHES[key]
