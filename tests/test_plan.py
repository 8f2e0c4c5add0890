"""The VRAM planner: weights computed from the configs equal what builds write, engine sizes are read from a
build, and the real-size figures and runtime modes agree with independently measured / stated numbers."""

from __future__ import annotations

import pytest
import torch

from zimage_deploy import build, plan
from zimage_deploy.checkpoint import read_config
from zimage_deploy.cli import run_cli
from zimage_deploy.plan import GIB, config_weights, make_plan
from zimage_deploy.targets import get_target

COMPONENTS = ("text_encoder", "context_refiner", "transformer", "vae_decoder", "vae_encoder")


def _cfgs(ckpt):
    return {k: read_config(ckpt, k) for k in ("transformer", "text_encoder", "vae")}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_config_weights_equal_the_built_graphs(request, tiny_ckpt, precision):
    """The planner's weights for each component, computed from the configs alone, equal the bytes of the
    initializers the build attached to that component's graph (BF16: norms and timestep embedder in float32)."""
    from zimage_deploy import manifest as manifest_io

    out = request.getfixturevalue(f"tiny_{precision}")
    comps = manifest_io.load(out)["components"]
    computed = config_weights(plan._meta_modules(_cfgs(tiny_ckpt)), {c: precision for c in COMPONENTS})
    assert computed == {c: comps[c]["weight_bytes"] for c in COMPONENTS}


# Measured on real-size random checkpoints by the lean export (benchmarks/reports/quantize-realsize-2026-11-26.md
# and export-memory-2026-11-26.md): graph sizes in GiB.
MEASURED_GIB = {("bf16", "transformer"): 10.79, ("bf16", "text_encoder"): 7.31, ("fp8", "transformer"): 5.52,
                ("int4", "transformer"): 2.96, ("int4", "text_encoder"): 2.42, ("bf16", "context_refiner"): 0.68}


@pytest.mark.parametrize("precision,component", sorted(MEASURED_GIB))
def test_real_size_weights_match_the_measured_graphs(precision, component):
    p = make_plan("rtx4090", precision)
    (part,) = [x for x in p.parts if x.name == component]
    assert part.weights / GIB == pytest.approx(MEASURED_GIB[(precision, component)], rel=0.01)


def test_real_size_modes_and_floor():
    """Stated expectations: on a 24 GB card BF16 fits at 1024² with everything resident but not at 2048² (the VAE's
    full-resolution activations), FP8 always; an 80 GB H100 holds everything. The DiT's compute floor is at least
    2 x (transformer parameters) x tokens per step over the datasheet peak (attention adds the rest)."""
    assert make_plan("rtx4090", "bf16").mode == "all-resident"
    assert make_plan("rtx4090", "bf16", 2048, 2048).mode == "low-vram"
    assert make_plan("rtx4090", "fp8", 2048, 2048).mode == "all-resident"
    assert make_plan("h100", "bf16", 2048, 2048).mode == "all-resident"
    h100 = make_plan("h100", "bf16", 1024, 1024)
    dit_params = 6.155e9 - 0.68 * GIB / 2  # the context refiner runs once per prompt, outside the step
    tokens = 64 * 64 + 128
    lower = 8 * 2 * dit_params * tokens / 989.4e12
    assert lower <= h100.floor_seconds["transformer"] <= 1.3 * lower
    assert h100.floor_seconds["total"] > h100.floor_seconds["transformer"]


def test_plan_reads_the_engine_sizes(tmp_path, tiny_ckpt):
    """With --engine-dir the weights are the engine plans' sizes, and each plan holds at least its weights."""
    from zimage_deploy import manifest as manifest_io

    out = tmp_path / "engines"
    assert build.main(["--model", str(tiny_ckpt), "--target", "rtx4090", "--precision", "bf16", "--out", str(out),
                       "--skip-parity"]) == 0
    p = make_plan("rtx4090", "bf16", 256, 256, engine_dir=out)
    comps = manifest_io.load(out)["components"]
    computed = config_weights(plan._meta_modules(_cfgs(tiny_ckpt)), {c: "bf16" for c in COMPONENTS})
    for part in p.parts:
        assert part.source == "engine plan" and part.weights == comps[part.name]["engine"]["bytes"]
        assert part.weights >= computed[part.name]
    assert p.mode == "all-resident"


