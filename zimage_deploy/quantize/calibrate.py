"""Calibration with nvidia-modelopt.

modelopt inserts its quantizers into our Torch modules (the scheme's modelopt config, schemes.py: max calibration
for FP8 and NVFP4; activation-aware AWQ search for INT4), the real sampling loop runs over the calibration prompts,
and the scales it found are saved to a small safetensors file per component. The graph rewrite (qdq.py) reads that
file: calibration never needs the ONNX graph, and the graph rewrite never needs the Torch model (so a real-size graph
is quantized one tensor at a time).

The scale files and their keys: zimage_deploy/scales.py.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import threading
import warnings
import torch
from tqdm import tqdm

from ..errors import UserError
from ..models.dit import Attention
from ..models.layers import Linear
from ..runtime.backend import Backend
from ..schemes import get_scheme


def modelopt():
    """modelopt's quantization package, with our Linear registered as a quantizable linear layer."""
    try:
        mtq = _import_on_a_clean_stack("modelopt.torch.quantization")
        from modelopt.torch.quantization.nn import QuantModuleRegistry
        from modelopt.torch.quantization.nn.modules.quant_linear import _QuantLinear
    except ImportError:
        raise UserError("quantization needs nvidia-modelopt: pip install 'zimage-deploy[quantize]'") from None
    if Linear not in QuantModuleRegistry:  # a subclass of nn.Linear is not converted unless registered
        QuantModuleRegistry.register({Linear: "zimage_deploy.Linear"})(_QuantLinear)
    if Attention not in QuantModuleRegistry:
        QuantModuleRegistry.register({Attention: "zimage_deploy.Attention"})(_quant_attention())
    return mtq


def _import_on_a_clean_stack(name: str):
    """Import `name` from a short-lived thread. Importing modelopt leaves one of its import frames alive, and with
    it every frame below (their locals included): imported from the calibration code, that kept whole models in
    memory after use (a real-size text encoder beside the DiT). A fresh thread's stack holds nothing of ours."""
    result: dict = {}

    def run():
        try:
            with warnings.catch_warnings():  # modelopt warns about untested transformers versions on import
                warnings.simplefilter("ignore")
                result["module"] = importlib.import_module(name)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = e

    thread = threading.Thread(target=run, name=f"import {name}")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["module"]


def _quant_attention():
    """modelopt module for the DiT's attention: quantizers on the BMM inputs q, k, v (the softmax output gets a
    fixed scale in the graph, its range being [0, 1])."""
    from modelopt.torch.quantization.nn import QuantModule, TensorQuantizer

    class _QuantAttention(QuantModule):
        def _setup(self):
            for x in "qkv":
                setattr(self, f"{x}_bmm_quantizer", TensorQuantizer())

        def attend(self, q, k, v, key_bias):
            return super().attend(self.q_bmm_quantizer(q), self.k_bmm_quantizer(k), self.v_bmm_quantizer(v),
                                  key_bias)

    return _QuantAttention


def plan_layers(model: torch.nn.Module, scheme: str, exclude, block: int, skip_prefixes=()) -> list[str]:
    """Linear modules to quantize: not excluded, not under `skip_prefixes`, and (INT4, NVFP4) whole blocks wide."""
    width = get_scheme(scheme).layer_width(block)
    return [name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not name.startswith(tuple(skip_prefixes))
            and not any(e in name for e in exclude) and not m.in_features % width]


def attention_modules(model: torch.nn.Module, exclude, skip_prefixes=()) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, Attention)
            and not n.startswith(tuple(skip_prefixes)) and not any(e in n for e in exclude)]


def calibrate(model: torch.nn.Module, scheme: str, layers: list[str], block: int, int4_method: str,
              forward_loop, attention=()) -> dict[str, torch.Tensor]:
    """Insert modelopt quantizers into `model` (in place: it stays fake-quantized), run `forward_loop(model)`,
    and return the scales (keys as in the module docstring)."""
    mtq = modelopt()
    with contextlib.redirect_stdout(io.StringIO()):  # modelopt prints its progress; ours is the tqdm bar
        mtq.quantize(model, get_scheme(scheme).modelopt_config(layers, block, int4_method, attention), forward_loop)
    return collect_scales(model, layers, scheme, block, attention)


