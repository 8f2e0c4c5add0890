"""The Z-Image union ControlNet through export, quantization, engines and the runtime, against diffusers'
`ZImageControlNetPipeline` / `ZImageControlNetInpaintPipeline` (float32, within 2/255, ONNX Runtime and Torch).

Checkpoints (tiny, written by zimage_deploy/tiny_controlnet.py with diffusers' own classes):
- union: a ZImageControlNetPipeline checkpoint, control refiner blocks on, control_in_dim 33 (inpainting union), random;
- v1: a single .safetensors in the released format, control_in_dim 16, plain control refiner, random;
- v20: a single file of the "control_layers" kind (a zero control_noise_refiner, as the Union 2.0 file), 33 channels;
- zero: a default-initialised diffusers folder (zero projections: every hint is zero, the scale cannot matter).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from backend_conformance import CPU_BACKENDS, LORA_BACKENDS
from conftest import need, synthetic_image
from zimage_deploy import ZImageRuntime, build, generate
from zimage_deploy.cli import run_cli
from zimage_deploy.errors import RequestError, UserError
from zimage_deploy.runtime.pipeline import Pipeline
from zimage_deploy.runtime.validate import BadInput, ImageInfo, Limits, TooLarge, check_request
from zimage_deploy.tiny_controlnet import make_controlnet, write_controlnet, write_controlnet_pipeline

UNION = dict(control_layers_places=(0, 1), control_refiner_layers_places=(0,), control_in_dim=33,
             add_control_noise_refiner="control_noise_refiner", seed=3)
V1 = dict(control_layers_places=(0, 1), control_in_dim=16, add_control_noise_refiner=None, seed=4)
V20 = dict(control_layers_places=(0, 1), control_refiner_layers_places=(0,), control_in_dim=33,
           add_control_noise_refiner="control_layers", seed=5)
PROMPT = "a red fox in the snow"


def as_array(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def check_close(got, expected, tol=2):
    got, expected = as_array(got), as_array(expected)
    assert got.shape == expected.shape
    assert expected.std() > 10, "reference image is flat: the comparison would prove little"
    assert np.abs(got - expected).max() <= tol


def mask_image(width, height):
    m = np.zeros((height, width), dtype=np.uint8)
    m[height // 4: 3 * height // 4, width // 3: width - 8] = 255
    return Image.fromarray(m)


def fp32_build(tmp_path_factory, model, *extra, precision="fp32"):
    out = tmp_path_factory.mktemp(f"cn-{precision}")
    assert build.main(["--model", str(model), "--target", "cpu", "--precision", precision, "--out", str(out),
                       *extra]) == 0
    return out


@pytest.fixture(scope="module")
def ckpts(tiny_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("controlnets")
    return {
        "union": write_controlnet_pipeline(d / "union-pipe", tiny_ckpt, **UNION),
        "v1": write_controlnet(d / "v1" / "Z-Image-Turbo-Fun-Controlnet-Union.safetensors", single_file=True, **V1),
        "v1_folder": write_controlnet(d / "v1-folder", **V1),  # the same weights, diffusers layout (the reference)
        "v20": write_controlnet(d / "v20" / "union-2.0.safetensors", single_file=True, zero_refiner=True, **V20),
        "v20_folder": write_controlnet(d / "v20-folder", **V20),
        "zero": write_controlnet(d / "zero", init="default", **{**V1, "seed": 6}),
    }


@pytest.fixture(scope="module")
def builds(ckpts, tiny_ckpt, tmp_path_factory):
    return {
        "union": fp32_build(tmp_path_factory, ckpts["union"]),  # its controlnet/ without the flag
        "v1": fp32_build(tmp_path_factory, tiny_ckpt, "--controlnet", str(ckpts["v1"])),
        "v20": fp32_build(tmp_path_factory, tiny_ckpt, "--controlnet", str(ckpts["v20"])),
        "zero": fp32_build(tmp_path_factory, tiny_ckpt, "--controlnet", str(ckpts["zero"])),
    }


def reference(which, ckpts, tiny_ckpt, inpaint=False):
    from diffusers import (ZImageControlNetInpaintPipeline, ZImageControlNetModel, ZImageControlNetPipeline,
                           ZImagePipeline)

    cls = ZImageControlNetInpaintPipeline if inpaint else ZImageControlNetPipeline
    if which == "union":
        pipe = cls.from_pretrained(ckpts["union"], dtype=torch.float32)
    else:
        base = ZImagePipeline.from_pretrained(tiny_ckpt, dtype=torch.float32)
        controlnet = ZImageControlNetModel.from_pretrained(ckpts[f"{which}_folder"], dtype=torch.float32)
        pipe = cls(**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASES = [  # build, height, width, steps, scale, control image size
    ("union", 96, 128, 3, 0.75, (100, 70)),
    ("union", 128, 64, 2, 1.3, (64, 160)),
    ("v1", 112, 80, 3, 0.75, (80, 112)),
    ("v20", 64, 96, 3, 0.5, (200, 150)),
]


@pytest.mark.parametrize("which,h,w,steps,scale,csize", CASES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_diffusers(builds, ckpts, tiny_ckpt, backend, which, h, w, steps, scale, csize):
    control = synthetic_image(*csize, seed=h + w)
    expected = reference(which, ckpts, tiny_ckpt)(
        PROMPT, control_image=control, height=h, width=w, num_inference_steps=steps, guidance_scale=0.0,
        controlnet_conditioning_scale=scale, generator=torch.Generator("cpu").manual_seed(7)).images[0]
    got = Pipeline(builds[which], backend)(PROMPT, h, w, steps, seed=7, control_image=control,
                                           controlnet_scale=scale, progress=False)[0]
    check_close(got, expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("h,w", [(96, 128), (128, 96)])
def test_inpainting_union_matches_diffusers(builds, ckpts, tiny_ckpt, backend, h, w):
    """control_in_dim 33: control latents + mask + masked-image latents (the image and mask of another size than the
    output: resized as diffusers does)."""
    image, mask, control = synthetic_image(120, 90, seed=1), mask_image(120, 90), synthetic_image(90, 90, seed=2)
    expected = reference("union", ckpts, tiny_ckpt, inpaint=True)(
        PROMPT, image=image, mask_image=mask, control_image=control, height=h, width=w, num_inference_steps=3,
        guidance_scale=0.0, generator=torch.Generator("cpu").manual_seed(9)).images[0]
    pipe = Pipeline(builds["union"], backend)
    got = pipe(PROMPT, h, w, 3, seed=9, control_image=control, images=[image], mask=mask, progress=False)[0]
    check_close(got, expected)
    without = pipe(PROMPT, h, w, 3, seed=9, control_image=control, progress=False)[0]
    assert np.abs(as_array(got) - as_array(without)).max() > 10  # the image and mask really condition it


@pytest.fixture(scope="module")
def base_build(ckpts, base_ckpt, tmp_path_factory):
    return fp32_build(tmp_path_factory, base_ckpt, "--variant", "base", "--controlnet", str(ckpts["v1"]))


@pytest.mark.parametrize("cfg_mode", ["batch", "sequential"])
def test_base_with_guidance_matches_diffusers(ckpts, base_ckpt, base_build, cfg_mode):
    """Base + ControlNet with classifier-free guidance and a negative prompt: the control latents go with both
    halves of the guided batch, as diffusers repeats them."""
    from diffusers import ZImageControlNetModel, ZImageControlNetPipeline, ZImagePipeline

    control = synthetic_image(64, 96, seed=6)
    base = ZImagePipeline.from_pretrained(base_ckpt, dtype=torch.float32)
    ref = ZImageControlNetPipeline(**base.components, controlnet=ZImageControlNetModel.from_pretrained(
        ckpts["v1_folder"], dtype=torch.float32))
    ref.set_progress_bar_config(disable=True)
    expected = ref(PROMPT, negative_prompt="blurry", control_image=control, height=96, width=64,
                   num_inference_steps=3, guidance_scale=3.0, controlnet_conditioning_scale=0.9,
                   generator=torch.Generator("cpu").manual_seed(4)).images[0]
    got = Pipeline(base_build, "onnxruntime", cfg_mode=cfg_mode)(
        PROMPT, 96, 64, 3, seed=4, negative_prompt="blurry", guidance_scale=3.0, control_image=control,
        controlnet_scale=0.9, progress=False)[0]
    check_close(got, expected)


def test_scale_zero_is_the_plain_turbo_image(builds, tiny_fp32):
    """Scale 0 (and no control image) give the plain build's image bit for bit (ONNX Runtime): the hints are zero
    and the hinted transformer adds exact zeros."""
    plain = Pipeline(tiny_fp32, "onnxruntime")(PROMPT, 96, 128, 3, seed=5, progress=False, output="pt")
    control = synthetic_image(96, 128, seed=3)
    for which in ("union", "v1"):
        pipe = Pipeline(builds[which], "onnxruntime")
        zero = pipe(PROMPT, 96, 128, 3, seed=5, control_image=control, controlnet_scale=0.0, progress=False,
                    output="pt")
        none = pipe(PROMPT, 96, 128, 3, seed=5, progress=False, output="pt")
        assert torch.equal(zero, plain) and torch.equal(none, plain)
        used = pipe(PROMPT, 96, 128, 3, seed=5, control_image=control, progress=False, output="pt")
        assert (used - plain).abs().max() > 0.05


def test_scale_matters_and_zero_init_does_nothing(builds):
    """With random weights the scale changes the image; a default-initialised ControlNet (zero projections) gives
    the plain image at any scale (which is why the other tests use random weights)."""
    control = synthetic_image(96, 96, seed=4)
    pipe = Pipeline(builds["v1"], "onnxruntime")
    a, b = (as_array(pipe(PROMPT, 96, 96, 3, seed=1, control_image=control, controlnet_scale=s, progress=False)[0])
            for s in (0.5, 1.0))
    assert np.abs(a - b).max() > 10
    zero = Pipeline(builds["zero"], "onnxruntime")
    plain = as_array(zero(PROMPT, 96, 96, 3, seed=1, progress=False)[0])
    for s in (0.75, 2.0):
        assert np.array_equal(as_array(zero(PROMPT, 96, 96, 3, seed=1, control_image=control, controlnet_scale=s,
                                            progress=False)[0]), plain)


def test_compiled_torch_runs_the_controlnet(builds):
    """The compiled Torch mode (dynamo; caption buckets) runs the ControlNet's hints graph and the hinted step: the
    image of the eager mode, no eager fallback."""
    control = synthetic_image(96, 96, seed=4)
    kw = dict(seed=1, steps=2, height=96, width=96, control_image=control, return_latents=True)
    eager = ZImageRuntime(builds["v1"], backend="torch", torch_mode="eager").generate(PROMPT, **kw)
    rt = ZImageRuntime(builds["v1"], backend="torch", torch_mode="compiled",
                       torch_options={"compile_backend": "eager"})
    got = rt.generate(PROMPT, **kw)
    assert float((got.latents - eager.latents).norm() / eager.latents.norm()) < 1e-5
    assert rt.fallbacks() == {} and rt.pipeline.backend.graph_stats()["entries"] == 1


def test_runtime_api_batches_and_timings(builds):
    """Two prompts with one control image run as one batch, each the image of its own call; the controlnet graph's
    time is reported per call."""
    rt = ZImageRuntime(builds["union"])
    control = synthetic_image(80, 80, seed=8)
    kw = dict(steps=2, height=64, width=64, control_image=control, controlnet_scale=0.8)
    both = rt.generate(["a cat", "a dog"], seed=[1, 2], **kw)
    assert both.timings["controlnet"] > 0 and both.timings["controlnet"] < both.timings["denoise"]
    for i, (p, s) in enumerate((("a cat", 1), ("a dog", 2))):
        alone = rt.generate(p, seed=s, **kw)
        assert np.array_equal(as_array(alone.images[0]), as_array(both.images[i]))
    with pytest.raises(RequestError, match="PIL image"):
        rt.generate("a cat", control_image="not an image")


def test_generate_cli(builds, ckpts, tiny_ckpt, tmp_path):
    control, out = tmp_path / "control.png", tmp_path / "out.png"
    synthetic_image(100, 70, seed=3).save(control)
    assert generate.main(["--engine-dir", str(builds["v1"]), "--prompt", PROMPT, "--seed", "7", "--steps", "3",
                          "--height", "112", "--width", "80", "--control-image", str(control), "--output",
                          str(out)]) == 0
    expected = reference("v1", ckpts, tiny_ckpt)(
        PROMPT, control_image=Image.open(control), height=112, width=80, num_inference_steps=3, guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(7)).images[0]  # default scale 0.75 on both sides
    check_close(Image.open(out), expected)


# -- the build ---------------------------------------------------------------------------------------------------
def test_manifest_records_the_controlnet(builds, ckpts):
    m = json.loads((builds["v1"] / "manifest.json").read_text())
    rec = m["controlnet"]
    assert rec["path"] == str(ckpts["v1"].resolve()) and len(rec["sha256"]) == 64
    assert rec["origin"] == "single file" and rec["config_from"] == "inferred from the weights"
    assert rec["config"]["control_layers_places"] == [0, 1] and rec["config"]["add_control_noise_refiner"] is None
    assert m["model"]["facts"]["n_hints"] == 2 and m["model"]["facts"]["control_in_dim"] == 16
    assert m["components"]["controlnet"]["outputs"][0]["dims"] == [2, "batch", "joint_len", 64]
    assert [i["name"] for i in m["components"]["transformer"]["inputs"]][-1] == "hints"
    v20 = json.loads((builds["v20"] / "manifest.json").read_text())["controlnet"]
    assert v20["config"]["add_control_noise_refiner"] == "control_layers"  # the zero refiner is read as 2.0 is
    union = json.loads((builds["union"] / "manifest.json").read_text())["controlnet"]
    assert union["origin"] == "pipeline checkpoint" and union["config"]["control_in_dim"] == 33


def test_plain_transformer_graph_unchanged(tiny_fp32, builds):
    """Builds without a ControlNet keep the plain per-step graph (no hints input, no hint nodes)."""
    import onnx

    plain = onnx.load(str(tiny_fp32 / "onnx" / "transformer" / "model.onnx"), load_external_data=False)
    hinted = onnx.load(str(builds["v1"] / "onnx" / "transformer" / "model.onnx"), load_external_data=False)
    assert [i.name for i in plain.graph.input] == ["latents", "timestep", "cap_states", "cap_lens"]
    assert not any("hint" in i.name for i in plain.graph.initializer)
    assert {"layers.0.hint_slot", "layers.1.hint_on"} <= {i.name for i in hinted.graph.initializer}


def test_rebuild_keys(builds, ckpts, tiny_ckpt, tmp_path, capsys):
    """Same ControlNet: every graph up to date; another ControlNet: only the transformer and controlnet graphs are
    exported again."""
    out = tmp_path / "b"
    args = ["--model", str(tiny_ckpt), "--out", str(out), "--skip-parity"]
    assert build.main(args + ["--controlnet", str(ckpts["v1"])]) == 0
    capsys.readouterr()
    assert build.main(args + ["--controlnet", str(ckpts["v1"])]) == 0
    assert capsys.readouterr().out.count("up to date, skipped") == 6
    assert build.main(args + ["--controlnet", str(ckpts["v1_folder"])]) == 0  # same weights, other files
    redone = [line for line in capsys.readouterr().out.splitlines() if "[export]" in line and "skipped" not in line]
    assert sorted(line.split()[1].rstrip(":") for line in redone) == ["controlnet", "transformer"]


def test_lean_export_equals_ordinary(tmp_path, tiny_ckpt):
    """The memory-lean path (two-layer template, layers stamped, weights streamed) gives the hinted transformer and the
    controlnet graph the same results as the ordinary export, on a deeper checkpoint."""
    import onnxruntime as ort

    from zimage_deploy.export.specs import CHECK_DIMS, specs_for
    from zimage_deploy.tiny import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "deep", dit=dict(n_layers=4), seed=11)
    cn = write_controlnet(tmp_path / "cn.safetensors", transformer=dict(n_layers=4), single_file=True,
                          **{**UNION, "control_layers_places": (0, 2)})
    outs = {}
    for lean in ("on", "off"):
        outs[lean] = tmp_path / lean
        assert build.main(["--model", str(ckpt), "--out", str(outs[lean]), "--lean", lean, "--controlnet", str(cn),
                           "--skip-parity"]) == 0
    m = json.loads((outs["on"] / "manifest.json").read_text())
    assert m["export"]["lean"] is True and m["controlnet"]["config"]["control_layers_places"] == [0, 2]
    for name in ("transformer", "controlnet"):
        spec = specs_for("turbo", m["model"]["facts"])[name]
        feeds = {io.name: t.numpy() for io, t in zip(spec.inputs, spec.sample(m["model"]["facts"], CHECK_DIMS,
                                                                               torch.float32))}
        got = {k: ort.InferenceSession(str(d / "onnx" / name / "model.onnx")).run(None, feeds)[0]
               for k, d in outs.items()}
        assert np.abs(got["on"] - got["off"]).max() <= 1e-5 * np.abs(got["off"]).max()


QUANTIZED = {"fp8": ["--calib-size", "4"], "int4": ["--int4-method", "rtn"]}


@pytest.fixture(scope="module")
def quantized(ckpts, tmp_path_factory):
    """precision -> a quantized build of the union checkpoint, each built once."""
    built = {}

    def get(precision):
        if precision == "fp8":
            need("modelopt")  # FP8 calibration
        if precision not in built:
            built[precision] = fp32_build(tmp_path_factory, ckpts["union"], *QUANTIZED[precision], precision=precision)
        return built[precision]
    return get


@pytest.mark.parametrize("precision", list(QUANTIZED))
def test_quantized_builds_pass_the_gate(quantized, precision):
    """The control branch is quantized like the DiT (same scheme, calibrated in the same loop with control images)
    and the quality gate, run with control images, passes."""
    out = quantized(precision)
    m = json.loads((out / "manifest.json").read_text())
    comps = m["components"]
    assert comps["controlnet"]["precision"] == comps["transformer"]["precision"] == precision
    assert comps["controlnet"]["quantization"]["layers"] > 10
    gate = m["stages"]["quantize"]["quality_gate"]
    assert gate["passed"] and gate["min_psnr_db"] >= 25
    control = synthetic_image(64, 64, seed=2)
    q = as_array(Pipeline(out, "onnxruntime")(PROMPT, 64, 64, 2, seed=3, control_image=control, progress=False)[0])
    assert q.std() > 10


@pytest.mark.parametrize("precision", list(QUANTIZED))
def test_quantized_branch_layers_match_an_independent_reference(quantized, precision):
    """Each quantized layer of the controlnet graph (its control blocks and the noise refiner it shares with the
    transformer), run by ONNX Runtime on sample inputs and fed the activation the graph computes, gives what numpy
    computes with independently quantized weights (tests/quant_ref.py; FP8: the activation quantized too)."""
    import onnx
    import onnxruntime as ort

    import quant_ref as qr
    from graph_ref import initializer, linear_io, with_outputs
    from zimage_deploy.export.specs import CHECK_DIMS, specs_for
    from zimage_deploy.scales import layers_of, load_scales

    out = quantized(precision)
    manifest = json.loads((out / "manifest.json").read_text())
    comp, facts = manifest["components"]["controlnet"], manifest["model"]["facts"]
    q = comp["quantization"]
    scales = {k: v.numpy() for k, v in load_scales(out / q["scales"])[0].items()}
    layers = layers_of(scales)
    assert any(n.startswith("control.") for n in layers) and any(n.startswith("noise_refiner.") for n in layers)
    spec = specs_for(manifest["variant"], facts)["controlnet"]
    sample = spec.sample(facts, dict(CHECK_DIMS, latent_h=16, latent_w=16), torch.float32)
    model = onnx.load(str(out / comp["onnx"]))
    io = {layer: linear_io(model, layer) for layer in layers}
    names = [v for pair in io.values() for v in pair]
    sess = ort.InferenceSession(with_outputs(model, names).SerializeToString(), providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in sess.get_outputs()],
                      sess.run(None, {i.name: x.numpy() for i, x in zip(spec.inputs, sample)})))
    unquantized = onnx.load(str(out / comp["unquantized"]["onnx"]))
    errors = {}
    for layer, (x, y) in io.items():
        w = initializer(unquantized, layer + ".weight")
        errors[layer] = qr.rel(values[y], qr.linear(values[x], w, precision, scales, layer, q["block"] or 1))
    assert max(errors.values()) <= 1e-5, errors  # float32 summation order only


def test_tensorrt_rtx_engines(ckpts, tmp_path):
    """A ControlNet build gets a controlnet engine and a transformer engine whose profile covers the hints (SM89,
    built ahead of time on this machine)."""
    need("tensorrt_rtx")
    from zimage_deploy.engines.builder import _has_cuda

    if _has_cuda():
        pytest.skip("checks the GPU-less (ahead-of-time) build path")
    out = tmp_path / "e"
    assert build.main(["--model", str(ckpts["union"]), "--target", "rtx4090", "--precision", "bf16", "--out",
                       str(out), "--skip-parity", "--max-side", "256", "--opt-side", "128"]) == 0
    comps = json.loads((out / "manifest.json").read_text())["components"]
    for name in ("controlnet", "transformer"):
        assert comps[name]["engine"]["status"] == "complete" and (out / comps[name]["engine"]["plan"]).stat().st_size
    lo, opt, hi = comps["transformer"]["engine"]["profile"]["hints"]
    # joint length = image tokens padded to 32 + caption slots: min 64 px (32 + 32), opt 128 px (64 + 128),
    # max 256 px (256 + 512)
    assert lo == [2, 1, 64, 64] and opt == [2, 1, 192, 64] and hi == [2, 4, 768, 64]


# -- bad inputs ------------------------------------------------------------------------------------------------
def _cli(main, argv, capsys):
    code = run_cli(lambda: main(argv))
    return code, capsys.readouterr().err


def test_bad_controlnets_fail_the_build(tiny_ckpt, ckpts, tmp_path, capsys):
    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    wrong_dim = write_controlnet(bad / "dim.safetensors", transformer=dict(dim=96, n_heads=3), single_file=True, **V1)
    wrong_heads = write_controlnet(bad / "heads", transformer=dict(n_heads=4, n_kv_heads=4), **V1)
    far = write_controlnet(bad / "far", **V1)
    cfg = json.loads((far / "config.json").read_text())
    (far / "config.json").write_text(json.dumps({**cfg, "control_layers_places": [0, 7]}))
    state = make_controlnet(**V1).state_dict()
    save_file({k: v for k, v in state.items() if "control_layers.1." not in k or "w2" not in k},
              str(bad / "missing.safetensors"))
    save_file({"lora_A.weight": torch.zeros(2, 2)}, str(bad / "lora.safetensors"))
    torch.save(state, bad / "pickled.pt")
    (bad / "junk.safetensors").write_bytes(b"\x00" * 64)
    cases = [
        (wrong_dim, "does not match the checkpoint's transformer: dim 96"),
        (wrong_heads, "n_heads 4"),
        (far, "control_layers_places [0, 7] must be distinct layers in 0..1"),
        (bad / "missing.safetensors", "do not match its config"),
        (bad / "lora.safetensors", "not a Z-Image ControlNet"),
        (bad / "pickled.pt", "pickle files are not read"),
        (bad / "junk.safetensors", "not a readable safetensors file"),
        (bad / "nowhere", "no such file or folder"),
    ]
    for path, message in cases:
        out = tmp_path / f"out-{path.name}"
        code, err = _cli(build.main, ["--model", str(tiny_ckpt), "--out", str(out), "--controlnet", str(path)],
                         capsys)
        assert code == 2 and message in err, (path, err)
        assert not out.exists()
    code, err = _cli(build.main, ["--model", "tiny-edit", "--out", str(tmp_path / "e"), "--controlnet",
                                  str(ckpts["v1"])], capsys)
    assert code == 2 and "Edit variant does not take one" in err


@pytest.fixture(scope="module")
def limits(builds):
    from zimage_deploy import manifest as manifest_io

    return {k: Limits.for_build(manifest_io.load(d)) for k, d in builds.items()}


def test_request_validation(limits, tiny_fp32):
    from zimage_deploy import manifest as manifest_io

    plain = Limits.for_build(manifest_io.load(tiny_fp32))
    ok = ImageInfo(300, 200)
    req = check_request(limits["union"], "a", control_image=ok, height=64, width=96)
    assert req.control_image and req.controlnet_scale == 0.75 and (req.height, req.width) == (64, 96)
    assert check_request(limits["union"], "a", control_image=ok, controlnet_scale=0).controlnet_scale == 0.0
    inpaint = check_request(limits["union"], "a", control_image=ok, images=[ImageInfo(90, 70)],
                            mask=ImageInfo(90, 70))
    assert (inpaint.height, inpaint.width) == (256, 256) and inpaint.strength is None  # the output, not the image
    bad = [
        (limits["union"], dict(controlnet_scale=0.5), RequestError, "needs a control image"),
        (plain, dict(control_image=ok), RequestError, "this build has no ControlNet"),
        (limits["union"], dict(control_image=ok, controlnet_scale=-0.1), RequestError, "must be in [0, 2]"),
        (limits["union"], dict(control_image=ok, controlnet_scale=float("nan")), RequestError, "must be in [0, 2]"),
        (limits["union"], dict(control_image=ok, controlnet_scale=1e300), RequestError, "must be in [0, 2]"),
        (limits["union"], dict(control_image=ok, controlnet_scale="1"), RequestError, "must be a number"),
        (limits["union"], dict(control_image=ImageInfo(5000, 5000)), TooLarge, "limited to"),
        (limits["union"], dict(control_image=ImageInfo(0, 10)), BadInput, "no pixels"),
        (limits["union"], dict(control_image=ImageInfo(8, 300)), RequestError, "at least 16 px"),
        (limits["union"], dict(control_image=ImageInfo(1000, 100)), RequestError, "8:1"),
        (limits["union"], dict(control_image=ok, images=[ok]), RequestError, "both an input image and a mask"),
        (limits["union"], dict(control_image=ok, images=[ok], mask=ImageInfo(10, 10)), RequestError, "same size"),
        (limits["union"], dict(control_image=ok, images=[ok], mask=ok, strength=0.5), RequestError, "strength"),
        (limits["v1"], dict(control_image=ok, images=[ok], mask=ok), RequestError, "inpainting ControlNet"),
        (limits["union"], dict(control_image=ok, height=1024), RequestError, "largest side"),
    ]
    for lim, kwargs, kind, message in bad:
        with pytest.raises(kind, match=None) as e:
            check_request(lim, "a", **kwargs)
        assert message in str(e.value), (kwargs, str(e.value))


def test_bad_requests_cli(builds, tmp_path, capsys):
    control, text = tmp_path / "c.png", tmp_path / "c.txt"
    synthetic_image(64, 64).save(control)
    text.write_text("not an image")
    huge = tmp_path / "huge.png"
    Image.new("L", (4100, 4100)).save(huge)
    base = ["--engine-dir", str(builds["v1"]), "--prompt", "a", "--steps", "2", "--output", str(tmp_path / "o.png")]
    for extra, message in [
        (["--controlnet-scale", "0.5"], "controlnet_scale needs a control image"),
        (["--control-image", str(text)], "is not an image this build reads"),
        (["--control-image", str(huge)], "limited to"),
        (["--control-image", str(tmp_path / "none.png")], "does not exist"),
        (["--control-image", str(control), "--controlnet-scale", "5"], "must be in [0, 2]"),
        (["--control-image", str(control), "--controlnet-scale", "nan"], "must be in [0, 2]"),
    ]:
        code, err = _cli(generate.main, base + extra, capsys)
        assert code == 2 and message in err, (extra, err)
    with pytest.raises(UserError, match="needs a control image"):
        Pipeline(builds["v1"], "onnxruntime")("a", 64, 64, 2, controlnet_scale=0.5, progress=False)


def test_moved_controlnet_is_a_clear_error(ckpts, tiny_ckpt, tmp_path):
    """The Torch backend reloads the ControlNet from the recorded path: gone or changed is an error naming it."""
    import shutil

    cn = tmp_path / "cn.safetensors"
    shutil.copy(ckpts["v1"], cn)
    out = tmp_path / "b"
    assert build.main(["--model", str(tiny_ckpt), "--out", str(out), "--controlnet", str(cn), "--skip-parity"]) == 0
    cn.write_bytes(cn.read_bytes()[:-4] + b"\x00\x00\x00\x01")
    with pytest.raises(UserError, match="changed since the build"):
        Pipeline(out, "torch")("a", 64, 64, 1, control_image=synthetic_image(64, 64), progress=False)
    cn.unlink()
    with pytest.raises(UserError, match="is not there any more"):
        Pipeline(out, "torch")("a", 64, 64, 1, control_image=synthetic_image(64, 64), progress=False)


# -- LoRAs with a ControlNet ------------------------------------------------------------------------------------
def test_loras_reach_the_controlnet_branch(ckpts, tiny_ckpt, tmp_path):
    """A LoRA also adapts the noise refiner the ControlNet shares with the transformer (as in diffusers, where the
    ControlNet uses the transformer's modules): fused at build time and applied at run time, the images equal
    diffusers' with the LoRA loaded."""
    need("peft")  # the test LoRA is made with PEFT
    from diffusers import ZImageControlNetPipeline, ZImageTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    tr = ZImageTransformer2DModel.from_pretrained(tiny_ckpt, subfolder="transformer", dtype=torch.float32)
    names = [n for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear)
             and n.startswith("noise_refiner.") and n.endswith(("to_q", "to_v", "w2"))]
    cfg = LoraConfig(target_modules=names, r=4, lora_alpha=4)
    tr.add_adapter(cfg, adapter_name="x")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    lora_dir = tmp_path / "lora"
    ZImageControlNetPipeline.save_lora_weights(lora_dir, transformer_lora_layers=get_peft_model_state_dict(
        tr, adapter_name="x"), transformer_lora_adapter_metadata=cfg.to_dict())
    lora = lora_dir / "pytorch_lora_weights.safetensors"

    control = synthetic_image(96, 64, seed=5)
    ref = reference("union", ckpts, tiny_ckpt)
    ref.load_lora_weights(str(lora_dir), adapter_name="l0")
    expected = ref(PROMPT, control_image=control, height=64, width=96, num_inference_steps=3, guidance_scale=0.0,
                   generator=torch.Generator("cpu").manual_seed(2)).images[0]
    out = tmp_path / "fused"
    assert build.main(["--model", str(ckpts["union"]), "--out", str(out), "--lora", f"{lora}:1"]) == 0
    kw = dict(seed=2, steps=3, height=64, width=96, control_image=control)
    check_close(ZImageRuntime(out).generate(PROMPT, **kw).images[0], expected)
    plain = tmp_path / "plain"
    assert build.main(["--model", str(ckpts["union"]), "--out", str(plain), "--skip-parity"]) == 0
    for backend in LORA_BACKENDS:
        rt = ZImageRuntime(plain, backend=backend)
        check_close(rt.generate(PROMPT, loras=[(lora, 1.0)], **kw).images[0], expected)
        base = as_array(rt.generate(PROMPT, **kw).images[0])
        assert np.abs(base - as_array(expected)).max() > 10  # the LoRA matters here


