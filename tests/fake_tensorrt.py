"""A fake `tensorrt` / `tensorrt_rtx` module and a fake `torch.cuda`, so the real builder (engines/builder.py) and
the real TensorRT backend (runtime/tensorrt_backend.py) run on the CPU in CI.

What it keeps honest (each is a rule of the real libraries that a bug in our code would break):
- a "plan" names its ONNX graph, profile and builder flags; an engine runs that graph with ONNX Runtime, reading its
  inputs from and writing its outputs to the raw addresses it was given (CPU torch tensors stand in for device
  memory), so a wrong binding gives a wrong image;
- `set_input_shape` returns False outside the profile, `set_tensor_address` False for unknown names, output shapes
  are -1 until every input shape is set; running with a missing address or too little device memory fails;
- CUDA-graph capture records each `execute_async_v3` with the addresses and device memory bound at that moment and
  does not run it; `replay` runs what was recorded (as a real graph does, whatever the context holds now), and fails
  if the captured device memory no longer belongs to the tensor that owned it at capture (freed memory);
  TensorRT-RTX refuses capture of an engine built without REQUIRE_USER_ALLOCATION (TensorRT-RTX 1.2 release notes);
- weightless (STRIP_PLAN) engines do not run until refitted; TensorRT-RTX 1.7's deferred weights, runtime cache
  (kernels "JIT-compiled" at context creation unless the cache holds them) and weight-streaming budget exist;
- the names TensorRT 10.12 lacks (IStreamWriter, build_serialized_network_to_stream, OnnxParser.load_model_proto /
  load_initializer / parse_model_proto) are absent from a `legacy` module.
Every call that matters is appended to `module.calls` as a tuple, in order.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import gc
import json
import types
import weakref
from pathlib import Path

import numpy as np
import torch

_NP = {1: np.float32, 7: np.int64, 6: np.int32, 9: np.bool_, 10: np.float16, 16: np.uint16}  # ONNX elem type
_SESSIONS: dict[str, object] = {}
_SHAPES: dict[tuple, dict] = {}  # (graph, input shapes) -> output shapes, as TensorRT's shape inference gives them


def _session(path: str):
    if path not in _SESSIONS:
        import onnxruntime as ort

        _SESSIONS[path] = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return _SESSIONS[path]


def _view(ptr: int, shape, dtype) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64))
    buf = (ctypes.c_char * max(count * np.dtype(dtype).itemsize, 1)).from_address(ptr)
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


def _owners(ptr: int, size: int) -> list:
    """Weak references to the live tensors whose storage holds [ptr, ptr + size)."""
    found = []
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and o.device.type == "cpu":
            try:  # tensors without memory (fake / functional ones left by earlier torch.compile runs) own nothing
                s = o.untyped_storage()
                start, nbytes = s.data_ptr(), s.nbytes()
            except (RuntimeError, NotImplementedError):
                continue
            if start <= ptr and ptr + size <= start + nbytes:
                found.append(weakref.ref(o))
    return found


def _graph_io(path: str):
    import onnx

    model = onnx.load(path, load_external_data=False)
    inits = {i.name for i in model.graph.initializer}

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    ins = {v.name: (_NP[v.type.tensor_type.elem_type], dims(v)) for v in model.graph.input if v.name not in inits}
    outs = {v.name: (_NP[v.type.tensor_type.elem_type], dims(v)) for v in model.graph.output}
    external = [i.name for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    return ins, outs, external


def make(flavour: str = "tensorrt-rtx", version: str = "1.7.1.116", legacy: bool = False) -> types.ModuleType:
    """A fresh fake module. `legacy`: TensorRT 10.12's names (see the module docstring)."""
    m = types.ModuleType("tensorrt_rtx" if flavour == "tensorrt-rtx" else "tensorrt")
    m.__version__ = version
    m.calls = calls = []
    m.rtx = rtx = flavour == "tensorrt-rtx"
    m.scratch = {}  # component (plan stem) -> device memory bytes at the largest shapes (default 4 KiB)
    m.capturing = None  # the fake CUDA graph being captured (set by FakeCuda)
    m.violations = []  # rules of the API broken without a crash (checked by the tests)

    class Logger:
        VERBOSE, INFO, WARNING, ERROR, INTERNAL_ERROR = range(5)

        def __init__(self, level=2):
            self.level = level

    m.Logger = Logger
    m.BuilderFlag = enum.IntEnum("BuilderFlag", "REFIT REFIT_IDENTICAL STRIP_PLAN WEIGHT_STREAMING "
                                             "REQUIRE_USER_ALLOCATION", start=0)
    m.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", "STRONGLY_TYPED", start=0)
    m.ExecutionContextAllocationStrategy = enum.IntEnum("ExecutionContextAllocationStrategy",
                                                     "STATIC ON_PROFILE_CHANGE USER_MANAGED", start=0)
    m.DataType = enum.IntEnum("DataType", "FLOAT BF16 HALF INT64 INT32", start=0)
    if rtx:
        m.ComputeCapability = enum.IntEnum("ComputeCapability", "SM75 SM80 SM86 SM89 SM120", start=0)
        m.CudaGraphStrategy = enum.IntEnum("CudaGraphStrategy", "DISABLED WHOLE_GRAPH_CAPTURE", start=0)

    class Input:
        def __init__(self, name):
            self.name = name

    class Network:
        def __init__(self):
            self.onnx = None
            self.inputs = []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return Input(self.inputs[i])

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            calls.append(("parse_from_file", Path(path).parent.name))
            self._set(path)
            return True

        def _set(self, path):
            self.network.onnx = str(Path(path).resolve())
            self.network.inputs = list(_graph_io(self.network.onnx)[0])

        if not legacy:
            def load_model_proto(self, data, path):
                self._path, self._loaded = path, set()
                return True

            def load_initializer(self, name, ptr, size):
                self._loaded.add(name)
                return True

            def parse_model_proto(self):
                external = _graph_io(self._path)[2]
                assert set(external) <= self._loaded, "external initializers not given to the parser"
                calls.append(("parse_model_proto", Path(self._path).parent.name, len(self._loaded)))
                self._set(self._path)
                return True

    m.OnnxParser = OnnxParser

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = [list(lo), list(opt), list(hi)]

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return b"fake-timing-cache"

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.cc = set(), [], None
            self.num_compute_capabilities, self.builder_optimization_level = 0, 3

        def set_flag(self, flag):
            self.flags.add(flag.name)

        def set_compute_capability(self, cc, i):
            self.cc = cc.name

        def create_timing_cache(self, data):
            calls.append(("create_timing_cache", len(data)))
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("set_timing_cache", ignore_mismatch))
            return True

        def add_optimization_profile(self, p):
            self.profiles.append(p)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def _plan(self, network, config) -> bytes:
            assert len(config.profiles) == 1
            name = Path(network.onnx).parent.name
            calls.append(("build", name, sorted(config.flags)))
            return json.dumps({"fake": m.__name__, "version": version, "name": name, "onnx": network.onnx,
                               "profile": config.profiles[0].shapes, "flags": sorted(config.flags),
                               "cc": config.cc}).encode()

        def build_serialized_network(self, network, config):
            return self._plan(network, config)

        if not legacy:
            def build_serialized_network_to_stream(self, network, config, writer):
                data = self._plan(network, config)
                half = len(data) // 2
                return writer.write(data[:half]) == half and writer.write(data[half:]) == len(data) - half

    m.Builder = Builder
    if not legacy:
        class IStreamWriter:
            def __init__(self):
                pass

        m.IStreamWriter = IStreamWriter

    # -- runtime ----------------------------------------------------------------------------------------
    class RuntimeCache:
        def __init__(self):
            self.kernels = set()

        def deserialize(self, blob):
            blob = bytes(blob)
            if not blob.startswith(b"fake-runtime-cache\n"):
                return False
            self.kernels |= set(blob.decode().split("\n")[1:]) - {""}
            calls.append(("runtime_cache_loaded", len(self.kernels)))
            return True

        def serialize(self):
            return ("fake-runtime-cache\n" + "\n".join(sorted(self.kernels))).encode()

    class RuntimeConfig:
        def __init__(self):
            self.cache, self.strategy = None, m.ExecutionContextAllocationStrategy.STATIC
            self.cuda_graph_strategy = m.CudaGraphStrategy.DISABLED

        def set_execution_context_allocation_strategy(self, s):
            self.strategy = s

        def create_runtime_cache(self):
            return RuntimeCache()

        def set_runtime_cache(self, cache):
            self.cache = cache
            return True

    class Engine:
        def __init__(self, plan: dict, deferred: bool):
            self.plan, self.name = plan, plan["name"]
            self.inputs, self.outputs, self.external = _graph_io(plan["onnx"])
            self.flags = set(plan["flags"])
            self.refittable = bool(self.flags & {"REFIT", "REFIT_IDENTICAL", "STRIP_PLAN"})
            self.weights_loaded = not deferred
            self.refitted = "STRIP_PLAN" not in self.flags
            self.streamable_weights_size = 1 << 20 if "WEIGHT_STREAMING" in self.flags else 0
            self._budget = -1
            self.alive = True

        @property
        def device_memory_size_v2(self):
            return m.scratch.get(self.name, 4096)

        @property
        def weight_streaming_budget_v2(self):
            return self._budget

        @weight_streaming_budget_v2.setter
        def weight_streaming_budget_v2(self, v):
            calls.append(("weight_streaming_budget", self.name, int(v)))
            self._budget = int(v)

        def create_execution_context(self, arg=None):
            if isinstance(arg, RuntimeConfig):
                strategy, cache = arg.strategy, arg.cache
            else:
                strategy, cache = arg, None
            kernel = f"{self.name}:{json.dumps(self.plan['profile'], sort_keys=True)}"
            jit = rtx and (cache is None or kernel not in cache.kernels)
            if jit and cache is not None:
                cache.kernels.add(kernel)
            calls.append(("create_context", self.name, strategy.name, "jit" if jit else "cached"))
            return Context(self)

        if rtx:
            def create_runtime_config(self):
                return RuntimeConfig()

            def unload_weights(self):
                calls.append(("unload_weights", self.name))
                self.weights_loaded = False
                return True

            def load_weights(self, blob):
                calls.append(("load_weights", self.name))
                if self.weights_loaded:
                    return False
                self.weights_loaded = True
                return True

        def __del__(self):
            calls.append(("engine_freed", self.name))

    class Runtime:
        def __init__(self, logger):
            self.defer_weights_loading = False
            if not rtx:
                del self.defer_weights_loading

        def deserialize_cuda_engine(self, data):
            plan = json.loads(bytes(data))
            assert plan["fake"] == m.__name__ and plan["version"] == version, "plan of another TensorRT"
            deferred = bool(getattr(self, "defer_weights_loading", False))
            calls.append(("deserialize", plan["name"], "deferred" if deferred else "loaded"))
            return Engine(plan, deferred)

    m.Runtime = Runtime

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses, self.memory = engine, {}, {}, None

        def _profile(self, name):
            return self.engine.plan["profile"][name]

        def set_input_shape(self, name, shape):
            shape = [int(s) for s in shape]
            if name not in self.engine.inputs:
                return False
            lo, _, hi = self._profile(name)
            ok = len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi))
            calls.append(("set_input_shape", self.engine.name, name, tuple(shape), ok))
            if ok:
                self.shapes[name] = shape
            return ok

        def set_tensor_address(self, name, ptr):
            ok = (name in self.engine.inputs or name in self.engine.outputs) and ptr != 0
            if ok:
                self.addresses[name] = int(ptr)
            return ok

        def get_tensor_shape(self, name):
            if name in self.shapes:
                return tuple(self.shapes[name])
            if len(self.shapes) < len(self.engine.inputs):
                return (-1,) * len(self.engine.outputs[name][1])
            key = (self.engine.plan["onnx"], json.dumps(self.shapes, sort_keys=True))
            if key not in _SHAPES:  # shape inference: run the graph once on zeros of these shapes
                eng = self.engine
                feeds = {n: np.zeros(self.shapes[n], dt) for n, (dt, _) in eng.inputs.items()}
                if "cap_lens" in feeds:
                    feeds["cap_lens"][:] = 1
                outs = _session(eng.plan["onnx"]).run(list(eng.outputs), feeds)
                _SHAPES[key] = {n: tuple(o.shape) for n, o in zip(eng.outputs, outs)}
            return _SHAPES[key][name]

        def update_device_memory_size_for_shapes(self):
            """Scratch grows with the inputs' size: the engine's size at the profile's largest shapes."""
            total = sum(np.prod(s) for s in self.shapes.values())
            largest = sum(np.prod(self._profile(n)[2]) for n in self.engine.inputs)
            return max(256, int(self.engine.device_memory_size_v2 * total / max(largest, 1)))

        def set_device_memory(self, ptr, size):
            if size < self.engine.device_memory_size_v2:
                m.violations.append(f"{self.engine.name}: set_device_memory({size}) below the engine's "
                                    f"device_memory_size_v2 {self.engine.device_memory_size_v2}")
            self.memory = (int(ptr), int(size))
            calls.append(("set_device_memory", self.engine.name, int(ptr), int(size)))

        def _snapshot(self):
            missing = [n for n in [*self.engine.inputs, *self.engine.outputs] if n not in self.addresses]
            assert not missing, f"{self.engine.name}: no address for {missing}"
            assert self.memory is not None, f"{self.engine.name}: no device memory set"
            need = self.update_device_memory_size_for_shapes()
            assert self.memory[1] >= need, f"{self.engine.name}: device memory {self.memory[1]} < {need} needed"
            out_shapes = {n: self.get_tensor_shape(n) for n in self.engine.outputs}
            return dict(shapes=dict(self.shapes), out_shapes=out_shapes, addresses=dict(self.addresses),
                        memory=self.memory)

        def execute_async_v3(self, stream):
            eng = self.engine
            assert eng.alive, "execute on a freed engine"
            if not eng.weights_loaded or not eng.refitted:
                calls.append(("execute_failed", eng.name, "weights not loaded"))
                return False
            snap = self._snapshot()
            if m.capturing is not None:
                if rtx and "REQUIRE_USER_ALLOCATION" not in eng.flags:
                    calls.append(("capture_refused", eng.name))
                    m.capturing.invalid = True
                    return False
                snap["owners"] = _owners(*snap["memory"])
                assert snap["owners"], f"{eng.name}: captured device memory is not a live tensor"
                m.capturing.work.append((self, snap))
                calls.append(("captured", eng.name, stream))
                return True
            calls.append(("execute", eng.name, stream))
            self.run(snap)
            return True

        def run(self, snap):
            eng = self.engine
            feeds = {n: _view(snap["addresses"][n], snap["shapes"][n], dt).copy()
                     for n, (dt, _) in eng.inputs.items()}
            outs = _session(eng.plan["onnx"]).run(list(eng.outputs), feeds)
            for (n, (dt, _)), value in zip(eng.outputs.items(), outs):
                assert tuple(value.shape) == tuple(snap["out_shapes"][n]), (n, value.shape, snap["out_shapes"][n])
                np.copyto(_view(snap["addresses"][n], value.shape, dt), value.astype(dt))

    class Weights:
        def __init__(self, dtype, ptr, count):
            self.dtype, self.ptr, self.count = dtype, ptr, count

    m.Weights = Weights

    class Refitter:
        def __init__(self, engine, logger):
            self.engine, self.named = engine, {}

        def set_named_weights(self, name, w):
            self.named[name] = w
            return True

        def get_missing_weights(self):
            return []

        def refit_cuda_engine(self):
            calls.append(("refit_cuda_engine", self.engine.name))
            self.engine.refitted = True
            return True

    m.Refitter = Refitter

    class OnnxParserRefitter:
        num_errors = 0

        def __init__(self, refitter, logger):
            self.refitter = refitter

        def refit_from_file(self, path):
            calls.append(("refit_from_file", Path(path).parent.name))
            return True

        def load_model_proto(self, data, path=None):
            calls.append(("refit_load_model_proto", Path(path).parent.name))
            self._loaded = set()
            return True

        def load_initializer(self, name, ptr, size):
            self._loaded.add(name)
            return True

        def refit_model_proto(self):
            missing = set(self.refitter.engine.external) - self._loaded
            calls.append(("refit_model_proto", self.refitter.engine.name, len(self._loaded), sorted(missing)))
            return not missing

    m.OnnxParserRefitter = OnnxParserRefitter
    return m


