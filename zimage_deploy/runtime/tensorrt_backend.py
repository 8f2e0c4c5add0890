"""TensorRT / TensorRT-RTX backend: runs the engines of a build on the GPU.

At load, before touching the GPU, every plan is checked against the manifest (size, and sha256 once per file
version, remembered in DIR/.verified.json: a truncated or corrupted plan is refused), then the installed TensorRT
flavour and version, then the GPU's compute capability. One CUDA stream; I/O buffers are torch CUDA tensors; input
shapes are set per call within the profile; one device-memory buffer is shared by all execution contexts (they run
one at a time on the stream); with static shapes the per-step transformer call is captured once in a CUDA graph and
replayed; low-VRAM mode keeps one engine resident at a time.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from ..buildfolder import BuildFolder
from ..engines.builder import device_capability
from ..engines.flavour import import_trt, version
from ..errors import UserError
from ..export.specs import DTYPES
from .backend import Backend
from .verify import plan_verified


def check_plans(engine_dir: Path, manifest: dict) -> None:
    """Every component has a complete engine whose plan file has the recorded size and hash."""
    for name, comp in manifest["components"].items():
        eng = comp.get("engine") or {}
        if eng.get("status") != "complete":
            raise UserError(f"{engine_dir} has no complete engine for {name}: build it for a GPU target first")
        path = BuildFolder(engine_dir).file(eng.get("plan"))
        if not path.is_file():
            raise UserError(f"engine plan {path} is missing: rebuild")
        size = path.stat().st_size
        if size != eng["bytes"]:
            raise UserError(f"engine plan {path} is truncated or corrupted ({size} bytes, the build wrote "
                            f"{eng['bytes']}): rebuild")
        if not plan_verified(engine_dir, path, eng["plan_sha256"]):  # hashed once per file version (stamp)
            raise UserError(f"engine plan {path} is corrupted (sha256 differs from the manifest): rebuild")


def check_compat(manifest: dict, installed_version: str, device_cc: tuple[int, int] | None) -> None:
    """Refuse engines built with another TensorRT version or for another GPU architecture."""
    for name, comp in manifest["components"].items():
        eng = comp["engine"]
        if eng["version"] != installed_version:
            raise UserError(f"{name} engine was built with {eng['flavour']} {eng['version']}, but {installed_version} "
                            "is installed: engines only load in the version that built them; rebuild")
        if device_cc is None:
            raise UserError("the TensorRT backend needs a CUDA GPU, and none is visible")
        if tuple(eng["compute_capability"]) != tuple(device_cc):
            want = "SM%d%d" % tuple(eng["compute_capability"])
            raise UserError(f"{name} engine was built for {want}, this GPU is SM{device_cc[0]}{device_cc[1]}: "
                            "build for this GPU's target")


# Engines that run in turn inside one stage: low-VRAM mode keeps them resident together (swapping a ControlNet's
# branch and the transformer every step would read both plans from disk each step); plan.py counts them so.
STAGE_OF = {"controlnet": "denoise", "transformer": "denoise"}


def low_vram_evictions(name: str, loaded) -> list[str]:
    """The resident engines to drop before `name` loads in low-VRAM mode: those of other stages."""
    stage = STAGE_OF.get(name, name)
    return [n for n in loaded if STAGE_OF.get(n, n) != stage]


class _Engine:
    def __init__(self, trt, runtime, plan: bytes, refit_from: Path | None = None, logger=None):
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise UserError("TensorRT could not deserialize the engine (see its log above)")
        if refit_from is not None:
            refit_weights(trt, self.engine, refit_from, logger)
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self.context = self.engine.create_execution_context(strategy)
        self.graph = None  # CUDA graph, static shapes only
        self.static_in: dict[str, torch.Tensor] = {}
        self.static_out: dict[str, torch.Tensor] = {}


def refit_weights(trt, engine, onnx_path: Path, logger) -> None:
    """Fill a weightless (STRIP_PLAN) engine with the weights of the graph it was built from."""
    refitter = trt.Refitter(engine, logger)
    parser = trt.OnnxParserRefitter(refitter, logger)
    if not parser.refit_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise UserError(f"cannot refit the weightless engine from {onnx_path}: {errors}")
    if not refitter.refit_cuda_engine():
        raise UserError(f"refitting the weightless engine from {onnx_path} failed (see TensorRT's log above)")


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, engine_dir, manifest, low_vram: bool = False, cuda_graphs: bool | None = None):
        super().__init__(engine_dir, manifest)
        check_plans(self.engine_dir, manifest)
        flavour = manifest["tensorrt"]["flavour"]
        self.trt = import_trt(flavour)
        check_compat(manifest, version(self.trt), device_capability())
        self.device = torch.device("cuda")
        self.stream = torch.cuda.Stream()
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        self.low_vram = low_vram
        static = manifest["tensorrt"]["options"].get("static")
        self.cuda_graphs = bool(static) if cuda_graphs is None else cuda_graphs
        self.engines: dict[str, _Engine] = {}
        self._lock = threading.Lock()
        self.workspace = torch.empty(0, dtype=torch.uint8, device=self.device)
        if not low_vram:
            for name in self.components:
                self._engine(name)

    def _engine(self, name: str) -> _Engine:
        if name not in self.engines:
            evict = low_vram_evictions(name, self.engines) if self.low_vram else []
            for other in evict:
                del self.engines[other]
            if evict:
                torch.cuda.empty_cache()
            comp = self.components[name]
            folder = BuildFolder(self.engine_dir)
            plan = folder.file(comp["engine"]["plan"]).read_bytes()
            refit = folder.file(comp["onnx"]) if comp["engine"].get("stripped") else None
            self.engines[name] = _Engine(self.trt, self.runtime, plan, refit, self.logger)
        return self.engines[name]

    def _bind(self, eng: _Engine, feeds: dict[str, torch.Tensor], out_specs: list[dict]) -> dict[str, torch.Tensor]:
        """Set shapes and addresses; allocate the outputs; size the shared device memory."""
        ctx = eng.context
        for name, t in feeds.items():
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        outputs = {}
        for o in out_specs:
            shape = tuple(ctx.get_tensor_shape(o["name"]))
            outputs[o["name"]] = t = torch.empty(shape, dtype=DTYPES[o["dtype"]], device=self.device)
            ctx.set_tensor_address(o["name"], t.data_ptr())
        size = ctx.update_device_memory_size_for_shapes()
        if size > self.workspace.numel():
            self.workspace = torch.empty(size, dtype=torch.uint8, device=self.device)
        ctx.set_device_memory(self.workspace.data_ptr(), size)
        return outputs

    @torch.no_grad()
    def run(self, component, **inputs):
        feeds = {k: v.to(self.device, non_blocking=True).contiguous()
                 for k, v in self._cast_inputs(component, inputs).items()}
        specs = self.components[component]["outputs"]
        with self._lock:
            eng = self._engine(component)
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                if self.cuda_graphs and component == "transformer":
                    outputs = self._run_graph(eng, feeds, specs)
                else:
                    outputs = self._bind(eng, feeds, specs)
                    if not eng.context.execute_async_v3(self.stream.cuda_stream):
                        raise RuntimeError(f"TensorRT failed to run {component}")
            torch.cuda.current_stream().wait_stream(self.stream)
            return outputs

    def _run_graph(self, eng: _Engine, feeds, specs):
        """Static shapes: copy into fixed buffers and replay one captured execution."""
        if eng.graph is None:
            eng.static_in = {k: v.clone() for k, v in feeds.items()}
            eng.static_out = self._bind(eng, eng.static_in, specs)
            eng.context.execute_async_v3(self.stream.cuda_stream)  # warm-up outside capture, as TensorRT needs
            self.stream.synchronize()
            eng.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(eng.graph, stream=self.stream):
                eng.context.execute_async_v3(self.stream.cuda_stream)
        for k, v in feeds.items():
            if v.shape != eng.static_in[k].shape:
                raise UserError(f"static-shape engine got {k} of shape {tuple(v.shape)}, "
                                f"built for {tuple(eng.static_in[k].shape)}")
            eng.static_in[k].copy_(v)
        eng.graph.replay()
        return {k: v.clone() for k, v in eng.static_out.items()}
