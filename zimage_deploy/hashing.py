"""sha256 of files and graph folders: the hashes a build records (graphs, scales, plans, checkpoints, ControlNets).

`remembered_sha256` keeps each file's hash in the cache by (path, size, mtime), so an unchanged 20 GB checkpoint is
not read again."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .fsutil import atomic_file
from .paths import cache_dir

CHUNK = 1 << 24


def _update(h, path: Path, progress=None) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if progress is not None:
                progress(len(chunk))


def file_sha256(path: Path) -> str:
    """sha256 of one file's bytes."""
    h = hashlib.sha256()
    _update(h, Path(path))
    return h.hexdigest()


def folder_sha256(folder: Path) -> str:
    """The hash a build records for a graph folder: names and contents of its files, in name order."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).iterdir()):
        h.update(p.name.encode() + b"\0")
        _update(h, p)
    return h.hexdigest()


# -- hashes remembered across runs --------------------------------------------------------------------------
def stamp_key(p: Path) -> str:
    st = p.stat()
    return f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _stamps_path() -> Path:
    return cache_dir() / "file-hashes.json"


def load_stamps() -> dict:
    try:
        stamps = json.loads(_stamps_path().read_text())
        return stamps if isinstance(stamps, dict) else {}
    except (OSError, ValueError):
        return {}


def save_stamps(stamps: dict) -> None:
    try:
        with atomic_file(_stamps_path()) as tmp:
            tmp.write_text(json.dumps(stamps))
    except OSError:  # a read-only cache only costs the next build a re-read
        pass


def remembered_sha256(files, progress=None) -> dict[Path, str]:
    """{file: sha256} for `files`, reading only those whose (path, size, mtime) the cache does not know;
    `progress(n_bytes)` is called as they are read."""
    stamps = load_stamps()
    todo = [p for p in files if stamp_key(p) not in stamps]
    for p in todo:
        h = hashlib.sha256()
        _update(h, p, progress)
        stamps[stamp_key(p)] = h.hexdigest()
    if todo:
        save_stamps(stamps)
    return {p: stamps[stamp_key(p)] for p in files}