# -- torch.cuda on the CPU -----------------------------------------------------------------------------------
class FakeStream:
    def __init__(self, cuda, handle):
        self.cuda, self.cuda_stream = cuda, handle

    def wait_stream(self, other):
        self.cuda.calls.append(("wait_stream", self.cuda_stream, other.cuda_stream))

    def synchronize(self):
        self.cuda.calls.append(("synchronize", self.cuda_stream))

    def __repr__(self):
        return f"stream{self.cuda_stream}"


class FakeGraph:
    def __init__(self, cuda):
        self.cuda, self.work, self.invalid, self.captured = cuda, [], False, False

    def replay(self):
        assert self.captured and not self.invalid, "replay of a graph that was not captured"
        self.cuda.calls.append(("replay", [ctx.engine.name for ctx, _ in self.work]))
        for ctx, snap in self.work:
            assert ctx.engine.alive, "replay of a graph whose engine was freed"
            alive = [r() for r in snap["owners"]]
            assert any(t is not None and t.untyped_storage().data_ptr() <= snap["memory"][0] for t in alive), \
                f"{ctx.engine.name}: graph replays into device memory that was freed after capture"
            ctx.run(snap)


class FakeCuda:
    """What the TensorRT backend uses of `torch.cuda`, recording into the fake TensorRT module's `calls`."""

    def __init__(self, trt):
        self.trt, self.calls = trt, trt.calls
        self._streams = 0
        self.default = self.Stream()
        self._current = self.default

    def Stream(self):  # noqa: N802 - torch's name
        self._streams += 1
        return FakeStream(self, self._streams - 1)

    def current_stream(self):
        return self._current

    @contextlib.contextmanager
    def stream(self, s):
        prev, self._current = self._current, s
        try:
            yield
        finally:
            self._current = prev

    def CUDAGraph(self):  # noqa: N802
        return FakeGraph(self)

    @contextlib.contextmanager
    def graph(self, g, stream=None, capture_error_mode="global"):
        self.calls.append(("capture_begin", capture_error_mode))
        self.trt.capturing = g
        try:
            yield
        finally:
            self.trt.capturing = None
            self.calls.append(("capture_end", not g.invalid))
        if g.invalid:  # as cudaStreamEndCapture reports an invalidated capture
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        g.captured = True

    def synchronize(self):
        self.calls.append(("synchronize", "device"))

    def empty_cache(self):
        self.calls.append(("empty_cache",))


def install(monkeypatch, trt, gpu=(8, 9), gpu_name="NVIDIA GeForce RTX 4090"):
    """Make `trt` the importable TensorRT of its flavour, and the backend run on the CPU with a fake CUDA whose
    device has compute capability `gpu` and model name `gpu_name`. Returns the FakeCuda."""
    import sys

    from zimage_deploy.engines import builder
    from zimage_deploy.runtime import tensorrt_backend

    monkeypatch.setitem(sys.modules, trt.__name__, trt)
    cuda = FakeCuda(trt)
    monkeypatch.setattr(tensorrt_backend, "cuda", cuda)
    monkeypatch.setattr(tensorrt_backend, "DEVICE", "cpu")
    monkeypatch.setattr(tensorrt_backend, "device_capability", lambda: gpu)
    monkeypatch.setattr(tensorrt_backend, "device_name", lambda: gpu_name, raising=False)
    monkeypatch.setattr(builder, "device_name", lambda: gpu_name if builder.device_capability() else None,
                        raising=False)
    return cuda
