"""The embeddable runtime: load a build once, then `generate` from any number of threads.

    from zimage_deploy import ZImageRuntime
    rt = ZImageRuntime("engines/Z-Image-Turbo-rtx4090-bf16")          # the manifest picks the backend
    result = rt.generate("a lighthouse at dusk", seed=7, height=1024, width=1024)
    result.images[0].save("out.png")

Thread safety and memory: a runtime runs at most `max_concurrent` generations at a time (default 1: one
set of activations in memory; the backends' sessions and engines are shared); other callers wait. Each call's
randomness comes from its own seed, so results do not depend on what other threads do. Runtimes hold no
global state: two of them (two builds, or two backends) can live in one process.

Errors: `RequestError` for a request that cannot be served as asked (the caller's fault),
`InternalError` for a failure inside (not the caller's fault).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..errors import InternalError, RequestError, UserError
from .pipeline import initial_latents, open_pipeline, timed


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    timings: dict = field(default_factory=dict)  # seconds per stage: encode, denoise, decode
    latents: torch.Tensor | None = None  # final latents (B, C, h, w), when asked for


class ZImageRuntime:
    def __init__(self, engine_dir: str | Path, backend: str = "auto", cfg_mode: str = "batch",
                 max_concurrent: int = 1, low_vram: bool = False):
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")
        self.pipeline = open_pipeline(engine_dir, backend, cfg_mode, low_vram)
        self.manifest = self.pipeline.manifest
        self.variant = self.manifest["variant"]
        self.backend = self.pipeline.backend.name
        self._slots = threading.BoundedSemaphore(max_concurrent)

    @property
    def defaults(self) -> dict:
        return self.pipeline.defaults

    def generate(self, prompt: str | list[str], *, seed: int | list[int] = 0, steps: int | None = None,
                 height: int | None = None, width: int | None = None, negative_prompt: str | None = None,
                 guidance_scale: float | None = None, cfg_normalization: float = 0.0, cfg_truncation: float = 1.0,
                 images: list[Image.Image] | None = None, mask: Image.Image | None = None, strength: float = 0.6,
                 return_latents: bool = False) -> GenerationResult:
        """One image per prompt. Several prompts with a list of seeds run as one batch, each image the same as
        its own single-prompt call with that seed (text-to-image)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        seeds = [seed] * len(prompts) if isinstance(seed, int) else list(seed)
        if not prompts or len(seeds) != len(prompts):
            raise RequestError(f"{len(prompts)} prompts and {len(seeds)} seeds: give one seed per prompt")
        kwargs = dict(height=height, width=width, steps=steps, negative_prompt=negative_prompt,
                      guidance_scale=guidance_scale, cfg_normalization=cfg_normalization,
                      cfg_truncation=cfg_truncation, progress=False)
        if self.variant == "edit":
            if mask is not None:
                raise RequestError("the Edit variant takes condition images, not a mask")
            kwargs["images"] = images
        else:
            if images and len(images) > 1:
                raise RequestError("img2img / inpainting take one image; several are for Edit builds")
            kwargs.update(image=images[0] if images else None, mask=mask, strength=strength)
        timings: dict = {}
        with self._slots:
            try:
                if self.variant != "edit" and not images and len(prompts) > 1:
                    kwargs["latents"] = self._batch_latents(seeds, height, width)
                if len(prompts) == 1 or "latents" in kwargs:
                    latents = self.pipeline(prompts, seed=seeds[0], output="latent", timings=timings, **kwargs)
                else:  # image-conditioned batches: one call per seed keeps each image reproducible on its own
                    latents = torch.cat([self.pipeline([p], seed=s, output="latent", timings=timings, **kwargs)
                                         for p, s in zip(prompts, seeds)])
                with timed(timings, "decode"):
                    images_out = self.pipeline.decode(latents, "pil")
            except UserError as e:
                raise RequestError(str(e)) from None
            except Exception as e:  # noqa: BLE001 - anything else is ours, not the caller's
                raise InternalError(f"{type(e).__name__}: {e}") from e
        return GenerationResult(images_out, seeds, timings, latents.cpu() if return_latents else None)

    def _batch_latents(self, seeds, height, width) -> torch.Tensor:
        facts, d = self.pipeline.facts, self.pipeline.defaults
        h, w = (height or d["height"]), (width or d["width"])
        self.pipeline.check_size(h, w)
        s = facts["vae_scale_factor"]
        return torch.cat([initial_latents(sd, 1, facts["latent_channels"], h // s, w // s) for sd in seeds])
