"""Stage timers of the sampling loop (encode, denoise, decode, controlnet)."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


@contextmanager
def timed(timings: dict | None, stage: str):
    """Add the block's wall time (seconds) to `timings[stage]` when a dict is given; with CUDA in use, the GPU's
    queued work is waited for at both ends, so each stage's kernels count in their own stage."""
    sync = timings is not None and torch.cuda.is_available() and torch.cuda.is_initialized()
    if sync:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            if sync:
                torch.cuda.synchronize()
            timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0
