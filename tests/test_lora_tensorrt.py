"""Run-time LoRAs on TensorRT engines built with the LoRA side branch (`build --max-lora-rank R --max-loras N`,
lora/tensorrt.py): FP8 and INT4 builds.

- TensorRT-RTX builds the SM89 engines of the real product graphs (BF16 base, FP8 / INT4 Q/DQ) on this GPU-less
  machine; what it parsed is recorded (tests/test_engines.py's recording builder): the DiT networks take the
  branch's factors as inputs of fixed shape, in the layers' dtype, and the other engines do not.
- Execution: the same builds over float32 base graphs (the fake runs graphs with ONNX Runtime on the CPU), engines
  from tests/fake_tensorrt.py: the images equal the ONNX Runtime backend's branch for the same LoRA set; no LoRA
  = the base image bit for bit; A then B = B alone bit for bit; switching refits nothing and re-captures no CUDA
  graph (static build); a rank above the build's bound, too many LoRAs, a LoRA of another model size: one clear
  error, nothing applied.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fake_tensorrt
from conftest import need
from test_lora import H, PROMPT, SEED, STEPS, W, image, make_peft_lora
from zimage_deploy import ZImageRuntime, build
from zimage_deploy import manifest as manifest_io
from zimage_deploy.errors import RequestError
from zimage_deploy.targets import Target

FAST = ["--skip-parity", "--no-quality-gate", "--calib-size", "2", "--calib-side", "64", "--calib-steps", "2"]
KINDS = {"fp8": ["--precision", "fp8"], "int4": ["--precision", "int4", "--int4-method", "rtn"]}
BOUNDS = ["--max-lora-rank", "8", "--max-loras", "2"]
KW = dict(seed=SEED, steps=STEPS, height=H, width=W)
SA, SB = 1.5, -2.0
DIT = ("context_refiner", "transformer")


@pytest.fixture(scope="module")
def trt_loras(tiny_ckpt, tmp_path_factory):
    d = Path(tmp_path_factory.mktemp("trt-loras"))
    a = make_peft_lora(tiny_ckpt, d / "a", 11, ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3",
                                                "adaLN_modulation.0", "cap_embedder.1"), r=4, lora_alpha=8)
    b = make_peft_lora(tiny_ckpt, d / "b", 12, ("to_q", "to_v", "w3"), r=2, lora_alpha=3)
    big = make_peft_lora(tiny_ckpt, d / "big", 13, ("to_q",), r=16, lora_alpha=16)
    q = "transformer.layers.0.attention.to_q"
    other = d / "other.safetensors"  # a LoRA of a wider model
    save_file({f"{q}.lora_A.weight": torch.randn(2, 96) * 0.05, f"{q}.lora_B.weight": torch.randn(96, 2) * 0.05},
              other)
    return {"a": a, "b": b, "big": big, "other": other}


@pytest.fixture(scope="module")
def rtx_records(tiny_ckpt, tmp_path_factory):
    """FP8 then INT4 builds (BF16 base; the INT4 one over a copy of the FP8 one: the export is kept) with the
    branch, SM89 DiT engines built by TensorRT-RTX: kind -> (build folder, component -> what TensorRT-RTX parsed).
    The text encoder and VAE engines are not built here (tests/test_engines.py builds them)."""
    need("tensorrt_rtx")
    from test_engines import _RecordingTRT

    from zimage_deploy.engines import builder as engine_builder
    from zimage_deploy.hashing import file_sha256
    from zimage_deploy.manifest import Engine

    root, out = Path(tmp_path_factory.mktemp("rtx-lora")), {}
    build_engine = engine_builder.EngineBuilder.build
    for kind in KINDS:
        record, current = {}, [None]

        def build_one(self, onnx_path, profile, plan_path, **kw):
            if plan_path.stem not in DIT:  # a placeholder plan
                plan_path.parent.mkdir(parents=True, exist_ok=True)
                plan_path.write_bytes(b"not built")
                return Engine(plan_sha256=file_sha256(plan_path), bytes=9, flavour=self.target.flavour,
                              version=self.version, compute_capability=tuple(self.target.compute_capability),
                              gpu=None, cuda_graphs=False, profile=profile, options=self.opts.as_dict(),
                              stripped=False, timing_cache=None, build_seconds=0.0)
            current[0] = plan_path.stem
            return build_engine(self, onnx_path, profile, plan_path, **kw)

        if kind != "fp8":
            shutil.copytree(root / "fp8", root / kind)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(engine_builder, "import_trt", lambda flavour: _RecordingTRT(record, current))
            mp.setattr(engine_builder.EngineBuilder, "build", build_one)
            assert build.main(["--model", str(tiny_ckpt), "--target", "rtx4090", *KINDS[kind], *FAST, *BOUNDS,
                               "--out", str(root / kind)]) == 0
        out[kind] = (root / kind, record)
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_rtx_engines_take_the_factors_as_inputs(kind, rtx_records):
    """SM89 engines built by TensorRT-RTX from the FP8 / INT4 graphs (BF16 base) with the branch: each DiT network
    has the three factor inputs of every adaptable layer, fixed shapes at the build's bounds (rank 8 x 2 LoRAs x
    the weight's row blocks), BF16 like the layer (the timestep embedder's float32, as its layers)."""
    out, record = rtx_records[kind]
    m = manifest_io.load(out)
    assert m["components"]["transformer"]["precision"] == kind
    assert "transformer" in record and (kind != "fp8" or "context_refiner" in record)  # INT4: the refiner is kept
    for name in record:
        comp = m["components"][name]
        factors = {k: v for k, v in record[name]["inputs"].items() if ".lora_" in k}
        branch = comp["engine"]["lora_branch"]
        assert (branch["max_rank"], branch["max_loras"]) == (8, 2)
        assert branch["graph"].endswith(".lora/model.onnx") and (out / branch["graph"]).is_file()
        layers = branch["layers"]
        qkv = f"{'context_refiner' if name == 'context_refiner' else 'layers'}.0.attention.qkv.weight"
        assert layers[qkv]["rank"] == 8 * 2 * 3 and layers[qkv]["dtype"] == "bfloat16"
        assert len(factors) == 3 * len(layers) and len(layers) >= 5, name
        for weight, layer in layers.items():
            (rows, inp), r, base = layer["shape"], layer["rank"], weight[: -len(".weight")]
            dtype = {"bfloat16": "BF16", "float32": "FLOAT"}[layer["dtype"]]
            assert factors[base + ".lora_down_t"] == (dtype, (inp, r)), weight
            assert factors[base + ".lora_up_t"] == (dtype, (r, rows)), weight
            assert factors[base + ".lora_scale"] == (dtype, (r,)), weight
            assert record[name]["profile"][base + ".lora_up_t"] == [[r, rows]] * 3
    quantized = m["components"]["transformer"]["engine"]["lora_branch"]["layers"]
    assert "layers.1.feed_forward.w2.weight" in quantized  # a quantized layer got its branch


@pytest.fixture(scope="module")
def fake_builds(tiny_ckpt, tmp_path_factory):
    """FP8 (static 64x96: CUDA graphs) and INT4 (dynamic; over a copy of the FP8 one) builds with the branch over
    float32 base graphs (what the fake's ONNX Runtime runs), with fake TensorRT-RTX engines."""
    root = Path(tmp_path_factory.mktemp("fake-lora"))
    with pytest.MonkeyPatch.context() as mp:
        fake_tensorrt.install(mp, fake_tensorrt.make())
        mp.setattr(Target, "base", property(lambda self: "fp32"))
        for kind, extra in (("fp8", ["--static", f"{H}x{W}"]), ("int4", [])):
            if kind != "fp8":
                shutil.copytree(root / "fp8", root / kind)
            assert build.main(["--model", str(tiny_ckpt), "--target", "rtx4090", *KINDS[kind], *FAST, *BOUNDS,
                               *extra, "--out", str(root / kind)]) == 0
    return root


@pytest.mark.parametrize("kind", list(KINDS))
def test_fake_engines_switch_sets_like_onnx_runtime(kind, fake_builds, trt_loras, monkeypatch):
    out, trt = fake_builds / kind, fake_tensorrt.make()
    m = manifest_io.load(out)
    assert m["components"]["transformer"]["precision"] == kind
    assert m["components"]["transformer"]["engine"]["lora_branch"]["graph"] == f"onnx/transformer.{kind}.lora/model.onnx"
    fake_tensorrt.install(monkeypatch, trt)
    both = [(trt_loras["a"], SA), (trt_loras["b"], SB)]
    only_b = [(trt_loras["b"], SB)]
    ort = ZImageRuntime(out, backend="onnxruntime")
    rt = ZImageRuntime(out, backend="tensorrt")
    base = image(rt.generate(PROMPT, **KW))
    assert np.array_equal(base, image(ort.generate(PROMPT, **KW)))  # zero factors: the base, bit for bit
    got_both = image(rt.generate(PROMPT, loras=both, **KW))
    ort_both = image(ort.generate(PROMPT, loras=both, **KW))
    assert np.abs(ort_both - base).mean() > 3, "the LoRAs barely change the image: the test proves little"
    assert np.abs(got_both - ort_both).max() <= 1, np.abs(got_both - ort_both).max()
    got_b = image(rt.generate(PROMPT, loras=only_b, **KW))  # A + B, then B alone
    assert np.abs(got_b - image(ort.generate(PROMPT, loras=only_b, **KW))).max() <= 1
    fresh = ZImageRuntime(out, backend="tensorrt")
    assert np.array_equal(got_b, image(fresh.generate(PROMPT, loras=only_b, **KW)))
    assert np.array_equal(image(rt.generate(PROMPT, **KW)), base)  # back to no LoRA
    kinds = [c[0] for c in trt.calls]
    assert "refit_cuda_engine" not in kinds and "build" not in kinds
    if kind == "fp8":  # one capture per engine and runtime (rt, fresh), however many switches
        captured = [c[1] for c in trt.calls if c[0] == "captured"]
        assert captured.count("transformer.fp8.lora") == 2, captured
    for loras, msg in (([(trt_loras["big"], 1.0)], r"rank 16 on .*bound of 8 \(max_lora_rank\)"),
                       ([(trt_loras["a"], 1.0)] * 3, r"3 LoRAs at once.*bound of 2 \(max_loras\)"),
                       ([(trt_loras["other"], 1.0)], "another model size")):
        with pytest.raises(RequestError, match=msg):
            rt.generate(PROMPT, loras=loras, **KW)
        assert np.array_equal(image(rt.generate(PROMPT, **KW)), base)  # nothing half-applied


def test_branch_reads_the_activation_before_the_awq_scale():
    """An INT4 AWQ layer multiplies its activation by the pre-quantization scale before the MatMul (its weight was
    divided by it): the branch must read the activation before that Mul (the LoRA's factors are not scaled)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from zimage_deploy.lora.onnx_branch import add_branches

    g = np.random.default_rng(0)
    w, s, bias = (g.standard_normal(sh).astype(np.float32) for sh in ((3, 4), (4,), (3,)))
    s = np.abs(s) + 0.5
    nodes = [helper.make_node("Mul", ["x", "l.pre_quant_scale"], ["l.input_awq"]),
             helper.make_node("Transpose", ["l.weight"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["l.input_awq", "wt"], ["y"]),
             helper.make_node("Add", ["y", "l.bias"], ["out"])]
    graph = helper.make_graph(nodes, "awq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(a, n) for a, n in ((w / s, "l.weight"),
                                                                          (s, "l.pre_quant_scale"), (bias, "l.bias"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    assert add_branches(model, {"l.weight": (3, 4)}, ranks={"l.weight": 2}) == ["l.weight"]
    onnx.checker.check_model(model)
    x, down, up, scale = (g.standard_normal(sh).astype(np.float32) for sh in ((2, 4), (4, 2), (2, 3), (2,)))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x, "l.lora_down_t": down, "l.lora_up_t": up, "l.lora_scale": scale})[0]
    want = (x * s) @ (w / s).T + ((x @ down) * scale) @ up + bias
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
