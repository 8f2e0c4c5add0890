"""Where the Torch backend's modules live between calls (its memory modes, the TensorRT runtime's counterparts):

- `none`: every module on the compute device (all resident);
- `model`: one stage's modules on the device at a time: before a component runs, the modules of other stages are
  released (the text encoder before the DiT loads), then its own are copied in (low-VRAM mode);
- `text-encoder-cpu`: `model` with the text encoder run on the CPU: its weights stay in host memory in the build's
  dtype (PyTorch's CPU kernels run BF16 and FP16) and never reach the device; its inputs stay on the CPU and its
  outputs (the embeddings) are moved to the device; the other stages one at a time as in `model` (what plan.py
  counts for the mode: the largest of the other stages);
- `sequential`: the last resort: each leaf module's weights are copied to the device just before it runs and
  released after (weight streaming, layer by layer); tensors owned by non-leaf modules (pad tokens, ...) stay
  in for the stage.

`--offload` (generate, serve, ZImageRuntime's `offload`) picks one by name for every backend: `auto` (the build's
VRAM plan), or a mode; `tensorrt_mode` says how the TensorRT runtime runs it (low-VRAM mode; the text encoder
through the Torch backend on the CPU; weight streaming only as the build planned it), and ONNX Runtime (on the
CPU) runs `none` only.

The host copy of every weight stays in CPU memory (the master); "released" points a module's tensors at `park`:
the master itself on a GPU machine (the device copy is freed), or the meta device where a test stands in for the
GPU on the CPU (a released module then holds no data at all, and any use of it fails). `resident` / `peak`
count the bytes on the device (the bookkeeping; on CUDA, torch.cuda.max_memory_allocated is the real figure).
"""

from __future__ import annotations

import contextlib
import threading

import torch

from ..errors import UserError
from ..manifest import ALL_RESIDENT, planned_low_vram, runtime_plan

MODES = ("none", "model", "text-encoder-cpu", "sequential")
OFFLOAD_CHOICES = ("auto", *MODES)  # --offload: auto is the build's plan's
HOST = ("text_encoder",)  # text-encoder-cpu: the loaders (keys) whose modules run on the CPU
# the build's VRAM plan (manifest runtime.mode) -> the Torch backend's mode
PLANNED = {"all-resident": "none", "low-vram": "model", "text-encoder-cpu": "text-encoder-cpu",
           "weight-streaming": "sequential"}


def _slots(module: torch.nn.Module, recurse: bool = True):
    """(owner, attribute, is_parameter) of every parameter and buffer; `recurse=False`: the module's own."""
    owners = module.named_modules() if recurse else [("", module)]
    for _, m in owners:
        for name, t in m._parameters.items():
            if t is not None:
                yield m, name, True
        for name, t in m._buffers.items():
            if t is not None:
                yield m, name, False


class OffloadPolicy:
    def __init__(self, mode: str = "none", device="cpu", park="cpu"):
        if mode not in MODES:
            raise UserError(f"unknown offload mode {mode!r}; choose one of: {', '.join(MODES)}")
        self.mode, self.device, self.park = mode, torch.device(device), torch.device(park)
        self.masters: dict[tuple[int, str], torch.Tensor] = {}  # (id(owner), attribute) -> host tensor
        self.stages: dict[str, list] = {}  # key -> its slots
        self.loaded: list[str] = []  # model mode: the keys whose modules are on the device
        self.events: list[tuple[str, str]] = []  # ("load" | "release", key)
        self.resident = self.peak = 0  # bytes on the device
        self._on: set[tuple[int, str]] = set()
        self.lock = threading.RLock()

    @property
    def load_device(self) -> torch.device:
        """Where a freshly loaded module goes before `manage`."""
        return self.device if self.mode == "none" else torch.device("cpu")

    def on_host(self, key: str) -> bool:
        """Whether `key`'s module runs on the CPU (text-encoder-cpu: the text encoder)."""
        return self.mode == "text-encoder-cpu" and key in HOST

    def device_of(self, key: str) -> torch.device:
        """Where `key`'s module computes (its inputs go there)."""
        return torch.device("cpu") if self.on_host(key) else self.device

    def manage(self, key: str, module: torch.nn.Module) -> torch.nn.Module:
        """Take `module` (the loader `key`'s) under this policy: its tensors become host masters, released (a
        module run on the host stays as it is, in host memory)."""
        if self.mode == "none":
            return module
        module.to("cpu")
        slots = list(_slots(module))
        if self.on_host(key):
            self.stages[key] = slots
            return module
        for owner, name, _ in slots:
            self.masters[(id(owner), name)] = getattr(owner, name).detach()
        self.stages[key] = slots
        self._put(slots, on=False)
        if self.mode == "sequential":
            for m in module.modules():
                own = list(_slots(m, recurse=False))
                if own and not any(True for _ in m.children()):  # a leaf: streamed around its forward
                    m.register_forward_pre_hook(lambda mod, args, own=own: self._put(own, on=True))
                    m.register_forward_hook(lambda mod, args, out, own=own: self._put(own, on=False))
        return module

    @contextlib.contextmanager
    def stage(self, key: str):
        """Around one call of a component served by `key`'s module: its modules placed as the mode says."""
        if self.mode == "none":
            yield
            return
        with self.lock:
            if self.on_host(key):  # runs on the CPU: the device keeps what it holds
                yield
            elif self.mode in ("model", "text-encoder-cpu"):
                for other in [k for k in self.loaded if k != key]:
                    self._put(self.stages[other], on=False)
                    self.loaded.remove(other)
                    self.events.append(("release", other))
                if key not in self.loaded:
                    self._put(self.stages[key], on=True)
                    self.loaded.append(key)
                    self.events.append(("load", key))
                yield
            else:  # sequential: the non-leaf modules' own tensors for the stage, the leaves' in their hooks
                inner = [s for s in self.stages[key] if any(True for _ in s[0].children())]
                self._put(inner, on=True)
                try:
                    yield
                finally:
                    self._put(inner, on=False)

    def where(self, key: str) -> set[str]:
        """The device types `key`'s tensors are on now."""
        return {getattr(owner, name).device.type for owner, name, _ in self.stages[key]}

    def _put(self, slots, on: bool) -> None:
        for owner, name, is_param in slots:
            slot = (id(owner), name)
            if (slot in self._on) == on:
                continue
            master = self.masters[slot]
            target = self.device if on else self.park
            t = master if target == master.device else master.to(target)
            if is_param:
                owner._parameters[name] = torch.nn.Parameter(t, requires_grad=False)
            else:
                owner._buffers[name] = t
            size = master.numel() * master.element_size()
            if on:
                self._on.add(slot)
                self.resident += size
                self.peak = max(self.peak, self.resident)
            else:
                self._on.discard(slot)
                self.resident -= size


