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
from ..errors import UserError
from ..variants import get_variant
from .backends import Backend, backend_entry, make_backend, resolve_backend
from .images import preprocess_image, preprocess_mask, to_pil
from .prompt import PromptTokenizer, pad_captions
from .scheduler import FlowMatchEuler, SchedulerConfig
from .timing import timed

CFG_MODES = ("batch", "sequential")


class GenerationCancelled(Exception):
    """Raised between denoising steps (and before decoding) once the caller's `should_stop()` is true."""


def initial_latents(seed: int, batch: int, channels: int, h: int, w: int) -> torch.Tensor:
    """Same seed => same latents as diffusers (CPU generator, float32)."""
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((batch, channels, h, w), generator=g, dtype=torch.float32)


def start_step(steps: int, strength: float) -> int:
    """First step of img2img / inpainting, computed as diffusers does (float arithmetic included)."""
    init = min(steps * strength, steps)
    return int(max(steps - init, 0))


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

    def check_size(self, height: int, width: int) -> None:
        for name, v in (("height", height), ("width", width)):
            if v <= 0 or v % self.multiple:
                raise UserError(f"{name} must be a positive multiple of {self.multiple}, got {v}")

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

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], height: int | None = None, width: int | None = None,
                 steps: int | None = None, seed: int = 0, *, negative_prompt: str | list[str] | None = None,
                 guidance_scale: float | None = None, cfg_normalization: float = 0.0, cfg_truncation: float = 1.0,
                 image: Image.Image | None = None, mask: Image.Image | None = None, strength: float = 0.6,
                 latents: torch.Tensor | None = None, progress: bool = True, output: str = "pil",
                 timings: dict | None = None, should_stop=None, control_image: Image.Image | None = None,
                 controlnet_scale: float | None = None):
        """Generate images. `latents` (B, C, h, w) replaces the seeded initial noise (text-to-image only);
        `timings`, if a dict, receives seconds per stage (encode, denoise, decode; with a control image also
        controlnet, its share of denoise); `should_stop`, a callable, is asked between steps and before decoding: when
        true, GenerationCancelled is raised. `control_image` (ControlNet builds; `controlnet_scale` default 0.75):
        with `image` and `mask`, an inpainting ControlNet's inputs instead of img2img / inpainting."""
        control_inputs = None
        if control_image is not None or controlnet_scale is not None:
            from ..controlnet import DEFAULT_SCALE
            from .control import check_control

            check_control(self.facts, control_image, image, mask)
            cn_scale = DEFAULT_SCALE if controlnet_scale is None else float(controlnet_scale)
            control_inputs, image, mask = (control_image, image, mask, cn_scale), None, None
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        b = len(prompts)
        steps = self.defaults["steps"] if steps is None else steps
        guidance = self.defaults["guidance_scale"] if guidance_scale is None else float(guidance_scale)
        if steps < 1:
            raise UserError(f"steps must be >= 1, got {steps}")
        if guidance < 0:
            raise UserError(f"guidance scale must be >= 0, got {guidance}")
        do_cfg = guidance > 0
        if negative_prompt is not None and not do_cfg:
            raise UserError("a negative prompt needs classifier-free guidance: pass a guidance scale > 0")
        if mask is not None and image is None:
            raise UserError("inpainting needs --image as well as --mask")
        if image is not None:
            if not 0.0 < strength <= 1.0:
                raise UserError(f"strength must be in (0, 1], got {strength}")
            if "vae_encoder" not in self.manifest["components"]:
                raise UserError(f"{self.engine_dir} has no vae_encoder graph (needed for --image): rebuild it")
            init = preprocess_image(image, self.multiple)
            img_h, img_w = init.shape[-2:]
            if (height and height != img_h) or (width and width != img_w):
                raise UserError(f"with an input image the output is the image's size ({img_w}x{img_h}, "
                                f"rounded down to {self.multiple}); got --width {width} --height {height}")
            height, width = img_h, img_w
        height = self.defaults["height"] if height is None else height
        width = self.defaults["width"] if width is None else width
        self.check_size(height, width)
        scale = self.facts["vae_scale_factor"]
        h, w = height // scale, width // scale
        device = self.backend.device

        with timed(timings, "encode"):
            pos = self.encode_prompt(prompts)
            if control_inputs is not None:  # the control image, VAE-encoded once per request
                from .control import Control, control_latents

                cimg, img, msk, cscale = control_inputs
                pos.control = Control(control_latents(self, cimg, height, width, img, msk).to(device), cscale,
                                      timings)
            neg = both = None
            if do_cfg:
                negs = [negative_prompt] * b if isinstance(negative_prompt, str) else (negative_prompt or [""] * b)
                if len(negs) != b:
                    raise UserError(f"{len(negs)} negative prompts for {b} prompts")
                neg = self.encode_prompt(negs)
                neg.control = pos.control
                both = _cat_prompts(pos, neg) if self.cfg_mode == "batch" else None

        sched = FlowMatchEuler(self.scheduler_config, steps, (h // 2) * (w // 2))
        first = 0
        gen = torch.Generator("cpu").manual_seed(seed)
        image_latents = noise = blend = None
        if image is not None:
            first = start_step(steps, strength)
            if first >= steps:
                raise UserError(f"strength {strength} with {steps} steps leaves no step to run")
            enc = self.backend.run("vae_encoder", image=init)
            mean, std = enc["mean"].float().cpu(), enc["std"].float().cpu()
            sample = mean + std * torch.randn(mean.shape, generator=gen, dtype=torch.float32)
            vae = self.facts
            image_latents = ((sample - vae["vae_shift"]) * vae["vae_scaling"]).repeat(b, 1, 1, 1)
            noise = torch.randn((b, self.facts["latent_channels"], h, w), generator=gen, dtype=torch.float32)
            sigma = sched.sigmas[first]
            latents = sigma * noise + (1.0 - sigma) * image_latents
            if mask is not None:
                m = preprocess_mask(mask, image, self.multiple)
                blend = F.interpolate(m, size=(h, w), mode="nearest").to(device)
            image_latents, noise = image_latents.to(device), noise.to(device)
        elif latents is None:
            latents = torch.randn((b, self.facts["latent_channels"], h, w), generator=gen, dtype=torch.float32)
        elif tuple(latents.shape) != (b, self.facts["latent_channels"], h, w):
            raise UserError(f"latents of shape {tuple(latents.shape)} for a {b} x {height}x{width} request")
        latents = latents.to(device)

        with timed(timings, "denoise"):
            latents = self.denoise(latents, sched, range(first, steps), guidance, cfg_normalization,
                                   cfg_truncation, pos, neg, both, progress,
                                   keep_unmasked(sched, steps, image_latents, noise, blend)
                                   if blend is not None else None, should_stop)
        with timed(timings, "decode"):
            return self.decode(latents, output)

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
