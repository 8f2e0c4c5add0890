"""The quantize stage's calibration of the build's own models: the text encoder on the prompts, then the DiT (and a
ControlNet's branch) in the real sampling loop behind the text encoder as deployed. Imported by the stage only when
there is data to calibrate on (it loads the model code, the runtime and its pipelines)."""

from __future__ import annotations

import gc

import torch

from ..buildfolder import BuildFolder
from ..controlnet import loader_kwargs as controlnet_kwargs, sample_request
from ..export.specs import DTYPES
from ..lora.fuse import loader_kwargs
from ..models.emulate import apply_scales
from ..models.load import load_dit, load_text_encoder, load_vae_encoder, load_vision_encoder
from ..runtime.backends import TorchBackend
from ..runtime.omni import prompt_segments
from ..runtime.open import PIPELINES
from ..runtime.prompt import PromptTokenizer
from ..schemes import get_scheme
from ..variants import get_variant
from .calibrate import CachedText, attention_modules, calibrate, plan_layers, sampling_loop, text_encoder_loop


@torch.no_grad()
def calibrate_models(job, manifest: dict, todo: dict[str, str], cal) -> dict[str, dict]:
    """modelopt calibration of the text encoder (prompts) and the DiT (the sampling loop, behind the text encoder
    as deployed; the omni layout's with `cal.images`, edit_inputs.CalibrationImages). `todo`: component ->
    scheme; `cal`: stage.Calibration. Returns component -> scales for the components calibrated from data."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[manifest["components"]["transformer"]["compute_dtype"]]
    job.log(f"[quantize] calibrating on {device} ({str(dtype).replace('torch.', '')}), {len(cal.prompts)} prompts")
    te = load_text_encoder(job.ckpt, dtype).to(device)
    tok = PromptTokenizer(BuildFolder(job.out).tokenizer, manifest["defaults"]["max_sequence_length"])
    scales = {}
    if "text_encoder" in todo:
        scales.update(_text_encoder(te, tok, todo["text_encoder"], job.quant, cal, device))
    if "transformer" in todo and get_scheme(todo["transformer"]).needs_data(job.quant.int4_method):
        # the text encoder's outputs first (as deployed, quantized or not), then the DiT alone in memory
        cfg = manifest["defaults"]["guidance_scale"] > 0
        text = TorchBackend(job.out, manifest, device=device, torch_mode="eager", modules={"text_encoder": te})
        cache = CachedText.encode(text, _text_batches(tok, cal.prompts, cfg, cal.images))
        del text
        del te
        gc.collect()  # modelopt's wrappers form reference cycles: free the text encoder before the DiT loads
        scales["transformer"] = _dit(job, manifest, todo, cal, cache, dtype, device)
        if "controlnet" in todo:  # one module, one set of scales: the shared noise refiner quantized alike
            scales["controlnet"] = scales["transformer"]
    return scales


def _text_encoder(te, tok, scheme: str, opts, cal, device) -> dict[str, dict]:
    """The text encoder's scales from the prompts ({} for a round-to-nearest scheme, whose scales are applied to
    `te`: the DiT is still calibrated behind the text encoder it will be deployed with)."""
    layers = plan_layers(te, scheme, opts.exclude, cal.block)
    if get_scheme(scheme).needs_data(opts.int4_method):
        batches = _text_batches(tok, cal.prompts, False, cal.images, 8)
        return {"text_encoder": calibrate(te, scheme, layers, cal.block, opts.int4_method,
                                          text_encoder_loop(batches, device))}
    apply_scales(te, _rtn_scales(te, layers, scheme, cal.block), scheme, cal.block)
    return {}


def _dit(job, manifest: dict, todo: dict[str, str], cal, cache, dtype, device) -> dict:
    """The DiT's scales from the sampling loop, its text encoder outputs read from `cache`."""
    opts, scheme = job.quant, todo["transformer"]
    dit = load_dit(job.ckpt, dtype, **loader_kwargs(job.out, manifest, "transformer"),  # LoRAs fused
                   **controlnet_kwargs(manifest, "transformer")).to(device)  # and the ControlNet's branch
    # only the per-step graphs' layers: the context refiner (once per prompt) is its own, unquantized graph; the
    # ControlNet's branch (its own graph, sharing the noise refiner) is calibrated in the same loop, with control
    # images, when it is quantized too
    skip = ("context_refiner", "siglip_refiner") + (() if "controlnet" in todo else ("control.",))
    layers = plan_layers(dit, scheme, opts.exclude, cal.block, skip_prefixes=skip)
    attention = attention_modules(dit, opts.exclude, skip) \
        if get_scheme(scheme).calibrates_activations and opts.fp8_attention else []
    modules = {"transformer": dit}
    if manifest.get("controlnet") or cal.images is not None:  # control / condition images are VAE-encoded
        modules["vae_encoder"] = load_vae_encoder(job.ckpt, dtype).to(device)
        if cal.images is not None:  # and condition images go through the SigLIP tower (as deployed: unquantized)
            modules["vision_encoder"] = load_vision_encoder(job.ckpt, dtype).to(device)
    backend = CachedText(TorchBackend(job.out, manifest, device=device, torch_mode="eager", modules=modules), cache)
    facts = manifest["model"]["facts"]
    pipe = PIPELINES[get_variant(manifest["variant"]).layout](job.out, backend)
    requests = cal.images.request if cal.images is not None else lambda i: sample_request(facts, i, cal.side)
    loop = sampling_loop(pipe, cal.prompts, cal.side, opts.calib_steps, requests)
    return calibrate(dit, scheme, layers, cal.block, opts.int4_method, loop, attention)


def _text_batches(tok, prompts: list[str], cfg: bool, images=None, per: int = 1) -> list[tuple]:
    """The text encoder's inputs the sampling loop asks for, batch by batch: `per` prompts (and CFG's empty
    negative) in the chat template; the omni layout's: each prompt's caption segments around its condition
    images, tokenized together as the Edit pipeline does (runtime/edit.py segment_features)."""
    if images is None:
        texts = prompts + ([""] if cfg else [])
        return [tok(texts[i:i + per]) for i in range(0, len(texts), per)]
    batches = []
    for i, p in enumerate(prompts):
        n = len(images.request(i)["images"])
        batches += [tok.tokenize(prompt_segments(t, n)) for t in [p] + ([""] if cfg else [])]
    return batches


def _rtn_scales(model, layers, scheme, block) -> dict[str, torch.Tensor]:
    modules, kind = dict(model.named_modules()), get_scheme(scheme)
    return {f"{n}.weight_amax": kind.weight_amax(modules[n].weight, block).cpu() for n in layers}
