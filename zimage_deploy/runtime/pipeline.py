"""One sampling loop over any backend, reproducing diffusers' Z-Image pipelines:
text-to-image (`ZImagePipeline`, Turbo and Base), with classifier-free guidance when `guidance_scale > 0`
(Base), img2img (`ZImageImg2ImgPipeline`) and inpainting (`ZImageInpaintPipeline`).

prompt -> chat template + tokens -> text_encoder -> keep real tokens -> pad to 32 -> context_refiner (once)
       -> [image -> vae_encoder -> noised latents] -> steps x [transformer (x2 with CFG) -> Euler step
       (-> inpaint blend)] -> vae_decoder -> uint8 image

Random numbers are drawn from one CPU generator in diffusers' order (VAE posterior sample, then noise), so the
same seed gives the same image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .. import manifest as manifest_io
from ..buildfolder import BuildFolder
from ..errors import InternalError, RequestError, UserError
from ..variants import get_variant
from .backends import Backend, backend_entry, make_backend, resolve_backend
from .images import preprocess_image, preprocess_mask, to_pil
from .prompt import PromptTokenizer, pad_captions
from .scheduler import FlowMatchEuler, SchedulerConfig, start_step
from .timing import timed
from .validate import Limits, Request, check_pil_images, check_request

CFG_MODES = ("batch", "sequential")


class GenerationCancelled(Exception):
    """Raised between denoising steps (and before decoding) once the caller's `should_stop()` is true."""


def initial_latents(seed: int, batch: int, channels: int, h: int, w: int) -> torch.Tensor:
    """Same seed => same latents as diffusers (CPU generator, float32)."""
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((batch, channels, h, w), generator=g, dtype=torch.float32)


def keep_unmasked(sched, steps: int, image_latents, noise, blend):
    """Inpainting's `after_step`: after each step the unmasked latents (blend 0) are put back on the image's own
    noising path (the image latents noised to the next step's sigma; the image latents themselves after the
    last step), as diffusers' inpainting pipelines do; the masked ones (blend 1) keep the sampled values."""

    def after_step(i, latents):
        proper = image_latents
        if i < steps - 1:
            s = sched.sigmas[i + 1]
            proper = s * noise + (1.0 - s) * image_latents
        return (1 - blend) * proper + blend * latents

    return after_step


@dataclass
class Prompt:
    states: torch.Tensor  # (B, S, dim) context refiner output
    lens: torch.Tensor  # (B,)
    control: object = None  # runtime/control.py Control: the request's ControlNet input, if any


def _cat_prompts(a: Prompt, b: Prompt) -> Prompt:
    """One batch of two prompt sets: caption axes padded to the longer (padding is masked out)."""
    s = max(a.states.shape[1], b.states.shape[1])
    pad = lambda x: F.pad(x, (0, 0, 0, s - x.shape[1]))  # noqa: E731
    return Prompt(torch.cat([pad(a.states), pad(b.states)]), torch.cat([a.lens, b.lens]), a.control)


