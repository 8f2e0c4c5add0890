"""Find, check and read Z-Image checkpoints in diffusers layout (local directory, hub id, or embedded tiny).

Weights are read from safetensors only; a checkpoint that has only pickle files (.bin/.pt/.ckpt) is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from .errors import UserError
from .hashing import load_stamps, remembered_sha256, stamp_key
from .keymaps import iter_source, iter_source_shapes, read_source, source_bytes
from .variants import is_omni

# What each component folder must hold (besides weights, checked separately).
REQUIRED_FILES = {
    "transformer": ["config.json"],
    "text_encoder": ["config.json"],
    "vae": ["config.json"],
    "tokenizer": ["tokenizer_config.json"],
    "scheduler": ["scheduler_config.json"],
}
WEIGHT_FOLDERS = ("transformer", "text_encoder", "vae")
EDIT_FILES = {"siglip": ["config.json"], "siglip_processor": ["preprocessor_config.json"]}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
HUB_PATTERNS = ["model_index.json", "*/*.json", "*/*.safetensors", "tokenizer/*", "*/*.jinja", "*/*.txt"]


def missing_files(path: Path, variant: str = "turbo") -> list[str]:
    """Relative paths a usable Z-Image checkpoint needs and `path` lacks (empty list: complete)."""
    missing = []
    if not (path / "model_index.json").is_file():
        missing.append("model_index.json")
    required = {**REQUIRED_FILES, **(EDIT_FILES if is_omni(variant) else {})}
    for folder, files in required.items():
        for f in files:
            if not (path / folder / f).is_file():
                missing.append(f"{folder}/{f}")
    for folder in WEIGHT_FOLDERS + (("siglip",) if is_omni(variant) else ()):
        d = path / folder
        if d.is_dir() and not any(d.glob("*.safetensors")) and read_source(d) is None:
            pickles = [p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES]
            hint = f" (found pickle files {pickles}: convert them to safetensors)" if pickles else ""
            missing.append(f"{folder}/*.safetensors{hint}")
        elif not d.is_dir():
            missing.append(f"{folder}/*.safetensors")
    if not (path / "tokenizer" / "tokenizer.json").is_file() and (path / "tokenizer").is_dir():
        if not any((path / "tokenizer").glob("vocab*")):
            missing.append("tokenizer/tokenizer.json")
    return missing


# diffusers pipeline class (model_index.json `_class_name`) -> the variants such a checkpoint can be built as.
# Turbo and Base share one class: the class cannot tell them apart (Base is chosen with --variant base).
PIPELINE_VARIANTS = {
    "ZImagePipeline": ("turbo", "base"),
    "ZImageImg2ImgPipeline": ("turbo", "base"),
    "ZImageInpaintPipeline": ("turbo", "base"),
    "ZImageControlNetPipeline": ("turbo", "base"),  # its controlnet/ is built too (controlnet.py)
    "ZImageControlNetInpaintPipeline": ("turbo", "base"),
    "ZImageOmniPipeline": ("edit",),
}


def resolve(model: str, variant: str | None = None) -> tuple[Path, str]:
    """`tiny` / `tiny-base` / `tiny-edit` (embedded), a local diffusers-layout directory, or a hub id -> (local
    checkpoint directory, variant), checked. The variant comes from the checkpoint's `model_index.json`
    (`_class_name`); `variant` chooses among the ones it allows (Turbo or Base) and must not contradict it."""
    from .tiny import TINY_MODELS, ensure_tiny

    if model in TINY_MODELS:
        path = ensure_tiny(model)
    else:
        path = Path(model).expanduser()
        if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
            if not path.is_dir():
                raise UserError(f"model {model!r}: no such directory (and not a hub id of the form owner/name)")
        else:
            path = _download(model)
    variant = detect_variant(path, variant, model)
    return check(path, variant), variant


def detect_variant(path: Path, asked: str | None, model: str = "") -> str:
    """The variant of the checkpoint at `path`: from `model_index.json`'s pipeline class; `asked` (--variant) must
    be one it allows. Without `asked`: Edit for Omni checkpoints; for a Turbo/Base class, Base when the model is
    `tiny-base` or the Base hub id, else Turbo."""
    from .tiny import TINY_MODELS
    from .variants import VARIANTS

    index = path / "model_index.json"
    try:
        cls = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as e:
        raise UserError(f"{index} is not a valid model index ({type(e).__name__})") from None
    allowed = PIPELINE_VARIANTS.get(cls) if isinstance(cls, str) else None
    if allowed is None:
        if index.is_file():
            known = ", ".join(PIPELINE_VARIANTS)
            raise UserError(f"{index}: pipeline class {cls!r} is not a Z-Image pipeline this toolkit builds "
                            f"(known: {known})")
        return asked or "turbo"  # no model_index.json: `check` reports what is missing
    if asked is not None:
        if asked not in allowed:
            raise UserError(f"--variant {asked} contradicts the checkpoint: its model_index.json names {cls}, "
                            f"which builds as {' or '.join(allowed)}")
        return asked
    if len(allowed) == 1:
        return allowed[0]
    tiny = TINY_MODELS.get(model, {})
    if tiny.get("variant") in allowed:
        return tiny["variant"]
    hub = {v.hub_id: v.name for v in VARIANTS.values()}
    return hub.get(model, "turbo") if hub.get(model, "turbo") in allowed else "turbo"


def check(path: Path, variant: str = "turbo") -> Path:
    missing = missing_files(path, variant)
    if missing:
        raise UserError(
            f"{path} is not a complete Z-Image checkpoint in diffusers layout; missing: {', '.join(missing)}"
        )
    return path.resolve()


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated ...
        needed = ["model_index.json"] + [f"{k}/{f}" for k, v in REQUIRED_FILES.items() for f in v]
        needed += [f"{k}/*.safetensors" for k in WEIGHT_FOLDERS]
        raise UserError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0]}). "
            f"Download it elsewhere and pass the local directory; it must contain: {', '.join(needed)}"
        ) from None


def read_config(path: Path, folder: str, name: str = "config.json") -> dict:
    with open(path / folder / name) as f:
        return json.load(f)


def iter_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of every safetensors file in `folder`, one at a time (never the whole model at once); a
    single-file view's folder (keymaps.py `source.json`) yields its source file's tensors, renamed."""
    source = read_source(folder)
    if source is not None:
        yield from iter_source(source)
        return
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"no safetensors weights in {folder}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def iter_shapes(folder: Path) -> Iterator[tuple[str, list[int]]]:
    """(name, shape) of every tensor `iter_tensors` yields, from the safetensors headers (no tensor is read)."""
    source = read_source(folder)
    if source is not None:
        yield from iter_source_shapes(source)
        return
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, list(f.get_slice(name).get_shape())


