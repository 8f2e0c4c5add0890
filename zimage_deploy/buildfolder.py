"""Files of a build folder that more than one stage writes or deletes."""

from __future__ import annotations

import shutil
from pathlib import Path

from .fsutil import atomic_dir


def copy_tree(src: Path, dst: Path) -> None:
    """Copy a checkpoint folder (tokenizer, scheduler, SigLIP processor) into the build, atomically."""
    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def drop_graph(out: Path, entry: dict, log, what: str) -> None:
    """Delete a graph the runtime does not need (--drop-intermediate); the manifest keeps its hash and says so."""
    folder = out / Path(entry["onnx"]).parent
    if folder.is_dir():
        size = sum(p.stat().st_size for p in folder.iterdir())
        shutil.rmtree(folder)
        log(f"[drop] {what}: {folder.relative_to(out)} ({size / 2**30:.2f} GiB)")
    entry["dropped"] = True