class Pipeline:
    layout = "basic"  # the variants (Variant.layout) this sampling loop runs

    def __init__(self, engine_dir: str | Path, backend: str | Backend = "auto", cfg_mode: str = "batch",
                 low_vram: bool | None = None, torch_mode: str | None = None, torch_options: dict | None = None,
                 offload: str | None = None):
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest_io.load(self.engine_dir)
        variant = get_variant(self.manifest.variant)
        if variant.layout != self.layout:
            raise UserError(f"{engine_dir} holds variant {self.manifest.variant!r}; {type(self).__name__} runs "
                            f"the {self.layout} sequence layout's variants (use open_pipeline)")
        comps = self.manifest.components
        rejected = [c for c in variant.required if c in comps and comps[c].status == "rejected"]
        if rejected:
            raise UserError(f"{engine_dir}: components {rejected} were rejected by the build's "
                            f"{comps[rejected[0]].extra.get('rejected_by', 'quality gate')} check; rebuild")
        missing = [c for c in variant.required if c not in comps or not comps[c].complete]
        if missing:
            raise UserError(f"{engine_dir} is not a complete build (missing {missing}): run the build again")
        if cfg_mode not in CFG_MODES:
            raise UserError(f"cfg_mode must be one of {CFG_MODES}")
        self.cfg_mode = cfg_mode
        from .verify import verify_build  # every file the pipeline and its backend read, before the first use

        abilities = backend.abilities if isinstance(backend, Backend) else \
            backend_entry(resolve_backend(backend, self.manifest)).abilities
        verify_build(self.engine_dir, self.manifest, abilities.build_files)
        self.backend = backend if isinstance(backend, Backend) else make_backend(
            backend, self.engine_dir, self.manifest, low_vram, torch_mode, offload=offload, **(torch_options or {}))
        self.tokenizer = PromptTokenizer(BuildFolder(self.engine_dir).tokenizer,
                                         self.manifest.defaults.max_sequence_length)
        sched = json.loads((BuildFolder(self.engine_dir).scheduler / "scheduler_config.json").read_text())
        self.scheduler_config = SchedulerConfig.from_diffusers(sched)
        self.facts = self.manifest.model.facts
        self.defaults = self.manifest["defaults"]
        self.multiple = self.defaults["resolution_multiple"]
        self.limits = Limits.for_build(self.manifest, self.backend.name, cfg_mode)  # what `check` accepts

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Prompt:
        """Context refiner output for each prompt: computed once per prompt, not once per step."""
        ids, mask = self.tokenizer(prompts)
        hidden = self.backend.run("text_encoder", input_ids=ids, attention_mask=mask)["hidden_states"]
        keep = mask.bool().to(hidden.device)
        feats, lens = pad_captions([hidden[i][keep[i]] for i in range(len(prompts))])
        return Prompt(self.backend.run("context_refiner", cap_feats=feats, cap_lens=lens)["cap_states"], lens)

    def _velocity(self, latents, t, prompt: Prompt) -> torch.Tensor:
        extra = {}
        if "controlnet" in self.manifest["components"]:  # the transformer of a ControlNet build takes its hints
            from .control import step_hints

            extra["hints"] = step_hints(self, latents, t, prompt.states, prompt.lens, prompt.control)
        return self.backend.run("transformer", latents=latents, timestep=t, cap_states=prompt.states,
                                cap_lens=prompt.lens, **extra)["noise_pred"]

    def _guided(self, latents, t, pos: Prompt, neg: Prompt, both: Prompt | None, scale: float, norm: float):
        """pos + g (pos - neg), optionally renormalised to at most `norm` x |pos| per sample (diffusers' rules)."""
        b = latents.shape[0]
        if both is not None:  # one batch-2B call
            out = self._velocity(torch.cat([latents, latents]), torch.cat([t, t]), both)
            v_pos, v_neg = out[:b].float(), out[b:].float()
        else:  # two calls
            v_pos, v_neg = self._velocity(latents, t, pos).float(), self._velocity(latents, t, neg).float()
        preds = []
        for p, n in zip(v_pos, v_neg):
            pred = p + scale * (p - n)
            if norm and norm > 0.0:
                max_norm = torch.linalg.vector_norm(p) * norm
                new_norm = torch.linalg.vector_norm(pred)
                if new_norm > max_norm:
                    pred = pred * (max_norm / new_norm)
            preds.append(pred)
        return torch.stack(preds)

    def check(self, prompt, *, seed=0, images=None, mask=None, control_image=None, **fields) -> Request:
        """A request checked against this build's limits (runtime/validate.py, the rules and messages of every
        front end) with its images as PIL images -> Request, or RequestError."""
        check_pil_images(images, mask, control_image)
        return check_request(self.limits, prompt, seed=seed, images=images, mask=mask, control_image=control_image,
                             **fields)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], height: int | None = None, width: int | None = None,
                 steps: int | None = None, seed: int = 0, *, negative_prompt: str | None = None,
                 guidance_scale: float | None = None, cfg_normalization: float = 0.0, cfg_truncation: float = 1.0,
                 images: list[Image.Image] | None = None, mask: Image.Image | None = None,
                 strength: float | None = None, control_image: Image.Image | None = None,
                 controlnet_scale: float | None = None, progress: bool = True, output: str = "pil",
                 timings: dict | None = None, should_stop=None):
        """Generate images: the request is checked (`check`: RequestError with the validator's message), then
        `run`. One `seed` for the batch (its random numbers come from one generator; ZImageRuntime.generate takes
        one seed per prompt). `images`: img2img / inpainting (one image, with `mask`), Edit (condition images);
        `control_image` (ControlNet builds): with `images` and `mask`, an inpainting ControlNet's inputs."""
        if isinstance(seed, (list, tuple)):
            raise RequestError("a pipeline call takes one seed for the batch (ZImageRuntime.generate takes one per "
                               "prompt)")
        req = self.check(prompt, seed=seed, steps=steps, height=height, width=width, negative_prompt=negative_prompt,
                         guidance_scale=guidance_scale, cfg_normalization=cfg_normalization,
                         cfg_truncation=cfg_truncation, images=images, mask=mask, strength=strength,
                         control_image=control_image, controlnet_scale=controlnet_scale)
        return self.run(req, images, mask, control_image, progress=progress, output=output, timings=timings,
                        should_stop=should_stop)

    @torch.no_grad()
    def run(self, req: Request, images: list[Image.Image] | None = None, mask: Image.Image | None = None,
            control_image: Image.Image | None = None, *, latents: torch.Tensor | None = None, progress: bool = True,
            output: str = "pil", timings: dict | None = None, should_stop=None):
        """Sample a checked Request (`check`, or validate.check_request with these images' sizes) as one batch,
        its random numbers from one generator seeded with the first seed. `latents` (B, C, h, w) replaces the
        initial noise (text-to-image only); `timings`, if a dict, receives seconds per stage (encode, denoise,
        decode; with a control image also controlnet, its share of denoise); `should_stop`, a callable, is asked
        between steps and before decoding: when true, GenerationCancelled is raised."""
        images = self._checked_inputs(req, images, mask, control_image, latents)
        with timed(timings, "encode"):
            pos, neg, both = self._encode(req, images, mask, control_image, timings)
        sched = self.scheduler(req)
        first, latents, after_step = self._start(req, sched, images, mask, latents)
        with timed(timings, "denoise"):
            latents = self.denoise(latents.to(self.backend.device), sched, range(first, req.steps),
                                   req.guidance_scale, req.cfg_normalization, req.cfg_truncation, pos, neg, both,
                                   progress, after_step, should_stop)
        with timed(timings, "decode"):
            return self.decode(latents, output)

    @staticmethod
    def _checked_inputs(req: Request, images, mask, control_image, latents) -> list:
        """The images `run` got are the ones the request was checked with (InternalError otherwise) -> the list."""
        images = list(images or [])
        if (len(images), mask is not None, control_image is not None) != (req.images, req.mask, req.control_image):
            raise InternalError(f"the request was checked with {req.images} image(s), mask {req.mask}, control image "
                                f"{req.control_image}; run got {len(images)}, {mask is not None}, "
                                f"{control_image is not None}")
        if latents is not None and req.strength is not None:
            raise InternalError("latents replace the initial noise of text-to-image requests only")
        return images

    def latent_size(self, req: Request) -> tuple[int, int]:
        scale = self.facts["vae_scale_factor"]
        return req.height // scale, req.width // scale

    def scheduler(self, req: Request) -> FlowMatchEuler:
        h, w = self.latent_size(req)
        return FlowMatchEuler(self.scheduler_config, req.steps, (h // 2) * (w // 2))

    def _encode(self, req: Request, images, mask, control_image, timings):
        """-> the prompts' states (with the ControlNet's input), the negative ones and both as one batch (CFG)."""
        pos = self.encode_prompt(list(req.prompts))
        if control_image is not None:  # VAE-encoded once per request
            from .control import Control, control_latents

            image = images[0] if images else None
            pos.control = Control(control_latents(self, control_image, req.height, req.width, image, mask)
                                  .to(self.backend.device), req.controlnet_scale, timings)
        if req.guidance_scale <= 0:
            return pos, None, None
        neg = self.encode_prompt([req.negative_prompt or ""] * req.batch)
        neg.control = pos.control
        return pos, neg, _cat_prompts(pos, neg) if self.cfg_mode == "batch" else None

    def _start(self, req: Request, sched, images, mask, latents):
        """-> the first step, the initial latents, the step hook: seeded noise (or `latents`), or img2img's noised
        image latents (inpainting: with the hook that keeps the unmasked ones)."""
        (b, c), (h, w) = (req.batch, self.facts["latent_channels"]), self.latent_size(req)
        gen = torch.Generator("cpu").manual_seed(req.seeds[0])
        if req.strength is None:  # text-to-image (a ControlNet's images condition the ControlNet only)
            if latents is None:
                return 0, torch.randn((b, c, h, w), generator=gen, dtype=torch.float32), None
            if tuple(latents.shape) != (b, c, h, w):
                raise InternalError(f"latents of shape {tuple(latents.shape)} for a {b} x {req.height}x{req.width} "
                                    "request")
            return 0, latents, None
        first = start_step(req.steps, req.strength)
        init = preprocess_image(images[0], self.multiple)
        if tuple(init.shape[-2:]) != (req.height, req.width):
            raise InternalError(f"the image prepares to {tuple(init.shape[-2:])}, the request was checked for "
                                f"{(req.height, req.width)}")
        enc = self.backend.run("vae_encoder", image=init)
        mean, std = enc["mean"].float().cpu(), enc["std"].float().cpu()
        sample = mean + std * torch.randn(mean.shape, generator=gen, dtype=torch.float32)
        image_latents = ((sample - self.facts["vae_shift"]) * self.facts["vae_scaling"]).repeat(b, 1, 1, 1)
        noise = torch.randn((b, c, h, w), generator=gen, dtype=torch.float32)
        sigma = sched.sigmas[first]
        latents = sigma * noise + (1.0 - sigma) * image_latents
        if mask is None:
            return first, latents, None
        device = self.backend.device
        blend = F.interpolate(preprocess_mask(mask, images[0], self.multiple), size=(h, w), mode="nearest")
        return first, latents, keep_unmasked(sched, req.steps, image_latents.to(device), noise.to(device),
                                             blend.to(device))

    def denoise(self, latents, sched, steps, guidance, cfg_normalization, cfg_truncation, pos, neg, both,
                progress, after_step=None, should_stop=None):
        """The step loop: velocity (guided when `guidance > 0`, with diffusers' truncation rule), Euler step,
        then `after_step(i, latents)` if given; `should_stop()` is asked before each step and after the last."""
        b = latents.shape[0]
        for i in tqdm(steps, desc="denoising", disable=not progress, leave=False):
            if should_stop is not None and should_stop():
                raise GenerationCancelled(f"cancelled before step {i + 1}")
            t = sched.model_timestep(i, b)
            g = guidance
            if g > 0 and cfg_truncation is not None and float(cfg_truncation) <= 1 and float(t[0]) > cfg_truncation:
                g = 0.0
            if g > 0:
                velocity = self._guided(latents, t, pos, neg, both, g, cfg_normalization)
            else:
                velocity = self._velocity(latents, t, pos)
            latents = sched.step(velocity, i, latents)
            if after_step is not None:
                latents = after_step(i, latents)
        if should_stop is not None and should_stop():
            raise GenerationCancelled("cancelled before decoding")
        return latents

    def decode(self, latents, output: str = "pil"):
        if output == "latent":
            return latents
        images = self.backend.run("vae_decoder", latents=latents)["image"].cpu()
        return images if output == "pt" else to_pil(images)
