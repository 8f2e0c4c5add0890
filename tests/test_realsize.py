"""Real-width graphs: a random checkpoint of the real Z-Image-Turbo width (DiT 3840 x 30 heads, Qwen3-4B width)
at reduced depth, written by the streaming writer, exported by the memory-lean path, and checked structurally
and against diffusers / transformers in float32 on the CPU."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from zimage_deploy import build
from zimage_deploy.checkpoint import iter_tensors
from zimage_deploy.models.dit import iter_fused
from zimage_deploy.realsize import write_real_size
from zimage_deploy.runtime.prompt import PromptTokenizer, pad_captions


@pytest.fixture(scope="module")
def real_width(tmp_path_factory):
    root = Path(tmp_path_factory.mktemp("realwidth"))
    ckpt = write_real_size(root / "ckpt", "bf16", shard_gb=0.5, dit={"n_layers": 3, "n_refiner_layers": 1},
                           text={"num_hidden_layers": 4, "vocab_size": 2048})
    out = root / "build"
    assert build.main(["--model", str(ckpt), "--precision", "fp32", "--lean", "on", "--skip-parity",
                       "--out", str(out)]) == 0
    return ckpt, out, json.loads((out / "manifest.json").read_text())


def test_checkpoint_is_sharded_safetensors(real_width):
    ckpt, _, _ = real_width
    shards = sorted((ckpt / "transformer").glob("*.safetensors"))
    index = json.loads((ckpt / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert json.loads((ckpt / "transformer" / "config.json").read_text())["dim"] == 3840


def test_graphs_structure(real_width):
    ckpt, out, manifest = real_width
    names, total = set(), 0
    for comp in ("transformer", "context_refiner"):
        path = out / "onnx" / comp / "model.onnx"
        onnx.checker.check_model(str(path))
        assert manifest["components"][comp]["external_data"] and (path.parent / "model.onnx.data").is_file()
        inits = onnx.load(str(path), load_external_data=False).graph.initializer
        names |= {t.name for t in inits}
        total += sum(int(np.prod(t.dims)) * 4 for t in inits)
    expected = dict(iter_fused(iter_tensors(ckpt / "transformer")))
    assert names == set(expected)  # every DiT weight, once, under its own name
    assert total == sum(t.numel() * 4 for t in expected.values())  # float32 graph of a bf16 checkpoint
    g = onnx.load(str(out / "onnx" / "transformer" / "model.onnx"), load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input}
    for io in manifest["components"]["transformer"]["inputs"]:
        assert dims[io["name"]] == io["dims"]


def test_dit_graphs_match_diffusers(real_width):
    from diffusers import ZImageTransformer2DModel

    ckpt, out, _ = real_width
    ref = ZImageTransformer2DModel.from_pretrained(ckpt, subfolder="transformer", dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    caps = [torch.randn(20, 2560, generator=g), torch.randn(45, 2560, generator=g)]
    latents, t = torch.randn(2, 16, 8, 12, generator=g), torch.rand(2, generator=g)
    with torch.no_grad():
        expected = -torch.stack(ref(list(latents.unsqueeze(2).unbind(0)), t, caps, return_dict=False)[0]).squeeze(2)
    del ref
    feats, lens = pad_captions(caps)
    sess = lambda n: ort.InferenceSession(str(out / "onnx" / n / "model.onnx"),  # noqa: E731
                                          providers=["CPUExecutionProvider"])
    (states,) = sess("context_refiner").run(None, {"cap_feats": feats.numpy(), "cap_lens": lens.numpy()})
    (got,) = sess("transformer").run(None, {"latents": latents.numpy(), "timestep": t.numpy(),
                                            "cap_states": states, "cap_lens": lens.numpy()})
    rel = np.linalg.norm(got - expected.numpy()) / np.linalg.norm(expected.numpy())
    assert rel <= 1e-5, rel


def test_text_encoder_graph_matches_transformers(real_width):
    from transformers import AutoModel

    ckpt, out, _ = real_width
    ids, mask = PromptTokenizer(ckpt / "tokenizer")(["一只橘猫", "a lighthouse on a cliff at dusk"])
    ref = AutoModel.from_pretrained(ckpt / "text_encoder", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask.bool(), output_hidden_states=True).hidden_states[-2]
    del ref
    (got,) = ort.InferenceSession(str(out / "onnx" / "text_encoder" / "model.onnx"),
                                  providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    keep = mask.bool()
    rel = np.linalg.norm(got[keep.numpy()] - expected[keep].numpy()) / np.linalg.norm(expected[keep].numpy())
    assert rel <= 1e-5, rel
