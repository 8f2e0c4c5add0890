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


def session(build_dir, name, optimized: bool = True):
    """A CPU session on the build's graph; `optimized=False` evaluates the graph as written, as the build's parity
    check does (export/graph_eval.py)."""
    opts = ort.SessionOptions()
    if not optimized:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(build_dir / "onnx" / name / "model.onnx"), opts, providers=["CPUExecutionProvider"])


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


# The graphs' I/O, written out for the tiny model (DiT width 64, caption features 32, text width 32, 16 latent
# channels): name -> (ONNX Runtime type, dims; strings are the dynamic axes TensorRT profiles range over)
INT64, FLOAT = "tensor(int64)", "tensor(float)"
IO = {
    "text_encoder": ({"input_ids": (INT64, ["batch", "text_len"]), "attention_mask": (INT64, ["batch", "text_len"])},
                     {"hidden_states": (FLOAT, ["batch", "text_len", 32])}),
    "context_refiner": ({"cap_feats": (FLOAT, ["batch", "cap_len", 32]), "cap_lens": (INT64, ["batch"])},
                        {"cap_states": (FLOAT, ["batch", "cap_len", 64])}),
    "transformer": ({"latents": (FLOAT, ["batch", 16, "latent_h", "latent_w"]), "timestep": (FLOAT, ["batch"]),
                     "cap_states": (FLOAT, ["batch", "cap_len", 64]), "cap_lens": (INT64, ["batch"])},
                    {"noise_pred": (FLOAT, ["batch", 16, "latent_h", "latent_w"])}),
    "vae_decoder": ({"latents": (FLOAT, ["batch", 16, "latent_h", "latent_w"])},
                    {"image": (FLOAT, ["batch", 3, "height", "width"])}),
    "vae_encoder": ({"image": (FLOAT, ["batch", 3, "height", "width"])},
                    {"mean": (FLOAT, ["batch", 16, "latent_h", "latent_w"]),
                     "std": (FLOAT, ["batch", 16, "latent_h", "latent_w"])}),
}


def test_manifest_describes_graphs(tiny_fp32):
    """The graphs' inputs and outputs (names, types, static and dynamic dims) are the ones written out above, and
    the manifest describes them as they are; the build's recorded parity figure is the one recomputed here (ONNX
    Runtime on the graph vs the Torch float32 module, on the build's check shapes)."""
    from zimage_deploy.export.specs import CHECK_DIMS, specs_for
    from zimage_deploy.runtime.backends import TorchBackend

    manifest = json.loads((tiny_fp32 / "manifest.json").read_text())
    assert set(manifest["components"]) == set(IO)
    torch_backend = TorchBackend(tiny_fp32, manifest, device="cpu")
    for name, comp in manifest["components"].items():
        assert comp["status"] == "complete" and comp["opset"] == 19
        sess = session(tiny_fp32, name, optimized=False)  # the recorded parity figure is recomputed below
        assert {io.name: (io.type, io.shape) for io in sess.get_inputs()} == IO[name][0], name
        # outputs: the dynamic axes are declared by name; the static sizes are checked on the computed outputs
        # (the VAE encoder's graph declares its outputs' channel axis without a size)
        declared = {io.name: (io.type, [d if isinstance(e, str) else e
                                        for d, e in zip(io.shape, IO[name][1][io.name][1])])
                    for io in sess.get_outputs()}
        assert declared == IO[name][1], name
        for got, described in ((sess.get_inputs(), comp["inputs"]), (sess.get_outputs(), comp["outputs"])):
            assert [io.name for io in got] == [d["name"] for d in described]
            assert [d["dtype"] for d in described] == [io.type[len("tensor("):-1].replace("float", "float32")
                                                        for io in got]
        assert [d["dims"] for d in comp["inputs"]] == [v[1] for v in IO[name][0].values()]
        assert [d["dims"] for d in comp["outputs"]] == [v[1] for v in IO[name][1].values()]
        spec = specs_for("turbo")[name]
        sample = spec.sample(manifest["model"]["facts"], CHECK_DIMS, torch.float32)
        outs = sess.run(None, {io.name: s.numpy() for io, s in zip(spec.inputs, sample)})
        sizes = dict(CHECK_DIMS, height=8 * CHECK_DIMS["latent_h"], width=8 * CHECK_DIMS["latent_w"])
        for out, (_, dims) in zip(outs, IO[name][1].values()):
            assert list(out.shape) == [sizes[d] if isinstance(d, str) else d for d in dims], name
        with torch.no_grad():
            ref = torch_backend.model(name)(*sample)
        ref = ref if isinstance(ref, tuple) else (ref,)
        keep = sample[1].bool().numpy() if name == "text_encoder" else slice(None)
        got = np.concatenate([o[keep].ravel() for o in outs])
        ref = np.concatenate([r.numpy()[keep].ravel() for r in ref])
        rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        parity = comp["parity"]
        assert parity["shapes"] == CHECK_DIMS and parity["rel_l2"] == pytest.approx(rel, rel=1e-3, abs=1e-12)
        assert rel < 1e-5 and parity["passed"], (name, rel)


@pytest.mark.parametrize("h,w", [(64, 64), (96, 160)])
def test_vae_encoder_graph_matches_diffusers(tiny_fp32, tiny_ckpt, h, w):
    vae = AutoencoderKL.from_pretrained(tiny_ckpt, subfolder="vae").eval()
    image = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h)) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(image).latent_dist
    mean, std = session(tiny_fp32, "vae_encoder").run(None, {"image": image.numpy()})
    np.testing.assert_allclose(mean, dist.mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(std, dist.std.numpy(), rtol=1e-5, atol=1e-6)
