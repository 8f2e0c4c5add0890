"""Run-time LoRAs: swapped per generation without rebuilding.

    manager = LoraManager.for_pipeline(pipeline)    # ZImageRuntime holds one as `rt.loras`
    active = manager.prepare([("style.safetensors", 0.8), ("face.safetensors", 0.5)])   # RequestError if bad
    with manager.use(active):
        pipeline(...)

(`LoraManager(engine_dir, manifest, backend_name)` checks and reads LoRAs before any model loads; `bind(pipeline)`
then applies them.)

- Torch: a low-rank side branch beside each adaptable linear layer, in fixed-size buffers (lora/adapters.py,
  models/lora_branch.py): y = base(x) + s (x A) B in the layer's float dtype, beside the quantized matmul on FP8 /
  INT4 / NVFP4 builds, never merged into the base weights; eager or compiled (a switch copies factors into the
  buffers: nothing recompiles). The module holds one set at a time: generations with the active set run together,
  a switch waits for them to finish. Bounds: `max_rank` per LoRA and row block, `max_loras` per set.
- ONNX Runtime: the DiT graphs (float or quantized) get the same side branch with the factors as graph inputs, in
  one extra session per component made on first use (lora/onnx_branch.py); a set is a feed, per thread, so
  generations with different sets run side by side.
- TensorRT: the engines are refitted (lora/tensorrt.py), always from the base weights. An engine holds one set at
  a time: generations with the active set run together, a switch waits for them to finish and holds back others
  while it refits.
On quantized builds TensorRT refuses run-time LoRAs (its engines carry no branch: refit replaces weights, and the
quantized ones cannot take a float delta): use --backend torch or onnxruntime, or fuse at build time.

Memory bounds: read LoRA files are cached up to `max_file_bytes` (least recently used first out); applied states
(ONNX Runtime feeds, Torch factors on the device) up to `max_sets` sets. A server takes names from a configured
folder (`spec.resolve_lora_name`) and hands (path, scale) pairs to `prepare`.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InternalError, RequestError, UserError
from ..manifest import planned_low_vram
from ..models.stream import factors
from ..targets import QUANTIZED
from .adapters import MAX_LORAS, MAX_RANK, check_bounds
from .formats import Lora, read_lora
from .spec import as_spec, file_sha256
from .targets import dit_components, graph_path, of_build

QUANTIZED_MESSAGE = ("this build's DiT is quantized ({}): TensorRT cannot add run-time LoRAs to its quantized "
                     "engines (a refit replaces weights; quantized ones cannot take a float delta). Use --backend "
                     "torch or onnxruntime (the LoRA runs beside the quantized layers there), or fuse the LoRA at "
                     "build time: python -m zimage_deploy.build ... --lora PATH[:SCALE]")


@dataclass(frozen=True)
class LoraSet:
    """Prepared LoRAs with their scales, in order; `key` identifies the set (file hashes and scales)."""
    items: tuple = ()
    key: tuple = ()
    _table: dict = field(default_factory=dict, compare=False, repr=False)

    def __bool__(self) -> bool:
        return bool(self.items)

    @property
    def table(self) -> dict:
        if not self._table and self.items:
            self._table.update(factors(self.items))
        return self._table

    def describe(self) -> list[dict]:
        return [{"path": str(lora.path), "scale": scale, **lora.record()} for lora, scale in self.items]


EMPTY = LoraSet()


class BoundedCache:
    """Least-recently-used cache bounded by entry count and total size. A missing value is made by the first
    caller while others asking for the same key wait; callers for other keys are not held back."""

    def __init__(self, max_items: int, max_bytes: int | None = None, sizeof=lambda v: 0):
        self.max_items, self.max_bytes, self.sizeof = max_items, max_bytes, sizeof
        self.items: OrderedDict = OrderedDict()
        self.making: dict = {}
        self._lock = threading.Lock()

    def get(self, key, make):
        while True:
            with self._lock:
                if key in self.items:
                    self.items.move_to_end(key)
                    return self.items[key]
                event = self.making.get(key)
                if event is None:
                    self.making[key] = event = threading.Event()
                    break
            event.wait()
        try:
            value = make()
            with self._lock:
                self.items[key] = value
                self._evict()
            return value
        finally:
            with self._lock:
                self.making.pop(key, None)
            event.set()

    def _evict(self) -> None:
        while len(self.items) > 1 and (len(self.items) > self.max_items or (
                self.max_bytes is not None and sum(map(self.sizeof, self.items.values())) > self.max_bytes)):
            self.items.popitem(last=False)
        if self.max_items < 1:
            self.items.clear()

    def clear(self) -> None:
        with self._lock:
            self.items.clear()


class _SwitchGate:
    """One active key shared by any number of users; switching waits until the users of the old key are done."""

    def __init__(self):
        self.cond = threading.Condition()
        self.key, self.users = (), 0

    @contextlib.contextmanager
    def hold(self, key, switch):
        with self.cond:
            while self.users and self.key != key:
                self.cond.wait()
            if self.key != key:
                switch()  # refit under the lock: nobody runs the engines meanwhile
                self.key = key
            self.users += 1
        try:
            yield
        finally:
            with self.cond:
                self.users -= 1
                self.cond.notify_all()


class _OrtLoraBackend:
    """Wraps the ONNX Runtime backend: DiT components of the thread's active set run on that set's sessions."""

    def __init__(self, inner, active: contextvars.ContextVar):
        self.inner, self.active = inner, active

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, component, **inputs):
        active = self.active.get()
        if active is not None and component in active[0].sessions:
            return active[0].run(self.inner, component, inputs, active[1])
        return self.inner.run(component, **inputs)


class LoraManager:
    def __init__(self, engine_dir: Path, manifest: dict, backend: str, low_vram: bool | None = None, max_sets: int = 2,
                 max_file_bytes: int = 2 << 30, max_rank: int = MAX_RANK, max_loras: int = MAX_LORAS):
        """`backend`: the backend's name (resolved, not auto); `low_vram`: the TensorRT backend's mode;
        `max_rank`, `max_loras`: the branches' bounds (rank per LoRA and row block, LoRAs per set): the size of the
        Torch buffers; ONNX Runtime (dynamic rank) checks the same bounds."""
        self.pipeline = None
        low_vram = planned_low_vram(manifest, low_vram)  # as make_backend decides it
        self.engine_dir, self.manifest, self.backend_name, self.low_vram = Path(engine_dir), manifest, backend, low_vram
        self.files = BoundedCache(64, max_file_bytes, lambda lora: lora.nbytes)
        self.states = BoundedCache(max_sets)
        self._targets = None
        self._lock = threading.Lock()
        self._torch = None  # TorchBranches, installed on first use
        self._ort = None  # OrtBranchSessions, made on first use
        self.max_rank, self.max_loras = int(max_rank), int(max_loras)
        self._ort_active: contextvars.ContextVar = contextvars.ContextVar(f"lora_ort_{id(self)}", default=None)
        self._gate = _SwitchGate()
        self._trt_modified: dict[str, set] = {}

    @classmethod
    def for_pipeline(cls, pipeline, **kwargs) -> "LoraManager":
        backend = pipeline.backend
        bounds = getattr(backend, "lora_bounds", None)  # branches reserved before compiling (runtime/backends.py)
        if bounds:
            kwargs = {"max_rank": bounds[0], "max_loras": bounds[1], **kwargs}
        return cls(pipeline.engine_dir, pipeline.manifest, backend.name, getattr(backend, "low_vram", False),
                   **kwargs).bind(pipeline)

    def bind(self, pipeline) -> "LoraManager":
        """Apply prepared sets to `pipeline` (opened from the same build, on the same backend)."""
        if pipeline.backend.name != self.backend_name:
            raise InternalError(f"LoRA manager for {self.backend_name} bound to a {pipeline.backend.name} pipeline")
        self.pipeline = pipeline
        return self

    def configure(self, max_sets: int | None = None, max_file_bytes: int | None = None, max_rank: int | None = None,
                  max_loras: int | None = None) -> None:
        """Cache bounds: applied LoRA sets kept ready (ONNX Runtime sessions, Torch factors), bytes of read files;
        the Torch branches' bounds (before the first LoRA is used: the branches are sized then)."""
        if (max_rank is not None or max_loras is not None) and self._torch is not None:
            raise InternalError("the LoRA branches are already installed: set max_rank / max_loras before first use")
        self.max_rank = self.max_rank if max_rank is None else int(max_rank)
        self.max_loras = self.max_loras if max_loras is None else int(max_loras)
        if max_sets is not None:
            self.states.max_items = int(max_sets)
        if max_file_bytes is not None:
            self.files.max_bytes = int(max_file_bytes)

    @property
    def backend(self):
        if self.pipeline is None:
            raise InternalError("LoraManager.use needs a pipeline: bind(pipeline) first")
        backend = self.pipeline.backend
        return backend.inner if isinstance(backend, _OrtLoraBackend) else backend

    # -- checking ---------------------------------------------------------------------------------------
    def check_supported(self) -> None:
        """RequestError when this build / backend cannot apply LoRAs at run time."""
        comps = self.manifest["components"]
        quantized = sorted({comps[n].get("precision") for n in dit_components(self.manifest)} & set(QUANTIZED))
        if quantized and self.backend_name == "tensorrt":
            raise RequestError(QUANTIZED_MESSAGE.format(", ".join(quantized)))
        backend = self.backend if self.pipeline is not None else None
        if backend is not None and backend.name == "torch" and \
                getattr(getattr(backend, "offload", None), "mode", "none") != "none":  # runtime/offload.py
            raise RequestError("run-time LoRAs are not supported by the offloading Torch backend (--low-vram); run "
                               "without it, or fuse the LoRA at build time (build --lora)")
        if self.backend_name not in ("torch", "onnxruntime", "tensorrt"):
            raise RequestError(f"run-time LoRAs are not supported by the {self.backend_name} backend")
        if self.backend_name == "tensorrt":
            if self.low_vram:
                raise RequestError("run-time LoRAs are not supported in low-VRAM mode (engines reload from their "
                                   "plans); run without --low-vram")
            plain = [n for n in dit_components(self.manifest)
                     if not ((comps[n].get("engine") or {}).get("options") or {}).get("refittable")]
            if plain:
                raise RequestError(f"the engines of {', '.join(plain)} are not refittable: rebuild with --refittable "
                                   "to swap LoRAs at run time, or fuse the LoRA at build time (build --lora)")

    @property
    def targets(self):
        with self._lock:
            if self._targets is None:
                self._targets = of_build(self.engine_dir, self.manifest)
            return self._targets

    def read(self, path: Path) -> Lora:
        """A LoRA file, read once per file version (cached under the byte bound)."""
        st = os.stat(path)
        key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
        return self.files.get(key, lambda: read_lora(path, self.targets, file_sha256(path)))

    def prepare(self, loras) -> LoraSet:
        """Check and read `loras` ([(path, scale), ...], LoraSpecs or 'PATH[:SCALE]' strings; a LoraSet passes
        through) -> LoraSet. RequestError for a LoRA this build cannot take."""
        if isinstance(loras, LoraSet):
            return loras
        if not loras:
            return EMPTY
        if isinstance(loras, (str, Path)) or not isinstance(loras, (list, tuple)):
            raise RequestError("loras must be a list of (path, scale) pairs")
        try:
            self.check_supported()
            items = tuple((self.read(spec.path), spec.scale) for spec in map(as_spec, loras))
            if self.backend_name in ("torch", "onnxruntime"):
                check_bounds(self.targets, items, self.max_rank, self.max_loras)
        except RequestError:
            raise
        except UserError as e:
            raise RequestError(str(e)) from None
        except OSError as e:  # removed or unreadable between the checks and the read
            raise RequestError(f"LoRA file cannot be read ({e})") from None
        return LoraSet(items, tuple((lora.sha256, scale) for lora, scale in items))

    # -- applying ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def use(self, lora_set: LoraSet = EMPTY):
        """Run the body with `lora_set` applied (EMPTY: the base weights)."""
        name = self.backend.name
        if lora_set:
            self.check_supported()
        if name in ("tensorrt", "torch"):  # base generations hold the gate too: no switch may happen under them
            switch = self._refit if name == "tensorrt" else self._torch_switch
            with self._gate.hold(lora_set.key, lambda: switch(lora_set)):
                yield
            return
        if not lora_set:
            yield
            return
        if name == "onnxruntime":
            self._install_ort()
            branches = self._ort_branches()
            prepared = self.states.get(lora_set.key, lambda: branches.prepare(lora_set.table))
            token = self._ort_active.set((branches, prepared))
            try:
                yield
            finally:
                self._ort_active.reset(token)
        else:
            raise RequestError(f"run-time LoRAs are not supported by the {name} backend")

    def _torch_switch(self, lora_set: LoraSet) -> None:
        """Copy `lora_set`'s factors into the DiT's branches (installing them on first use); called with no
        generation running."""
        if not lora_set and self._torch is None:
            return  # never adapted: no branches to clear
        branches = self._torch_branches()
        prepared = self.states.get(lora_set.key, lambda: branches.prepare(lora_set.table)) if lora_set else {}
        branches.load(prepared)

    def _torch_branches(self):
        from .adapters import TorchBranches

        targets = self.targets
        with self._lock:
            if self._torch is None:
                self.backend.model("transformer")  # loads the DiT module once (shared by its components)
                model = self.backend.models["transformer"]
                model = getattr(model, "dit", model)  # the step-graph wrapper of runtime/torch_fast.py
                self._torch = TorchBranches(model, targets, self.max_rank, self.max_loras)
            return self._torch

    def _ort_branches(self):
        from .onnx_branch import OrtBranchSessions

        targets = self.targets
        with self._lock:
            if self._ort is None:
                self._ort = OrtBranchSessions(self.backend, targets.shapes)
            return self._ort

    def _install_ort(self) -> None:
        with self._lock:
            if not isinstance(self.pipeline.backend, _OrtLoraBackend):
                self.pipeline.backend = _OrtLoraBackend(self.pipeline.backend, self._ort_active)

    def _refit(self, lora_set: LoraSet) -> None:
        import torch

        from .tensorrt import refit_engine, refit_names

        backend = self.backend
        table = lora_set.table
        torch.cuda.synchronize()
        for name in dit_components(self.manifest):
            path = graph_path(self.engine_dir, self.manifest["components"][name])
            names = refit_names(path, table, self._trt_modified.get(name, ()))
            eng = backend._engine(name)
            refit_engine(backend.trt, eng.engine, backend.logger, path, table, names)
            eng.graph = None  # a captured CUDA graph is re-captured with the new weights
            self._trt_modified[name] = {n for n in names if n in table}