@pytest.mark.parametrize("argv,message", [
    (["--target", "rtx4090", "--height", "1000"], "multiple of 16"),
    (["--target", "rtx4090", "--width", "0"], "multiple of 16"),
    (["--target", "rtx4090", "--steps", "0"], "--steps must be >= 1"),
    (["--target", "rtx4090", "--precision", "nvfp4"], "not supported on target"),
    (["--engine-dir", "/nonexistent/build"], "has no manifest.json"),
])
def test_plan_errors(argv, message, capsys):
    assert run_cli(lambda: plan.main(argv)) == 2
    assert message in capsys.readouterr().err


def test_plan_cli_table(capsys, tmp_path):
    out = tmp_path / "plan.json"
    assert plan.main(["--target", "rtx5090", "--precision", "nvfp4", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "runtime mode: all-resident" in text and "| transformer | nvfp4 |" in text
    assert out.is_file()


def test_runtime_mode_follows_the_build_plan():
    from zimage_deploy.runtime.backends import planned_low_vram

    assert planned_low_vram({"runtime": {"mode": "low-vram"}}, None) is True
    assert planned_low_vram({"runtime": {"mode": "all-resident"}}, None) is False
    assert planned_low_vram({}, None) is False
    assert planned_low_vram({"runtime": {"mode": "weight-streaming"}}, None) is True
    assert planned_low_vram({"runtime": {"mode": "low-vram"}}, False) is False  # asked for explicitly
    assert planned_low_vram({"runtime": {"mode": "all-resident"}}, True) is True


# -- ControlNet builds --------------------------------------------------------------------------------------
V1 = dict(control_layers_places=(0, 1), control_in_dim=16, add_control_noise_refiner=None, seed=4)
UNION = dict(control_layers_places=(0, 1), control_refiner_layers_places=(0,), control_in_dim=33,
             add_control_noise_refiner="control_noise_refiner", seed=3)


@pytest.mark.parametrize("precision,kind", [("fp32", "v1"), ("bf16", "union")])
def test_controlnet_weights_equal_the_built_graph(tmp_path, tiny_ckpt, precision, kind):
    """A ControlNet build's `controlnet` graph (its branch plus the DiT embedders and noise refiner it shares)
    holds exactly the bytes the planner computes from the configs, with --controlnet before building and from
    the build's record after; the transformer differs from the plain one only by its per-layer hint slots."""
    from zimage_deploy import manifest as manifest_io
    from zimage_deploy.tiny_controlnet import write_controlnet

    cn = write_controlnet(tmp_path / "cn" / "union.safetensors", single_file=True, **(V1 if kind == "v1" else UNION))
    out = tmp_path / "build"
    assert build.main(["--model", str(tiny_ckpt), "--target", "cpu", "--precision", precision, "--out", str(out),
                       "--controlnet", str(cn), "--skip-parity"]) == 0
    comps = manifest_io.load(out)["components"]
    before = make_plan("rtx4090", precision if precision != "fp32" else "bf16", 256, 256, model=str(tiny_ckpt),
                       controlnet=str(cn))
    names = [p.name for p in before.parts]
    assert names.index("controlnet") == names.index("transformer") - 1
    from zimage_deploy.models.controlnet import ControlBranch
    from zimage_deploy.controlnet import open_controlnet

    dit, text, vae = plan._meta_modules(_cfgs(tiny_ckpt))
    with torch.device("meta"):
        branch = ControlBranch(open_controlnet(str(cn), tiny_ckpt).config, dit.cfg)
    computed = config_weights((dit, text, vae), {c: precision for c in COMPONENTS + ("controlnet",)}, branch)
    assert computed["controlnet"] == comps["controlnet"]["weight_bytes"]
    slots = dit.cfg.n_layers * (8 + 4)  # an int64 slot and a float32 on/off switch per main layer
    assert computed["transformer"] + slots == comps["transformer"]["weight_bytes"]
    n_branch = sum(p.numel() for p in branch.parameters())
    assert comps["controlnet"]["weight_bytes"] > n_branch * (4 if precision == "fp32" else 2)  # shared parts too


def test_controlnet_plan_modes(tmp_path, tiny_ckpt):
    """The branch runs every step beside the transformer: low-vram mode holds both, and its hints are counted in
    both components' activations."""
    from zimage_deploy.tiny_controlnet import write_controlnet

    cn = write_controlnet(tmp_path / "cn" / "u.safetensors", single_file=True, **UNION)
    plain = make_plan("rtx4090", "bf16", 256, 256, model=str(tiny_ckpt))
    with_cn = make_plan("rtx4090", "bf16", 256, 256, model=str(tiny_ckpt), controlnet=str(cn))
    per = {p.name: p for p in with_cn.parts}
    plain_per = {p.name: p for p in plain.parts}
    cfg = plan._meta_modules(_cfgs(tiny_ckpt))[0].cfg
    hints = 2 * 1 * ((256 // 8 // 2) ** 2 + 128) * cfg.dim * 2  # n_hints x batch x joint_len x dim, BF16
    assert per["transformer"].act_opt == plain_per["transformer"].act_opt + hints
    assert per["controlnet"].calls == with_cn.steps and per["controlnet"].flops > 0
    biggest = lambda p: max(x.act_opt for x in p.parts)  # noqa: E731 (the tiny model's is the VAE's)
    assert with_cn.modes["all-resident"] - plain.modes["all-resident"] == \
        per["controlnet"].weights + biggest(with_cn) - biggest(plain)
    others = [p.weights + p.act_opt for p in with_cn.parts if p.name not in ("transformer", "controlnet")]
    denoise = per["transformer"].weights + per["controlnet"].weights + max(per["transformer"].act_opt,
                                                                           per["controlnet"].act_opt)
    assert with_cn.modes["low-vram"] == max(others + [denoise]) + plan.CUDA_OVERHEAD
    assert with_cn.floor_seconds["controlnet"] > 0


def test_real_size_union_controlnet(tmp_path):
    """A Union-2.1-shaped ControlNet at the real width (15 control blocks, 2 control refiner blocks, 33 channels),
    written as a sparse safetensors file (headers only are read): the branch's BF16 bytes equal 2 bytes per
    parameter of diffusers' own ZImageControlNetModel (norms in float32 aside), and BF16 no longer fits a 24 GB
    card with everything resident at 1024² while FP8 does."""
    import json
    import os

    from diffusers import ZImageControlNetModel

    cfg = dict(control_layers_places=list(range(0, 30, 2)), control_refiner_layers_places=[0, 1],
               control_in_dim=33, add_control_noise_refiner="control_noise_refiner", dim=3840, n_refiner_layers=2,
               n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, all_patch_size=[2], all_f_patch_size=[1])
    with torch.device("meta"):
        model = ZImageControlNetModel(**cfg)
    header, offset = {}, 0
    own = 0
    for name, t in model.state_dict().items():
        if not name.startswith("control_"):
            continue  # diffusers' copies of the transformer's modules: not in the released files
        n = t.numel() * 2
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
        own += t.numel()
    folder = tmp_path / "union-2.1"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "ZImageControlNetModel", **cfg}))
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = folder / "diffusion_pytorch_model.safetensors"
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
    os.truncate(path, 8 + len(raw) + offset)  # sparse: no data written
    bf16 = make_plan("rtx4090", "bf16", controlnet=str(folder))
    part = {p.name: p for p in bf16.parts}["controlnet"]
    plain = {p.name: p for p in make_plan("rtx4090", "bf16").parts}
    shared = plain["transformer"].weights  # upper bound for the shared embedders + noise refiner
    assert 3.0e9 < own < 3.6e9  # the README's "~3.3 B parameters"
    assert 2 * own <= part.weights <= 2 * own + 0.1 * shared
    assert bf16.mode != "all-resident" and make_plan("rtx4090", "fp8", controlnet=str(folder)).mode == \
        "all-resident"


def test_controlnet_plan_errors(tmp_path, capsys, tiny_fp32):
    for argv, message in ((["--controlnet", str(tmp_path / "missing.safetensors")], "no such file"),
                          (["--engine-dir", str(tiny_fp32), "--controlnet", str(tmp_path)], "--build-dir")):
        assert run_cli(lambda: plan.main(argv)) == 2
        assert message in capsys.readouterr().err
    bad = tmp_path / "lora.safetensors"
    from safetensors.torch import save_file

    save_file({"transformer.layers.0.attention.to_q.lora_A.weight": torch.zeros(4, 8)}, str(bad))
    assert run_cli(lambda: plan.main(["--controlnet", str(bad)])) == 2
    assert "error:" in capsys.readouterr().err


def test_low_vram_runtime_keeps_the_denoise_stage_together():
    """What the plan assumes of low-VRAM mode, the TensorRT runtime does: the ControlNet's engine and the
    transformer's stay resident together through the loop; other stages replace each other."""
    from zimage_deploy.runtime.tensorrt_backend import low_vram_evictions

    assert low_vram_evictions("transformer", ["controlnet"]) == []
    assert low_vram_evictions("controlnet", ["transformer"]) == []
    assert low_vram_evictions("transformer", ["text_encoder", "context_refiner"]) == ["text_encoder",
                                                                                      "context_refiner"]
    assert low_vram_evictions("vae_decoder", ["controlnet", "transformer"]) == ["controlnet", "transformer"]
    assert low_vram_evictions("text_encoder", []) == []


# -- planner vs quantized graphs at the real widths --------------------------------------------------------------
def _real_width_graph(folder, shapes: dict[str, tuple[int, int]]):
    """A BF16 graph of linear layers (weight -> Transpose -> MatMul, as exported) with these weight shapes."""
    import onnx
    from onnx import TensorProto, helper

    g = torch.Generator().manual_seed(0)
    nodes, inputs, outputs, inits = [], [], [], []
    for name, (out_f, in_f) in shapes.items():
        w = (torch.randn(out_f, in_f, generator=g) * 0.02).to(torch.bfloat16)
        inits.append(helper.make_tensor(f"{name}.weight", TensorProto.BFLOAT16, [out_f, in_f],
                                        w.view(torch.int16).numpy().tobytes(), raw=True))
        nodes += [helper.make_node("Transpose", [f"{name}.weight"], [f"{name}.wt"], name=f"/{name}/Transpose"),
                  helper.make_node("MatMul", [f"{name}.x", f"{name}.wt"], [f"{name}.y"], name=f"/{name}/MatMul")]
        inputs.append(helper.make_tensor_value_info(f"{name}.x", TensorProto.BFLOAT16, [1, in_f]))
        outputs.append(helper.make_tensor_value_info(f"{name}.y", TensorProto.BFLOAT16, [1, out_f]))
    model = helper.make_model(helper.make_graph(nodes, "layers", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 21)])
    folder.mkdir(parents=True)
    onnx.save(model, str(folder / "model.onnx"))
    return {f"{n}.weight": torch.empty(s, device="meta") for n, s in shapes.items()}


