"""`DIR/manifest.json`: what a build produced and everything the runtime needs to know about it.

The file is JSON written atomically (temp file + rename) after every stage, so a reader never sees half a manifest.
`load` parses it once into a frozen `Manifest`, checking every field a reader uses (a `UserError` naming the key,
not a traceback later); readers use its typed records (`Defaults`, `Model`, `TensorRT`, `Component` with its
`Engine` and `Quantization`, `RuntimePlan`). Each record's field names are the JSON keys, so the keys are spelled
here once: a stage builds its part as a record and writes `record.to_dict()`. Keys a record does not type ride
along in its `extra` and are written back unchanged (`parse(d).to_dict() == d`).

A `Manifest` is also a read-only mapping over the JSON it was parsed from (`manifest["components"]`), for the
readers not converted yet and for the build's stages, which grow the plain dict they are handed."""

from __future__ import annotations

import copy
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

from .errors import UserError
from .fsutil import atomic_file

SCHEMA = 1  # the file's "schema"; bump it (and keep reading the old one where possible) when the format changes
NAME = "manifest.json"
ALL_RESIDENT = "all-resident"  # the VRAM plan's mode with nothing offloaded


class _Bad(Exception):
    """A field of the JSON is missing or has the wrong type (`where`: its dotted key)."""

    def __init__(self, where: str, what: str):
        super().__init__(f"{where!r} {what}")


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", dict: "an object",
               list: "a list"}


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)


def _take(raw: Mapping, key: str, kind, where: str, required: bool = False):
    """`raw[key]` checked against `kind` (a bool is not a number); None where absent or null and not required."""
    name = f"{where}.{key}" if where else key
    if raw.get(key) is None:
        if required:
            raise _Bad(name, "missing")
        return None
    value = raw[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise _Bad(name, f"is {_kind_name(type(value))}, expected {_kind_name(kind)}")
    return value


def _json(value):
    if isinstance(value, _Record):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_json(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _json(v) for k, v in value.items()}
    return copy.deepcopy(value)


def _default(f):
    return f.default_factory() if f.default_factory is not MISSING else None if f.default is MISSING else f.default


@dataclass(frozen=True, kw_only=True)
class _Record:
    """A part of the manifest: fields named as its JSON keys, typed by their annotations (`parse` checks them: a
    field without a default is required), the other keys in `extra`. `absent`: the fields the parsed JSON did not
    have (`to_dict` leaves them out while they hold their default; a record a stage builds writes every field)."""
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)
    absent: frozenset = field(default=frozenset(), repr=False, compare=False)
    order: tuple = field(default=(), repr=False, compare=False)  # the parsed JSON's key order, kept when written

    _NOT_JSON = ("extra", "absent", "order")

    def to_dict(self) -> dict:
        out = {f.name: _json(getattr(self, f.name)) for f, _ in _json_fields(type(self))
               if f.name not in self.absent or getattr(self, f.name) != _default(f)}
        out.update(_json(self.extra))
        first = [k for k in self.order if k in out]
        return {k: out[k] for k in first + [k for k in out if k not in self.order]}

    @classmethod
    def parse(cls, raw: Mapping, where: str = ""):
        """`raw` checked against the fields' types (raises `_Bad` naming the key) and typed."""
        typed = {f.name: _read(raw, f, hint, where) for f, hint in _json_fields(cls)}
        return cls(**typed, extra={k: v for k, v in raw.items() if k not in typed},
                   absent=frozenset(k for k in typed if k not in raw), order=tuple(raw))


@cache
def _json_fields(cls) -> tuple:
    """(field, its type) of each JSON key of a record class."""
    hints = typing.get_type_hints(cls)
    return tuple((f, hints[f.name]) for f in fields(cls) if f.name not in cls._NOT_JSON)


def _bare(hint):
    """`X | None` -> X."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _read(raw: Mapping, f, hint, where: str):
    """One field of a record from its JSON: checked against the field's type (records and mappings of records
    parsed in turn, lists made tuples); absent or null: the field's default, or `_Bad` where it has none."""
    hint = _bare(hint)
    origin = typing.get_origin(hint) or hint
    name = f"{where}.{f.name}" if where else f.name
    kind = {float: (int, float), tuple: list, Mapping: dict}.get(origin, origin)
    if isinstance(origin, type) and issubclass(origin, _Record):
        kind = dict
    value = _take(raw, f.name, kind, where, required=f.default is MISSING and f.default_factory is MISSING)
    if value is None:
        return _default(f)
    if kind is dict and origin is not dict and origin is not Mapping:
        return origin.parse(value, name)
    if origin is Mapping and _is_record(typing.get_args(hint)[-1]):
        item = typing.get_args(hint)[-1]
        for key, v in value.items():
            if not isinstance(v, dict):
                raise _Bad(f"{name}.{key}", f"is {_kind_name(type(v))}, expected an object")
        return {key: item.parse(v, f"{name}.{key}") for key, v in value.items()}
    return tuple(value) if origin is tuple else value


