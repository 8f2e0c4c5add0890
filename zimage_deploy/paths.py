"""Where the toolkit keeps its own files (a leaf: imports nothing of the package)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache folder: embedded tiny checkpoints, remembered file hashes, TensorRT timing caches."""
    return Path(os.environ.get("ZIMAGE_DEPLOY_CACHE", Path.home() / ".cache" / "zimage_deploy"))
