"""The two TensorRT flavours behind one API: TensorRT-RTX (GeForce/RTX targets, builds ahead of time on a
machine without a GPU) and TensorRT (datacenter targets, builds on the GPU it targets)."""

from __future__ import annotations

import importlib

from ..errors import UserError

MODULES = {"tensorrt-rtx": "tensorrt_rtx", "tensorrt": "tensorrt"}
INSTALL_HINTS = {
    "tensorrt-rtx": "pip install tensorrt-rtx-cu12   (or: pip install 'zimage-deploy[tensorrt-rtx]')",
    "tensorrt": "install NVIDIA TensorRT 10.x or 11.x for your CUDA version, for example "
                "`pip install tensorrt-cu12` (see NVIDIA's TensorRT installation guide); "
                "TensorRT-RTX cannot build for datacenter GPUs (no SM90/SM100)",
}


def import_trt(flavour: str):
    """The TensorRT module of `flavour`, or a UserError that says how to install it."""
    try:
        return importlib.import_module(MODULES[flavour])
    except ImportError as e:
        raise UserError(f"this target needs {flavour} (Python module `{MODULES[flavour]}`), which cannot be "
                        f"imported here ({e}). Install it: {INSTALL_HINTS[flavour]}") from None


def version(trt) -> str:
    return trt.__version__
