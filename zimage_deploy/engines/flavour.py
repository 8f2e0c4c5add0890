"""The two TensorRT flavours behind one API: TensorRT-RTX (GeForce/RTX targets, builds ahead of time on a
machine without a GPU) and TensorRT (datacenter targets, builds on the GPU it targets)."""

from __future__ import annotations

import importlib

from ..errors import UserError

MODULES = {"tensorrt-rtx": "tensorrt_rtx", "tensorrt": "tensorrt"}
MIN_TENSORRT = (10, 13)  # IStreamWriter, build_serialized_network_to_stream, OnnxParser.load_initializer & co.
# what the builder calls that TensorRT 10.12 and older lack
NEEDED = {"": ("IStreamWriter",), "Builder": ("build_serialized_network_to_stream",),
          "OnnxParser": ("load_model_proto", "load_initializer", "parse_model_proto")}


def tensorrt_hint() -> str:
    """Which datacenter TensorRT wheel to install beside this torch: the one built for torch's CUDA major."""
    try:
        import torch

        major = (torch.version.cuda or "").split(".")[0]
    except Exception:
        major = ""
    wheel = f"tensorrt-cu{major}" if major else "tensorrt-cu12"
    return (f"pip install '{wheel}>=10.13' (NVIDIA TensorRT 10.13 or newer for the CUDA major version your torch "
            f"was built with{f', CUDA {major}' if major else ': tensorrt-cu12 for CUDA 12, tensorrt-cu13 for CUDA 13'}"
            "; see NVIDIA's TensorRT installation guide); TensorRT-RTX cannot build for datacenter GPUs "
            "(no SM90/SM100)")


INSTALL_HINTS = {
    "tensorrt-rtx": "pip install tensorrt-rtx-cu12   (or: pip install 'zimage-deploy[tensorrt-rtx]')",
    "tensorrt": None,  # tensorrt_hint()
}


def import_trt(flavour: str):
    """The TensorRT module of `flavour`, or a UserError that says how to install it."""
    try:
        return importlib.import_module(MODULES[flavour])
    except ImportError as e:
        raise UserError(f"this target needs {flavour} (Python module `{MODULES[flavour]}`), which cannot be "
                        f"imported here ({e}). Install it: {INSTALL_HINTS[flavour] or tensorrt_hint()}") from None


def version(trt) -> str:
    return trt.__version__


def check_version(flavour: str, trt) -> None:
    """Datacenter TensorRT must be 10.13 or newer (and have the names the builder uses): refused before any work."""
    if flavour != "tensorrt":
        return
    try:
        installed = tuple(int(x) for x in version(trt).split(".")[:2])
    except ValueError:
        installed = (0, 0)
    missing = [f"{owner + '.' if owner else ''}{n}" for owner, names in NEEDED.items() for n in names
               if not hasattr(getattr(trt, owner) if owner else trt, n)]
    if installed < MIN_TENSORRT or missing:
        raise UserError(f"TensorRT {version(trt)} is installed; building engines needs TensorRT "
                        f"{'.'.join(map(str, MIN_TENSORRT))} or newer"
                        f"{' (missing ' + ', '.join(missing) + ')' if missing else ''}. Install it: {tensorrt_hint()}")
