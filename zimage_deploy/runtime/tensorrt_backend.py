"""TensorRT / TensorRT-RTX backend: runs the engines of a build on the GPU.

At load, before touching the GPU, every plan is checked against the manifest (size, and sha256 once per file
version, remembered in DIR/.verified.json: a truncated or corrupted plan is refused), then the installed TensorRT
flavour and version, then the GPU's compute capability (and its model: a plan built on another model loads with a
warning). One CUDA stream; I/O buffers are torch CUDA tensors; input shapes are set per call and must lie within the
engine's profile (refused with the profile in the message); one device-memory buffer is shared by all execution
contexts (they run one at a time on the stream), sized once for the largest engine, so a captured CUDA graph's
scratch never moves. Captions are zero-padded to a profile whose caption length is fixed (static builds: their
padding is masked out). An engine whose profile has one shape per input (static builds: the context refiner,
transformer and VAE) is captured once in a CUDA graph and replayed; a refused capture is reported and the engine
runs without one.

TensorRT-RTX: each engine's kernels JIT-compiled at context creation are kept in a runtime cache file beside its
plan (DIR/engines/NAME.<plan sha>.runtime-cache, written when absent or rejected, e.g. by another GPU or driver,
reused after; kernels compiled later for new dynamic shapes are not added to the file); low-VRAM mode keeps one stage's
weights resident and unloads / loads the others' weights (`ICudaEngine.unload_weights` / `load_weights`: the engines
and their compiled contexts stay), after synchronizing the stream. Weight-streaming budgets come from the build's
VRAM plan (`runtime.stream_budget_bytes`). Weightless plans are refitted from the build's graphs at load, their external data memory-mapped.

Engines built with the LoRA side branch (`build --max-lora-rank`, lora/tensorrt.py) take the branch's factors as
inputs: they live in fixed device buffers of the backend (zeros: no LoRA, the base output), bound at every call and
captured with the engine's CUDA graph; `load_lora` copies a set's factors into them (a switch: no refit, no new
capture).
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ..buildfolder import BuildFolder
from ..components import stage_of
from ..engines.builder import MappedWeights, device_capability, device_name
from ..engines.flavour import import_trt, version
from ..errors import UserError
from ..export.specs import DTYPES
from ..fsutil import atomic_file
from ..lora.tensorrt import branch_bounds, branch_inputs
from ..manifest import Manifest, parse
from .backend import Abilities, Backend
from .verify import plan_verified

cuda = torch.cuda  # what the backend uses of CUDA (tests/fake_tensorrt.py runs it on the CPU with a fake)
DEVICE = "cuda"
PADDED_DIMS = ("cap_len", "joint_len")  # caption axes whose padding the graphs mask out (basic layout)


def check_plans(engine_dir: Path, manifest: Manifest | dict) -> None:
    """Every component has a complete engine whose plan file has the recorded size and hash."""
    for name, comp in parse(manifest).components.items():
        eng = comp.engine
        if not comp.has_engine:
            raise UserError(f"{engine_dir} has no complete engine for {name}: build it for a GPU target first")
        path = BuildFolder(engine_dir).file(eng.plan)
        if not path.is_file():
            raise UserError(f"engine plan {path} is missing: rebuild")
        size = path.stat().st_size
        if size != eng.bytes:
            raise UserError(f"engine plan {path} is truncated or corrupted ({size} bytes, the build wrote "
                            f"{eng.bytes}): rebuild")
        if not plan_verified(engine_dir, path, eng.plan_sha256):  # hashed once per file version (stamp)
            raise UserError(f"engine plan {path} is corrupted (sha256 differs from the manifest): rebuild")


def check_compat(manifest: Manifest | dict, installed_version: str, device_cc: tuple[int, int] | None,
                 gpu: str | None = None) -> None:
    """Refuse engines built with another TensorRT version or for another GPU architecture; warn when they were
    built on another GPU model (TensorRT: plans are specific to the device model they were built on)."""
    comps = parse(manifest).components
    for name, comp in comps.items():
        eng = comp.engine
        if eng.version != installed_version:
            raise UserError(f"{name} engine was built with {eng.flavour} {eng.version}, but {installed_version} "
                            "is installed: engines only load in the version that built them; rebuild")
        if device_cc is None:
            raise UserError("the TensorRT backend needs a CUDA GPU, and none is visible")
        if tuple(eng.compute_capability or ()) != tuple(device_cc):
            want = "SM%d%d" % tuple(eng.compute_capability)
            raise UserError(f"{name} engine was built for {want}, this GPU is SM{device_cc[0]}{device_cc[1]}: "
                            "build for this GPU's target")
    built_on = {c.engine.gpu for c in comps.values()} - {None}
    if gpu and built_on and gpu not in built_on:
        warnings.warn(f"the engines were built on a {', '.join(sorted(built_on))} and load on a {gpu}: TensorRT plans "
                      "are tuned for the GPU model they were built on (they run, maybe slower); rebuild on this "
                      "GPU for its own tuning", stacklevel=3)


def low_vram_evictions(name: str, loaded) -> list[str]:
    """The resident engines to drop before `name` loads in low-VRAM mode: those of other stages."""
    return [n for n in loaded if stage_of(n) != stage_of(name)]


def refit_weights(trt, engine, onnx_path: Path, logger) -> None:
    """Fill a weightless (STRIP_PLAN) engine with the weights of the graph it was built from. External data is
    handed over as pointers into a memory map of the data file (as the builder parses it), not read into a copy."""
    refitter = trt.Refitter(engine, logger)
    parser = trt.OnnxParserRefitter(refitter, logger)
    weights = MappedWeights(onnx_path)
    try:
        if weights.external and hasattr(parser, "load_initializer"):
            ok = weights.load(parser) and parser.refit_model_proto()
        else:
            ok = parser.refit_from_file(str(onnx_path))
        if not ok:
            errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
            raise UserError(f"cannot refit the weightless engine from {onnx_path}: {errors}")
        if not refitter.refit_cuda_engine():
            raise UserError(f"refitting the weightless engine from {onnx_path} failed (see TensorRT's log above)")
    finally:
        del parser, refitter
        weights.close()


class _Engine:
    """One deserialized engine, its execution context and, where captured, its CUDA graph."""

    def __init__(self, backend: "TensorRTBackend", name: str):
        trt, comp = backend.trt, backend.components[name]
        folder = BuildFolder(backend.engine_dir)
        self.name, self.trt, self.profile = name, trt, comp["engine"]["profile"]
        self.plan_path = folder.file(comp["engine"]["plan"])
        # the runtime cache of this plan (another plan's kernels would never be found in it)
        self.cache_path = self.plan_path.with_name(f"{self.plan_path.stem}.{comp['engine']['plan_sha256'][:16]}"
                                                   ".runtime-cache")
        stripped = bool(backend.manifest.components[name].engine.stripped)
        # TensorRT-RTX: weights that can be unloaded and loaded again (low-VRAM mode) without a new engine
        self.swappable = backend.low_vram and not stripped and hasattr(backend.runtime, "defer_weights_loading")
        if self.swappable:
            backend.runtime.defer_weights_loading = True
        plan = self.plan_path.read_bytes()
        try:
            self.engine = backend.runtime.deserialize_cuda_engine(plan)
        finally:
            if self.swappable:
                backend.runtime.defer_weights_loading = False
        if self.engine is None:
            raise UserError(f"TensorRT could not deserialize the {name} engine (see its log above)")
        if stripped:
            refit_weights(trt, self.engine, folder.file(comp["onnx"]), backend.logger)
        self.context = self._context(backend)  # kernels compiled before the weights take GPU memory
        self.resident = not self.swappable
        if self.swappable:
            self.load(plan)
        del plan
        self.graph = None  # torch CUDA graph once captured; False: capture refused, run without
        self.static_in: dict[str, torch.Tensor] = {}
        self.static_out: dict[str, torch.Tensor] = {}
        self.capturable = bool(comp["engine"].get("cuda_graphs")) and all(
            lo == hi for lo, _, hi in self.profile.values())

    def _context(self, backend):
        """The execution context (device memory: the backend's); TensorRT-RTX: through a runtime config holding
        the runtime cache of this engine's compiled kernels (read from its file, written there when new)."""
        trt = self.trt
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        if not hasattr(self.engine, "create_runtime_config"):
            return self.engine.create_execution_context(strategy)
        config = self.engine.create_runtime_config()
        config.set_execution_context_allocation_strategy(strategy)
        cache_path = self.cache_path
        cache = config.create_runtime_cache()
        reused = cache_path.is_file() and cache.deserialize(cache_path.read_bytes())
        if not config.set_runtime_cache(cache):
            raise RuntimeError(f"{trt.__name__} refused the runtime cache of {self.name}")
        context = self.engine.create_execution_context(config)
        if not reused:
            try:
                with atomic_file(cache_path) as tmp:
                    tmp.write_bytes(memoryview(cache.serialize()))
                for stale in cache_path.parent.glob(f"{self.plan_path.stem}.*.runtime-cache"):
                    if stale != cache_path:  # an earlier plan's
                        stale.unlink(missing_ok=True)
            except OSError as e:  # a read-only build folder: kernels compile again at the next start
                warnings.warn(f"cannot write the runtime cache {cache_path} ({e})", stacklevel=2)
        return context

    def unload(self) -> None:
        """Drop the weights from the GPU (the caller has synchronized the stream); a captured graph goes too."""
        self.graph, self.static_in, self.static_out = None, {}, {}
        if not self.engine.unload_weights():
            raise RuntimeError(f"TensorRT could not unload the weights of {self.name}")
        self.resident = False

    def load(self, plan: bytes | None = None) -> None:
        if not self.engine.load_weights(self.plan_path.read_bytes() if plan is None else plan):
            raise RuntimeError(f"TensorRT could not load the weights of {self.name} (see its log above)")
        self.resident = True


class TensorRTBackend(Backend):
    name = "tensorrt"
    abilities = Abilities(lora="refit", memory_modes=("none", "model", "text-encoder-cpu", "sequential"),
                          dtypes=("float32", "bfloat16"), devices=("cuda",), build_files=("plans",), profile_batch=True)

    def __init__(self, engine_dir, manifest, low_vram: bool = False, cuda_graphs: bool | None = None,
                 text_encoder_cpu: bool = False):
        """`text_encoder_cpu` (the text-encoder-cpu memory mode, runtime/offload.py): the text encoder runs on the
        CPU through the Torch backend (the checkpoint's weights in host memory, the build's quantization
        emulated), its engine never loads; its outputs move to the GPU."""
        super().__init__(engine_dir, manifest)
        check_plans(self.engine_dir, self.manifest)
        flavour = self.manifest.tensorrt.flavour
        self.trt = import_trt(flavour)
        check_compat(self.manifest, version(self.trt), device_capability(), device_name())
        self.device = torch.device(DEVICE)
        self.stream = cuda.Stream()
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        plan = self.manifest.runtime
        # weight streaming: each large engine keeps the resident weights the build's VRAM plan gives it
        self.stream_budgets = (plan.stream_budget_bytes or {}) if plan and plan.mode == "weight-streaming" else {}
        self.low_vram = bool(low_vram)
        self.cuda_graphs = cuda_graphs is not False
        self.engines: dict[str, _Engine] = {}
        self._lock = threading.Lock()
        self.workspace = torch.empty(0, dtype=torch.uint8, device=self.device)
        self.host: dict[str, Backend] = {}  # component -> the backend that runs it on the CPU
        if text_encoder_cpu:
            from .torch_fast import TorchBackend

            self.host["text_encoder"] = TorchBackend(engine_dir, manifest, device="cpu", torch_mode="eager",
                                                     offload="none")
        # the LoRA branch's factor inputs: component -> input name -> fixed buffer (kept across engine reloads)
        self.branch = {name: {n: torch.zeros(shape, dtype=DTYPES[dtype], device=self.device)
                              for n, (shape, dtype) in branch_inputs(comp["engine"]["lora_branch"]).items()}
                       for name, comp in self.components.items() if (comp.get("engine") or {}).get("lora_branch")}
        if not self.low_vram:
            for name in self.components:
                if name not in self.host:
                    self._load(name)

    # -- engines and device memory ---------------------------------------------------------------------
    def _load(self, name: str) -> _Engine:
        eng = self.engines[name] = _Engine(self, name)
        budget, streamable = self.stream_budgets.get(name), getattr(eng.engine, "streamable_weights_size", 0)
        if budget is not None and streamable:
            eng.engine.weight_streaming_budget_v2 = min(int(budget), int(streamable))
        elif budget is not None:
            warnings.warn(f"the VRAM plan streams the weights of {name}, but its engine was built without "
                          "--weight-streaming: all its weights load", stacklevel=3)
        self._reserve(eng)
        return eng

    def _reserve(self, eng: _Engine) -> None:
        """One workspace for every context: at least each engine's device memory size (its largest shapes).
        Grown only when a larger engine loads (low-VRAM mode); graphs captured on the old one are dropped first."""
        size = int(eng.engine.device_memory_size_v2)
        if size <= self.workspace.numel():
            return
        self.stream.synchronize()
        for other in self.engines.values():
            other.graph, other.static_in, other.static_out = None, {}, {}
        self.workspace = torch.empty(size, dtype=torch.uint8, device=self.device)

    def lora_applier(self, targets, max_rank, max_loras):
        from .tensorrt_lora import EngineBranch, EngineRefit  # branch inputs fed, or the DiT engines refitted

        return EngineBranch(self) if branch_bounds(self.manifest) else EngineRefit(self)

    def _engine(self, name: str) -> _Engine:
        eng = self.engines.get(name)
        if eng is not None and eng.resident:
            return eng
        if self.low_vram:
            resident = [n for n, e in self.engines.items() if e.resident]
            evict = low_vram_evictions(name, resident)
            if evict:
                self.stream.synchronize()  # no work of theirs may still be queued
                for other in evict:
                    if self.engines[other].swappable:
                        self.engines[other].unload()
                    else:
                        del self.engines[other]
                cuda.empty_cache()
        if eng is None:
            return self._load(name)
        eng.load()
        return eng

    # -- running -----------------------------------------------------------------------------------------
    def _pad(self, comp: str, feeds: dict[str, torch.Tensor], profile: dict) -> dict[str, torch.Tensor]:
        """Zero-pad caption axes up to a profile whose caption length is fixed (static builds)."""
        for spec in self.components[comp]["inputs"]:
            t, lo = feeds[spec["name"]], profile[spec["name"]][0]
            for axis, dim in enumerate(spec["dims"]):
                if dim in PADDED_DIMS and t.shape[axis] < lo[axis]:
                    pad = [0, 0] * (t.dim() - axis - 1) + [0, lo[axis] - t.shape[axis]]
                    t = F.pad(t, pad)
            feeds[spec["name"]] = t
        return feeds

    def _bind(self, eng: _Engine, feeds: dict[str, torch.Tensor], out_specs: list[dict]) -> dict[str, torch.Tensor]:
        """Set shapes and addresses (each checked); allocate the outputs; hand over the shared device memory."""
        ctx = eng.context
        for name, t in feeds.items():
            if not ctx.set_input_shape(name, tuple(t.shape)):
                lo, _, hi = eng.profile.get(name, (None, None, None))
                raise UserError(f"{eng.name}: {name} of shape {tuple(t.shape)} is outside the engine's profile "
                                f"({lo} .. {hi}): this request does not fit the build (see its size limits)")
            if not ctx.set_tensor_address(name, t.data_ptr()):
                raise RuntimeError(f"TensorRT refused the address of {eng.name} input {name}")
        outputs = {}
        for o in out_specs:
            shape = tuple(ctx.get_tensor_shape(o["name"]))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"TensorRT cannot tell the shape of {eng.name} output {o['name']} ({shape}) "
                                   "from the inputs given")
            outputs[o["name"]] = t = torch.empty(shape, dtype=DTYPES[o["dtype"]], device=self.device)
            if not ctx.set_tensor_address(o["name"], t.data_ptr()):
                raise RuntimeError(f"TensorRT refused the address of {eng.name} output {o['name']}")
        ctx.set_device_memory(self.workspace.data_ptr(), self.workspace.numel())
        return outputs

    def _execute(self, eng: _Engine) -> None:
        if not eng.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {eng.name} (see its log above)")

    @torch.no_grad()
    def run(self, component, **inputs):
        if component in self.host:
            out = self.host[component].run(component, **inputs)
            return {k: v.to(self.device) for k, v in out.items()}
        specs = self.components[component]["outputs"]
        with self._lock:  # inputs move to the GPU inside the lock: never beside another thread's graph capture
            eng = self._engine(component)
            feeds = {k: v.to(self.device, non_blocking=True).contiguous()
                     for k, v in self._pad(component, self._cast_inputs(component, inputs), eng.profile).items()}
            self.stream.wait_stream(cuda.current_stream())
            with cuda.stream(self.stream):
                if self.cuda_graphs and eng.capturable and eng.graph is not False:
                    outputs = self._run_graph(eng, feeds, specs)
                else:
                    outputs = self._bind(eng, {**feeds, **self.branch.get(component, {})}, specs)
                    self._execute(eng)
            cuda.current_stream().wait_stream(self.stream)
            return outputs

    @torch.no_grad()
    def load_lora(self, factors: dict[str, dict[str, torch.Tensor]]) -> None:
        """Copy a LoRA set's factor inputs (component -> input name -> tensor, lora/tensorrt.py `branch_feeds`) into
        the branch buffers; what `factors` leaves out becomes zero (no LoRA there). The caller runs nothing on
        the engines meanwhile; queued work finishes first."""
        unknown = sorted(set(factors) - set(self.branch))
        if unknown:
            raise UserError(f"the engines of {', '.join(unknown)} carry no LoRA branch: rebuild with --max-lora-rank")
        with self._lock:
            self.stream.synchronize()
            for comp, buffers in self.branch.items():
                given = factors.get(comp, {})
                for name, buf in buffers.items():
                    if name in given:
                        buf.copy_(given[name])
                    else:
                        buf.zero_()

    def _run_graph(self, eng: _Engine, feeds, specs):
        """Static shapes: copy into fixed buffers and replay one captured execution."""
        if eng.graph is None:
            static_in = {k: v.clone() for k, v in feeds.items()}
            static_out = self._bind(eng, {**static_in, **self.branch.get(eng.name, {})}, specs)
            self._execute(eng)  # warm-up outside capture, as TensorRT needs; its outputs are this call's
            self.stream.synchronize()
            graph = cuda.CUDAGraph()
            try:
                with cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                    self._execute(eng)
            except RuntimeError as e:
                eng.graph = False
                warnings.warn(f"CUDA graph capture of {eng.name} failed ({e}); it runs without a CUDA graph",
                              stacklevel=4)
                return static_out
            eng.graph, eng.static_in, eng.static_out = graph, static_in, static_out
            return {k: v.clone() for k, v in static_out.items()}
        for k, v in feeds.items():
            eng.static_in[k].copy_(v)  # same shapes: the profile has one
        eng.graph.replay()
        return {k: v.clone() for k, v in eng.static_out.items()}
