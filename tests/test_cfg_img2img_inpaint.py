"""Base (CFG, negative prompt, normalisation, truncation), img2img and inpainting: the runtime's images equal
diffusers' float32 images within 2/255 (ONNX Runtime and Torch backends)."""

import numpy as np
import pytest
import torch
from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline, ZImagePipeline
from PIL import Image

from backend_conformance import CPU_BACKENDS
from conftest import synthetic_image
from zimage_deploy import generate
from zimage_deploy.cli import run_cli
from zimage_deploy.runtime.pipeline import Pipeline


def as_array(image):
    return np.asarray(image).astype(np.int16)


def check_close(got, expected):
    got, expected = as_array(got), as_array(expected)
    assert got.shape == expected.shape
    assert expected.std() > 10, "reference image is flat: the comparison would prove little"
    assert np.abs(got - expected).max() <= 2


def reference(cls, ckpt):
    pipe = cls.from_pretrained(ckpt, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


BASE_CASES = [  # prompt, negative, guidance, cfg_normalization, cfg_truncation, h, w, steps
    ("a castle on a hill at sunset", "blurry, low quality", 4.0, 0.0, 1.0, 128, 96, 6),
    ("一只在雪地里的狐狸", None, 3.0, 1.0, 1.0, 96, 160, 5),
    ("a bowl of ramen, studio photo", "cartoon", 5.0, 0.0, 0.5, 128, 128, 6),
]


@pytest.mark.parametrize("prompt,negative,g,norm,trunc,h,w,steps", BASE_CASES)
@pytest.mark.parametrize("backend,cfg_mode", [("onnxruntime", "batch"), ("onnxruntime", "sequential"),
                                              ("torch", "batch")])
def test_base_cfg_matches_diffusers(base_fp32, base_ckpt, backend, cfg_mode, prompt, negative, g, norm, trunc,
                                    h, w, steps):
    expected = reference(ZImagePipeline, base_ckpt)(
        prompt, negative_prompt=negative, height=h, width=w, num_inference_steps=steps, guidance_scale=g,
        cfg_normalization=norm, cfg_truncation=trunc, generator=torch.Generator("cpu").manual_seed(3)).images[0]
    got = Pipeline(base_fp32, backend, cfg_mode=cfg_mode)(
        prompt, h, w, steps, seed=3, negative_prompt=negative, guidance_scale=g, cfg_normalization=norm,
        cfg_truncation=trunc, progress=False)[0]
    check_close(got, expected)


def test_guidance_changes_the_image(base_fp32):
    """CFG is really applied: guidance 4 differs from guidance 0."""
    pipe = Pipeline(base_fp32, "onnxruntime")
    a = as_array(pipe("a castle", 64, 64, 4, seed=1, guidance_scale=0.0, progress=False)[0])
    b = as_array(pipe("a castle", 64, 64, 4, seed=1, guidance_scale=4.0, progress=False)[0])
    assert np.abs(a - b).max() > 10


IMG2IMG_CASES = [  # image size, strength, steps, guidance
    ((128, 96), 0.6, 8, 0.0),
    ((100, 70), 0.8, 8, 0.0),   # not a multiple of 16: resized as diffusers does
    ((96, 128), 1.0, 4, 0.0),
]


@pytest.mark.parametrize("size,strength,steps,g", IMG2IMG_CASES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_img2img_matches_diffusers(tiny_fp32, tiny_ckpt, backend, size, strength, steps, g):
    image = synthetic_image(*size, seed=size[0])
    expected = reference(ZImageImg2ImgPipeline, tiny_ckpt)(
        "a watercolor landscape", image=image, strength=strength, num_inference_steps=steps, guidance_scale=g,
        generator=torch.Generator("cpu").manual_seed(5)).images[0]
    got = Pipeline(tiny_fp32, backend)("a watercolor landscape", steps=steps, seed=5, guidance_scale=g,
                                       images=[image], strength=strength, progress=False)[0]
    check_close(got, expected)


def test_img2img_with_cfg_matches_diffusers(base_fp32, base_ckpt):
    image = synthetic_image(96, 96, seed=9)
    expected = reference(ZImageImg2ImgPipeline, base_ckpt)(
        "a red barn", image=image, negative_prompt="fog", strength=0.7, num_inference_steps=6, guidance_scale=3.5,
        generator=torch.Generator("cpu").manual_seed(2)).images[0]
    got = Pipeline(base_fp32, "onnxruntime")("a red barn", steps=6, seed=2, negative_prompt="fog",
                                             guidance_scale=3.5, images=[image], strength=0.7, progress=False)[0]
    check_close(got, expected)


def _mask(width, height):
    m = np.zeros((height, width), dtype=np.uint8)
    m[height // 4: 3 * height // 4, width // 3: width - 8] = 255
    return Image.fromarray(m)


@pytest.mark.parametrize("size,strength", [((128, 128), 0.75), ((160, 96), 1.0)])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inpaint_matches_diffusers(tiny_fp32, tiny_ckpt, backend, size, strength):
    image, mask = synthetic_image(*size, seed=1), _mask(*size)
    expected = reference(ZImageInpaintPipeline, tiny_ckpt)(
        "a bright window", image=image, mask_image=mask, strength=strength, num_inference_steps=8,
        guidance_scale=0.0, generator=torch.Generator("cpu").manual_seed(11)).images[0]
    got = Pipeline(tiny_fp32, backend)("a bright window", steps=8, seed=11, guidance_scale=0.0, images=[image],
                                       mask=mask, strength=strength, progress=False)[0]
    check_close(got, expected)
    # outside the mask the result stays close to the input (the blend really happened)
    keep = np.asarray(mask) == 0
    assert np.abs(as_array(got)[keep] - as_array(image)[keep]).mean() < np.abs(
        as_array(got)[~keep] - as_array(image)[~keep]).mean()


def _cli(argv, capsys):
    code = run_cli(lambda: generate.main(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case,message", [
    ("mask_size", "must be the same size"),
    ("strength_zero", "strength must be in (0, 1]"),
    ("strength_big", "strength must be in (0, 1]"),
    ("not_image", "is not an image"),
    ("two_images", "need an Edit build"),
    ("size_with_image", "the image's size"),
])
def test_bad_image_requests(tiny_fp32, tmp_path, capsys, case, message):
    img = tmp_path / "in.png"
    synthetic_image(64, 64).save(img)
    mask = tmp_path / "mask.png"
    _mask(64, 48).save(mask)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    extra = {
        "mask_size": ["--image", str(img), "--mask", str(mask)],
        "strength_zero": ["--image", str(img), "--strength", "0"],
        "strength_big": ["--image", str(img), "--strength", "1.5"],
        "not_image": ["--image", str(text)],
        "two_images": ["--image", str(img), "--image", str(img)],
        "size_with_image": ["--image", str(img), "--height", "128"],
    }[case]
    out = tmp_path / "out" / "x.png"
    code, err = _cli(["--engine-dir", str(tiny_fp32), "--prompt", "a cat", "--output", str(out)] + extra, capsys)
    assert code == 2 and message in err
    assert not out.exists()


def test_inpaint_via_cli(tiny_fp32, tmp_path, capsys):
    img, mask, out = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "out.png"
    synthetic_image(96, 64).save(img)
    _mask(96, 64).save(mask)
    code, err = _cli(["--engine-dir", str(tiny_fp32), "--prompt", "a door", "--image", str(img), "--mask",
                      str(mask), "--strength", "0.9", "--output", str(out)], capsys)
    assert code == 0, err
    assert Image.open(out).size == (96, 64)