ROWS = 16  # output rows per layer: the scales run along the input width, which is the real one


@pytest.mark.parametrize("component,scheme", [("transformer", "fp8"), ("transformer", "int4"),
                                              ("transformer", "nvfp4"), ("text_encoder", "int4"),
                                              ("text_encoder", "fp8")])
def test_planner_bytes_equal_the_quantized_graph_at_real_width(tmp_path, component, scheme):
    """The planner's bytes per weight for each scheme (block scales included) equal what the quantize stage writes
    for the real model: one layer of each real input width of the component's quantized layers (16 rows each; the
    blocks run along the input), in BF16, quantized with the block the build picks for the real model. Only the
    per-tensor scalars (FP8 scales, NVFP4 global scales, a zero point) are beyond the planner's count."""
    from zimage_deploy.quantize.options import QuantOptions
    from zimage_deploy.quantize.qdq import quantize_graph
    from zimage_deploy.quantize.stage import int4_block
    from zimage_deploy.schemes import get_scheme

    cfgs = plan._configs(None, None)
    dit, text, _ = plan._meta_modules(cfgs)
    if component == "transformer":
        named, quantizable = plan._dit_split(dit)["transformer"], plan._dit_quantizable
    else:
        named, quantizable = list(text.named_parameters()), plan._text_quantizable
    shapes = {}
    for name, p in named:  # the first layer of each input width
        if p.ndim == 2 and name.endswith(".weight") and quantizable(name) and \
                p.shape[1] not in {s[1] for s in shapes.values()}:
            shapes[name[: -len(".weight")]] = (ROWS, p.shape[1])
    assert len(shapes) >= 2
    params = _real_width_graph(tmp_path / "src", shapes)
    block = int4_block(QuantOptions(), {"dim": cfgs["transformer"]["dim"]})  # the build's rule for this model
    scales = None
    if get_scheme(scheme).needs_scales:
        scales = {f"{n}.{k}": torch.tensor(1.0) for n in shapes for k in ("weight_amax", "input_amax")}
    summary = quantize_graph(tmp_path / "src", tmp_path / "dst", scheme, block, scales, progress=False)
    assert sorted(summary["quantized"]) == sorted(shapes)
    assert summary["bytes_before"] == plan.weight_bytes(list(params.items()), "bf16")
    planned = plan.weight_bytes(list(params.items()), scheme)
    extra = summary["bytes_after"] - planned
    assert 0 <= extra <= 16 * len(shapes), (summary["bytes_after"], planned, summary["block"])


