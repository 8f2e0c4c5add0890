"""The OpenAI Images API (`/v1/images/generations`, `/v1/images/edits`) driven by the official `openai` client
against the server on loopback; every image compared pixel for pixel with the runtime's own."""

import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image

from conftest import synthetic_image
from serve_util import ServerThread, decode, png_bytes
from zimage_deploy import ZImageRuntime
from zimage_deploy.serve.app import create_app


def arr(image):
    return np.asarray(image.convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def runtime(tiny_fp32):
    return ZImageRuntime(tiny_fp32)


@pytest.fixture(scope="module")
def client(runtime):
    with ServerThread(create_app(runtime, api_key="sk-test")) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0, timeout=120)


def test_generations_n_images_with_seeds(client, runtime):
    res = client.images.generate(model="z-image-turbo", prompt="a lighthouse at dusk", n=2, size="96x64",
                                 response_format="b64_json", extra_body={"seed": 11, "steps": 3})
    assert len(res.data) == 2 and res.created > 0
    for i, item in enumerate(res.data):
        want = runtime.generate("a lighthouse at dusk", seed=11 + i, height=64, width=96, steps=3).images[0]
        assert decode(item.b64_json).shape == (64, 96, 3)
        assert np.abs(decode(item.b64_json) - arr(want)).max() <= 1  # batched: float ordering may differ by 1


def test_generations_defaults_and_formats(client, runtime):
    res = client.images.generate(prompt="a cat", extra_body={"seed": 2, "steps": 2}, output_format="webp",
                                 quality="high", user="someone")
    img = Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json)))
    assert img.format == "WEBP" and img.size == (256, 256)  # the build's default size


def test_guidance_extensions(client, runtime):
    res = client.images.generate(prompt="a barn", size="64x64", extra_body={
        "seed": 4, "steps": 3, "guidance_scale": 3.0, "negative_prompt": "fog", "cfg_normalization": 1.5})
    want = runtime.generate("a barn", seed=4, height=64, width=64, steps=3, guidance_scale=3.0,
                            negative_prompt="fog", cfg_normalization=1.5).images[0]
    assert np.array_equal(decode(res.data[0].b64_json), arr(want))


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(response_format="url"), openai.BadRequestError, "response_format 'url' is not supported"),
    (dict(size="huge"), openai.UnprocessableEntityError, "size must be 'WIDTHxHEIGHT'"),
    (dict(size="1024x1024"), openai.UnprocessableEntityError, "above this build's largest side 512"),
    (dict(n=0), openai.UnprocessableEntityError, "n must be an integer in 1.."),
    (dict(n=100), openai.UnprocessableEntityError, "n must be an integer in 1.."),
    (dict(background="transparent"), openai.BadRequestError, "opaque"),
    (dict(extra_body={"steps": 0}), openai.UnprocessableEntityError, "steps must be in 1..100"),
    (dict(extra_body={"colour": "red"}), openai.UnprocessableEntityError, "unknown field `colour`"),
    (dict(user="u" * 1000), openai.UnprocessableEntityError, "short string"),
])
def test_generations_errors(client, kwargs, error, message):
    with pytest.raises(error) as e:
        client.images.generate(prompt="a cat", **kwargs)
    assert message in e.value.message


def test_wrong_key_is_401(client):
    other = openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        other.images.generate(prompt="a cat")


def test_edits_img2img_and_inpainting(client, runtime):
    image = synthetic_image(96, 64, seed=3)
    res = client.images.edit(image=("in.png", png_bytes(image), "image/png"), prompt="a red door",
                             extra_body={"seed": 5, "steps": 4, "strength": 0.7})
    want = runtime.generate("a red door", seed=5, steps=4, strength=0.7, images=[image]).images[0]
    assert np.array_equal(decode(res.data[0].b64_json), arr(want))
    # OpenAI's mask: fully transparent pixels are the ones to edit
    mask = Image.new("RGBA", (96, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (20, 10, 70, 50))
    res = client.images.edit(image=("in.png", png_bytes(image), "image/png"), prompt="a window", size="96x64",
                             mask=("mask.png", png_bytes(mask), "image/png"), extra_body={"seed": 6, "steps": 4})
    white_is_repaint = Image.new("L", (96, 64), 0)
    white_is_repaint.paste(255, (20, 10, 70, 50))
    want = runtime.generate("a window", seed=6, steps=4, images=[image], mask=white_is_repaint).images[0]
    assert np.array_equal(decode(res.data[0].b64_json), arr(want))


def test_edits_errors(client):
    image = ("in.png", png_bytes(synthetic_image(64, 64)), "image/png")
    with pytest.raises(openai.UnprocessableEntityError, match="the image's size"):
        client.images.edit(image=image, prompt="a door", size="128x128")
    with pytest.raises(openai.UnprocessableEntityError, match="Edit build"):
        client.images.edit(image=[image, image], prompt="a door")
    with pytest.raises(openai.BadRequestError, match="PNG, JPEG or WebP"):
        client.images.edit(image=("in.gif", png_bytes(synthetic_image(64, 64), "GIF"), "image/gif"), prompt="x")
    with pytest.raises(openai.UnprocessableEntityError, match="same size"):
        client.images.edit(image=image, prompt="x", mask=("m.png", png_bytes(Image.new("L", (32, 32))), "image/png"))


def test_edits_on_an_edit_build(tmp_path_factory, edit_ckpt):
    """Edit builds: `image[]` condition images (two), the output size from `size`."""
    from zimage_deploy import build

    out = tmp_path_factory.mktemp("edit-build")
    assert build.main(["--model", str(edit_ckpt), "--variant", "edit", "--target", "cpu", "--precision", "fp32",
                       "--skip-parity", "--out", str(out)]) == 0
    rt = ZImageRuntime(out)
    images = [synthetic_image(96, 96, seed=1), synthetic_image(128, 64, seed=2).convert("RGBA")]  # RGBA too
    with ServerThread(create_app(rt)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        res = client.images.edit(image=[(f"{i}.png", png_bytes(im), "image/png") for i, im in enumerate(images)],
                                 prompt="make the sky red", size="64x64",
                                 extra_body={"seed": 3, "steps": 2, "guidance_scale": 2.0})
        large = synthetic_image(1100, 1000, seed=5)  # above 1024x1024 px: scaled to the output's area first
        res_large = [client.images.edit(image=("large.png", png_bytes(large), "image/png"), prompt="add a moon",
                                        size=size, extra_body={"seed": 8, "steps": 2}) for size in ("80x80", "96x96")]
        # at a 64x64 output's area it would be 64x48: a side below the build's 64 px (its profiles' range), refused
        with pytest.raises(openai.UnprocessableEntityError, match="64..512 px"):
            client.images.edit(image=("large.png", png_bytes(large), "image/png"), prompt="add a moon", size="64x64",
                               extra_body={"seed": 8, "steps": 2})
        with pytest.raises(openai.UnprocessableEntityError, match="at most 2"):
            client.images.edit(image=[(f"{i}.png", png_bytes(images[0]), "image/png") for i in range(3)],
                               prompt="x")
    want = rt.generate("make the sky red", seed=3, steps=2, guidance_scale=2.0, height=64, width=64,
                       images=[images[0], images[1].convert("RGB")]).images[0]
    assert np.array_equal(decode(res.data[0].b64_json), arr(want))
    for res, side in zip(res_large, (80, 96)):  # scaled to each output's area: the runtime's own image
        want = rt.generate("add a moon", seed=8, steps=2, height=side, width=side, images=[large]).images[0]
        assert np.array_equal(decode(res.data[0].b64_json), arr(want))
