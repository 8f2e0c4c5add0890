"""The embeddable runtime: load a build once, then `generate` from any number of threads.

    from zimage_deploy import ZImageRuntime
    rt = ZImageRuntime("engines/Z-Image-Turbo-rtx4090-bf16")          # the manifest picks the backend
    result = rt.generate("a lighthouse at dusk", seed=7, height=1024, width=1024)
    result.images[0].save("out.png")

Thread safety and memory: a runtime runs at most `max_concurrent` generations at a time (default 1: one
set of activations in memory; the backends' sessions and engines are shared); other callers wait. Each call's
randomness comes from its own seed, so results do not depend on what other threads do. Runtimes hold no
global state: two of them (two builds, or two backends) can live in one process.

Requests are checked by runtime/validate.py (`check_request`, the same rules and messages as the CLI and the
server) before anything runs: `self.limits` holds the build's limits, `check(...)` checks a request without
running it.

Errors: `RequestError` for a request that cannot be served as asked (the caller's fault; `TooLarge` and
`BadInput` are its 413 / 400 kinds), `InternalError` for a failure inside (not the caller's fault),
`GenerationCancelled` when `cancel` (a threading.Event or a callable) turned true: it is checked between
denoising steps and before decoding.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from ..errors import InternalError, RequestError, UserError
from ..lora.runtime import LoraManager
from .open import open_pipeline
from .pipeline import GenerationCancelled, initial_latents
from .timing import timed
from .torch_fast import TORCH_MODES  # noqa: F401 - the serve command's --torch-mode choices
from .validate import Limits, Request, check_pil_images, check_request

__all__ = ["GenerationCancelled", "GenerationResult", "ZImageRuntime"]


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    timings: dict = field(default_factory=dict)  # seconds per stage: encode, denoise, decode
    latents: torch.Tensor | None = None  # final latents (B, C, h, w), when asked for


class ZImageRuntime:
    def __init__(self, engine_dir: str | Path, backend: str = "auto", cfg_mode: str = "batch",
                 max_concurrent: int = 1, low_vram: bool | None = None, torch_mode: str | None = None,
                 torch_options: dict | None = None, offload: str = "auto", ort_providers: list[str] | None = None):
        """`torch_mode` (Torch backend): "eager" or "compiled" (None: compiled on CUDA, eager on the CPU);
        `torch_options`: more of its options (runtime/torch_fast.py TorchBackend), e.g. {"max_graphs": 16};
        `offload`: the memory mode, "auto" (the build's VRAM plan's), "none", "model", "text-encoder-cpu" or
        "sequential" (runtime/offload.py; UserError where the backend cannot run it); `ort_providers` (ONNX Runtime
        backend): its execution providers in order of preference, from those the installed onnxruntime offers
        (None: the CPU's)."""
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")
        if ort_providers is not None:  # the backend options travel with the Torch ones (make_backend sorts them)
            torch_options = {**(torch_options or {}), "ort_providers": ort_providers}
        self.pipeline = open_pipeline(engine_dir, backend, cfg_mode, low_vram, torch_mode, torch_options, offload)
        self.torch_mode = getattr(self.pipeline.backend, "torch_mode", None)
        self.manifest = self.pipeline.manifest
        self.variant = self.manifest["variant"]
        self.backend = self.pipeline.backend.name
        self.limits = self.pipeline.limits
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self.loras = LoraManager.for_pipeline(self.pipeline)  # run-time LoRAs (lora/runtime.py): prepare, cache bounds

    @property
    def defaults(self) -> dict:
        return self.pipeline.defaults

    def check(self, prompt: str | list[str], *, seed: int | list[int] = 0, steps: int | None = None,
              height: int | None = None, width: int | None = None, negative_prompt: str | None = None,
              guidance_scale: float | None = None, cfg_normalization: float = 0.0, cfg_truncation: float = 1.0,
              images: list | None = None, mask=None, strength: float | None = None,
              limits: Limits | None = None, control_image=None, controlnet_scale: float | None = None) -> Request:
        """Check a request as `generate` would, without running it -> the normalised Request, or RequestError.
        `images` / `mask` / `control_image` may be PIL images or validate.ImageInfo sizes (e.g. from
        `validate.probe_image`)."""
        return check_request(limits or self.limits, prompt, seed=seed, steps=steps, height=height, width=width,
                             negative_prompt=negative_prompt, guidance_scale=guidance_scale,
                             cfg_normalization=cfg_normalization, cfg_truncation=cfg_truncation, images=images,
                             mask=mask, strength=strength, control_image=control_image,
                             controlnet_scale=controlnet_scale)

    def generate(self, prompt: str | list[str], *, seed: int | list[int] = 0, steps: int | None = None,
                 height: int | None = None, width: int | None = None, negative_prompt: str | None = None,
                 guidance_scale: float | None = None, cfg_normalization: float = 0.0, cfg_truncation: float = 1.0,
                 images: list[Image.Image] | None = None, mask: Image.Image | None = None,
                 strength: float | None = None, return_latents: bool = False, cancel=None,
                 limits: Limits | None = None, loras=None, control_image: Image.Image | None = None,
                 controlnet_scale: float | None = None) -> GenerationResult:
        """One image per prompt. Several prompts with a list of seeds run as one batch, each image the same as
        its own single-prompt call with that seed (text-to-image). `strength` (img2img / inpainting; default
        0.6) needs an image; on Edit builds `strength` (default 1) and `mask` edit the first condition image.
        `cancel`: a threading.Event or a callable; once it is true the call stops between steps (or before
        decoding) and raises GenerationCancelled. `limits` replaces `self.limits` (a server's
        tighter budgets). `loras`: [(path, scale), ...] applied for this call only (or a set from
        `self.loras.prepare`). `control_image` (ControlNet builds, resized to the output size) and
        `controlnet_scale` (default 0.75): the ControlNet's input; with an inpainting ControlNet, `images` and
        `mask` condition it too."""
        check_pil_images(images, mask, control_image)
        req = self.check(prompt, seed=seed, steps=steps, height=height, width=width,
                         negative_prompt=negative_prompt, guidance_scale=guidance_scale,
                         cfg_normalization=cfg_normalization, cfg_truncation=cfg_truncation, images=images,
                         mask=mask, strength=strength, limits=limits, control_image=control_image,
                         controlnet_scale=controlnet_scale)
        return self.run(req, images=images, mask=mask, return_latents=return_latents, cancel=cancel, loras=loras,
                        control_image=control_image)

    def run(self, req: Request, images: list[Image.Image] | None = None, mask: Image.Image | None = None,
            return_latents: bool = False, cancel=None, loras=None,
            control_image: Image.Image | None = None) -> GenerationResult:
        """Run a Request from `check` (with the images it was checked with)."""
        lora_set = self.loras.prepare(loras)  # RequestError for a LoRA this build cannot take
        should_stop = cancel.is_set if isinstance(cancel, threading.Event) else cancel
        timings: dict = {}
        with self._slots, contextlib.ExitStack() as lora_scope:
            try:
                lora_scope.enter_context(self.loras.use(lora_set))
                if should_stop is not None and should_stop():
                    raise GenerationCancelled("cancelled before it started")
                latents = self._sample(req, images, mask, control_image, timings, should_stop)
                with timed(timings, "decode"):
                    images_out = self.pipeline.decode(latents, "pil")
            except (GenerationCancelled, InternalError):
                raise
            except UserError as e:
                raise RequestError(str(e)) from None
            except Exception as e:  # noqa: BLE001 - anything else is ours, not the caller's
                raise InternalError(f"{type(e).__name__}: {e}") from e
        return GenerationResult(images_out, list(req.seeds), timings, latents.cpu() if return_latents else None)

    def _sample(self, req: Request, images, mask, control_image, timings: dict, should_stop) -> torch.Tensor:
        """The request's latents, each image the same as its own single-prompt request with its seed: a
        text-to-image batch in one call from each seed's noise, an image-conditioned one in one call per seed."""
        run = functools.partial(self.pipeline.run, images=images, mask=mask, control_image=control_image,
                                output="latent", progress=False, timings=timings, should_stop=should_stop)
        if req.batch == 1:
            return run(req)
        if not images:
            return run(req, latents=self._batch_latents(req))
        return torch.cat([run(replace(req, prompts=(p,), seeds=(s,))) for p, s in zip(req.prompts, req.seeds)])

    def warmup(self, sizes: list[tuple[int, int]]) -> dict:
        """Compile and capture before serving (runtime/warmup.py): for each (height, width), one 1-step request
        per caption bucket of the compiled Torch backend, with CFG where the variant uses it, and img2img where the
        build can; other backends: one request per size. Later requests of those sizes then neither compile nor
        capture. RequestError for a size the build does not take. -> what ran: sizes, requests, seconds, the
        backend's graph cache and fallbacks."""
        from .warmup import warm_up

        for h, w in sizes:
            self.check("warm-up", height=h, width=w)
        return warm_up(self, [(int(h), int(w)) for h, w in sizes])

    def fallbacks(self) -> dict[str, int]:
        """Component -> calls that ran eagerly although the compiled Torch mode is on (each also logged as a
        warning); empty for other backends and modes."""
        fallbacks = getattr(self.pipeline.backend, "fallbacks", None)
        return fallbacks() if callable(fallbacks) else {}

    def _batch_latents(self, req: Request) -> torch.Tensor:
        (h, w), channels = self.pipeline.latent_size(req), self.pipeline.facts["latent_channels"]
        return torch.cat([initial_latents(seed, 1, channels, h, w) for seed in req.seeds])