# -- the cards people own (issue #33) --------------------------------------------------------------------------

def test_modes_follow_from_the_configs_and_the_cards_memory():
    """What each mode needs depends on the build, not the card; the card's memory alone picks the first mode (in
    MODES' order) that fits 95% of it — at 1024², 8 steps, for every GPU target."""
    from zimage_deploy.targets import TARGETS

    needs = None
    for name, t in TARGETS.items():
        if t.compute_capability is None:
            continue
        p = make_plan(name, "int4", advise=False)
        needs = needs or p.modes
        assert p.modes == needs and p.memory == t.memory_gib * GIB
        fitting = [m for m in plan.MODES if p.modes[m] <= p.memory * plan.USABLE]
        assert p.mode == (fitting[0] if fitting else "does-not-fit")


def test_sixteen_and_twelve_gb_cards():
    """The issue's goals, planned: Turbo 1024² on a 16 GB card in FP8 with no CPU offload of the DiT (low-VRAM;
    with an INT4 text encoder everything resident), on a 12 GB card likewise, INT4 on a 12 GB Ampere card. BF16
    on 12 GB needs weight streaming, with the DiT's resident budget what its stage leaves free, and the plan says
    what does better."""
    assert make_plan("rtx4080", "fp8").mode == "low-vram"
    assert make_plan("rtx4080", "fp8", text_encoder="int4").mode == "all-resident"
    assert make_plan("rtx5070", "fp8", text_encoder="int4").mode == "all-resident"
    assert make_plan("rtx3060", "int4").mode == "all-resident"
    bf16 = make_plan("rtx3060", "bf16")
    per = {p.name: p for p in bf16.parts}
    assert bf16.mode == "weight-streaming"
    usable = int(bf16.memory * plan.USABLE)
    assert bf16.stream_budgets["transformer"] == usable - plan.CUDA_OVERHEAD - per["transformer"].act_opt
    assert bf16.stream_budgets["text_encoder"] == per["text_encoder"].weights  # fits whole in its own stage
    assert "--precision int4: all-resident" in " ".join(bf16.advice)
    streamed = (per["transformer"].weights - bf16.stream_budgets["transformer"]) * bf16.steps
    assert bf16.floor_seconds["transfers"] > streamed / (get_target("rtx3060").peaks.pcie * 1e9)
    fp8 = make_plan("rtx4080", "fp8")
    assert any(a.startswith("--text-encoder-precision int4: all-resident") for a in fp8.advice)
    assert make_plan("rtx4080", "bf16", 2048, 2048).advice  # smaller sizes or precisions that do better


