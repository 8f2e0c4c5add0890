"""The rules every backend keeps, written once: each backend's test module subclasses `BackendConformance`
(tests/test_backend_registry.py checks every registered backend has such a subclass).

A subclass names its backend (`backend`: its registry name) and may replace `tolerance` (the largest difference
from the reference image, in 8-bit levels) and the `build` fixture (default: the tiny float32 CPU build; TensorRT:
the fake engines of tests/fake_tensorrt.py). What it then passes, against one small request:
- images: diffusers' float32 image of the same request, within `tolerance`;
- errors: bad requests refused with the same RequestError messages, wrong component inputs with the same ValueError;
- LoRAs (backends whose `abilities.lora` is set, as opened): no LoRA is the base image bit for bit after a LoRA run,
  and A then B is B alone bit for bit (a fresh runtime's); otherwise a LoRA request is refused (RequestError);
- batches: prompts grouped into one call up to its `abilities.exact_batch` give each prompt's own image bit for bit,
  larger groups within `tolerance`; more than the build takes at once is refused.

Registry-fed lists for tests that run a case on every backend that can (the hand-kept lists they replace named the
backends): `CPU_BACKENDS` (those that run on this CPU machine) and `LORA_BACKENDS` (of those, the ones applying
run-time LoRAs).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from zimage_deploy.errors import RequestError
from zimage_deploy.runtime.backends import REGISTRY

CPU_BACKENDS = [name for name, entry in REGISTRY.items() if "cpu" in entry.abilities.devices]
LORA_BACKENDS = [name for name in CPU_BACKENDS if REGISTRY[name].abilities.lora]

PROMPT, SEED, H, W, STEPS = "a small red boat on a calm lake", 5, 64, 64, 3
PROMPTS = ("a small red boat on a calm lake", "一座雪山，日出")
BAD = [  # (request keywords, the message every backend gives)
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt=PROMPT, steps=0), "steps must be in"),
    (dict(prompt=PROMPT, height=72), "height must be a positive multiple of 16, got 72"),
    (dict(prompt=PROMPT, seed=-1), "seed must be in 0.."),
    (dict(prompt=PROMPT, strength=0.5), "strength needs an input image"),
]


@functools.lru_cache(maxsize=None)
def reference_image(ckpt: str) -> np.ndarray:
    """diffusers' float32 image of the request (the reference: DESIGN.md "Correctness discipline")."""
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(ckpt, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPT, height=H, width=W, num_inference_steps=STEPS, guidance_scale=0.0,
                 generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    return np.asarray(image).astype(np.int16)


@functools.lru_cache(maxsize=None)
def _lora_files(ckpt: str, folder: str) -> tuple[Path, Path]:
    """Two kohya-format LoRAs over the DiT's attention and feed-forward layers (A: rank 2, B: rank 3)."""
    from diffusers import ZImageTransformer2DModel
    from safetensors.torch import save_file

    dit = ZImageTransformer2DModel.from_pretrained(ckpt, subfolder="transformer", torch_dtype=torch.float32)
    layers = [(n, m) for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear)
              and n.endswith(("attention.to_q", "attention.to_v", "feed_forward.w2"))]
    paths = []
    for seed, rank in ((1, 2), (2, 3)):
        g = torch.Generator().manual_seed(seed)
        sd = {}
        for name, m in layers:
            key = "lora_unet_" + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.3
            sd[f"{key}.lora_up.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.3
            sd[f"{key}.alpha"] = torch.tensor(float(rank))
        paths.append(Path(folder) / f"lora{seed}.safetensors")
        save_file(sd, paths[-1])
    return tuple(paths)


def pixels(result, i: int = 0) -> np.ndarray:
    return np.asarray(result.images[i]).astype(np.int16)


class BackendConformance:
    backend: str = ""
    tolerance = 2

    @pytest.fixture
    def build(self, tiny_fp32):
        return tiny_fp32

    @pytest.fixture
    def open_runtime(self, build):
        from zimage_deploy import ZImageRuntime

        return lambda: ZImageRuntime(build, backend=self.backend)

    @pytest.fixture
    def rt(self, open_runtime):
        return open_runtime()

    def generate(self, rt, **kw):
        return rt.generate(kw.pop("prompt", PROMPT), **{"seed": SEED, "steps": STEPS, "height": H, "width": W, **kw})

    def test_registered(self, rt):
        assert rt.backend == self.backend and self.backend in REGISTRY
        assert type(rt.pipeline.backend) is REGISTRY[self.backend].backend

    def test_image_matches_the_reference(self, rt, tiny_ckpt):
        expected = reference_image(str(tiny_ckpt))
        got = pixels(self.generate(rt))
        assert got.shape == expected.shape == (H, W, 3) and expected.std() > 10
        assert np.abs(got - expected).max() <= self.tolerance

    def test_bad_requests_same_errors(self, rt):
        for kwargs, message in BAD:
            with pytest.raises(RequestError, match=re.escape(message)):
                self.generate(rt, **kwargs)
        with pytest.raises(ValueError, match=r"vae_decoder takes \['latents'\], got \['nope'\]"):
            rt.pipeline.backend.run("vae_decoder", nope=torch.zeros(1, 16, 8, 8))

    def test_loras(self, rt, open_runtime, tiny_ckpt, tmp_path_factory):
        a, b = _lora_files(str(tiny_ckpt), str(tmp_path_factory.mktemp("conformance-loras")))
        try:  # the backend's abilities, the backend as opened (e.g. offloading) and the build (e.g. engines)
            rt.loras.check_supported()
        except RequestError as e:
            with pytest.raises(RequestError, match=re.escape(str(e))):
                self.generate(rt, loras=[(a, 1.0)])
            return
        base = pixels(self.generate(rt))
        with_a = pixels(self.generate(rt, loras=[(a, 0.8)]))
        b_after_a = pixels(self.generate(rt, loras=[(b, 0.8)]))
        assert np.abs(with_a - base).mean() > 1 and np.abs(b_after_a - with_a).mean() > 1  # the LoRAs do something
        assert np.array_equal(pixels(self.generate(rt)), base)  # no LoRA: the base, bit for bit
        assert np.array_equal(pixels(self.generate(open_runtime(), loras=[(b, 0.8)])), b_after_a)  # B alone

    def test_batches(self, rt):
        exact = REGISTRY[self.backend].abilities.exact_batch
        n = min(len(PROMPTS), rt.limits.max_batch)
        seeds = [SEED + i for i in range(n)]
        together = self.generate(rt, prompt=list(PROMPTS[:n]), seed=seeds)
        for i in range(n):
            alone = pixels(self.generate(rt, prompt=PROMPTS[i], seed=seeds[i]))
            if n <= exact:
                assert np.array_equal(pixels(together, i), alone), i
            else:
                assert np.abs(pixels(together, i) - alone).max() <= self.tolerance, i
        too_many = rt.limits.max_batch + 1
        with pytest.raises(RequestError):
            self.generate(rt, prompt=[PROMPT] * too_many, seed=list(range(too_many)))
