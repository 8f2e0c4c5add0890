"""The Torch backend: the export-friendly modules, run eagerly or compiled (`torch_mode`).

- "eager": the modules as they are; quantized builds through the emulation of their Q/DQ graphs (models/emulate.py:
  the same scale files, the same arithmetic). The reference every compiled result is checked against.
- "compiled" (the default on CUDA): the DiT's blocks and the text encoder's layers compiled regionally, the VAE
  compiled whole (`torch.compile`, `dynamic=False`); the per-step DiT call captured as one CUDA graph per input
  signature and replayed every step (`StepGraph`; without CUDA the same static buffers run without a graph); FP8
  builds' DiT through real FP8 matmuls (`torch._scaled_mm`) with the build's static scales (models/fast.py
  `FP8Linear`; eager emulates the same scales, so both are checked against each other).
- dense attention (both modes; compiled mode only without caption buckets): the all-zero mask left out when every
  caption key is attended (batch 1, or equal lengths), so SDPA can take its flash kernel.

Production shapes (compiled mode): caption axes are padded to a bounded set of lengths (`caption_buckets`, default
32/64/128/256/512; padded slots are masked keys, so the padding is invisible) and outputs cut back, so every prompt
length of one bucket reuses one compiled graph and one CUDA graph; the CUDA graphs live in a least-recently-used
cache keyed by the input signature (size, bucket, batch), at most `max_graphs`. Bucketed attention always takes the
mask (SDPA's memory-efficient / cuDNN kernels, not flash). `caption_buckets=None`: exact lengths, dense attention at
batch 1 (flash), a compile and a capture per new caption length. Which is faster on a GPU is a measurement owed.

No silent fallback: a compiled call that fails (a compiler error, dynamo's recompile limit, which is raised as an
error here) while the eager module runs the same inputs is logged (`logging.warning`, once per signature) and
counted per component (`fallbacks()`), and that signature runs eagerly from then on; a CUDA graph that cannot be
captured is logged and counted as `transformer.cuda_graph`. An error the eager module raises too is raised.

Every accelerated module is a `share_copy` of the one given or loaded: one set of weights serves several backends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..buildfolder import BuildFolder
from ..components import DIT, loader_of
from ..errors import UserError
from ..export.specs import DTYPES
from ..paths import cache_dir
from ..models.dit import SEQ_MULTIPLE, Attention
from ..models.fast import set_dense_attention
from ..schemes import get_scheme
from .backend import Abilities, Backend
from .offload import offload_policy

log = logging.getLogger(__name__)

TORCH_MODES = ("eager", "compiled")
ATTENTION_KERNELS = ("default", "cudnn")
CAPTION_BUCKETS = (32, 64, 128, 256, 512)
MAX_GRAPHS = 16  # step graphs kept: 5 caption buckets x 3 sizes at batch 1 fit
# dims padded to a bucket: the text encoder's tokens, the caption slots (and the ControlNet hints' caption part)
TEXT_DIMS, CAPTION_DIMS = ("text_len",), ("cap_len", "joint_len")
_compiled_kernel: str | None = None  # the attention kernel this process's compiled DiT code was traced with


def default_torch_mode(device: str | torch.device | None = None) -> str:
    """compiled on CUDA, eager elsewhere (compiling on the CPU works, for checking, but takes long)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return "compiled" if str(device).startswith("cuda") else "eager"


