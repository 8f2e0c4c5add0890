"""`DIR/manifest.json`: what a build produced and everything the runtime needs to know about it.
Written atomically (temp file + rename) after every stage, so a reader never sees half a manifest."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import UserError

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
    engine_dir = Path(engine_dir)
    engine_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".json", dir=engine_dir)
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, engine_dir / NAME)


def complete_components(manifest: dict) -> list[str]:
    return [n for n, c in manifest.get("components", {}).items() if c.get("status") == "complete"]
