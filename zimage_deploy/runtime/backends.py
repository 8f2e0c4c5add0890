"""Backends: run a component by name on named torch tensors and return named torch tensors.

Every backend takes the same inputs and gives the same outputs, as the manifest describes them; the sampling
loop does not know which one it talks to.
- onnxruntime: the exported graphs (CPU; float32 graphs, ONNX Runtime has no BF16 kernels on CPU);
- torch: the same export-friendly modules, loaded from the checkpoint the build recorded;
- tensorrt: the engines (runtime/tensorrt_backend.py).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from ..buildfolder import BuildFolder
from ..components import loader_of
from ..errors import UserError
from ..export.specs import DTYPES
from ..manifest import planned_low_vram
from .backend import Backend
from .offload import offload_policy

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")


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


class TorchBackend(Backend):
    name = "torch"
    lora_bounds: tuple[int, int] | None = None  # (max_rank, max_loras): LoRA branches installed before compiling

    def __init__(self, engine_dir, manifest, device: str | None = None, compile: bool = False, fp8: bool = False,
                 modules: dict[str, torch.nn.Module] | None = None, offload="none"):
        """`device`: default cuda when available. On a GPU, `compile` compiles each DiT block (CUDA graphs);
        `fp8` runs the DiT's projections in FP8 through `torch._scaled_mm` (models/fast.py), with the FP8 graphs'
        calibrated scales when the build is an fp8 build. `modules` (loader name ->
        module already in memory, e.g. {"transformer": dit, ...}) replaces loading from the checkpoint. `offload`:
        "none" | "model" | "sequential" (runtime/offload.py), an OffloadPolicy, or None: the build's plan's (what
        make_backend asks for)."""
        super().__init__(engine_dir, manifest)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if compile and not str(device).startswith("cuda"):
            raise UserError("--compile of the torch backend needs a CUDA GPU")
        self.compile, self.fp8 = compile, fp8
        self.device = torch.device(device)
        self.offload = offload_policy(offload, manifest, self.device, compile or fp8)
        self.models: dict[str, torch.nn.Module] = {}
        self.ckpt = None
        if modules is not None:
            for key, model in modules.items():
                self.models[key] = self.offload.manage(key, self._accelerate(key, model))
        else:
            from ..checkpoint import missing_files

            path = Path(manifest["model"]["path"])
            if not path.is_dir() or missing_files(path, manifest["variant"]):
                raise UserError(f"the torch backend loads weights from the checkpoint the build used ({path}), "
                                "which is not there")
            self.ckpt = path
        self.wrappers: dict[str, torch.nn.Module] = {}
        self._lock = threading.Lock()

    def _accelerate(self, key: str, model: torch.nn.Module) -> torch.nn.Module:
        if key == "transformer" and (self.fp8 or self.compile):
            from ..models.fast import compile_blocks, fp8_blocks

            if self.fp8:  # the FP8 graphs' calibrated scales where the build has them
                fp8_blocks(model, self._scales("transformer", "fp8"))
            if self.compile:
                if self.lora_bounds:  # lora/adapters.py: switching LoRA sets then recompiles nothing
                    from ..lora.adapters import reserve

                    reserve(model, self.engine_dir, self.manifest, *self.lora_bounds)
                compile_blocks(model)
        return model

    def _scales(self, component: str, scheme: str) -> dict | None:
        from ..scales import load_scales

        q = self.components.get(component, {}).get("quantization")
        return load_scales(BuildFolder(self.engine_dir).file(q["scales"]))[0] if q and q["scheme"] == scheme else None

    def _quantized(self, key: str, model: torch.nn.Module) -> torch.nn.Module:
        """Apply the quantization of the build's quantized components served by this module (same scale files,
        same arithmetic as their Q/DQ graphs)."""
        from ..models.emulate import apply_scales

        for name, comp in self.components.items():
            q = comp.get("quantization")
            if q and loader_of(name) == key:
                apply_scales(model, self._scales(name, q["scheme"]), q["scheme"], q["block"] or 0)
        return model

    def model(self, component: str) -> torch.nn.Module:
        """The component's module, called with the graph's inputs in order (the same wrapper the export traced)."""
        from ..export.specs import specs_for
        from ..models.load import LOADERS

        key = loader_of(component)
        with self._lock:
            if key not in self.models:
                if self.ckpt is None:
                    raise UserError(f"no module for {component} was given to this torch backend")
                dtype = DTYPES[self.components[component]["compute_dtype"]]
                from ..controlnet import loader_kwargs as controlnet_kwargs  # its ControlNet (build --controlnet)
                from ..lora.fuse import loader_kwargs  # LoRAs the build fused (build --lora)

                model = LOADERS[key](self.ckpt, dtype, **loader_kwargs(self.engine_dir, self.manifest, key),
                                     **controlnet_kwargs(self.manifest, key))
                model = self._quantized(key, model.to(self.offload.load_device))
                self.models[key] = self.offload.manage(key, self._accelerate(key, model))
            if component not in self.wrappers:
                specs = specs_for(self.manifest["variant"], self.manifest["model"]["facts"])
                self.wrappers[component] = specs[component].wrap(self.models[key])
            return self.wrappers[component]

    @torch.no_grad()
    def run(self, component, **inputs):
        x = self._cast_inputs(component, inputs)
        module = self.model(component)
        with self.offload.stage(loader_of(component)):
            out = module(*[v.to(self.device) for v in x.values()])
        outs = out if isinstance(out, tuple) else (out,)
        specs = self.components[component]["outputs"]
        return {s["name"]: o.to(DTYPES[s["dtype"]]) for s, o in zip(specs, outs)}


def resolve_backend(name: str, manifest: dict) -> str:
    """`auto`: TensorRT when the build has engines and a CUDA GPU is visible; otherwise ONNX Runtime for
    float32 builds and Torch for BF16 builds (ONNX Runtime has no BF16 CPU kernels)."""
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    if name == "auto":
        has_engines = all((c.get("engine") or {}).get("status") == "complete"
                          for c in manifest["components"].values())
        if has_engines and torch.cuda.is_available():
            return "tensorrt"
        bf16 = any(c.get("compute_dtype") == "bfloat16" for c in manifest["components"].values())
        return "torch" if bf16 else "onnxruntime"
    return name


def make_backend(name: str, engine_dir: Path, manifest: dict, low_vram: bool | None = None) -> Backend:
    """The backend `name` (see `resolve_backend` for `auto`). `low_vram`: keep one stage resident at a time
    (TensorRT: its engines; Torch: its modules, runtime/offload.py); None: the mode the build's VRAM plan picked
    for its target (manifest `runtime.mode`)."""
    name = resolve_backend(name, manifest)
    if name == "tensorrt":
        from .tensorrt_backend import TensorRTBackend

        return TensorRTBackend(engine_dir, manifest, low_vram=planned_low_vram(manifest, low_vram))
    if name == "onnxruntime":
        return OnnxRuntimeBackend(engine_dir, manifest)
    # --low-vram: module offload; else (on CUDA) the memory mode of the build's plan
    return TorchBackend(engine_dir, manifest, offload=None if low_vram is None else "model" if low_vram else "none")