def bucket(n: int, buckets) -> int:
    """The smallest bucket >= n; beyond the largest, n rounded up to a multiple of 32 (never smaller than n)."""
    for b in sorted(buckets or ()):
        if b >= n:
            return b
    return -(-n // SEQ_MULTIPLE) * SEQ_MULTIPLE if buckets else n


def attention_kernels(kernel: str):
    """The context that sets SDPA's kernel order for `kernel` (ATTENTION_KERNELS); every kernel stays allowed, so
    inputs one kernel refuses (a mask, a dtype, the CPU) fall through to the next."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if kernel == "default":
        return contextlib.nullcontext()
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


class StepGraph(nn.Module):
    """The DiT's per-step call as one CUDA graph per input signature (shapes, dtypes, dense attention), at most
    `max_graphs` of them (least recently used out): the first call of a signature warms up (compiles) and captures,
    later calls copy their inputs into the captured static buffers, replay, and return a copy of the static output.

    Without CUDA (`capture=False`) the same static-buffer path runs without a graph, so the buffer handling and the
    cache are checked on the CPU; `captured` counts real CUDA graphs, `replays` the calls, `evicted` the entries
    dropped. A capture that fails leaves that signature running over the same buffers without a graph: logged,
    counted in `capture_failures`, the reason in `capture_error`."""

    def __init__(self, step: nn.Module, capture: bool, max_graphs: int = MAX_GRAPHS, warmup: int = 2,
                 version=None):
        """`version`: a callable whose value is part of the signature (the module's structure: layers swapped
        after a capture, e.g. LoRA branches, then get new graphs instead of stale ones)."""
        super().__init__()
        self.version = version or (lambda: None)
        if max_graphs < 1:
            raise UserError(f"max_graphs must be >= 1, got {max_graphs}")
        self.step = step
        self.capture, self.warmup, self.max_graphs = capture, warmup, max_graphs
        self.graphs: OrderedDict[tuple, tuple] = OrderedDict()
        self.pool = None
        self.captured = self.replays = self.evicted = self.capture_failures = 0
        self.capture_error: str | None = None
        self._attention = [m for m in step.modules() if isinstance(m, Attention)]

    def signature(self, inputs) -> tuple:
        dense = bool(self._attention) and self._attention[0].dense
        return tuple((tuple(x.shape), x.dtype, x.device) for x in inputs) + (dense, self.version())

    def _record(self, static: list[torch.Tensor]):
        if not self.capture:
            return None, self.step(*static)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compilation, autotuning and workspaces happen before the capture
            for _ in range(self.warmup):
                self.step(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.step(*static)
        except Exception as e:  # noqa: BLE001 - e.g. an op that syncs with the host: run without the graph
            torch.cuda.synchronize()
            self.capture_error = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            self.capture_failures += 1
            log.warning("no CUDA graph for the DiT step %s: %s (it runs compiled, without a graph)",
                        [tuple(x.shape) for x in static], self.capture_error)
            return None, self.step(*static)
        self.pool = graph.pool()  # one memory pool for all of this model's graphs
        self.captured += 1
        return graph, out

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = self.signature(inputs)
        entry = self.graphs.get(key)
        if entry is None:
            static = [x.clone() for x in inputs]
            graph, out = self._record(static)
            entry = (graph, static, out)
            self.graphs[key] = entry
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
                self.evicted += 1
        self.graphs.move_to_end(key)
        graph, static, out = entry
        for buf, x in zip(static, inputs):
            buf.copy_(x, non_blocking=True)
        if graph is not None:
            graph.replay()
        else:  # no CUDA graph: the same buffers, run directly
            out.copy_(self.step(*static))
        self.replays += 1
        return out.clone()  # the static output is overwritten by the next replay


def _structure(dit: nn.Module):
    """Which layers the DiT's first block holds now (run-time LoRA branches swap them in): part of the step-graph
    signature, so graphs captured before a swap are not replayed after it."""
    layers = getattr(dit, "layers", None)
    block = layers[0] if layers is not None and len(layers) else None
    return None if block is None else (id(block.attention.qkv), id(block.feed_forward.w13))


def dense_captions(lens: torch.Tensor, seq: int) -> bool:
    """Whether every caption key of a (B, seq) caption batch is attended: each caption padded to 32 fills `seq`.
    Decided only from lengths on the host (a device tensor would need a sync: then the mask stays)."""
    if lens.device.type != "cpu":
        return False
    padded = (lens + (SEQ_MULTIPLE - 1)) // SEQ_MULTIPLE * SEQ_MULTIPLE
    return bool((padded == seq).all())


class TorchBackend(Backend):
    """The Torch backend (see the module docstring). `device`: default cuda when available; `torch_mode`: "eager" or
    "compiled" (default: compiled on CUDA, eager elsewhere); `modules` (loader name -> module already in memory,
    e.g. {"transformer": dit, ...}) replaces loading from the checkpoint. Compiled-mode options: `caption_buckets`,
    `max_graphs` (CUDA graphs kept), `fp8_scales` (static FP8 scales for an unquantized build's DiT, e.g. from
    `models.fast.record_input_amax`; an fp8 build uses its own), `fast_accum` (`_scaled_mm`'s fast accumulation),
    `attention_kernel` ("default" or "cudnn": cuDNN attention first in the DiT), `compile_backend` (torch.compile's
    backend, or a dict loader name -> backend, e.g. {"transformer": "inductor", "vae_decoder": "eager"}: "eager"
    checks dynamo alone, quickly), `dense_attention`, `lora_bounds` ((max_rank, max_loras): the DiT's LoRA branches
    installed before compiling, so no LoRA set recompiles anything; without, they are installed on first LoRA
    use, a recompile then). `offload`: "none" | "model" | "text-encoder-cpu" | "sequential" (runtime/offload.py;
    eager mode only), an OffloadPolicy, or None / "auto": the build's plan's; with an offloading memory mode the
    default torch_mode is eager."""

    name = "torch"
    abilities = Abilities(lora="branch", memory_modes=("none", "model", "text-encoder-cpu", "sequential"),
                          dtypes=("float32", "bfloat16"), devices=("cpu", "cuda"), compile_modes=TORCH_MODES,
                          build_files=("scales",), options=("torch_mode",))
    lora_bounds: tuple[int, int] | None = None  # (max_rank, max_loras): LoRA branches installed before compiling

    def __init__(self, engine_dir, manifest, device: str | None = None, *, torch_mode: str | None = None,
                 modules: dict[str, nn.Module] | None = None, caption_buckets=CAPTION_BUCKETS,
                 max_graphs: int = MAX_GRAPHS, fp8_scales: dict | None = None, fast_accum: bool = False,
                 attention_kernel: str = "default", compile_backend="inductor", dense_attention: bool = True,
                 offload="none", lora_bounds: tuple[int, int] | None = None):
        super().__init__(engine_dir, manifest)
        if lora_bounds is not None:
            self.lora_bounds = tuple(int(b) for b in lora_bounds)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        if torch_mode is None:  # compiled on CUDA, unless the memory mode offloads (that needs eager)
            self.offload = offload_policy(offload, manifest, self.device, False)
            torch_mode = "eager" if self.offload.mode != "none" else default_torch_mode(device)
        else:
            self.offload = offload_policy(offload, manifest, self.device, torch_mode == "compiled")
        if torch_mode not in TORCH_MODES:
            raise UserError(f"torch_mode must be one of {', '.join(TORCH_MODES)}, got {torch_mode!r}")
        if attention_kernel not in ATTENTION_KERNELS:
            raise UserError(f"attention_kernel must be one of {ATTENTION_KERNELS}, got {attention_kernel!r}")
        if max_graphs < 1:
            raise UserError(f"max_graphs must be >= 1, got {max_graphs}")
        self.cuda = self.device.type == "cuda"
        self.torch_mode = torch_mode
        self.compiled = torch_mode == "compiled"
        self.caption_buckets = tuple(sorted(caption_buckets)) if caption_buckets else None
        self.max_graphs, self.fp8_scales, self.fast_accum = max_graphs, fp8_scales, fast_accum
        self.attention_kernel, self.compile_backend = attention_kernel, compile_backend
        self.dense_attention = dense_attention
        self.fp8_layers = 0
        self.models: dict[str, nn.Module] = {}
        self.eager_models: dict[str, nn.Module] = {}  # compiled mode: the uncompiled twin of each compiled module
        self.wrappers: dict[str, nn.Module] = {}
        self.eager_wrappers: dict[str, nn.Module] = {}
        self._fallbacks: dict[str, int] = {}
        self._eager_signatures: set[tuple] = set()
        self._lock = threading.Lock()
        self.ckpt = None
        if self.compiled:
            _compile_config()
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

    def lora_refusal(self) -> str | None:
        if self.offload.mode != "none":  # runtime/offload.py
            return ("run-time LoRAs are not supported by the offloading Torch backend (--low-vram); run without it, "
                    "or fuse the LoRA at build time (build --lora)")
        return None

    def lora_applier(self, targets, max_rank, max_loras):
        """Side branches in fixed buffers beside the DiT's adaptable layers (lora/adapters.py)."""
        from ..lora.adapters import TorchBranches

        self.model("transformer")  # loads the DiT module once (shared by its components)
        model = self.models["transformer"]
        return TorchBranches(getattr(model, "dit", model), targets, max_rank, max_loras)  # dit: StepGraph's

    # the older flags some callers read: compiled mode, real FP8 layers
    @property
    def compile(self) -> bool:
        return self.compiled

    @property
    def fp8(self) -> bool:
        return self.fp8_layers > 0

    # -- building ------------------------------------------------------------------------------------------
    def _scales(self, component: str, scheme: str) -> dict | None:
        from ..scales import load_scales

        q = self._quantization(component)
        return load_scales(BuildFolder(self.engine_dir).file(q.scales))[0] if q and q.scheme == scheme else None

    def _quantization(self, component: str):
        comp = self.manifest.components.get(component)
        return comp.quantization if comp else None

    def _real_fp8(self, component: str) -> bool:
        """Compiled mode runs an fp8 build's DiT through FP8 matmuls with the build's scales (eager emulates them)."""
        q = self._quantization(component)
        return self.compiled and loader_of(component) == DIT and bool(q) and get_scheme(q.scheme).fp8_matmuls

    def _quantized(self, key: str, model: nn.Module) -> nn.Module:
        """Apply the quantization of the build's quantized components served by this module (same scale files,
        same arithmetic as their Q/DQ graphs); FP8 DiTs in compiled mode are swapped in `_accelerate` instead."""
        from ..models.emulate import apply_scales

        for name, comp in self.manifest.components.items():
            q = comp.quantization
            if q and loader_of(name) == key and not self._real_fp8(name):
                apply_scales(model, self._scales(name, q.scheme), q.scheme, q.block or 0)
        return model

    def _accelerate(self, key: str, model: nn.Module) -> nn.Module:
        """Compiled mode: a compiled copy of `model` (its uncompiled twin kept for fallbacks); eager: `model` itself
        (what runs is what was given: calibration observes it)."""
        from ..models import fast

        if not self.compiled or key == "vision_encoder":  # SigLIP (transformers' module) stays eager: see README
            return model
        model = fast.share_copy(model)
        if key == DIT:
            _claim_compiled_kernel(self.attention_kernel)
            scales = self.fp8_scales if self.fp8_scales is not None else self._scales("transformer", "fp8")
            if scales is not None and (self.fp8_scales is not None or self._real_fp8("transformer")):
                self.fp8_layers = fast.fp8_blocks(model, scales, self.fast_accum)
            if self.lora_bounds:  # lora/adapters.py: switching LoRA sets then recompiles nothing
                from ..lora.adapters import reserve

                reserve(model, self.engine_dir, self.manifest, *self.lora_bounds)
            self.eager_models[key] = fast.share_copy(model)  # shares the weights (and any LoRA buffers)
            fast.compile_blocks(model, None, self._compiler(key))
        elif key == "text_encoder":
            from ..models.text_encoder import QwenLayer

            self.eager_models[key] = fast.share_copy(model)
            fast.compile_regions(model, (QwenLayer,), None, self._compiler(key))
        else:  # the VAE's decoder / encoder: compiled whole
            self.eager_models[key] = fast.share_copy(model)
            model.compile(backend=self._compiler(key), dynamic=False)
        return model

    def _compiler(self, key: str):
        backend = self.compile_backend
        return backend.get(key, "inductor") if isinstance(backend, dict) else backend

    def model(self, component: str) -> nn.Module:
        """The component's module, called with the graph's inputs in order (the same wrapper the export traced;
        compiled mode: the transformer's in a StepGraph)."""
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
                wrapper = specs[component].wrap(self.models[key])
                if key in self.eager_models:
                    self.eager_wrappers[component] = specs[component].wrap(self.eager_models[key])
                    if component == "transformer":
                        wrapper = StepGraph(wrapper, capture=self.cuda, max_graphs=self.max_graphs,
                                            version=lambda dit=self.models[key]: _structure(dit))
                self.wrappers[component] = wrapper
            return self.wrappers[component]

    # -- running -------------------------------------------------------------------------------------------
    def _bucketed(self, component: str, x: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """Caption axes padded to their bucket (zeros: masked keys, pad ids) -> (inputs, {output: (axis, cut)})."""
        if not self.caption_buckets:
            return x, {}
        spec = self.components[component]
        grow: dict[str, int] = {}
        for io in spec["inputs"]:
            for axis, dim in enumerate(io["dims"]):
                if dim in TEXT_DIMS + CAPTION_DIMS and dim not in grow:
                    size = x[io["name"]].shape[axis]
                    grow[dim] = bucket(size, self.caption_buckets) - size
        if "cap_len" in grow:
            grow["joint_len"] = grow["cap_len"]
        if not any(grow.values()):
            return x, {}
        out = dict(x)
        for io in spec["inputs"]:
            for axis, dim in enumerate(io["dims"]):
                if grow.get(dim):
                    t = out[io["name"]]
                    pad = [0, 0] * (t.dim() - 1 - axis) + [0, grow[dim]]
                    out[io["name"]] = F.pad(t, pad)
        cuts = {}
        for io in spec["outputs"]:
            for axis, dim in enumerate(io["dims"]):
                if grow.get(dim):
                    cuts[io["name"]] = (axis, grow[dim])
        return out, cuts

    def _dense(self, component: str, x: dict[str, torch.Tensor]) -> bool:
        if not self.dense_attention or (self.compiled and self.caption_buckets):
            return False  # bucketed: one graph per (size, bucket, batch), always masked (see the module docstring)
        if component in ("transformer", "controlnet") and "cap_lens" in x:
            return dense_captions(x["cap_lens"], x["cap_states"].shape[1])
        if component == "context_refiner" and "cap_lens" in x:
            return dense_captions(x["cap_lens"], x["cap_feats"].shape[1])
        return False

    def _set_dense(self, dense: bool) -> None:
        for m in (self.models.get(DIT), self.eager_models.get(DIT)):
            if m is not None:
                set_dense_attention(m, dense)

    @torch.no_grad()
    def run(self, component, **inputs):
        x = self._cast_inputs(component, inputs)
        cuts = {}
        if self.compiled:
            x, cuts = self._bucketed(component, x)
        model = self.model(component)
        key = loader_of(component)
        if key == DIT:
            self._set_dense(self._dense(component, x))
        device = self.offload.device_of(key)  # text-encoder-cpu: the text encoder's inputs stay on the CPU
        args = [v.to(device, non_blocking=True) for v in x.values()]
        try:
            with self.offload.stage(key), attention_kernels(self.attention_kernel if key == DIT else "default"):
                out = self._call(component, model, args)
        finally:
            if key == DIT and not self.compiled:  # eager runs the caller's module: its flags are left as they were
                set_dense_attention(self.models[DIT], False)
        outs = out if isinstance(out, tuple) else (out,)
        specs = self.components[component]["outputs"]
        result = {}
        for s, o in zip(specs, outs):
            if s["name"] in cuts:
                axis, extra = cuts[s["name"]]
                o = o.narrow(axis, 0, o.shape[axis] - extra)
            result[s["name"]] = o.to(self.device, DTYPES[s["dtype"]])  # (a host module's outputs move over)
        return result

    def _call(self, component: str, model: nn.Module, args: list[torch.Tensor]):
        """A compiled call, or the eager twin's where compiling this signature failed (logged and counted)."""
        if component not in self.eager_wrappers:
            return model(*args)
        signature = (component, *((tuple(a.shape), a.dtype) for a in args))
        if signature not in self._eager_signatures:
            try:
                return model(*args)
            except Exception as e:  # noqa: BLE001 - judged below: does the eager module run these inputs?
                error = e
            self._share_lora_branches()
            out = self.eager_wrappers[component](*args)  # raises if the inputs are at fault, not the compiler
            self._eager_signatures.add(signature)
            log.warning("torch backend: the compiled %s failed for inputs %s; it runs eagerly for them from now on "
                        "(%s: %s)", component, [tuple(a.shape) for a in args], type(error).__name__,
                        " ".join(str(error).split())[:300])
            self._count_fallback(component)
            return out
        self._count_fallback(component)
        self._share_lora_branches()
        return self.eager_wrappers[component](*args)

    def _share_lora_branches(self) -> None:
        """The eager twin of the compiled DiT runs the LoRA branches installed on the compiled one after the twin
        was copied (on first LoRA use, without `lora_bounds`): the same branch modules, so it follows every switch.
        (Branches reserved before compiling are in the twin already, their buffers shared.)"""
        from ..models.lora_branch import LoraBranch, branches

        compiled, twin = self.models.get(DIT), self.eager_models.get(DIT)
        if compiled is None or twin is None:
            return
        compiled, twin = getattr(compiled, "dit", compiled), getattr(twin, "dit", twin)  # as lora/runtime.py finds it
        for name, branch in branches(compiled).items():
            if not isinstance(twin.get_submodule(name), LoraBranch):
                parent, _, attr = name.rpartition(".")
                setattr(twin.get_submodule(parent) if parent else twin, attr, branch)

    def _count_fallback(self, component: str) -> None:
        with self._lock:
            self._fallbacks[component] = self._fallbacks.get(component, 0) + 1

    def fallbacks(self) -> dict[str, int]:
        """Component -> calls that ran eagerly although compiled mode is on (and `transformer.cuda_graph`: step
        signatures without a CUDA graph). Empty in eager mode and when everything ran compiled."""
        out = dict(self._fallbacks)
        step = self.wrappers.get("transformer")
        if isinstance(step, StepGraph) and step.capture_failures:
            out["transformer.cuda_graph"] = step.capture_failures
        return out

    def graph_stats(self) -> dict:
        """The step-graph cache: entries, bound, captured CUDA graphs, replays, evictions."""
        step = self.wrappers.get("transformer")
        if not isinstance(step, StepGraph):
            return {}
        return {"entries": len(step.graphs), "max_graphs": step.max_graphs, "captured": step.captured,
                "replays": step.replays, "evicted": step.evicted, "cuda_graphs": step.capture}


def compile_cache_dir() -> Path:
    """Where compiled code persists across processes: $TORCHINDUCTOR_CACHE_DIR when set, else the toolkit's cache
    folder (paths.py: $ZIMAGE_DEPLOY_CACHE) / torch-compile. Inductor's FX graph cache and AOT autograd cache (on by
    default) keep the generated kernels there, so a restarted process traces (dynamo) but does not compile again."""
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or cache_dir() / "torch-compile")


def _compile_config() -> None:
    """The compile cache folder (before anything compiles in this process: inductor reads it once); dynamo's
    recompile limit raised (buckets x sizes x batches stay below it) and made an error, so hitting it is a counted
    fallback, never dynamo's silent switch to eager."""
    import torch._dynamo

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, 64)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 1024)
    cfg.fail_on_recompile_limit_hit = True


def compile_counters() -> dict:
    """What dynamo and inductor did since `reset_compile_counters`: frames compiled, graphs, graph breaks (with the
    first reasons), recompilations (with the first guard failures), CUDA-graph skips."""
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
