"""build --target cpu --precision fp32, then generate: the image equals diffusers' ZImagePipeline float32 image."""

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline
from PIL import Image

from backend_conformance import CPU_BACKENDS
from zimage_deploy import build, generate

CASES = [  # (checkpoint, prompt, height, width, steps, seed)
    ("tiny", "a red fox in the snow, watercolor", 128, 192, 8, 1),
    ("tiny", "一只在雨中奔跑的小狗，电影感，高细节", 176, 96, 8, 2),
    ("alt", "a lighthouse on a cliff at dusk", 96, 160, 4, 3),
    ("alt", "山水画：远山、小桥、流水", 128, 128, 8, 4),
]


@pytest.fixture(scope="module")
def builds(tiny_ckpt, alt_ckpt, tmp_path_factory):
    out = {}
    for name, ckpt in (("tiny", tiny_ckpt), ("alt", alt_ckpt)):
        d = tmp_path_factory.mktemp(f"build-{name}")
        assert build.main(["--model", str(ckpt), "--target", "cpu", "--precision", "fp32", "--out", str(d)]) == 0
        out[name] = (ckpt, d)
    return out


def diffusers_image(ckpt, prompt, h, w, steps, seed):
    pipe = ZImagePipeline.from_pretrained(ckpt, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return np.asarray(pipe(prompt, height=h, width=w, num_inference_steps=steps, guidance_scale=0.0,
                           generator=torch.Generator("cpu").manual_seed(seed)).images[0]).astype(np.int16)


@pytest.mark.parametrize("which,prompt,h,w,steps,seed", CASES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_generate_matches_diffusers(builds, backend, which, prompt, h, w, steps, seed, tmp_path):
    ckpt, engine_dir = builds[which]
    out = tmp_path / "out.png"
    argv = ["--engine-dir", str(engine_dir), "--prompt", prompt, "--seed", str(seed), "--steps", str(steps),
            "--height", str(h), "--width", str(w), "--backend", backend, "--output", str(out)]
    assert generate.main(argv) == 0
    got = np.asarray(Image.open(out)).astype(np.int16)
    expected = diffusers_image(ckpt, prompt, h, w, steps, seed)
    assert got.shape == expected.shape == (h, w, 3)
    assert expected.std() > 10, "reference image is flat: the comparison would prove little"
    assert np.abs(got - expected).max() <= 2


def test_other_seed_differs(builds, tmp_path):
    """The comparison above can fail: a different seed gives a clearly different image."""
    ckpt, engine_dir = builds["tiny"]
    out = tmp_path / "out.png"
    assert generate.main(["--engine-dir", str(engine_dir), "--prompt", "a cat", "--seed", "5", "--height", "64",
                          "--width", "64", "--backend", "onnxruntime", "--output", str(out)]) == 0
    got = np.asarray(Image.open(out)).astype(np.int16)
    assert np.abs(got - diffusers_image(ckpt, "a cat", 64, 64, 8, 6)).max() > 2
