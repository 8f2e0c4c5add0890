"""The Torch backend's fast paths (GPU first; each also runs on the CPU, for checking):

- `mode`: "eager"; "blocks" (the DiT's blocks compiled regionally, a CUDA graph per block on a GPU); "step" (the
  blocks compiled without graphs, and the whole per-step DiT call captured as one CUDA graph per input shape,
  replayed every step: `StepGraph`);
- `fp8`: the DiT's block projections in FP8 (models/fast.py), with static activation scales where calibrated ones
  are there (the build's FP8 scales, or `fp8_scales`), else dynamic ones; `fast_accum` for `_scaled_mm`;
- `compile_text` / `compile_vae`: the text encoder's decoder layers (regional) and the VAE decoder compiled too;
  a component whose compiled first call fails runs eagerly from then on, and says so in `fallbacks`;
- dense attention: when every caption key is valid (batch 1, or equal caption lengths; decided on the host from the
  lengths the pipeline hands over, without a device read) the DiT's attention leaves its all-zero mask out;
- `attention_kernel`: "default" (SDPA's own choice: flash attention for the unmasked case) or "cudnn" (cuDNN's
  fused attention first where it takes the inputs, then SDPA's usual order); set around every DiT call, so it
  holds when the compiled blocks are traced and when the step graph is captured. Compiled code keeps the kernel
  it was traced with and is shared by the process's backends (dynamo does not guard on SDPA's kernel order), so
  a compiled backend with another kernel than the process's earlier ones is refused until
  `reset_compile_counters()` (which forgets all compiled code);
- inputs go to the device without a host synchronisation (`non_blocking`), so a denoising step never waits.

Every accelerated module is a `share_copy` of the one given or loaded: the originals are never compiled or
swapped, so one set of weights serves several backends (the GPU benchmark's rows).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from ..export.specs import DTYPES
from ..models.dit import SEQ_MULTIPLE, Attention
from ..components import loader_of
from .backends import TorchBackend

MODES = ("eager", "blocks", "step")
ATTENTION_KERNELS = ("default", "cudnn")
_compiled_kernel: str | None = None  # the attention kernel this process's compiled DiT code was traced with


def attention_kernels(kernel: str):
    """The context that sets SDPA's kernel order for `kernel` (ATTENTION_KERNELS); every kernel stays allowed, so
    inputs one kernel refuses (a mask, a dtype, the CPU) fall through to the next."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if kernel == "default":
        return contextlib.nullcontext()
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


