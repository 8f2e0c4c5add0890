"""`DIR/manifest.json`: what a build produced and everything the runtime needs to know about it.
Written atomically (temp file + rename) after every stage, so a reader never sees half a manifest."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError
from .fsutil import atomic_file

SCHEMA = 1
NAME = "manifest.json"


def load(engine_dir: Path) -> dict:
    path = Path(engine_dir) / NAME
    if not path.is_file():
        raise UserError(f"{engine_dir} has no {NAME}: build it first with `python -m zimage_deploy.build --out DIR`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as e:
        raise UserError(f"{path} is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror or e})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path} is not a build manifest: it holds a JSON {type(manifest).__name__}, not an object; "
                        "rebuild")
    if manifest.get("schema") != SCHEMA:
        raise UserError(f"{path} has manifest schema {manifest.get('schema')!r}, this version reads {SCHEMA}: "
                        "rebuild")
    check(manifest, path)
    return manifest


# keys the runtime reads, with the JSON type each must have
_REQUIRED = {"variant": str, "components": dict, "defaults": dict, "model": dict}
_DEFAULTS = {"steps": int, "guidance_scale": (int, float), "height": int, "width": int,
             "resolution_multiple": int, "max_sequence_length": int}


def check(manifest: dict, path: Path | str = NAME) -> None:
    """The fields the runtime reads are there with the right types (a clear error, not a traceback later)."""
    def bad(what: str) -> UserError:
        return UserError(f"{path} is not a complete build manifest ({what}): rebuild")

    for key, kind in _REQUIRED.items():
        if not isinstance(manifest.get(key), kind):
            raise bad(f"{key!r} missing or not a {kind.__name__}")
    for key, kind in _DEFAULTS.items():
        v = manifest["defaults"].get(key)
        if not isinstance(v, kind) or isinstance(v, bool) or v < 0 or (key == "resolution_multiple" and v < 1):
            raise bad(f"defaults.{key} missing or invalid")
    if not isinstance(manifest["model"].get("facts"), dict):
        raise bad("model.facts missing")
    for name, comp in manifest["components"].items():
        if not isinstance(comp, dict):
            raise bad(f"components.{name} is not an object")


def save(engine_dir: Path, manifest: dict) -> None:
    with atomic_file(Path(engine_dir) / NAME) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")


def complete_components(manifest: dict) -> list[str]:
    return [n for n, c in manifest.get("components", {}).items() if c.get("status") == "complete"]


def has_engines(manifest: dict) -> bool:
    """Every component has a complete engine: what the TensorRT backend needs to run the build (and so what `auto`
    picks TensorRT by, and what a GPU is reserved for). A build with some engines missing (an engines stage cut
    short) runs on ONNX Runtime / Torch like one without any."""
    comps = manifest.get("components") or {}
    return bool(comps) and all((c.get("engine") or {}).get("status") == "complete" for c in comps.values())


def planned_low_vram(manifest: dict, low_vram: bool | None) -> bool:
    """`low_vram` as asked, or (None) the mode the build's VRAM plan picked for its target (`runtime.mode`): one
    stage resident at a time in every mode but all-resident (text-encoder-cpu and weight-streaming plans too)."""
    if low_vram is None:
        return (manifest.get("runtime") or {}).get("mode", "all-resident") != "all-resident"
    return bool(low_vram)
