"""Backends: run a component by name on named torch tensors and return named torch tensors; the registry of them.

Every backend takes the same inputs and gives the same outputs, as the manifest describes them; the sampling
loop does not know which one it talks to.
- onnxruntime: the exported graphs (float32 graphs: ONNX Runtime has no BF16 kernels on the CPU), on the execution
  providers asked for (`providers`; default the CPU's) among those the installed onnxruntime offers;
- torch: the same export-friendly modules, loaded from the checkpoint the build recorded, eager or compiled
  (runtime/torch_fast.py);
- tensorrt: the engines (runtime/tensorrt_backend.py).
What each can do beyond that is declared once, in its class's `abilities` (runtime/backend.py `Abilities`); the
registry (`REGISTRY`) names them, and everything that picks, checks or describes a backend reads it. A new backend
is one module with its `Backend` subclass plus one `Entry` here.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..buildfolder import BuildFolder
from ..errors import UserError
from ..manifest import components_of, has_engines, planned_low_vram, runtime_plan  # noqa: F401 - imported from here too
from .backend import Abilities, Backend
from .offload import asked_mode, check_host_mode, tensorrt_mode
from .tensorrt_backend import TensorRTBackend
from .torch_fast import TORCH_MODES, TorchBackend  # noqa: F401 - TORCH_MODES: the CLIs' choices

TORCH_COMPILED = "torch-compiled"  # manifest `runtime.backend` of a build made for the compiled Torch runtime
CPU_PROVIDERS = ("CPUExecutionProvider",)


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def add_providers_flag(ap) -> None:
    """`--ort-providers NAME[,NAME...]` on a command that chooses a backend (the value: a list, or None)."""
    ap.add_argument("--ort-providers", default=None, metavar="NAME[,NAME...]",
                    type=lambda v: [p.strip() for p in v.split(",") if p.strip()],
                    help="the onnxruntime backend: execution providers in order of preference, from those the "
                         "installed onnxruntime offers (e.g. CUDAExecutionProvider,CPUExecutionProvider; default: "
                         "CPUExecutionProvider)")


def check_providers(providers) -> tuple[str, ...]:
    """ONNX Runtime execution providers, in order of preference (None: the CPU's); UserError naming the ones the
    installed onnxruntime offers where one asked for is not among them."""
    if providers is None:
        return CPU_PROVIDERS
    providers = tuple(p.strip() for p in ([providers] if isinstance(providers, str) else providers) if p.strip())
    available = available_providers()
    missing = [p for p in providers if p not in available]
    if not providers:
        raise UserError(f"no ONNX Runtime execution provider given; the installed onnxruntime offers: "
                        f"{', '.join(available)}")
    if missing:
        raise UserError(f"ONNX Runtime execution provider{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                        f"not available in the installed onnxruntime; it offers: {', '.join(available)}")
    return providers


class OnnxRuntimeBackend(Backend):
    """`providers`: ONNX Runtime execution providers in order of preference (None: the CPU's), from those the installed
    package offers (`onnxruntime.get_available_providers()`)."""

    name = "onnxruntime"
    abilities = Abilities(lora="feed", exact_batch=4, dtypes=("float32",), devices=("cpu", "cuda"),
                          build_files=("graphs",), options=("ort_providers",))

    def __init__(self, engine_dir, manifest, providers=None):
        super().__init__(engine_dir, manifest)
        import onnxruntime as ort

        self.ort = ort
        self.providers = list(check_providers(providers))
        self.sessions: dict[str, object] = {}
        self._lock = threading.Lock()
        self._lora = contextvars.ContextVar(f"ort_lora_{id(self)}", default=None)  # this thread's LoRA set
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
        lora = self._lora.get()
        if lora is not None and component in lora[0].sessions:  # the DiT with this thread's LoRA set
            return lora[0].run(self, component, inputs, lora[1])
        feeds = {k: v.detach().cpu().numpy() for k, v in self._cast_inputs(component, inputs).items()}
        outputs = self.session(component).run(None, feeds)
        names = [o["name"] for o in self.components[component]["outputs"]]
        return {n: torch.from_numpy(np.asarray(o)) for n, o in zip(names, outputs)}

    def lora_applier(self, targets, max_rank, max_loras):
        return _LoraFeeds(self, targets)


class _LoraFeeds:
    """The ONNX Runtime backend's LoRA sets: the DiT graphs with the side branch, one extra session per component
    (lora/onnx_branch.py), run with a set's factors as feeds while this thread is `feeding` it."""

    def __init__(self, backend: OnnxRuntimeBackend, targets):
        from ..lora.onnx_branch import OrtBranchSessions

        self.backend, self.sessions = backend, OrtBranchSessions(backend, targets.shapes)

    def prepare(self, table: dict) -> dict:
        return self.sessions.prepare(table)

    @contextlib.contextmanager
    def feeding(self, prepared: dict):
        token = self.backend._lora.set((self.sessions, prepared))
        try:
            yield
        finally:
            self.backend._lora.reset(token)


# makers: (engine_dir, manifest, memory mode (runtime/offload.py; None: the build's plan's), options) -> backend
def _make_tensorrt(engine_dir, manifest, mode, options):
    low, text_encoder_cpu = tensorrt_mode(mode, manifest)
    return TensorRTBackend(engine_dir, manifest, low_vram=low, text_encoder_cpu=text_encoder_cpu)


def _make_onnxruntime(engine_dir, manifest, mode, options):
    check_host_mode(OnnxRuntimeBackend.name, mode)
    return OnnxRuntimeBackend(engine_dir, manifest, providers=options.get("ort_providers"))


def _make_torch(engine_dir, manifest, mode, options):
    return TorchBackend(engine_dir, manifest, offload=mode, **options)


@dataclass(frozen=True)
class Entry:
    """A registered backend: its class (`name`, `abilities`) and how it is made from the common options
    (engine_dir, manifest, the memory mode: None for the build's plan's) and its own (`abilities.options`, more
    keywords where it takes any)."""

    backend: type[Backend]
    make: Callable[..., Backend]

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def abilities(self) -> Abilities:
        return self.backend.abilities


REGISTRY: dict[str, Entry] = {e.name: e for e in (
    Entry(TensorRTBackend, _make_tensorrt),
    Entry(OnnxRuntimeBackend, _make_onnxruntime),
    Entry(TorchBackend, _make_torch),
)}
BACKENDS = ("auto", *REGISTRY)  # what --backend takes


def backend_entry(name: str) -> Entry:
    """The registry entry of the backend `name` (resolved: not auto)."""
    if name not in REGISTRY:
        raise UserError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    return REGISTRY[name]


def resolve_backend(name: str, manifest: dict) -> str:
    """`auto`: TensorRT when the build has engines and a CUDA GPU is visible; otherwise Torch on a CUDA GPU or for a
    build made for the compiled Torch runtime (manifest `runtime.backend`: a Hopper build without TensorRT), else
    ONNX Runtime for float32 builds and Torch for BF16 builds (ONNX Runtime has no BF16 CPU kernels)."""
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    if name == "auto":
        if has_engines(manifest) and torch.cuda.is_available():
            return "tensorrt"
        if torch.cuda.is_available() or runtime_plan(manifest).backend == TORCH_COMPILED:
            return "torch"
        bf16 = any(c.compute_dtype == "bfloat16" for c in components_of(manifest).values())
        return "torch" if bf16 else "onnxruntime"
    return name


def check_options(name: str, **options) -> None:
    """Options given (not None) that the backend `name` does not take (its `abilities.options`): UserError naming
    the backends that take them."""
    for option, value in options.items():
        if value is None or option in backend_entry(name).abilities.options:
            continue
        owners = [n for n, e in REGISTRY.items() if option in e.abilities.options]
        flag = "--" + option.replace("_", "-")
        raise UserError(f"{flag} {value if isinstance(value, str) else ','.join(value)} is an option of the "
                        f"{' / '.join(owners)} backend, not of {name}")


def check_torch_mode(name: str, torch_mode: str | None) -> None:
    """`torch_mode` is the Torch backend's option: refused (UserError) for another backend or an unknown mode."""
    if torch_mode is None:
        return
    modes = list(dict.fromkeys(m for e in REGISTRY.values() for m in e.abilities.compile_modes))
    if torch_mode not in modes:
        raise UserError(f"torch_mode must be one of {', '.join(modes)}, got {torch_mode!r}")
    check_options(name, torch_mode=torch_mode)


def make_backend(name: str, engine_dir: Path, manifest: dict, low_vram: bool | None = None,
                 torch_mode: str | None = None, offload: str | None = None, ort_providers=None,
                 **torch_options) -> Backend:
    """The backend `name` (see `resolve_backend` for `auto`). `offload`: the memory mode (runtime/offload.py:
    none, model, text-encoder-cpu, sequential; None / auto: the one the build's VRAM plan picked for its target,
    manifest `runtime.mode`), refused where the backend cannot run it; `low_vram`: the older flag (True: model).
    `torch_mode` (Torch: "eager" | "compiled"; None: compiled on CUDA, eager on the CPU) and `torch_options`
    (runtime/torch_fast.py TorchBackend's keywords, e.g. max_graphs) go to the Torch backend; `ort_providers` (ONNX
    Runtime's execution providers, None: the CPU's) to ONNX Runtime. A backend's option given to another is refused
    (UserError)."""
    name = resolve_backend(name, manifest)
    check_torch_mode(name, torch_mode)
    check_options(name, ort_providers=ort_providers)
    given = {"torch_mode": torch_mode, "ort_providers": ort_providers}
    options = {k: v for k, v in given.items() if k in backend_entry(name).abilities.options}
    return backend_entry(name).make(engine_dir, manifest, asked_mode(offload, low_vram), {**options, **torch_options})
