"""Run-time LoRAs: swapped per generation without rebuilding.

    manager = LoraManager.for_pipeline(pipeline)    # ZImageRuntime holds one as `rt.loras`
    active = manager.prepare([("style.safetensors", 0.8), ("face.safetensors", 0.5)])   # RequestError if bad
    with manager.use(active):
        pipeline(...)

(`LoraManager(engine_dir, manifest, backend)` with the backend's registry entry (runtime/backends.py
`backend_entry(name)`) checks and reads LoRAs before any model loads; `bind(pipeline)` then applies them.)

Each backend declares how it applies a set (`abilities.lora`, runtime/backend.py) and provides the applier
(`Backend.lora_applier`); this module knows the ways, not the backends:

- "branch" (Torch): a low-rank side branch beside each adaptable linear layer, in fixed-size buffers
  (lora/adapters.py, models/lora_branch.py): y = base(x) + s (x A) B in the layer's float dtype, beside the
  quantized matmul on FP8 / INT4 / NVFP4 builds, never merged into the base weights; eager or compiled (a switch
  copies factors into the buffers: nothing recompiles). The module holds one set at a time: generations with the
  active set run together, a switch waits for them to finish. Bounds: `max_rank` per LoRA and row block,
  `max_loras` per set.
- "feed" (ONNX Runtime): the DiT graphs (float or quantized) get the same side branch with the factors as graph
  inputs, in one extra session per component made on first use (lora/onnx_branch.py); a set is a feed, per
  thread, so generations with different sets run side by side.
- "refit" (TensorRT, runtime/tensorrt_lora.py): the engines are refitted (lora/tensorrt.py), always from the base
  weights. An engine holds one set at a time: generations with the active set run together, a switch waits for
  them to finish and holds back others while it refits.
- TensorRT engines built with the LoRA side branch (`build --max-lora-rank R [--max-loras N]`, any precision: FP8 /
  INT4 / NVFP4 too) take the "branch" way instead: the same side branch inside the engines, its factors engine
  inputs of fixed rank (lora/tensorrt.py); a switch copies the set's factors into the backend's fixed buffers: no
  refit, no rebuild, no CUDA-graph re-capture; the base weights are never touched. Bounds: the build's (a LoRA or
  set above them is refused before anything is applied).
Quantized TensorRT builds without the branch refuse run-time LoRAs (a refit replaces weights, and the quantized
ones cannot take a float delta): rebuild with --max-lora-rank, use --backend torch or onnxruntime, or fuse at
build time.

Memory bounds: read LoRA files are cached up to `max_file_bytes` (least recently used first out); applied states
(ONNX Runtime feeds, Torch factors on the device) up to `max_sets` sets. A server takes names from a configured
folder (`spec.resolve_lora_name`) and hands (path, scale) pairs to `prepare`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InternalError, RequestError, UserError
from ..manifest import parse, planned_low_vram
from ..models.stream import factors
from ..targets import QUANTIZED
from .adapters import MAX_LORAS, MAX_RANK, check_bounds
from .formats import Lora, read_lora
from .spec import as_spec, file_sha256
from .targets import dit_components, of_build
from .tensorrt import branch_bounds

ONE_AT_A_TIME = ("branch", "refit")  # ways whose backend holds one set at a time (a switch waits for its users)
BOUNDED = ("branch", "feed")  # ways whose branches have a rank / count bound
QUANTIZED_MESSAGE = ("this build's DiT is quantized ({}) and its engines carry no LoRA branch: TensorRT cannot add "
                     "run-time LoRAs to them (a refit replaces weights; quantized ones cannot take a float delta). "
                     "Rebuild the engines with the branch: python -m zimage_deploy.build ... --max-lora-rank R "
                     "[--max-loras N] (the LoRA then runs beside the quantized layers, switched per request); or "
                     "use --backend torch or onnxruntime here, or fuse the LoRA at build time: "
                     "python -m zimage_deploy.build ... --lora PATH[:SCALE]")


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


class LoraManager:
    def __init__(self, engine_dir: Path, manifest: dict, backend, low_vram: bool | None = None, max_sets: int = 2,
                 max_file_bytes: int = 2 << 30, max_rank: int = MAX_RANK, max_loras: int = MAX_LORAS):
        """`backend`: the backend's registry entry, class or object (its `name` and `abilities.lora`: how it
        applies a set); `low_vram`: its memory mode as asked (None: the build's plan); `max_rank`, `max_loras`: the
        branches' bounds (rank per LoRA and row block, LoRAs per set): the size of the Torch buffers; ONNX Runtime
        (dynamic rank) checks the same bounds."""
        self.pipeline = None
        manifest = parse(manifest, Path(engine_dir) / "manifest.json")
        low_vram = planned_low_vram(manifest, low_vram)  # as make_backend decides it
        self.engine_dir, self.manifest, self.low_vram = Path(engine_dir), manifest, low_vram
        self.backend_name, self.way = backend.name, backend.abilities.lora
        # engines built with the LoRA branch (lora/tensorrt.py): their bounds, and a switch feeds, never refits
        self.engine_bounds = branch_bounds(manifest) if self.way == "refit" else None
        if self.engine_bounds:
            self.way = "branch"
        self.files = BoundedCache(64, max_file_bytes, lambda lora: lora.nbytes)
        self.states = BoundedCache(max_sets)
        self._targets = None
        self._lock = threading.Lock()
        self._applier = None  # the backend's `lora_applier`, made on first use
        self.max_rank, self.max_loras = int(max_rank), int(max_loras)
        self._gate = _SwitchGate()

    @classmethod
    def for_pipeline(cls, pipeline, **kwargs) -> "LoraManager":
        backend = pipeline.backend
        bounds = getattr(backend, "lora_bounds", None)  # branches reserved before compiling (runtime/backends.py)
        if bounds:
            kwargs = {"max_rank": bounds[0], "max_loras": bounds[1], **kwargs}
        return cls(pipeline.engine_dir, pipeline.manifest, backend, getattr(backend, "low_vram", False),
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
        if (max_rank is not None or max_loras is not None) and self._applier is not None:
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
        return self.pipeline.backend

    # -- checking ---------------------------------------------------------------------------------------
    def check_supported(self) -> None:
        """RequestError when this build / backend cannot apply LoRAs at run time."""
        comps = self.manifest.components
        quantized = sorted({comps[n].precision for n in dit_components(self.manifest)} & set(QUANTIZED))
        if quantized and self.way == "refit":
            raise RequestError(QUANTIZED_MESSAGE.format(", ".join(quantized)))
        refusal = self.backend.lora_refusal() if self.pipeline is not None else None  # as opened (e.g. offloading)
        if refusal:
            raise RequestError(refusal)
        if self.way is None:
            raise RequestError(f"run-time LoRAs are not supported by the {self.backend_name} backend")
        if self.way == "refit":
            if self.low_vram:
                raise RequestError("run-time LoRAs are not supported in low-VRAM mode (engines reload from their "
                                   "plans); run without --low-vram")
            plain = [n for n in dit_components(self.manifest) if not (comps[n].engine and comps[n].engine.refittable)]
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
            if self.way in BOUNDED:
                rank, count = self.max_rank, self.max_loras
                if self.engine_bounds:  # never above what the engines hold
                    rank, count = min(rank, self.engine_bounds[0]), min(count, self.engine_bounds[1])
                check_bounds(self.targets, items, rank, count)
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
        if lora_set:
            self.check_supported()
        if self.way in ONE_AT_A_TIME:  # base generations hold the gate too: no switch may happen under them
            with self._gate.hold(lora_set.key, lambda: self._switch(lora_set)):
                yield
            return
        if not lora_set:
            yield
            return
        applier = self._applied()
        with applier.feeding(self._prepared(applier, lora_set)):
            yield

    def _switch(self, lora_set: LoraSet) -> None:
        """Load `lora_set` into the backend (a one-set-at-a-time way); called with no generation running."""
        if not lora_set and self._applier is None:
            return  # never adapted: nothing to take back to the base
        applier = self._applied()
        applier.load(self._prepared(applier, lora_set) if lora_set else {})

    def _prepared(self, applier, lora_set: LoraSet):
        return self.states.get(lora_set.key, lambda: applier.prepare(lora_set.table))

    def _applied(self):
        targets = self.targets
        with self._lock:
            if self._applier is None:
                self._applier = self.backend.lora_applier(targets, self.max_rank, self.max_loras)
            return self._applier