def asked_mode(offload: str | None, low_vram: bool | None = None) -> str | None:
    """The memory mode asked for by name (`--offload`; None or "auto": the build's plan's, returned as None), or
    by the older `low_vram` flag (True: `model`, False: `none`); given both, they must agree."""
    if offload is not None and offload not in OFFLOAD_CHOICES:
        raise UserError(f"unknown offload mode {offload!r}; choose one of: {', '.join(OFFLOAD_CHOICES)}")
    mode = None if offload in (None, "auto") else offload
    flag = None if low_vram is None else "model" if low_vram else "none"
    if mode is not None and flag is not None and mode != flag:
        raise UserError(f"--low-vram {'asks for' if low_vram else 'off is'} offload mode {flag}, but --offload "
                        f"asks for {mode}: give one of them")
    return mode or flag


def offload_policy(offload, manifest: dict, device: torch.device, accelerated: bool) -> OffloadPolicy:
    """The Torch backend's policy: an OffloadPolicy as given, a mode by name, or (None / "auto") the mode the
    build's VRAM plan picked (on CUDA only, and not under --compile / FP8, whose compiled blocks keep their
    weights)."""
    if isinstance(offload, OffloadPolicy):
        return offload
    if offload in (None, "auto"):
        planned = PLANNED.get(runtime_plan(manifest).mode, "none")
        offload = planned if device.type == "cuda" and not accelerated else "none"
    elif offload != "none" and accelerated:
        raise UserError(f"offload mode {offload} keeps weights in host memory between calls: it does not "
                        "combine with --compile or FP8 (compiled blocks keep their weights on the GPU)")
    return OffloadPolicy(offload, device, "cpu")


def tensorrt_mode(mode: str | None, manifest: dict) -> tuple[bool, bool]:
    """How the TensorRT runtime runs memory mode `mode` (None: the build's plan's) -> (low_vram: one stage's
    engines resident at a time, text_encoder_cpu: the text encoder run on the CPU by the Torch backend, its
    engine never loaded). Weight streaming (`sequential`'s counterpart) needs engines built for it, at the budgets
    the build's plan sets: it runs where the plan picked it, and is refused otherwise."""
    planned = runtime_plan(manifest).mode or ALL_RESIDENT
    if mode is None:  # weight streaming: low-VRAM mode with the plan's budgets
        return planned_low_vram(manifest, None), planned == "text-encoder-cpu"
    if mode == "sequential" and planned != "weight-streaming":
        raise UserError(f"the TensorRT backend cannot run offload mode sequential on this build: it streams "
                        f"weights only with engines built for it (build --weight-streaming), where the build's VRAM "
                        f"plan picks weight streaming (this build's: {planned}); use --offload model or "
                        "text-encoder-cpu, or --backend torch")
    return mode != "none", mode == "text-encoder-cpu"


def check_host_mode(backend: str, mode: str | None) -> None:
    """A backend that runs on the CPU (ONNX Runtime) has nothing to offload: only `none` (or auto)."""
    if mode not in (None, "none"):
        raise UserError(f"the {backend} backend runs on the CPU: offload mode {mode} has nothing to move; use "
                        "--offload none (or auto), or --backend torch / tensorrt")