def collect_scales(model, layers, scheme: str, block: int, attention=()) -> dict[str, torch.Tensor]:
    modules, kind = dict(model.named_modules()), get_scheme(scheme)
    scales = {}
    for name in attention:
        for x in "qkv":
            amax = getattr(modules[name], f"{x}_bmm_quantizer").amax
            if amax is None:
                raise UserError(f"no calibration data reached the attention of {name}")
            scales[f"{name}.{x}_bmm_amax"] = amax.detach().float().cpu().reshape(())
    for name in layers:
        m = modules[name]
        amax = m.weight_quantizer.amax
        if amax is None:
            raise UserError(f"calibration left no weight scale for {name}")
        amax = amax.detach().float().cpu()
        scales[f"{name}.weight_amax"] = kind.collected_weight_amax(amax, m.out_features, m.in_features, block)
        iq = m.input_quantizer
        if kind.calibrates_activations:
            if iq.amax is None:
                raise UserError(f"no calibration data reached {name}: is it used by the sampling loop?")
            scales[f"{name}.input_amax"] = iq.amax.detach().float().cpu().reshape(())
        pqs = getattr(iq, "pre_quant_scale", None)
        if pqs is not None:
            scales[f"{name}.pre_quant_scale"] = pqs.detach().float().cpu().flatten()
    return {k: v.contiguous().clamp(min=1e-12) for k, v in scales.items()}


# -- the forward loops --------------------------------------------------------------------------------------

def text_encoder_loop(batches: list[tuple[torch.Tensor, torch.Tensor]], device):
    """Calibration loop of the text encoder: (input_ids, attention_mask) batches, as the pipeline encodes them."""
    def loop(model):
        for ids, mask in tqdm(batches, desc="calibrating text_encoder", unit="batch", leave=False):
            model(ids.to(device), mask.to(device))
    return loop


class CachedText(Backend):
    """A backend that answers `text_encoder` from outputs computed beforehand and hands every other component to
    `inner`: the DiT is calibrated without the text encoder in memory (peak = the larger model, not the sum)."""

    def __init__(self, inner: Backend, cache: dict):
        super().__init__(inner.engine_dir, inner.manifest)
        self.inner, self.cache, self.device = inner, cache, inner.device

    @staticmethod
    def key(input_ids: torch.Tensor) -> tuple:
        return tuple(input_ids.shape), input_ids.cpu().numpy().tobytes()

    @classmethod
    @torch.no_grad()
    def encode(cls, text_backend, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
        """`batches`: (input_ids, attention_mask) as the sampling loop will send them."""
        cache = {}
        for ids, mask in tqdm(batches, desc="text encoder outputs", unit="batch", leave=False):
            cache[cls.key(ids)] = text_backend.run("text_encoder", input_ids=ids, attention_mask=mask)
        return cache

    def run(self, component, **inputs):
        if component == "text_encoder":
            return self.cache[self.key(inputs["input_ids"])]
        return self.inner.run(component, **inputs)


def sampling_loop(pipe, prompts: list[str], side: int, steps: int | None = None, extra=None):
    """Calibration loop of the DiT: the real sampling loop (text encoder, context refiner, every denoising step,
    with guidance where the variant uses it) over each prompt, seed = its index; `extra(i)`: more request arguments
    for prompt i (a ControlNet build's control images, an Edit build's condition images)."""
    def loop(_model):
        for i, p in enumerate(tqdm(prompts, desc="calibrating transformer", unit="prompt", leave=False)):
            pipe(p, height=side, width=side, steps=steps, seed=i, output="latent", progress=False,
                 **(extra(i) if extra else {}))
    return loop
