"""The export-friendly DiT against diffusers' ZImageTransformer2DModel, float32, several shapes."""

import pytest
import torch
from diffusers import ZImageTransformer2DModel

from zimage_deploy.models.load import load_dit
from zimage_deploy.runtime.prompt import pad_captions


def rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


def reference(model, latents, t, caps):
    out = model(list(latents.unsqueeze(2).unbind(0)), t, caps, return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


# (batch, caption lengths, latent h, latent w): image tokens (h/2)*(w/2)
CASES = [
    (1, [5], 8, 8),        # 16 image tokens: padded to 32
    (1, [32], 16, 16),     # 64 tokens, caption exactly 32
    (1, [40], 8, 16),      # non-square, 32 tokens (multiple of 32)
    (2, [7, 45], 12, 8),   # batch 2, different caption lengths (different padded lengths), 24 tokens
    (2, [33, 33], 16, 12), # batch 2, equal lengths, 48 tokens
    (2, [64, 3], 10, 14),  # batch 2, non-square 35 tokens, one caption a multiple of 32
]


@pytest.mark.parametrize("batch,lens,h,w", CASES)
@pytest.mark.parametrize("which", ["tiny", "alt"])
def test_dit_matches_diffusers(which, batch, lens, h, w, tiny_ckpt, alt_ckpt):
    ckpt = tiny_ckpt if which == "tiny" else alt_ckpt
    ref = ZImageTransformer2DModel.from_pretrained(ckpt, subfolder="transformer").eval()
    ours = load_dit(ckpt)
    g = torch.Generator().manual_seed(sum(lens) + h * w)
    cap_dim = ref.config.cap_feat_dim
    caps = [torch.randn(n, cap_dim, generator=g) for n in lens]
    latents = torch.randn(batch, 16, h, w, generator=g)
    t = torch.rand(batch, generator=g)
    with torch.no_grad():
        expected = reference(ref, latents, t, caps)
        feats, cap_lens = pad_captions(caps)
        got = ours(latents, t, ours.context(feats, cap_lens), cap_lens)
    assert got.shape == expected.shape
    assert rel_l2(got, expected) <= 1e-5


def test_pad_tokens_matter(tiny_ckpt):
    """Guard against a test that cannot fail: the checkpoint's pad tokens change the output."""
    ours = load_dit(tiny_ckpt)
    g = torch.Generator().manual_seed(0)
    latents, t = torch.randn(1, 16, 8, 8, generator=g), torch.rand(1, generator=g)
    feats, lens = pad_captions([torch.randn(5, ours.cfg.cap_feat_dim, generator=g)])
    with torch.no_grad():
        a = ours(latents, t, ours.context(feats, lens), lens)
        ours.x_pad_token.add_(1.0)
        ours.cap_pad_token.add_(1.0)
        b = ours(latents, t, ours.context(feats, lens), lens)
    assert rel_l2(a, b) > 1e-3
