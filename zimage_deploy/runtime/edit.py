"""Z-Image-Edit / Omni: image(s) + instruction -> image, reproducing diffusers' `ZImageOmniPipeline`.

condition images -> [vae_encoder (posterior mode), vision_encoder -> siglip_refiner] once per request;
prompt -> segments around the images -> text_encoder -> context_refiner (omni layout) once per prompt;
steps x [transformer (omni layout; x2 with CFG) -> Euler step (-> mask blend)] -> vae_decoder.

Beyond diffusers (which has no strength or mask for Omni): `strength` and `mask` edit the first condition image
in place with the img2img / inpainting rules of runtime/pipeline.py, on its posterior-mode latents (the ones the
DiT is conditioned on); at strength 1 without a mask the sampling is diffusers' Omni pipeline, unchanged.

Difference from diffusers, on purpose: diffusers casts the condition image to bfloat16 before the VAE encoder
whatever the pipeline's dtype (so its float32 pipeline fails); a float32 build here stays float32 there, and
a BF16 build's VAE encoder graph computes in BF16 as diffusers does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from ..buildfolder import BuildFolder
from ..errors import UserError
from ..models.omni import batch_layouts, build_layout
from .images import to_rgb
from .omni import prepare_condition, prepare_mask, prompt_segments
from .pipeline import Pipeline, keep_unmasked, start_step
from .scheduler import FlowMatchEuler
from .timing import timed


class EditPipeline(Pipeline):
    layout = "omni"

    def __init__(self, engine_dir, backend="auto", cfg_mode: str = "batch", low_vram: bool | None = None,
                 torch_mode: str | None = None, torch_options: dict | None = None, offload: str | None = None):
        super().__init__(engine_dir, backend, cfg_mode, low_vram, torch_mode, torch_options, offload)
        from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

        self.siglip_processor = Siglip2ImageProcessorPil.from_pretrained(str(BuildFolder(self.engine_dir).siglip_processor))

    @torch.no_grad()
    def segment_features(self, prompts: list[str], n_images: int) -> list[list[torch.Tensor]]:
        """Text-encoder features of each prompt's caption segments (one text-encoder batch for all)."""
        texts = [seg for p in prompts for seg in prompt_segments(p, n_images)]
        ids, mask = self.tokenizer.tokenize(texts)
        hidden = self.backend.run("text_encoder", input_ids=ids, attention_mask=mask)["hidden_states"].cpu()
        per = len(texts) // len(prompts)
        feats = [hidden[i][mask[i].bool()] for i in range(len(texts))]
        return [feats[i * per:(i + 1) * per] for i in range(len(prompts))]

    @torch.no_grad()
    def condition(self, images: list[Image.Image], height, width):
        """-> VAE latents (C, H/8, W/8) and SigLIP features (Hs, Ws, C) per image, and the last image's size."""
        latents, sig_feats, size = [], [], None
        for image in images:
            sig_image, vae_input, size = prepare_condition(image, self.multiple, height, width)
            mean = self.backend.run("vae_encoder", image=vae_input)["mean"].float().cpu()
            latents.append(((mean - self.facts["vae_shift"]) * self.facts["vae_scaling"])[0])
            inputs = self.siglip_processor(images=[sig_image], return_tensors="pt")
            hs, ws = (int(v) for v in inputs["spatial_shapes"][0])
            hidden = self.backend.run("vision_encoder", pixel_values=inputs["pixel_values"],
                                      pixel_attention_mask=inputs["pixel_attention_mask"],
                                      spatial_shapes=inputs["spatial_shapes"])["hidden_states"].float().cpu()
            sig_feats.append(hidden[0, : hs * ws].reshape(hs, ws, -1))
        return latents, sig_feats, size

    def _states(self, layout: dict) -> dict:
        """Prompt- and image-only parts, once per request: caption and SigLIP refiners."""
        run = self.backend.run
        cap = run("context_refiner", cap_feats=layout["cap_feats"], cap_pad=layout["cap_pad"],
                  cap_pos=layout["cap_pos"], cap_valid=layout["cap_valid"])["cap_states"]
        sig = run("siglip_refiner", sig_feats=layout["sig_feats"], sig_pad=layout["sig_pad"],
                  sig_pos=layout["sig_pos"], sig_valid=layout["sig_valid"])["sig_states"]
        keep = ("cond_patches", "x_pad", "x_pos", "x_noise", "cap_pos", "cap_valid", "cap_noise", "sig_pos",
                "sig_valid", "sig_noise")
        return {**{k: layout[k] for k in keep}, "cap_states": cap, "sig_states": sig}

    def _velocity(self, latents, t, states: dict) -> torch.Tensor:
        return self.backend.run("transformer", latents=latents, timestep=t, **states)["noise_pred"]

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], height: int | None = None, width: int | None = None,
                 steps: int | None = None, seed: int = 0, *, images: list[Image.Image] | None = None,
                 mask: Image.Image | None = None, strength: float | None = None,
                 negative_prompt: str | list[str] | None = None, guidance_scale: float | None = None,
                 cfg_normalization: float = 0.0, cfg_truncation: float = 1.0, progress: bool = True,
                 output: str = "pil", timings: dict | None = None, should_stop=None, **unsupported):
        """`strength` < 1 starts from the first condition image's latents noised to the strength's sigma
        (img2img's rule); `mask` (white = change, the first condition image's size) keeps the unmasked latents
        on that image's noising path after every step (inpainting's rule). With either, the output is the
        first condition image's prepared size; without, the last one's (diffusers' Omni pipeline)."""
        if any(unsupported.get(k) is not None for k in ("image", "latents")):
            raise UserError("the Edit variant takes condition images (images=[...]), not image= or latents=")
        if not images:
            raise UserError("the Edit variant needs at least one condition image (--image)")
        strength = 1.0 if strength is None else float(strength)
        if not 0.0 < strength <= 1.0:
            raise UserError(f"strength must be in (0, 1], got {strength}")
        # RGBA, palette, grayscale, 16-bit, CMYK inputs: as seen, in RGB (the SigLIP processor takes 3 channels of
        # 8 bits)
        images = [to_rgb(im) for im in images]
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        b = len(prompts)
        steps = self.defaults["steps"] if steps is None else steps
        guidance = self.defaults["guidance_scale"] if guidance_scale is None else float(guidance_scale)
        if steps < 1 or guidance < 0:
            raise UserError(f"need steps >= 1 and guidance >= 0, got {steps} and {guidance}")
        do_cfg = guidance > 0
        if negative_prompt is not None and not do_cfg:
            raise UserError("a negative prompt needs classifier-free guidance: pass a guidance scale > 0")
        first = start_step(steps, strength)
        if first >= steps:
            raise UserError(f"strength {strength} with {steps} steps leaves no step to run")

        mask_px = None if mask is None else prepare_mask(mask, images[0], self.multiple, height, width)
        with timed(timings, "encode"):
            cond_latents, sig_feats, (img_h, img_w) = self.condition(images, height, width)
        scale = self.facts["vae_scale_factor"]
        from_image = mask is not None or strength < 1.0  # edits the first condition image in place
        if from_image:
            img_h, img_w = (int(v) * scale for v in cond_latents[0].shape[-2:])
            if (height and height != img_h) or (width and width != img_w):
                raise UserError(f"with a mask or strength < 1 the output is the first condition image's prepared "
                                f"size ({img_w}x{img_h}); got --width {width} --height {height}")
        height, width = img_h if height is None else height, img_w if width is None else width
        self.check_size(height, width)
        h, w = height // scale, width // scale
        gen = torch.Generator("cpu").manual_seed(seed)
        latents = torch.randn((b, self.facts["latent_channels"], h, w), generator=gen, dtype=torch.float32)

        def states_for(texts):
            segs = self.segment_features(texts, len(images))
            lays = [build_layout(s, cond_latents, sig_feats, (h, w), self.facts["siglip_feat_dim"]) for s in segs]
            return lays

        with timed(timings, "encode"):
            pos_lays = states_for(prompts)
            neg_lays = None
            if do_cfg:
                negs = [negative_prompt] * b if isinstance(negative_prompt, str) else (negative_prompt or [""] * b)
                if len(negs) != b:
                    raise UserError(f"{len(negs)} negative prompts for {b} prompts")
                neg_lays = states_for(negs)
            pos = self._states(batch_layouts(pos_lays))
            neg = self._states(batch_layouts(neg_lays)) if do_cfg and self.cfg_mode == "sequential" else None
            both = self._states(batch_layouts(pos_lays + neg_lays)) if do_cfg and self.cfg_mode == "batch" else None

        device = self.backend.device
        sched = FlowMatchEuler(self.scheduler_config, steps, (h // 2) * (w // 2))
        after_step = None
        if from_image:  # the seeded noise above is the noise the first image's latents are noised with
            image_latents, noise = cond_latents[0][None].expand(b, -1, -1, -1).to(device), latents.to(device)
            if strength < 1.0:
                sigma = sched.sigmas[first]
                latents = sigma * noise + (1.0 - sigma) * image_latents
            if mask is not None:
                # nearest down to the latents, as the inpainting path does
                blend = F.interpolate(mask_px, size=(h, w), mode="nearest").to(device)
                after_step = keep_unmasked(sched, steps, image_latents, noise, blend)
        latents = latents.to(device)
        with timed(timings, "denoise"):
            latents = self.denoise(latents, sched, range(first, steps), guidance, cfg_normalization,
                                   cfg_truncation, pos, neg, both, progress, after_step, should_stop)
        with timed(timings, "decode"):
            return self.decode(latents, output)
