"""Z-Image-Edit / Omni: the omni DiT against diffusers at module level, and image + instruction end to end
against diffusers' `ZImageOmniPipeline` (ONNX Runtime and Torch backends, one and two condition images of
other sizes than the output, CFG with a negative prompt).

diffusers' Omni pipeline casts the condition image to bfloat16 before the VAE encoder, so in float32 it fails;
the reference here runs with that cast undone (the float32 semantics this project implements)."""

import hashlib

import numpy as np
import pytest
import torch
from diffusers import ZImageOmniPipeline, ZImageTransformer2DModel
from PIL import Image

from backend_conformance import CPU_BACKENDS
from conftest import synthetic_image
from zimage_deploy import ZImageRuntime, generate
from zimage_deploy.cli import run_cli
from zimage_deploy.models.load import load_dit
from zimage_deploy.models.omni import batch_layouts, build_layout
from zimage_deploy.runtime.open import open_pipeline


@pytest.mark.parametrize("seg_lens,cond_sizes,target", [
    ([[5, 40, 4], [5, 9, 4]], [(12, 8)], (8, 12)),                 # 1 image, CFG-like batch of 2 prompts
    ([[5, 3, 70, 4]], [(12, 8), (6, 10)], (10, 10)),              # 2 images of different sizes
])
def test_omni_dit_matches_diffusers(edit_ckpt, seg_lens, cond_sizes, target):
    ref = ZImageTransformer2DModel.from_pretrained(edit_ckpt, subfolder="transformer").eval()
    ours = load_dit(edit_ckpt)
    g = torch.Generator().manual_seed(0)
    cap_dim, sig_dim = ref.config.cap_feat_dim, ref.config.siglip_feat_dim
    conds = [torch.randn(16, h, w, generator=g) for h, w in cond_sizes]
    sigs = [torch.randn(3 + i, 5 - i, sig_dim, generator=g) for i in range(len(conds))]
    segs = [[torch.randn(n, cap_dim, generator=g) for n in lens] for lens in seg_lens]
    b = len(segs)
    latents, t = torch.randn(b, 16, *target, generator=g), torch.rand(1, generator=g).expand(b)
    with torch.no_grad():
        x = [[c.unsqueeze(1) for c in conds] + [latents[i].unsqueeze(1)] for i in range(b)]
        out = ref(x=x, t=t, cap_feats=segs, siglip_feats=[sigs + [None] for _ in range(b)],
                  image_noise_mask=[[0] * len(conds) + [1]] * b, return_dict=False)[0]
        expected = -torch.stack(out).squeeze(2)
        lay = batch_layouts([build_layout(s, conds, sigs, target, sig_dim) for s in segs])
        cap = ours.context_omni(lay["cap_feats"], lay["cap_pad"], lay["cap_pos"], lay["cap_valid"])
        sig = ours.siglip(lay["sig_feats"], lay["sig_pad"], lay["sig_pos"], lay["sig_valid"])
        got = ours.forward_omni(latents, t, lay["cond_patches"], lay["x_pad"], lay["x_pos"], lay["x_noise"], cap,
                                lay["cap_pos"], lay["cap_valid"], lay["cap_noise"], sig, lay["sig_pos"],
                                lay["sig_valid"], lay["sig_noise"])
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-5


def reference(ckpt):
    pipe = ZImageOmniPipeline.from_pretrained(ckpt, dtype=torch.float32)
    encode = pipe.vae.encode
    pipe.vae.encode = lambda x, *a, **k: encode(x.float(), *a, **k)  # undo the bfloat16 cast (see above)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASES = [  # condition image sizes, output (height, width), negative prompt
    ([(128, 96)], (None, None), "blurry"),
    ([(128, 96), (80, 112)], (64, 96), None),
]


