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
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if manifest.get("schema") != SCHEMA:
        raise UserError(f"{path} has manifest schema {manifest.get('schema')}, this version reads {SCHEMA}: rebuild")
    return manifest


def save(engine_dir: Path, manifest: dict) -> None:
    with atomic_file(Path(engine_dir) / NAME) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")


def complete_components(manifest: dict) -> list[str]:
    return [n for n, c in manifest.get("components", {}).items() if c.get("status") == "complete"]