def test_text_encoder_cpu_mode_where_the_text_encoder_is_the_widest_stage():
    """Where only the text encoder's stage is too wide, the plan runs it on the CPU and keeps the rest on the
    GPU (one stage at a time), before falling back to weight streaming; its time is left out of the floor."""
    p = plan.Plan("rtx3080", "fp8", "turbo", 1024, 1024, 8, 1, 10 * GIB)
    p.parts = [plan.Part("text_encoder", "bf16", 9 * GIB, "config", GIB // 2, GIB, 1e12, 1),
               plan.Part("transformer", "fp8", 6 * GIB, "config", GIB // 2, GIB, 1e13, 8),
               plan.Part("vae_decoder", "bf16", GIB // 10, "config", GIB, 2 * GIB, 1e12, 1)]
    plan._choose_mode(p)
    assert p.mode == "text-encoder-cpu"
    assert p.modes["text-encoder-cpu"] == 6 * GIB + GIB // 2 + plan.CUDA_OVERHEAD < p.modes["low-vram"]
    plan._floors(p, get_target("rtx3080"))
    assert p.floor_seconds["text_encoder"] == 0 and p.floor_seconds["transfers"] > 0


def test_build_turns_on_weight_streaming_where_the_plan_needs_it():
    from zimage_deploy.engines.profiles import EngineOptions

    log = []
    opts = plan.planned_engine_options("rtx3060", "bf16", 1024, "turbo", None, None, None, EngineOptions(),
                                       log.append)
    assert opts.weight_streaming and "weight streaming" in log[-1]
    log.clear()
    assert plan.planned_engine_options("rtx3060", "int4", 1024, "turbo", None, None, None, EngineOptions(),
                                       log.append) == EngineOptions()
    assert "all-resident" in log[-1]


def test_all_targets_table(capsys, tmp_path):
    out = tmp_path / "rows.json"
    assert plan.main(["--all-targets", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| rtx3060 | 12 | SM86 | int4* | int4 | all-resident |" in text
    assert "| rtx4080 | 16 | SM89 | fp8* | int4 | all-resident |" in text
    rows = {(r["target"], r["precision"]): r for r in __import__("json").loads(out.read_text())["rows"]}
    assert ("rtx3090", "fp8") not in rows and rows[("rtx3060", "bf16")]["mode"] == "weight-streaming"


# -- several builds on one card (issue #31's planner part) ------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_graphs(tmp_path_factory, tiny_ckpt):
    """A tiny rtx4090 build without engines (the plan reads its graphs' weight bytes)."""
    out = tmp_path_factory.mktemp("set") / "turbo"
    assert build.main(["--model", str(tiny_ckpt), "--target", "rtx4090", "--precision", "bf16", "--out", str(out),
                       "--skip-parity", "--skip-engines"]) == 0
    return out


def _copy(src, dst, target=None, transformer_gib=None):
    import json
    import shutil

    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    if target:
        manifest["target"] = target
    if transformer_gib:
        manifest["components"]["transformer"]["weight_bytes"] = int(transformer_gib * GIB)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_set_of_builds_on_one_card(gpu_graphs, tmp_path, capsys):
    """Two small builds stay resident together; two whose DiTs (12 GiB each) fit a 24 GB card alone but not
    together are swapped in one at a time, each in its own mode; the set plan is written for a server to follow."""
    import json

    other = _copy(gpu_graphs, tmp_path / "base")
    s = plan.plan_set([gpu_graphs, other])
    assert s.mode == "resident-together" and s.together < 2 * make_plan(
        "rtx4090", "bf16", 256, 256, engine_dir=gpu_graphs).modes["all-resident"]  # one CUDA context, not two
    big = [_copy(gpu_graphs, tmp_path / n, transformer_gib=12) for n in ("big1", "big2")]
    out = tmp_path / "set.json"
    assert plan.main(["--engine-dir", str(big[0]), "--engine-dir", str(big[1]), "--json", str(out)]) == 0
    assert "set mode: one-at-a-time" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["mode"] == "one-at-a-time" and [b["mode"] for b in record["builds"]] == ["all-resident"] * 2
    assert record["together"] > 24 * GIB * plan.USABLE >= record["one_at_a_time"]
    assert all(b["swap_seconds"] > 0.3 for b in record["builds"])  # 12 GiB over PCIe 4.0 x16


def test_set_of_builds_for_other_cards(gpu_graphs, tmp_path, capsys):
    blackwell = _copy(gpu_graphs, tmp_path / "b", target="rtx5090")
    ada = _copy(gpu_graphs, tmp_path / "a", target="rtx4080")
    for argv, message in ((["--engine-dir", str(gpu_graphs), "--engine-dir", str(blackwell)], "pass --target"),
                          (["--engine-dir", str(gpu_graphs), "--engine-dir", str(blackwell), "--target", "rtx4090"],
                           "do not run on rtx4090")):
        assert run_cli(lambda: plan.main(argv)) == 2
        assert message in capsys.readouterr().err
    s = plan.plan_set([gpu_graphs, ada], target="rtx4080")  # same SM89 engines, on the 16 GB card
    assert s.target == "rtx4080" and s.memory == 16 * GIB and s.mode == "resident-together"


def test_has_engines_means_every_component_has_one():
    """One answer to "does the build have engines?" (TensorRT under `auto`, the Ray replicas' and batch actors'
    GPU): every component's engine complete; a build with some missing runs without TensorRT."""
    from zimage_deploy.batch.ray_data import uses_gpu
    from zimage_deploy.manifest import has_engines

    done = {"engine": {"status": "complete"}}
    assert has_engines({"components": {"text_encoder": done, "transformer": done}})
    assert not has_engines({"components": {"text_encoder": done, "transformer": {}}})  # `any` said yes
    assert not has_engines({"components": {}})
    assert uses_gpu is has_engines


def test_edit_build_is_planned(edit_fp32, tiny_fp32):
    """An Edit build (planned on a card): the SigLIP tower and refiner are parts whose computed weights equal the
    built graphs', and the DiT's activations count the condition images' rows (more than Turbo's at one size)."""
    import json

    manifest = json.loads((edit_fp32 / "manifest.json").read_text())
    cfgs = plan._configs(None, manifest, edit=True)
    computed = config_weights(plan._meta_modules(cfgs), {c: "fp32" for c in manifest["components"]},
                              vision=plan._meta_vision(cfgs["siglip"]))
    assert {c: e["weight_bytes"] for c, e in manifest["components"].items()} == computed
    edit = make_plan("h100", "fp32", 256, 256, engine_dir=edit_fp32, on_target="h100")
    turbo = make_plan("h100", "fp32", 256, 256, engine_dir=tiny_fp32, on_target="h100")
    parts = {p.name: p for p in edit.parts}
    assert {"vision_encoder", "siglip_refiner"} <= set(parts) and edit.mode == "all-resident"
    assert parts["vision_encoder"].act_max > parts["vision_encoder"].act_opt > 0  # two condition images at most
    dit = {p.name: p for p in turbo.parts}["transformer"]
    assert parts["transformer"].act_opt > 2 * dit.act_opt  # batch 2 (CFG) and the condition rows
