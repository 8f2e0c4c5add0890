"""Flow-matching Euler scheduler, reproducing diffusers' FlowMatchEulerDiscreteScheduler as Z-Image uses it
(custom sigmas `linspace(1, 1/N, N)`, static `shift` or resolution-dependent exponential shifting, Euler step)
without depending on diffusers at run time."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    shift: float = 3.0
    use_dynamic_shifting: bool = False
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "SchedulerConfig":
        unsupported = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                                   "invert_sigmas", "stochastic_sampling", "shift_terminal") if cfg.get(k)]
        if cfg.get("time_shift_type", "exponential") != "exponential":
            unsupported.append("time_shift_type")
        if unsupported:
            raise ValueError(f"unsupported scheduler options: {unsupported}")
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in cfg.items() if k in names})


def calculate_shift(seq_len: int, cfg: SchedulerConfig) -> float:
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    return seq_len * m + (cfg.base_shift - m * cfg.base_image_seq_len)


class FlowMatchEuler:
    """`timesteps` (N,) float32 in [0, 1000] and `sigmas` (N + 1,) ending in 0, as diffusers computes them."""

    def __init__(self, cfg: SchedulerConfig, steps: int, image_seq_len: int):
        if steps < 1:
            raise ValueError("steps must be >= 1")
        sigmas = torch.linspace(1.0, 1.0 / steps, steps).numpy().astype(np.float32)
        if cfg.use_dynamic_shifting:
            mu = calculate_shift(image_seq_len, cfg)
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
        else:
            sigmas = cfg.shift * sigmas / (1 + (cfg.shift - 1) * sigmas)
        sig = torch.from_numpy(np.asarray(sigmas)).to(torch.float32)
        self.timesteps = sig * cfg.num_train_timesteps
        self.sigmas = torch.cat([sig, torch.zeros(1)])
        self.num_train_timesteps = cfg.num_train_timesteps

    def model_timestep(self, i: int, batch: int) -> torch.Tensor:
        """What the DiT takes at step i: (1000 - t) / 1000, as the pipeline computes it (float32)."""
        t = self.timesteps[i].expand(batch)
        return (self.num_train_timesteps - t) / self.num_train_timesteps

    def step(self, velocity: torch.Tensor, i: int, latents: torch.Tensor) -> torch.Tensor:
        dt = self.sigmas[i + 1] - self.sigmas[i]
        return (latents.float() + dt * velocity.float()).to(torch.float32)


def start_step(steps: int, strength: float) -> int:
    """First step of img2img / inpainting, computed as diffusers does (float arithmetic included)."""
    init = min(steps * strength, steps)
    return int(max(steps - init, 0))
