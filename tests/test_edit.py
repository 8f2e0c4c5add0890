"""Z-Image-Edit / Omni: the omni DiT against diffusers at module level, and image + instruction end to end
against diffusers' `ZImageOmniPipeline` (ONNX Runtime and Torch backends, one and two condition images of
other sizes than the output, CFG with a negative prompt).

diffusers' Omni pipeline casts the condition image to bfloat16 before the VAE encoder, so in float32 it fails;
the reference here runs with that cast undone (the float32 semantics this project implements)."""

import numpy as np
import pytest
import torch
from diffusers import ZImageOmniPipeline, ZImageTransformer2DModel

from conftest import synthetic_image
from zimage_deploy import generate
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
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
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
    (["--image", "{img}", "--strength", "0.5"], "no --mask or --strength"),
    (["--image", "{small}"], "condition image too small"),
])
def test_edit_bad_requests(edit_fp32, tmp_path, capsys, extra, message):
    synthetic_image(96, 96).save(tmp_path / "img.png")
    synthetic_image(32, 96).save(tmp_path / "small.png")
    extra = [e.format(img=tmp_path / "img.png", small=tmp_path / "small.png") for e in extra]
    out = tmp_path / "out.png"
    code = run_cli(lambda: generate.main(["--engine-dir", str(edit_fp32), "--prompt", "x", "--output", str(out)]
                                         + extra))
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()
