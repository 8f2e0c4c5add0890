"""The exported float32 graphs, run by ONNX Runtime, against transformers / diffusers directly."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from diffusers import AutoencoderKL, ZImageTransformer2DModel
from diffusers.image_processor import VaeImageProcessor
from transformers import AutoModel

from zimage_deploy.runtime.prompt import PromptTokenizer, pad_captions


def session(build_dir, name):
    return ort.InferenceSession(str(build_dir / "onnx" / name / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("prompts", [["a cat"], ["一只橘猫在窗台上晒太阳", "neon city street at night, rain " * 4]])
def test_text_encoder_graph_matches_transformers(tiny_fp32, tiny_ckpt, prompts):
    ids, mask = PromptTokenizer(tiny_ckpt / "tokenizer")(prompts)
    (got,) = session(tiny_fp32, "text_encoder").run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    ref = AutoModel.from_pretrained(tiny_ckpt / "text_encoder").eval()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask.bool(), output_hidden_states=True).hidden_states[-2]
    for i in range(len(prompts)):
        keep = mask[i].bool()
        np.testing.assert_allclose(got[i][keep.numpy()], expected[i][keep].numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch,h,w", [(1, 8, 8), (1, 12, 20), (2, 16, 10)])
def test_vae_decoder_graph_matches_diffusers(tiny_fp32, tiny_ckpt, batch, h, w):
    vae = AutoencoderKL.from_pretrained(tiny_ckpt, subfolder="vae").eval()
    latents = torch.randn(batch, 16, h, w, generator=torch.Generator().manual_seed(h * w))
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    expected = VaeImageProcessor(vae_scale_factor=16).postprocess(decoded, output_type="pt").numpy()
    (got,) = session(tiny_fp32, "vae_decoder").run(None, {"latents": latents.numpy()})
    assert got.shape == (batch, 3, 8 * h, 8 * w)
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("lens,h,w", [([9], 8, 8), ([40, 3], 14, 10), ([64, 64], 16, 16)])
def test_dit_graphs_match_diffusers(tiny_fp32, tiny_ckpt, lens, h, w):
    ref = ZImageTransformer2DModel.from_pretrained(tiny_ckpt, subfolder="transformer").eval()
    g = torch.Generator().manual_seed(h + w)
    caps = [torch.randn(n, ref.config.cap_feat_dim, generator=g) for n in lens]
    latents = torch.randn(len(lens), 16, h, w, generator=g)
    t = torch.rand(len(lens), generator=g)
    with torch.no_grad():
        out = ref(list(latents.unsqueeze(2).unbind(0)), t, caps, return_dict=False)[0]
    expected = -torch.stack(out).squeeze(2)
    feats, cap_lens = pad_captions(caps)
    (states,) = session(tiny_fp32, "context_refiner").run(None, {"cap_feats": feats.numpy(),
                                                                 "cap_lens": cap_lens.numpy()})
    (got,) = session(tiny_fp32, "transformer").run(None, {
        "latents": latents.numpy(), "timestep": t.numpy(), "cap_states": states, "cap_lens": cap_lens.numpy()})
    rel = np.linalg.norm(got - expected.numpy()) / np.linalg.norm(expected.numpy())
    assert rel <= 1e-5


def test_manifest_describes_graphs(tiny_fp32):
    manifest = json.loads((tiny_fp32 / "manifest.json").read_text())
    assert set(manifest["components"]) == {"text_encoder", "context_refiner", "transformer", "vae_decoder",
                                          "vae_encoder"}
    for name, comp in manifest["components"].items():
        assert comp["status"] == "complete" and comp["opset"] == 19
        sess = session(tiny_fp32, name)
        assert [i.name for i in sess.get_inputs()] == [i["name"] for i in comp["inputs"]]
        assert [o.name for o in sess.get_outputs()] == [o["name"] for o in comp["outputs"]]
        for io, meta in zip(sess.get_inputs(), comp["inputs"]):
            # dynamic dims are named the same in the graph and in the manifest
            assert [d if isinstance(d, str) else d for d in io.shape] == meta["dims"]
        assert comp["parity"]["rel_l2"] < 1e-5, comp["parity"]


@pytest.mark.parametrize("h,w", [(64, 64), (96, 160)])
def test_vae_encoder_graph_matches_diffusers(tiny_fp32, tiny_ckpt, h, w):
    vae = AutoencoderKL.from_pretrained(tiny_ckpt, subfolder="vae").eval()
    image = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h)) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(image).latent_dist
    mean, std = session(tiny_fp32, "vae_encoder").run(None, {"image": image.numpy()})
    np.testing.assert_allclose(mean, dist.mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(std, dist.std.numpy(), rtol=1e-5, atol=1e-6)
