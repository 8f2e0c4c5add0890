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
from ..errors import InternalError
from ..models.omni import batch_layouts, build_layout
from .images import to_rgb
from .omni import prepare_condition, prepare_mask, prompt_segments
from .pipeline import Pipeline, keep_unmasked
from .scheduler import start_step
from .timing import timed
from .validate import Request


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
    def run(self, req: Request, images: list[Image.Image] | None = None, mask: Image.Image | None = None,
            control_image: Image.Image | None = None, *, latents: torch.Tensor | None = None, progress: bool = True,
            output: str = "pil", timings: dict | None = None, should_stop=None):
        """`strength` < 1 starts from the first condition image's latents noised to the strength's sigma
        (img2img's rule); `mask` (white = change, the first condition image's size) keeps the unmasked latents
        on that image's noising path after every step (inpainting's rule). With either, the output is the
        first condition image's prepared size; without, the last one's (diffusers' Omni pipeline)."""
        self._checked_inputs(req, images, mask, control_image, latents)
        if latents is not None:
            raise InternalError("the Edit pipeline draws its initial noise from the seed (latents= is text-to-image's)")
        # RGBA, palette, grayscale, 16-bit, CMYK inputs: as seen, in RGB (the SigLIP processor takes 3 channels of
        # 8 bits)
        images = [to_rgb(im) for im in images]
        h_given, w_given = req.sizes_given  # the condition resize rule depends on the size as given
        with timed(timings, "encode"):
            cond_latents, sig_feats, last = self.condition(images, h_given, w_given)
        # a mask or a strength below 1 edits the first condition image in place
        from_image = mask is not None or (req.strength is not None and req.strength < 1.0)
        first_size = tuple(int(v) * self.facts["vae_scale_factor"] for v in cond_latents[0].shape[-2:])
        if (req.height, req.width) != (first_size if from_image else (h_given or last[0], w_given or last[1])):
            raise InternalError(f"the condition images prepare to another output size than the request was checked "
                                f"for ({req.width}x{req.height})")
        h, w = self.latent_size(req)
        gen = torch.Generator("cpu").manual_seed(req.seeds[0])
        noise = torch.randn((req.batch, self.facts["latent_channels"], h, w), generator=gen, dtype=torch.float32)
        with timed(timings, "encode"):
            pos, neg, both = self._encode(req, cond_latents, sig_feats, (h, w))
        sched = self.scheduler(req)
        first, latents, after_step = 0, noise, None
        if from_image:  # the seeded noise is the noise the first image's latents are noised with
            first, latents, after_step = self._from_image(req, sched, cond_latents[0], noise, mask, images[0])
        with timed(timings, "denoise"):
            latents = self.denoise(latents.to(self.backend.device), sched, range(first, req.steps),
                                   req.guidance_scale, req.cfg_normalization, req.cfg_truncation, pos, neg, both,
                                   progress, after_step, should_stop)
        with timed(timings, "decode"):
            return self.decode(latents, output)

    def _encode(self, req: Request, cond_latents, sig_feats, hw):
        """-> the refined states of the prompts, the negative ones (CFG, sequential) and both (CFG, one batch)."""
        def layouts(texts):
            return [build_layout(s, cond_latents, sig_feats, hw, self.facts["siglip_feat_dim"])
                    for s in self.segment_features(texts, len(cond_latents))]

        pos_lays = layouts(list(req.prompts))
        if req.guidance_scale <= 0:
            return self._states(batch_layouts(pos_lays)), None, None
        neg_lays = layouts([req.negative_prompt or ""] * req.batch)
        if self.cfg_mode == "batch":
            return self._states(batch_layouts(pos_lays)), None, self._states(batch_layouts(pos_lays + neg_lays))
        return self._states(batch_layouts(pos_lays)), self._states(batch_layouts(neg_lays)), None

    def _from_image(self, req: Request, sched, image_latents, noise, mask, first_image):
        """-> the first step, the initial latents and the step hook of an edit of the first condition image."""
        device = self.backend.device
        image_latents, noise = image_latents[None].expand(req.batch, -1, -1, -1).to(device), noise.to(device)
        strength = 1.0 if req.strength is None else req.strength
        first, latents, after_step = start_step(req.steps, strength), noise, None
        if strength < 1.0:
            sigma = sched.sigmas[first]
            latents = sigma * noise + (1.0 - sigma) * image_latents
        if mask is not None:  # nearest down to the latents, as the inpainting path does
            h_given, w_given = req.sizes_given
            mask_px = prepare_mask(mask, first_image, self.multiple, h_given, w_given)
            blend = F.interpolate(mask_px, size=noise.shape[-2:], mode="nearest").to(device)
            after_step = keep_unmasked(sched, req.steps, image_latents, noise, blend)
        return first, latents, after_step