class StepGraph(nn.Module):
    """The DiT's per-step call as one CUDA graph per input signature (shapes, dtypes, dense attention): the first
    call of a signature warms up (compiles) and captures, later calls copy their inputs into the captured static
    buffers, replay, and return a copy of the static output. `context` (once per prompt) runs as it is.

    Without CUDA (`capture=False`) the same static-buffer path runs eagerly instead of replaying, so the buffer
    handling is checked on the CPU; `captured` counts real CUDA graphs, `replays` the graph (or emulated) calls.
    A capture that fails leaves that signature running eagerly over the same buffers, with the reason in
    `capture_error` (the caller reports it: no graph, but the step still runs)."""

    def __init__(self, dit: nn.Module, capture: bool, warmup: int = 2):
        super().__init__()
        self.dit = dit
        self.capture, self.warmup = capture, warmup
        self.graphs: dict[tuple, tuple] = {}
        self.pool = None
        self.captured = self.replays = 0
        self.capture_error: str | None = None
        self._attention = [m for m in dit.modules() if isinstance(m, Attention)]

    @property
    def cfg(self):
        return self.dit.cfg

    def context(self, *inputs):
        return self.dit.context(*inputs)

    def _signature(self, inputs) -> tuple:
        dense = bool(self._attention) and self._attention[0].dense
        return tuple((tuple(x.shape), x.dtype, x.device) for x in inputs) + (dense,)

    def _record(self, static: list[torch.Tensor]):
        if not self.capture:
            return None, self.dit(*static)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compilation, autotuning and workspaces happen before the capture
            for _ in range(self.warmup):
                self.dit(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.dit(*static)
        except Exception as e:  # noqa: BLE001 - e.g. an op that syncs with the host: run without the graph
            torch.cuda.synchronize()
            self.capture_error = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            return None, self.dit(*static)
        self.pool = graph.pool()  # one memory pool for all of this model's graphs
        self.captured += 1
        return graph, out

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = self._signature(inputs)
        entry = self.graphs.get(key)
        if entry is None:
            static = [x.clone() for x in inputs]
            graph, out = self._record(static)
            self.graphs[key] = entry = (graph, static, out)
        graph, static, out = entry
        for buf, x in zip(static, inputs):
            buf.copy_(x, non_blocking=True)
        if graph is not None:
            graph.replay()
        else:  # no CUDA: the same buffers, run eagerly
            out.copy_(self.dit(*static))
        self.replays += 1
        return out.clone()  # the static output is overwritten by the next replay


def dense_captions(lens: torch.Tensor, seq: int) -> bool:
    """Whether every caption key of a (B, seq) caption batch is attended: each caption padded to 32 fills `seq`.
    Decided only from lengths on the host (a device tensor would need a sync: then the mask stays)."""
    if lens.device.type != "cpu":
        return False
    padded = (lens + (SEQ_MULTIPLE - 1)) // SEQ_MULTIPLE * SEQ_MULTIPLE
    return bool((padded == seq).all())


class FastTorchBackend(TorchBackend):
    """The Torch backend with the fast paths above as options (see the module docstring)."""

    name = "torch"

    def __init__(self, engine_dir, manifest, device: str | None = None, *, mode: str = "eager", fp8: bool = False,
                 fp8_scales: dict | None = None, fast_accum: bool = False, compile_text: bool = False,
                 compile_vae: bool = False, dense_attention: bool = True, compile_backend: str = "inductor",
                 attention_kernel: str = "default", modules: dict[str, nn.Module] | None = None):
        if mode not in MODES:
            raise UserError(f"mode must be one of {MODES}, got {mode!r}")
        if attention_kernel not in ATTENTION_KERNELS:
            raise UserError(f"attention_kernel must be one of {ATTENTION_KERNELS}, got {attention_kernel!r}")
        self.attention_kernel = attention_kernel
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = str(device).startswith("cuda")
        self.mode, self.fp8_on, self.fp8_scales, self.fast_accum = mode, fp8, fp8_scales, fast_accum
        self.compile_text, self.compile_vae = compile_text, compile_vae
        self.dense_attention, self.compile_backend = dense_attention, compile_backend
        self.fallbacks: dict[str, str] = {}
        self.fp8_layers = 0
        self._first_call: set[str] = set()
        self._attention: list[Attention] | None = None
        super().__init__(engine_dir, manifest, device=device, modules=modules)

    # -- building ------------------------------------------------------------------------------------------
    def _accelerate(self, key: str, model: nn.Module) -> nn.Module:
        from ..models import fast

        if key == "transformer":  # always a copy: its attention flags are set per call
            if self.mode != "eager":
                _claim_compiled_kernel(self.attention_kernel)
            model = fast.share_copy(model)
            if self.fp8_on:
                scales = self.fp8_scales if self.fp8_scales is not None else self._scales("transformer", "fp8")
                self.fp8_layers = fast.fp8_blocks(model, scales, self.fast_accum)
            if self.mode != "eager" and self.lora_bounds:  # lora/adapters.py: LoRA switches recompile nothing
                from ..lora.adapters import reserve

                reserve(model, self.engine_dir, self.manifest, *self.lora_bounds)
            if self.mode == "blocks":
                fast.compile_blocks(model, "reduce-overhead" if self.cuda else None, self.compile_backend)
            elif self.mode == "step":
                fast.compile_blocks(model, None, self.compile_backend)
                model = StepGraph(model, capture=self.cuda)
        elif key == "text_encoder" and self.compile_text:
            from ..models.text_encoder import QwenLayer

            model = fast.share_copy(model)
            fast.compile_regions(model, (QwenLayer,), None, self.compile_backend)
            self._first_call.add(key)
        elif key == "vae_decoder" and self.compile_vae:
            model = fast.share_copy(model)
            model.compile(backend=self.compile_backend, dynamic=False)
            self._first_call.add(key)
        return model

    # -- running -------------------------------------------------------------------------------------------
    def _dense(self, component: str, x: dict[str, torch.Tensor]) -> bool:
        if not self.dense_attention:
            return False
        if component == "transformer":
            return dense_captions(x["cap_lens"], x["cap_states"].shape[1])
        if component == "context_refiner":
            return dense_captions(x["cap_lens"], x["cap_feats"].shape[1])
        return False

    def _set_dense(self, dense: bool) -> None:
        if self._attention is None:
            self._attention = [m for m in self.models["transformer"].modules() if isinstance(m, Attention)]
        for m in self._attention:
            m.dense = dense

    @torch.no_grad()
    def run(self, component, **inputs):
        x = self._cast_inputs(component, inputs)
        model = self.model(component)
        if component in ("transformer", "context_refiner"):
            self._set_dense(self._dense(component, x))
            if self.mode == "blocks" and self.cuda:  # each DiT call is a new step for the per-block graphs
                torch.compiler.cudagraph_mark_step_begin()
        args = [v.to(self.device, non_blocking=True) for v in x.values()]
        key = loader_of(component)
        with attention_kernels(self.attention_kernel if key == "transformer" else "default"):
            if key in self._first_call:
                out = self._first(key, component, model, args)
            else:
                out = model(*args)
        outs = out if isinstance(out, tuple) else (out,)
        if self.mode == "blocks" and key == "transformer":
            # a per-block graph's output (the context's states, reused every step) is overwritten by later replays
            outs = tuple(o.clone() for o in outs)
        specs = self.components[component]["outputs"]
        return {s["name"]: o.to(DTYPES[s["dtype"]]) for s, o in zip(specs, outs)}

    def _first(self, key: str, component: str, model: nn.Module, args: list[torch.Tensor]):
        """A compiled text encoder / VAE decoder's first call; if compiling it fails, undo the compilation, note
        why in `fallbacks` and run eagerly."""
        self._first_call.discard(key)
        try:
            return model(*args)
        except Exception as e:  # noqa: BLE001 - the DiT's numbers matter more than these stages' compilation
            for module in self.models[key].modules():
                module._compiled_call_impl = None
            self.fallbacks[component] = f"compile failed, eager: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
            return model(*args)


def compile_counters() -> dict:
    """What dynamo and inductor did since `reset_compile_counters` (per benchmark row): frames compiled, graphs,
    graph breaks (with the first reasons), recompilations (with the first guard failures), CUDA-graph skips."""
    from torch._dynamo.utils import counters

    guard_failures = getattr(torch._dynamo.utils, "guard_failures", {})
    breaks = counters.get("graph_break", {})
    reasons = [r for rs in guard_failures.values() for r in rs]
    return {
        "frames_total": int(counters["frames"]["total"]), "frames_ok": int(counters["frames"]["ok"]),
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "calls_captured": int(counters["stats"]["calls_captured"]),
        "graph_breaks": int(sum(breaks.values())), "graph_break_reasons": [str(r)[:200] for r in list(breaks)[:3]],
        "recompiles": len(reasons), "recompile_reasons": [str(r)[:200] for r in reasons[:3]],
        "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
    }


def _claim_compiled_kernel(kernel: str) -> None:
    global _compiled_kernel
    if _compiled_kernel not in (None, kernel):
        raise UserError(f"this process has compiled the DiT with attention_kernel={_compiled_kernel!r}; compiled "
                        f"code is shared and keeps its kernel, so attention_kernel={kernel!r} needs "
                        "reset_compile_counters() first (it forgets all compiled code)")
    _compiled_kernel = kernel


def reset_compile_counters() -> None:
    """Forget compiled code and counters (each benchmark row starts from nothing; on-disk caches stay)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    global _compiled_kernel
    _compiled_kernel = None
    torch._dynamo.reset()
    counters.clear()
    getattr(torch._dynamo.utils, "guard_failures", {}).clear()
