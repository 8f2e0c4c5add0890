"""Load-time verification of a build against its manifest, before the first generation.

Checked every time a pipeline opens: the tokenizer and scheduler folders (and the Edit SigLIP processor) are
there, and every graph the chosen backend runs has the size the manifest records (ONNX Runtime: each
component's graph folder, model.onnx plus its external data; TensorRT: the plans, in tensorrt_backend.py;
Torch: the quantization scale files of quantized components). The sha256 the manifest records is checked on
the first load of each file and remembered in `DIR/.verified.json`, keyed by path, size and modification time
(nanoseconds): a file that changes is hashed again. A read-only build folder is hashed at every load.
Any mismatch is a UserError naming the file (the CLIs print it as `error:` and exit 2).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..buildfolder import CHECKPOINT, SCHEDULER, TOKENIZER, BuildFolder, support_folders
from ..errors import UserError
from ..fsutil import atomic_file
from ..hashing import file_sha256, folder_sha256
from ..manifest import Manifest, parse
from ..variants import is_omni

STAMP = ".verified.json"


class _Stamp:
    """`DIR/.verified.json`: relative path -> {"files": [[name, size, mtime_ns], ...], "sha256": hash}."""

    def __init__(self, engine_dir: Path):
        self.path = Path(engine_dir) / STAMP
        self.engine_dir = Path(engine_dir)
        try:
            data = json.loads(self.path.read_text())
            self.entries = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            self.entries = {}
        self.dirty = False

    def verified(self, target: Path, files: list[Path], expected: str, hasher) -> bool:
        key = str(target.relative_to(self.engine_dir))
        stats = [[p.name, st.st_size, st.st_mtime_ns] for p in files for st in [p.stat()]]
        entry = self.entries.get(key)
        if isinstance(entry, dict) and entry.get("files") == stats and entry.get("sha256") == expected:
            return True
        if hasher(target) != expected:
            return False
        self.entries[key] = {"files": stats, "sha256": expected}
        self.dirty = True
        return True

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            with atomic_file(self.path) as tmp:
                tmp.write_text(json.dumps(self.entries, indent=1) + "\n")
        except OSError:  # a read-only build folder: verify again next time
            pass


def check_support_files(engine_dir: Path, manifest: Manifest | dict) -> None:
    """The folders the pipelines read besides the graphs."""
    engine_dir = Path(engine_dir)
    files = {TOKENIZER: "tokenizer.json", SCHEDULER: "scheduler_config.json"}  # what must be inside
    for folder in support_folders(is_omni(parse(manifest).variant)):
        file = files.get(folder)
        path = engine_dir / folder
        if not path.is_dir():
            raise UserError(f"{path} is missing: the build folder is incomplete; rebuild it")
        if file and not (path / file).is_file():
            raise UserError(f"{path / file} is missing: the build folder is incomplete; rebuild it")


def check_graphs(engine_dir: Path, manifest: Manifest | dict, stamp: _Stamp | None = None) -> None:
    """Every complete component's ONNX graph folder: size always, sha256 on first load (then the stamp)."""
    engine_dir = Path(engine_dir)
    own = stamp is None
    stamp = stamp or _Stamp(engine_dir)
    for name, comp in parse(manifest).components.items():
        if not comp.complete:
            continue
        if comp.source == CHECKPOINT:  # a graphless build
            raise UserError(f"{engine_dir} has no ONNX graphs: it was built for the compiled Torch runtime (run it with "
                            "--backend torch, or rebuild with --graphs on for ONNX Runtime)")
        if comp.onnx is None or comp.bytes is None or comp.onnx_sha256 is None:
            raise UserError(f"the manifest records no graph, size or hash for {name}: rebuild")
        graph = BuildFolder(engine_dir).file(comp.onnx)
        folder = graph.parent
        if not graph.is_file():
            raise UserError(f"graph {graph} is missing: rebuild")
        files = sorted(p for p in folder.iterdir())
        if any(not p.is_file() for p in files):
            raise UserError(f"graph folder {folder} holds something other than the graph's files: rebuild")
        size = sum(p.stat().st_size for p in files)
        if size != comp.bytes:
            raise UserError(f"graph {graph} is truncated or corrupted ({size} bytes in {folder.name}/, the build "
                            f"wrote {comp.bytes}): rebuild")
        if not stamp.verified(folder, files, comp.onnx_sha256, folder_sha256):
            raise UserError(f"graph {graph} is corrupted (sha256 differs from the manifest): rebuild")
    if own:
        stamp.save()


def check_scales(engine_dir: Path, manifest: Manifest | dict, stamp: _Stamp | None = None) -> None:
    """Quantized components' scale files (read by the Torch backend): present, with the recorded hash."""
    engine_dir = Path(engine_dir)
    own = stamp is None
    stamp = stamp or _Stamp(engine_dir)
    for comp in parse(manifest).components.values():
        q = comp.quantization
        if not q or not comp.complete or not q.scales:
            continue
        path = BuildFolder(engine_dir).file(q.scales)
        if not path.is_file():
            raise UserError(f"quantization scales {path} are missing: rebuild")
        if q.scales_sha256 and not stamp.verified(path, [path], q.scales_sha256, file_sha256):
            raise UserError(f"quantization scales {path} are corrupted (sha256 differs from the manifest): rebuild")
    if own:
        stamp.save()


def plan_verified(engine_dir: Path, path: Path, expected_sha256: str) -> bool:
    """A TensorRT plan's sha256 equals the manifest's (hashed once per file version, then the stamp)."""
    stamp = _Stamp(engine_dir)
    ok = stamp.verified(Path(path), [Path(path)], expected_sha256, file_sha256)
    stamp.save()
    return ok


# what a backend loads (its `abilities.build_files`, runtime/backend.py) -> the check run before the first
# generation; "plans": the TensorRT backend checks its plans (size, then sha256 through `plan_verified`) as it loads
CHECKS = {"graphs": check_graphs, "scales": check_scales, "plans": None}


def verify_build(engine_dir: Path, manifest: Manifest | dict, build_files) -> None:
    """Everything the pipeline and its backend will read (`build_files`: the backend's `abilities.build_files`),
    before the first generation."""
    check_support_files(engine_dir, manifest)
    stamp = _Stamp(engine_dir)
    for kind in build_files:
        if CHECKS[kind] is not None:
            CHECKS[kind](engine_dir, manifest, stamp)
    stamp.save()
