"""Open a build's pipeline: the class follows the variant's declared sequence layout."""

from __future__ import annotations

from pathlib import Path

from .. import manifest as manifest_io
from ..variants import get_variant
from .backend import Backend
from .edit import EditPipeline
from .pipeline import Pipeline

PIPELINES = {"basic": Pipeline, "omni": EditPipeline}  # Variant.layout -> the sampling loop that runs it


def open_pipeline(engine_dir: str | Path, backend: str | Backend = "auto", cfg_mode: str = "batch",
                  low_vram: bool | None = None, torch_mode: str | None = None,
                  torch_options: dict | None = None, offload: str | None = None) -> Pipeline:
    """The pipeline for the variant the build in `engine_dir` holds. `torch_mode` ("eager" | "compiled"; None:
    compiled on CUDA) and `torch_options` (e.g. {"max_graphs": 8}): the Torch backend's (runtime/torch_fast.py);
    `offload`: the memory mode (runtime/offload.py; None / "auto": the build's plan's)."""
    layout = get_variant(manifest_io.load(Path(engine_dir)).variant).layout
    return PIPELINES[layout](engine_dir, backend, cfg_mode, low_vram, torch_mode, torch_options, offload)