def _is_record(hint) -> bool:
    return isinstance(hint, type) and issubclass(hint, _Record)


@dataclass(frozen=True, kw_only=True)
class Defaults(_Record):
    """What a request leaves out (the variant's, at the model's default side)."""
    steps: int
    guidance_scale: float
    height: int
    width: int
    resolution_multiple: int
    max_sequence_length: int

    @classmethod
    def parse(cls, raw: Mapping, where: str = "") -> "Defaults":
        made = super().parse(raw, where)
        for f, _ in _json_fields(cls):
            v = getattr(made, f.name)
            if v < 0 or (f.name == "resolution_multiple" and v < 1):
                raise _Bad(f"{where}.{f.name}" if where else f.name, f"is {v}, out of range")
        return made


@dataclass(frozen=True, kw_only=True)
class Model(_Record):
    """The checkpoint the build was made from (`facts`: facts.py's numbers)."""
    source: str | None = None
    path: str | None = None
    sha256: str | None = None
    facts: Mapping[str, Any]


@dataclass(frozen=True, kw_only=True)
class TensorRT(_Record):
    """The engines' flavour and version, the SM they are built for, the engine options (engines/builder.py)."""
    flavour: str | None = None
    version: str | None = None
    compute_capability: tuple[int, ...] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Engine(_Record):
    """A component's TensorRT plan (engines/builder.py builds it, engines/stage.py adds `plan`, `key`, `status`)."""
    plan_sha256: str | None = None
    bytes: int | None = None
    flavour: str | None = None
    version: str | None = None
    compute_capability: tuple[int, ...] | None = None
    gpu: str | None = None
    cuda_graphs: bool | None = None
    profile: Mapping[str, Any] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    stripped: bool | None = None
    timing_cache: str | None = None
    build_seconds: float | None = None
    plan: str | None = None
    key: str | None = None
    status: str | None = None

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def refittable(self) -> bool:
        return bool(self.options.get("refittable"))


@dataclass(frozen=True, kw_only=True)
class Quantization(_Record):
    """A quantized component's record (quantize/stage.py): its scheme, scale file and the key that says it is up to
    date; the calibration's figures ride in `extra`."""
    key: str | None = None
    scheme: str | None = None
    block: int | None = None  # INT4 / NVFP4 block size
    scales: str | None = None
    scales_sha256: str | None = None


@dataclass(frozen=True, kw_only=True)
class Component(_Record):
    """One component: its graph (export), precision, parity, quantization and engine records."""
    key: str | None = None  # the export's up-to-date key
    status: str | None = None
    source: str | None = None  # "checkpoint": no graph (a graphless build, buildfolder.CHECKPOINT)
    precision: str | None = None
    compute_dtype: str | None = None
    onnx: str | None = None
    onnx_sha256: str | None = None
    bytes: int | None = None
    weight_bytes: int | None = None
    external_data: bool | None = None
    dropped: bool | None = None
    quantization: Quantization | None = None
    engine: Engine | None = None

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def has_engine(self) -> bool:
        return self.engine is not None and self.engine.complete


@dataclass(frozen=True, kw_only=True)
class RuntimePlan(_Record):
    """The manifest's `runtime` (plan.py `runtime_record`): the mode the VRAM plan picked for the target, what each
    mode needs, the weight-streaming budgets; `backend` where the build is made for the compiled Torch runtime."""
    mode: str | None = None
    planned_at: tuple[int, int] | None = None
    needs_gib: Mapping[str, float] | None = None
    memory_gib: float | None = None
    stream_budget_bytes: Mapping[str, int] | None = None
    advice: tuple[str, ...] | None = None
    backend: str | None = None

    @property
    def low_vram(self) -> bool:
        """One stage resident at a time: every mode but all-resident (text-encoder-cpu and weight streaming too)."""
        return (self.mode or ALL_RESIDENT) != ALL_RESIDENT