def weight_bytes(folder: Path) -> int:
    """Bytes of a component's weight files (a view's: its source files)."""
    source = read_source(folder)
    if source is not None:
        return source_bytes(source)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def content_hash(path: Path) -> str:
    """sha256 over the relative names and contents of every file of the checkpoint. Each file's own sha256 is
    remembered in the cache by (path, size, mtime), so an unchanged 20 GB checkpoint is not read again."""
    from tqdm import tqdm

    files = sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.relative_to(path).parts)
    stamps = load_stamps()
    total = sum(p.stat().st_size for p in files if stamp_key(p) not in stamps)
    with tqdm(total=total, unit="B", unit_scale=True, desc="hashing checkpoint", disable=total < 1 << 30) as bar:
        sums = remembered_sha256(files, bar.update)
    return _digest(path, files, sums)


def _digest(root: Path, files, sums) -> str:
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0" + sums[p].encode())
    return h.hexdigest()


def part_hashes(path: Path) -> dict[str, str]:
    """sha256 of each top-level folder of the checkpoint (transformer, text_encoder, vae, ...), from the remembered
    file hashes (call after `content_hash`): what lets a rebuild keep the graphs of the parts that did not change."""
    out = {}
    for folder in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        out[folder.name] = _digest(path, files, remembered_sha256(files))
    return out


def model_key(model: str, variant: str) -> str:
    if model == "tiny":
        return f"tiny-{variant}"
    if model.startswith("tiny-") and not Path(model).exists():
        return model
    path = Path(model)
    if path.is_file():
        return path.stem
    if path.exists():
        return path.resolve().name
    return model.replace("/", "--")
