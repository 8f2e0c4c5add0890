"""Tiny Z-Image ControlNets for tests and demos, written with diffusers' own `ZImageControlNetModel`: a diffusers
folder (`save_pretrained`), a single `.safetensors` in the released Union format (the model's own keys, no config),
or a whole `ZImageControlNetPipeline` checkpoint with its `controlnet/` folder.

`init="default"` keeps diffusers' initialisation: its before/after projections are zero, so every hint is zero and
the ControlNet changes nothing (the scale cannot matter); `init="random"` (the default) randomises every weight the
way tiny.py does, so hints are large and scale-dependent.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .fsutil import atomic_dir, atomic_file
from .tiny import TINY_DIT, _randomize


def make_controlnet(transformer: dict | None = None, control_layers_places=(0,), control_refiner_layers_places=(),
                    control_in_dim: int = 16, add_control_noise_refiner: str | None = None, init: str = "random",
                    seed: int = 0):
    """A diffusers ZImageControlNetModel for the transformer config `transformer` (default: the tiny one)."""
    from diffusers import ZImageControlNetModel

    if init not in ("random", "default"):
        raise ValueError(f"init must be 'random' or 'default', not {init!r}")
    dit = {**TINY_DIT, **(transformer or {})}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ZImageControlNetModel(
            control_layers_places=list(control_layers_places),
            control_refiner_layers_places=list(control_refiner_layers_places), control_in_dim=control_in_dim,
            add_control_noise_refiner=add_control_noise_refiner, all_patch_size=tuple(dit["all_patch_size"]),
            all_f_patch_size=tuple(dit["all_f_patch_size"]), dim=dit["dim"], n_refiner_layers=dit["n_refiner_layers"],
            n_heads=dit["n_heads"], n_kv_heads=dit["n_kv_heads"], norm_eps=dit["norm_eps"], qk_norm=dit["qk_norm"])
    if init == "random":
        _randomize(model, torch.Generator().manual_seed(seed + 1000))
    return model.eval()


def write_controlnet(out: Path, transformer: dict | None = None, single_file: bool = False,
                     zero_refiner: bool = False, **kwargs) -> Path:
    """Write a ControlNet (see `make_controlnet` for the config and `init`) to `out`: a diffusers folder, or with
    `single_file` one .safetensors of the model's own weights (the released format). `zero_refiner` (single file,
    "control_layers" kind): add a control_noise_refiner whose projections are zero, as the Union 2.0 file has."""
    from safetensors.torch import save_file

    model = make_controlnet(transformer, **kwargs)
    out = Path(out)
    if not single_file:
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
        return out
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if zero_refiner:
        extra = make_controlnet(transformer, **{**kwargs, "add_control_noise_refiner": "control_noise_refiner"})
        for k, v in extra.state_dict().items():
            if k.startswith("control_noise_refiner."):
                state[k] = torch.zeros_like(v) if "_proj." in k else v.contiguous()
    with atomic_file(out, suffix=".safetensors") as tmp:
        save_file(state, str(tmp))
    return out


def write_controlnet_pipeline(out: Path, base: Path, **kwargs) -> Path:
    """A ZImageControlNetPipeline checkpoint: the base checkpoint's components and a ControlNet (`make_controlnet`
    kwargs, for the base's transformer config) in its `controlnet/` folder."""
    from diffusers import ZImageControlNetPipeline, ZImagePipeline

    base_pipe = ZImagePipeline.from_pretrained(base, dtype=torch.float32)
    transformer = {k: v for k, v in base_pipe.transformer.config.items() if not k.startswith("_")}
    controlnet = make_controlnet(transformer, **kwargs)
    pipe = ZImageControlNetPipeline(scheduler=base_pipe.scheduler, vae=base_pipe.vae,
                                    text_encoder=base_pipe.text_encoder, tokenizer=base_pipe.tokenizer,
                                    transformer=base_pipe.transformer, controlnet=controlnet)
    out = Path(out)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out