# -- the server --------------------------------------------------------------------------------------------------
def test_server_fields(builds, tiny_fp32):
    """`control_image` / `controlnet_scale` in /v1/generate (JSON base64 and multipart file), the OpenAI
    generations (base64) and edits (file) endpoints: the runtime's own images; bad values are 4xx."""
    import httpx

    from serve_util import ServerThread, b64, decode, png_bytes
    from zimage_deploy.serve.app import create_app

    rt = ZImageRuntime(builds["union"])
    control, image, mask = synthetic_image(80, 60, seed=1), synthetic_image(64, 64, seed=2), mask_image(64, 64)
    kw = dict(seed=3, steps=2, height=64, width=64)
    expected = as_array(rt.generate(PROMPT, control_image=control, controlnet_scale=0.6, **kw).images[0])
    inpaint = as_array(rt.generate(PROMPT, control_image=control, images=[image], mask=mask, **kw).images[0])
    cpng = png_bytes(control)
    with ServerThread(create_app(rt)) as url, httpx.Client(base_url=url, timeout=120) as client:
        body = {"prompt": PROMPT, **kw, "control_image": b64(cpng), "controlnet_scale": 0.6}
        r = client.post("/v1/generate", json=body)
        assert r.status_code == 200, r.text
        assert np.array_equal(decode(r.json()["images"][0]), expected)
        r = client.post("/v1/generate", data={"request": json.dumps({"prompt": PROMPT, **kw, "controlnet_scale": 0.6})},
                        files={"control_image": ("c.png", cpng, "image/png")})
        assert r.status_code == 200 and np.array_equal(decode(r.json()["images"][0]), expected), r.text
        r = client.post("/v1/images/generations", json={"prompt": PROMPT, "size": "64x64", "seed": 3, "steps": 2,
                                                         "control_image": b64(cpng), "controlnet_scale": 0.6})
        assert r.status_code == 200 and np.array_equal(decode(r.json()["data"][0]["b64_json"]), expected), r.text
        r = client.post("/v1/images/edits", data={"prompt": PROMPT, "size": "64x64", "seed": "3", "steps": "2"},
                        files=[("image", ("i.png", png_bytes(image), "image/png")),
                               ("mask", ("m.png", png_bytes(mask), "image/png")),
                               ("control_image", ("c.png", cpng, "image/png"))])
        assert r.status_code == 200 and np.array_equal(decode(r.json()["data"][0]["b64_json"]), inpaint), r.text
        bad = [
            ({**body, "controlnet_scale": -1}, 422, "must be in [0, 2]"),
            ({**body, "controlnet_scale": "x"}, 422, "must be a number"),
            ({**body, "control_image": "%%%"}, 400, "not valid base64"),
            ({**body, "control_image": b64(b"GIF89a not really")}, 400, "is not an image"),
            ({**body, "control_image": b64(png_bytes(Image.new("L", (4100, 4100))))}, 413, None),
            ({"prompt": PROMPT, "controlnet_scale": 0.5}, 422, "needs a control image"),
            ({**body, "control_image": b64(png_bytes(Image.new("RGB", (8, 8))))}, 422, "at least 16 px"),
        ]
        for payload, status, message in bad:
            r = client.post("/v1/generate", json=payload)
            assert r.status_code == status and (message is None or message in r.json()["error"]["message"]), \
                (payload.get("controlnet_scale"), r.status_code, r.text[:300])
    with ServerThread(create_app(ZImageRuntime(tiny_fp32))) as url, httpx.Client(base_url=url, timeout=120) as client:
        r = client.post("/v1/generate", json={"prompt": PROMPT, "control_image": b64(cpng)})
        assert r.status_code == 422 and "no ControlNet" in r.json()["error"]["message"]