@pytest.mark.parametrize("sizes,hw,negative", CASES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_edit_matches_diffusers(edit_fp32, edit_ckpt, backend, sizes, hw, negative):
    images = [synthetic_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    expected = reference(edit_ckpt)(image=images, prompt="make the sky red", height=hw[0], width=hw[1],
                                    num_inference_steps=4, guidance_scale=3.0, negative_prompt=negative,
                                    generator=torch.Generator("cpu").manual_seed(1)).images[0]
    got = open_pipeline(edit_fp32, backend)("make the sky red", hw[0], hw[1], 4, 1, images=images,
                                            guidance_scale=3.0, negative_prompt=negative, progress=False)[0]
    got, expected = np.asarray(got).astype(int), np.asarray(expected).astype(int)
    assert got.shape == expected.shape and expected.std() > 10
    assert np.abs(got - expected).max() <= 2


def test_condition_image_matters(edit_fp32):
    pipe = open_pipeline(edit_fp32, "onnxruntime")
    a = np.asarray(pipe("edit", 64, 64, 2, 0, images=[synthetic_image(96, 96, 1)], progress=False)[0]).astype(int)
    b = np.asarray(pipe("edit", 64, 64, 2, 0, images=[synthetic_image(96, 96, 2)], progress=False)[0]).astype(int)
    assert np.abs(a - b).max() > 10


@pytest.mark.parametrize("extra,message", [
    ([], "needs at least one condition image"),
    (["--image", "{small}"], "condition image too small"),
    # masks: another size than the first condition image, not an image, an empty file
    (["--image", "{img}", "--mask", "{small}"], "the mask is 32x96 but the first condition image is 96x96"),
    (["--image", "{img}", "--image", "{img}", "--mask", "{text}"], "is not an image this build reads"),
    (["--image", "{img}", "--mask", "{empty}"], "is not an image this build reads"),
    (["--image", "{img}", "--strength", "0"], "strength must be in (0, 1]"),
    (["--image", "{img}", "--strength", "1e-17"], "leaves no step to run"),
    (["--image", "{img}", "--strength", "0.5", "--height", "64"], "the first condition image's prepared size"),
])
def test_edit_bad_requests(edit_fp32, tmp_path, capsys, extra, message):
    synthetic_image(96, 96).save(tmp_path / "img.png")
    synthetic_image(32, 96).save(tmp_path / "small.png")
    (tmp_path / "text.png").write_text("not a picture")
    (tmp_path / "empty.png").write_bytes(b"")
    extra = [e.format(**{k: tmp_path / f"{k}.png" for k in ("img", "small", "text", "empty")}) for e in extra]
    out = tmp_path / "out.png"
    code = run_cli(lambda: generate.main(["--engine-dir", str(edit_fp32), "--prompt", "x", "--output", str(out)]
                                         + extra))
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()


# -- strength and mask (runtime/edit.py): the first condition image edited in place ---------------------------
def _half_mask(w, h):
    mask = np.zeros((h, w), np.uint8)
    mask[:, w // 2:] = 255  # white = change: the right half
    return Image.fromarray(mask)


def test_strength_one_without_mask_is_todays_edit(edit_fp32):
    """strength 1 (given, or the default) samples from noise exactly as the Edit pipeline always did; the
    checksum is today's image (computed with the code before strength and mask existed)."""
    rt = ZImageRuntime(edit_fp32, "onnxruntime")
    images = [synthetic_image(96, 80, 1), synthetic_image(64, 64, 2)]
    plain, one = (np.asarray(rt.generate("make it red", seed=4, steps=3, guidance_scale=2.0, images=images,
                                         **kw).images[0]) for kw in ({}, {"strength": 1.0}))
    assert np.array_equal(plain, one) and plain.shape == (64, 64, 3)  # the last image's size, as before
    assert hashlib.sha256(plain.tobytes()).hexdigest().startswith("8cc0a24da12d88aa")


def test_black_mask_returns_the_input_and_a_mask_keeps_the_rest(edit_fp32):
    pipe = open_pipeline(edit_fp32, "onnxruntime")
    image, other = synthetic_image(96, 64, 1), synthetic_image(64, 80, 2)
    first_latents = pipe.condition([image], None, None)[0][0][None]
    kept = np.asarray(pipe.decode(first_latents)[0]).astype(int)  # the input through the VAE round trip

    def run(mask, output="pil", **kw):
        out = pipe("make it red", None, None, 4, 3, images=[image, other], mask=mask, guidance_scale=2.0,
                   progress=False, output=output, **kw)
        return out if output == "latent" else np.asarray(out[0]).astype(int)

    # all black: nothing to change -> the input through the VAE round trip (the first image's size, not the last's)
    black = run(Image.new("L", image.size, 0))
    assert black.shape == kept.shape == (64, 96, 3) and np.abs(black - kept).max() <= 1
    # the right half white: the unmasked latents are the first image's, exactly; the right half is sampled anew.
    # In pixels the VAE decoder (convolutions, mid-block attention) carries some of the new half across the seam:
    # on this tiny random VAE a lot (the whole image is 8x12 latents), hence the ratio of 3
    mask = _half_mask(96, 64)
    latents = run(mask, "latent")
    assert torch.equal(latents[..., :6], first_latents[..., :6]) and not torch.equal(latents, first_latents)
    half = np.asarray(pipe.decode(latents)[0]).astype(int)
    outside, inside = np.abs(half - kept)[:, :48].mean(), np.abs(half - kept)[:, 48:].mean()
    assert inside > 3 * outside and inside > 20, (outside, inside)
    # strength: the lower, the closer the final latents stay to the first image's
    far = [((run(None, "latent", strength=s) - first_latents).norm() / first_latents.norm()).item()
           for s in (0.1, 0.6, 0.99)]
    assert far[0] < far[1] < far[2], far


def test_mask_and_strength_agree_across_backends_and_the_server(edit_fp32):
    import httpx

    from serve_util import ServerThread, decode, png_bytes
    from zimage_deploy.serve.app import create_app

    image, mask = synthetic_image(96, 64, 3), _half_mask(96, 64)
    kw = dict(seed=5, steps=3, guidance_scale=2.0, images=[image], mask=mask, strength=0.8)
    ort_rt = ZImageRuntime(edit_fp32, "onnxruntime")
    ort = np.asarray(ort_rt.generate("a blue sky", **kw).images[0]).astype(int)
    torch_ = np.asarray(ZImageRuntime(edit_fp32, "torch").generate("a blue sky", **kw).images[0]).astype(int)
    assert np.abs(ort - torch_).max() <= 2
    with ServerThread(create_app(ort_rt)) as url:
        r = httpx.post(f"{url}/v1/images/edits", timeout=120,
                       data={"prompt": "a blue sky", "seed": "5", "steps": "3", "guidance_scale": "2",
                             "strength": "0.8", "response_format": "b64_json"},
                       files={"image": ("in.png", png_bytes(image), "image/png"),
                              "mask": ("m.png", png_bytes(mask), "image/png")})
        assert r.status_code == 200, r.text
        assert np.array_equal(np.asarray(decode(r.json()["data"][0]["b64_json"])).astype(int), ort)
        bad = httpx.post(f"{url}/v1/images/edits", timeout=60, data={"prompt": "x"},
                         files={"image": ("in.png", png_bytes(image), "image/png"),
                                "mask": ("m.png", png_bytes(Image.new("L", (64, 64))), "image/png")})
        assert bad.status_code == 422 and "must be the same size" in bad.json()["error"]["message"]