@dataclass(frozen=True, kw_only=True, eq=False)
class Manifest(_Record, Mapping):
    """A parsed, checked manifest. Typed: `variant`, `defaults`, `model`, `components`, `tensorrt`, `runtime`
    (None: no VRAM plan), `controlnet` / `loras` (the ControlNet's and fused LoRAs' records, None: none); the rest
    (host, stages, export, quantize options, ...) in `extra`. As a mapping it reads the JSON it was parsed from."""
    schema: int
    zimage_deploy: str | None = None
    variant: str
    target: str | None = None
    precision: str | None = None
    model: Model
    plan: Mapping[str, str] | None = None
    defaults: Defaults
    tensorrt: TensorRT | None = None
    components: Mapping[str, Component]
    runtime: RuntimePlan | None = None
    controlnet: Mapping[str, Any] | None = None
    loras: tuple[Mapping[str, Any], ...] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    _NOT_JSON = ("extra", "absent", "order", "raw")

    @property
    def has_engines(self) -> bool:
        """Every component has a complete engine (see `has_engines`)."""
        return bool(self.components) and all(c.has_engine for c in self.components.values())

    # -- the read-only mapping over the parsed JSON -------------------------------------------------------------
    def __getitem__(self, key):
        return self.raw[key]

    def __iter__(self):
        return iter(self.raw)

    def __len__(self):
        return len(self.raw)

    def __eq__(self, other):
        return isinstance(other, Manifest) and self.to_dict() == other.to_dict()

    __hash__ = None

    @classmethod
    def parse(cls, raw: Mapping, where: str = "") -> "Manifest":
        made = super().parse(raw, where)
        object.__setattr__(made, "raw", raw)
        return made


def parse(data, path: Path | str = NAME) -> Manifest:
    """`data` (the JSON of a manifest) checked once and typed; a `UserError` naming the key where it is not a
    manifest this version reads."""
    if isinstance(data, Manifest):
        return data
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a build manifest: it holds a JSON {type(data).__name__}, not an object; "
                        "rebuild")
    schema = data.get("schema")
    if schema != SCHEMA:
        raise UserError(f"{path} has manifest schema {schema!r}, this version reads {SCHEMA}: rebuild the folder "
                        "(python -m zimage_deploy.build ... --out DIR)")
    try:
        return Manifest.parse(data)
    except _Bad as e:
        raise _incomplete(e, path) from None


def _incomplete(e: _Bad, path: Path | str = NAME) -> UserError:
    return UserError(f"{path} is not a complete build manifest ({e}): rebuild")


def load(engine_dir: Path) -> Manifest:
    path = Path(engine_dir) / NAME
    if not path.is_file():
        raise UserError(f"{engine_dir} has no {NAME}: build it first with `python -m zimage_deploy.build --out DIR`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as e:
        raise UserError(f"{path} is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror or e})") from None
    return parse(data, path)


def save(engine_dir: Path, manifest: dict | Manifest) -> None:
    """Write `manifest` (the build's dict, or a `Manifest`: its `to_dict()`) atomically."""
    data = manifest.to_dict() if isinstance(manifest, Manifest) else manifest
    with atomic_file(Path(engine_dir) / NAME) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def read_component(raw, name: str) -> Component:
    """One component's record of a plain dict (the build's manifest as a stage grows it), checked and typed."""
    try:
        if not isinstance(raw, dict):
            raise _Bad(f"components.{name}", f"is {_kind_name(type(raw))}, expected an object")
        return Component.parse(raw, f"components.{name}")
    except _Bad as e:
        raise _incomplete(e) from None


def components_of(manifest: Mapping) -> dict[str, Component]:
    """A `Manifest`'s components, or those of a plain dict (a build in progress, a test's fragment) parsed here."""
    if isinstance(manifest, Manifest):
        return dict(manifest.components)
    return {name: read_component(c, name) for name, c in (manifest.get("components") or {}).items()}


def has_engines(manifest: Mapping) -> bool:
    """Every component has a complete engine: what the TensorRT backend needs to run the build (and so what `auto`
    picks TensorRT by, and what a GPU is reserved for). A build with some engines missing (an engines stage cut
    short) runs on ONNX Runtime / Torch like one without any."""
    comps = components_of(manifest)
    return bool(comps) and all(c.has_engine for c in comps.values())


def runtime_plan(manifest: Mapping) -> RuntimePlan:
    """The build's VRAM plan (`runtime`; an empty one where there is none) of a `Manifest` or a plain dict."""
    if isinstance(manifest, Manifest):
        return manifest.runtime or RuntimePlan.parse({})
    raw = manifest.get("runtime")
    try:
        return RuntimePlan.parse(raw if isinstance(raw, dict) else {}, "runtime")
    except _Bad as e:
        raise _incomplete(e) from None


def planned_low_vram(manifest: Mapping, low_vram: bool | None) -> bool:
    """`low_vram` as asked, or (None) the mode the build's VRAM plan picked for its target (`runtime.mode`): one
    stage resident at a time in every mode but all-resident (text-encoder-cpu and weight-streaming plans too)."""
    if low_vram is None:
        return runtime_plan(manifest).low_vram
    return bool(low_vram)
