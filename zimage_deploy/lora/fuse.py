"""LoRAs fused into the DiT weights at build time.

The fusion happens in one place, the DiT's weight stream (models/stream.py: checkpoint tensors -> our fused
naming -> LoRA deltas): the loaded module (ordinary export, parity, Torch backend, quantization calibration) and the
memory-lean export (weights streamed into the graphs) read the same fused weights. This module says which LoRAs a
build fuses: read and checked at build time (`BuildLoras`), reread from the build's copies afterwards.

A build records each fused LoRA in the manifest (sha256, scale, format) and keeps a copy in `DIR/loras/`, so that
whatever reloads the DiT later (the Torch backend, the quantize stage) fuses exactly the same file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Sequence

from ..components import DIT, loader_of
from ..errors import UserError
from .formats import Lora, read_lora
from .spec import as_spec, file_sha256
from .targets import from_checkpoint


def lora_key(loras: Sequence[tuple[Lora, float]]) -> str:
    """What identifies a set of LoRAs (files and scales, in order): '' for none."""
    return _key([(lora.sha256, scale) for lora, scale in loras])


def recorded_key(manifest: dict) -> str:
    """`lora_key` of the LoRAs a build's manifest records as fused."""
    return _key([(rec["sha256"], rec["scale"]) for rec in manifest.get("loras") or []])


def _key(pairs) -> str:
    if not pairs:
        return ""
    return hashlib.sha256(json.dumps([[sha, float(scale)] for sha, scale in pairs]).encode()).hexdigest()


class BuildLoras:
    """The LoRAs a build fuses (`build --lora PATH[:SCALE]`), read and checked against the checkpoint's
    transformer before anything is written."""

    def __init__(self, args: Sequence = (), ckpt: Path | None = None):
        specs = [as_spec(a) for a in args or ()]
        self.loras: list[tuple[Lora, float]] = []
        if specs:
            targets = from_checkpoint(ckpt)
            self.loras = [(read_lora(s.path, targets), s.scale) for s in specs]
        self.key = lora_key(self.loras)

    def __bool__(self) -> bool:
        return bool(self.loras)

    def key_for(self, component: str) -> str:
        """The part of a component's up-to-date key that the LoRAs make: '' for components without DiT weights."""
        return self.key if loader_of(component) == DIT else ""

    def kwargs(self, loader: str) -> dict:
        """Keyword arguments of a loader (models/load.py) for these LoRAs."""
        return {"loras": self.loras} if self.loras and loader == DIT else {}

    def save(self, out: Path) -> list[dict]:
        """Copy the files into `out/loras/` (atomically; kept when already there) -> the manifest's `loras`."""
        from ..buildfolder import BuildFolder
        from ..fsutil import atomic_file

        records = []
        for lora, scale in self.loras:
            rel, dst = BuildFolder.lora_rel(lora.sha256), BuildFolder(out).lora(lora.sha256)
            if not (dst.is_file() and file_sha256(dst) == lora.sha256):
                with atomic_file(dst, suffix=".safetensors") as tmp:
                    shutil.copyfile(lora.path, tmp)
            records.append({"file": rel, "source": str(lora.path), "scale": scale, **lora.record()})
        return records


def build_loras(engine_dir: Path, manifest: dict) -> list[tuple[Lora, float]]:
    """The LoRAs a build fused (its manifest's `loras`, read from its `loras/` copies, hashes checked)."""
    records = manifest.get("loras") or []
    if not records:
        return []
    from ..buildfolder import BuildFolder

    targets = from_checkpoint(Path(manifest["model"]["path"]))
    loras = []
    for rec in records:
        path = BuildFolder(engine_dir).file(rec["file"])
        if not path.is_file() or file_sha256(path) != rec["sha256"]:
            raise UserError(f"{engine_dir} fused LoRA {rec.get('source')} at build time, but its copy {path} is "
                            "missing or changed: rebuild")
        loras.append((read_lora(path, targets, rec["sha256"]), float(rec["scale"])))
    return loras


def loader_kwargs(engine_dir: Path, manifest: dict, loader: str) -> dict:
    """Keyword arguments that make `loader` (models/load.py) load the DiT as the build fused it."""
    if loader != DIT or not manifest.get("loras"):
        return {}
    return {"loras": build_loras(engine_dir, manifest)}
