"""The Turbo sampling loop over any backend, reproducing diffusers' ZImagePipeline (text-to-image, no CFG).

prompt -> chat template + tokens -> text_encoder -> keep real tokens -> pad to 32 -> context_refiner (once)
       -> N x [transformer -> Euler step] -> vae_decoder -> uint8 image
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .. import manifest as manifest_io
from ..errors import UserError
from .backends import Backend, make_backend
from .prompt import PromptTokenizer, pad_captions
from .scheduler import FlowMatchEuler, SchedulerConfig


def initial_latents(seed: int, batch: int, channels: int, h: int, w: int) -> torch.Tensor:
    """Same seed => same latents as diffusers (CPU generator, float32)."""
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((batch, channels, h, w), generator=g, dtype=torch.float32)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL images, rounding as diffusers' image processor does."""
    arr = (images.float().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


class TurboPipeline:
    def __init__(self, engine_dir: str | Path, backend: str | Backend = "auto"):
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest_io.load(self.engine_dir)
        if self.manifest["variant"] != "turbo":
            raise UserError(f"{engine_dir} holds variant {self.manifest['variant']!r}; this runtime runs turbo")
        missing = [c for c in ("text_encoder", "context_refiner", "transformer", "vae_decoder")
                   if self.manifest["components"].get(c, {}).get("status") != "complete"]
        if missing:
            raise UserError(f"{engine_dir} is not a complete build (missing {missing}): run the build again")
        self.backend = backend if isinstance(backend, Backend) else make_backend(backend, self.engine_dir,
                                                                                  self.manifest)
        self.tokenizer = PromptTokenizer(self.engine_dir / "tokenizer",
                                         self.manifest["defaults"]["max_sequence_length"])
        sched = json.loads((self.engine_dir / "scheduler" / "scheduler_config.json").read_text())
        self.scheduler_config = SchedulerConfig.from_diffusers(sched)
        self.facts = self.manifest["model"]["facts"]

    def check_size(self, height: int, width: int) -> None:
        multiple = self.manifest["defaults"]["resolution_multiple"]
        for name, v in (("height", height), ("width", width)):
            if v <= 0 or v % multiple:
                raise UserError(f"{name} must be a positive multiple of {multiple}, got {v}")

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> context refiner output (B, S, dim) and caption lengths (B,): computed once per prompt."""
        ids, mask = self.tokenizer(prompts)
        hidden = self.backend.run("text_encoder", input_ids=ids, attention_mask=mask)["hidden_states"]
        caps = [hidden[i][mask[i].bool()] for i in range(len(prompts))]
        feats, lens = pad_captions(caps)
        return self.backend.run("context_refiner", cap_feats=feats, cap_lens=lens)["cap_states"], lens

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], height: int | None = None, width: int | None = None,
                 steps: int | None = None, seed: int = 0, latents: torch.Tensor | None = None,
                 progress: bool = True, output: str = "pil"):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        defaults = self.manifest["defaults"]
        height, width = height or defaults["height"], width or defaults["width"]
        steps = steps or defaults["steps"]
        self.check_size(height, width)
        if steps < 1:
            raise UserError(f"steps must be >= 1, got {steps}")
        scale = self.facts["vae_scale_factor"]
        h, w = height // scale, width // scale
        b = len(prompts)
        if latents is None:
            latents = initial_latents(seed, b, self.facts["latent_channels"], h, w)
        latents = latents.to(self.backend.device)

        cap_states, cap_lens = self.encode_prompt(prompts)
        sched = FlowMatchEuler(self.scheduler_config, steps, (h // 2) * (w // 2))
        for i in tqdm(range(steps), desc="denoising", disable=not progress, leave=False):
            velocity = self.backend.run("transformer", latents=latents, timestep=sched.model_timestep(i, b),
                                        cap_states=cap_states, cap_lens=cap_lens)["noise_pred"]
            latents = sched.step(velocity, i, latents)
        if output == "latent":
            return latents
        images = self.backend.run("vae_decoder", latents=latents)["image"].cpu()
        return images if output == "pt" else to_pil(images)
