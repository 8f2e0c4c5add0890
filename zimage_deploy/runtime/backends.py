"""Backends: run a component by name on named torch tensors and return named torch tensors.

Every backend takes the same inputs and gives the same outputs, as the manifest describes them; the sampling
loop does not know which one it talks to.
- onnxruntime: the exported graphs (CPU; float32 graphs, ONNX Runtime has no BF16 kernels on CPU);
- torch: the same export-friendly modules, loaded from the checkpoint the build recorded, eager or compiled
  (runtime/torch_fast.py);
- tensorrt: the engines (runtime/tensorrt_backend.py).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from ..buildfolder import BuildFolder
from ..errors import UserError
from ..manifest import has_engines, planned_low_vram  # noqa: F401 - imported from here too
from .backend import Backend
from .offload import asked_mode, check_host_mode, tensorrt_mode
from .torch_fast import TORCH_MODES, TorchBackend  # noqa: F401 - the Torch backend lives there

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")
TORCH_COMPILED = "torch-compiled"  # manifest `runtime.backend` of a build made for the compiled Torch runtime


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, engine_dir, manifest, providers=("CPUExecutionProvider",)):
        super().__init__(engine_dir, manifest)
        import onnxruntime as ort

        self.ort = ort
        self.providers = list(providers)
        self.sessions: dict[str, object] = {}
        self._lock = threading.Lock()
        for name, comp in self.components.items():
            if any(io["dtype"] == "bfloat16" for io in comp["inputs"] + comp["outputs"]):
                raise UserError(
                    f"{name} is a BF16 graph: ONNX Runtime cannot run BF16 graphs on the CPU. "
                    "Use --backend torch, or build with --precision fp32 for ONNX Runtime."
                )

    def session(self, component: str):
        with self._lock:
            if component not in self.sessions:
                path = BuildFolder(self.engine_dir).file(self.components[component]["onnx"])
                opts = self.ort.SessionOptions()
                opts.log_severity_level = 3
                # no busy-waiting between calls: the loop does torch work between graph runs
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
                self.sessions[component] = self.ort.InferenceSession(str(path), opts, providers=self.providers)
            return self.sessions[component]

    def run(self, component, **inputs):
        feeds = {k: v.detach().cpu().numpy() for k, v in self._cast_inputs(component, inputs).items()}
        outputs = self.session(component).run(None, feeds)
        names = [o["name"] for o in self.components[component]["outputs"]]
        return {n: torch.from_numpy(np.asarray(o)) for n, o in zip(names, outputs)}


def resolve_backend(name: str, manifest: dict) -> str:
    """`auto`: TensorRT when the build has engines and a CUDA GPU is visible; otherwise Torch on a CUDA GPU or for a
    build made for the compiled Torch runtime (manifest `runtime.backend`: a Hopper build without TensorRT), else
    ONNX Runtime for float32 builds and Torch for BF16 builds (ONNX Runtime has no BF16 CPU kernels)."""
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    if name == "auto":
        if has_engines(manifest) and torch.cuda.is_available():
            return "tensorrt"
        if torch.cuda.is_available() or (manifest.get("runtime") or {}).get("backend") == TORCH_COMPILED:
            return "torch"
        bf16 = any(c.get("compute_dtype") == "bfloat16" for c in manifest["components"].values())
        return "torch" if bf16 else "onnxruntime"
    return name


def check_torch_mode(name: str, torch_mode: str | None) -> None:
    """`torch_mode` is the Torch backend's option: refused (UserError) for another backend or an unknown mode."""
    if torch_mode is None:
        return
    if torch_mode not in TORCH_MODES:
        raise UserError(f"torch_mode must be one of {', '.join(TORCH_MODES)}, got {torch_mode!r}")
    if name != "torch":
        raise UserError(f"--torch-mode {torch_mode} is an option of the torch backend, not of {name}")


def make_backend(name: str, engine_dir: Path, manifest: dict, low_vram: bool | None = None,
                 torch_mode: str | None = None, offload: str | None = None, **torch_options) -> Backend:
    """The backend `name` (see `resolve_backend` for `auto`). `offload`: the memory mode (runtime/offload.py:
    none, model, text-encoder-cpu, sequential; None / auto: the one the build's VRAM plan picked for its target,
    manifest `runtime.mode`), refused where the backend cannot run it; `low_vram`: the older flag (True: model).
    `torch_mode` (Torch: "eager" | "compiled"; None: compiled on CUDA, eager on the CPU) and `torch_options`
    (runtime/torch_fast.py TorchBackend's keywords, e.g. max_graphs) go to the Torch backend."""
    name = resolve_backend(name, manifest)
    check_torch_mode(name, torch_mode)
    mode = asked_mode(offload, low_vram)
    if name == "tensorrt":
        from .tensorrt_backend import TensorRTBackend

        low, text_encoder_cpu = tensorrt_mode(mode, manifest)
        return TensorRTBackend(engine_dir, manifest, low_vram=low, text_encoder_cpu=text_encoder_cpu)
    if name == "onnxruntime":
        check_host_mode(name, mode)
        return OnnxRuntimeBackend(engine_dir, manifest)
    return TorchBackend(engine_dir, manifest, torch_mode=torch_mode, offload=mode, **torch_options)
