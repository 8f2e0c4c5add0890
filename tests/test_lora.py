"""LoRAs: fused at build time (`build --lora`), swapped at run time (`generate --lora`, `ZImageRuntime.generate(
loras=...)`), refitted into TensorRT engines — all checked against diffusers with the same LoRAs loaded.

Test LoRAs are made here: random PEFT LoRAs on the tiny checkpoint's diffusers transformer, saved with
`ZImagePipeline.save_lora_weights` (diffusers/PEFT format, with rank_pattern / alpha_pattern / rslora in the
metadata), and the same LoRAs re-keyed by this file into the kohya format (`lora_unet_*`, lora_down/up, .alpha)
and the original Z-Image repository's module names (`diffusion_model.` prefix, fused `attention.qkv` as stacked
factors with a block-diagonal up matrix, `attention.out`, `x_embedder`, `final_layer`), taking each module's
scaling from PEFT itself.
"""

import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from backend_conformance import CPU_BACKENDS, LORA_BACKENDS
from conftest import need

from zimage_deploy import build, generate
from zimage_deploy.cli import run_cli
from zimage_deploy.errors import RequestError, UserError
from zimage_deploy.lora import LoraManager, parse_lora_arg, resolve_lora_name
from zimage_deploy.lora.formats import read_lora
from zimage_deploy.models.stream import factors
from zimage_deploy.lora.runtime import BoundedCache
from zimage_deploy.lora.targets import from_checkpoint, from_graphs
from zimage_deploy.models.dit import fuse_state_dict
from zimage_deploy.models.load import load_dit, stream_weights
from zimage_deploy.runtime.backends import REGISTRY

peft = need("peft")  # the test LoRAs are made with PEFT

PROMPT, SEED, H, W, STEPS = "a red fox in the snow", 3, 64, 96, 3
SA, SB = 0.7, -1.3  # the two LoRAs' strengths
ALL = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3", "adaLN_modulation.0", "all_x_embedder.2-1",
       "linear", "adaLN_modulation.1", "t_embedder.mlp.0", "t_embedder.mlp.2", "cap_embedder.1")


# -- making test LoRAs -------------------------------------------------------------------------------------
def _transformer(ckpt):
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel.from_pretrained(ckpt, subfolder="transformer", torch_dtype=torch.float32)


def make_peft_lora(ckpt, folder: Path, seed: int, suffixes, random=True, **config) -> Path:
    """A PEFT LoRA on the diffusers transformer's Linear layers ending with `suffixes`, saved as diffusers does."""
    from diffusers import ZImagePipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    tr = _transformer(ckpt)
    names = [n for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(suffixes)]
    cfg = LoraConfig(target_modules=names, **config)
    tr.add_adapter(cfg, adapter_name="x")
    if random:  # PEFT initialises lora_B to zeros: a LoRA that changes nothing
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in tr.named_parameters():
                if ".lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ZImagePipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(tr, adapter_name="x"),
                                     transformer_lora_adapter_metadata=cfg.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


def peft_modules(ckpt, path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """diffusers module -> (A, B, scaling) as PEFT loads the file (scaling from PEFT's own layers)."""
    from peft.tuners.lora import LoraLayer

    tr = diffusers_pipe(ckpt, [(path, 1.0)]).transformer  # the pipeline's loader reads the PEFT metadata
    return {n: (m.lora_A["l0"].weight.detach().clone(), m.lora_B["l0"].weight.detach().clone(), m.scaling["l0"])
            for n, m in tr.named_modules() if isinstance(m, LoraLayer) and "l0" in m.lora_A}


def to_kohya(mods, path: Path) -> Path:
    sd = {}
    for name, (a, b, s) in mods.items():
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = a, b
        sd[f"{key}.alpha"] = torch.tensor(s * a.shape[0])  # kohya scale: alpha / rank
    save_file(sd, path)
    return path


ORIGINAL_NAMES = [(".attention.to_out.0", ".attention.out"), ("all_x_embedder.2-1", "x_embedder"),
                  ("all_final_layer.2-1.", "final_layer.")]


def to_original(mods, path: Path) -> Path:
    """The original repository's names; q/k/v as one fused `qkv` LoRA of rank r_q + r_k + r_v."""
    sd, qkv = {}, {}
    for name, (a, b, s) in mods.items():
        for proj in "qkv":
            if name.endswith(f".attention.to_{proj}"):
                qkv.setdefault(name[: -len(f".to_{proj}")], {})[proj] = (a, b * s)
                break
        else:
            for old, new in ORIGINAL_NAMES:
                name = name.replace(old, new)
            sd[f"diffusion_model.{name}.lora_A.weight"], sd[f"diffusion_model.{name}.lora_B.weight"] = a, b * s
    for block, parts in qkv.items():
        d = next(iter(parts.values()))[1].shape[0]
        downs = [parts[p][0] for p in "qkv" if p in parts]
        up = torch.zeros(3 * d, sum(x.shape[0] for x in downs))
        col = 0
        for i, p in enumerate("qkv"):
            if p in parts:
                a, b = parts[p]
                up[i * d:(i + 1) * d, col:col + a.shape[0]] = b
                col += a.shape[0]
        key = f"diffusion_model.{block}.qkv"
        sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = torch.cat(downs), up
        sd[f"{key}.alpha"] = torch.tensor(float(col))  # alpha = rank: scale 1 (the scalings are folded into B)
    save_file(sd, path)
    return path


@pytest.fixture(scope="module")
def loras(tiny_ckpt, tmp_path_factory):
    """Two LoRAs (A: every Linear, rank/alpha patterns; B: a few modules, rslora), each in three formats."""
    d = Path(tmp_path_factory.mktemp("loras"))
    a = make_peft_lora(tiny_ckpt, d / "a", 1, ALL, r=4, lora_alpha=8, rank_pattern={"w2": 2},
                       alpha_pattern={"to_v": 3})
    b = make_peft_lora(tiny_ckpt, d / "b", 2, ("to_q", "to_v", "w3", "layers.1.adaLN_modulation.0"), r=2,
                       lora_alpha=3, use_rslora=True)
    out = {"a": {"diffusers": a}, "b": {"diffusers": b}}
    for name, path in (("a", a), ("b", b)):
        mods = peft_modules(tiny_ckpt, path)
        out[name]["kohya"] = to_kohya(mods, d / f"{name}-kohya.safetensors")
        out[name]["original"] = to_original(mods, d / f"{name}-original.safetensors")
    out["zero"] = make_peft_lora(tiny_ckpt, d / "zero", 0, ALL, random=False, r=4, lora_alpha=4)
    return out


# -- the diffusers references ------------------------------------------------------------------------------
def diffusers_pipe(ckpt, lora_list=()):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(ckpt, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for i, (path, _) in enumerate(lora_list):
        pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
    if lora_list:
        pipe.set_adapters([f"l{i}" for i in range(len(lora_list))], [s for _, s in lora_list])
    return pipe


def diffusers_image(ckpt, lora_list=(), prompt=PROMPT):
    pipe = diffusers_pipe(ckpt, lora_list)
    return np.asarray(pipe(prompt, height=H, width=W, num_inference_steps=STEPS, guidance_scale=0.0,
                           generator=torch.Generator("cpu").manual_seed(SEED)).images[0]).astype(np.int16)


def diffusers_fused_state(ckpt, lora_list):
    pipe = diffusers_pipe(ckpt, lora_list)
    pipe.fuse_lora(adapter_names=[f"l{i}" for i in range(len(lora_list))])
    pipe.unload_lora_weights()
    return fuse_state_dict(pipe.transformer.state_dict().items())


@pytest.fixture(scope="module")
def refs(tiny_ckpt, loras):
    both = [(loras["a"]["diffusers"], SA), (loras["b"]["diffusers"], SB)]
    out = {"base": diffusers_image(tiny_ckpt), "both": diffusers_image(tiny_ckpt, both),
           "b": diffusers_image(tiny_ckpt, [(loras["b"]["diffusers"], SB)])}
    assert np.abs(out["both"] - out["base"]).mean() > 3, "the LoRAs barely change the image: the tests prove little"
    assert np.abs(out["b"] - out["both"]).mean() > 3
    return out


def image(result) -> np.ndarray:
    return np.asarray(result.images[0]).astype(np.int16)


def cli(main, argv, capsys) -> tuple[int, str]:
    """A CLI's exit code and stderr, as `python -m ...` gives them."""
    capsys.readouterr()
    code = run_cli(lambda: main(argv))
    return code, capsys.readouterr().err


# -- formats and build-time fusion against diffusers' fused weights ---------------------------------------
@pytest.mark.parametrize("fmt_a,fmt_b", [("diffusers", "diffusers"), ("kohya", "original"), ("original", "kohya")])
def test_every_format_fuses_like_diffusers(tiny_ckpt, loras, fmt_a, fmt_b):
    targets = from_checkpoint(tiny_ckpt)
    la, lb = read_lora(loras["a"][fmt_a], targets), read_lora(loras["b"][fmt_b], targets)
    ours = load_dit(tiny_ckpt, loras=[(la, SA), (lb, SB)]).state_dict()
    ref = diffusers_fused_state(tiny_ckpt, [(loras["a"]["diffusers"], SA), (loras["b"]["diffusers"], SB)])
    base = load_dit(tiny_ckpt).state_dict()
    assert set(ours) == set(ref)
    err = max(float((ours[k] - ref[k]).abs().max()) for k in ref)
    effect = max(float((base[k] - ref[k]).abs().max()) for k in ref)
    assert err <= 1e-5 < effect / 100, (err, effect)
    assert la.format.endswith("original" if fmt_a == "original" else "diffusers")
    assert la.format.startswith("kohya" if fmt_a == "kohya" else "peft")


def test_file_scales_follow_peft(tiny_ckpt, loras):
    """Each module's scale (alpha / rank, patterns, rslora) is PEFT's own scaling for it."""
    targets = from_checkpoint(tiny_ckpt)
    for name in ("a", "b"):
        peft_scales = {m: s for m, (_, _, s) in peft_modules(tiny_ckpt, loras[name]["diffusers"]).items()}
        ours = {layer.source: layer.scale for layer in read_lora(loras[name]["diffusers"], targets).layers}
        assert ours.keys() == peft_scales.keys()
        for module, scale in ours.items():
            assert scale == pytest.approx(peft_scales[module], rel=1e-6), module
    scales = {layer.source: layer.scale for layer in read_lora(loras["a"]["diffusers"], targets).layers}
    assert scales["layers.0.attention.to_v"] == pytest.approx(3 / 4) and scales["layers.0.feed_forward.w2"] == 4


def test_lean_stream_and_zero_lora(tiny_ckpt, loras):
    """The memory-lean export's weight stream fuses exactly what the loaded module holds; a default-initialised
    LoRA (lora_B zeros) leaves every weight as it was, bit for bit."""
    targets = from_checkpoint(tiny_ckpt)
    pairs = [(read_lora(loras["a"]["kohya"], targets), SA), (read_lora(loras["b"]["original"], targets), SB)]
    module = load_dit(tiny_ckpt, loras=pairs).state_dict()
    streamed = dict(stream_weights(tiny_ckpt, "transformer", pairs))
    assert set(streamed) == set(module)
    assert all(torch.equal(streamed[k].float(), module[k].float()) for k in module)
    zero = load_dit(tiny_ckpt, loras=[(read_lora(loras["zero"], targets), 1.0)]).state_dict()
    base = load_dit(tiny_ckpt).state_dict()
    assert all(torch.equal(zero[k], base[k]) for k in base)


def test_targets_from_checkpoint_and_graphs_agree(tiny_ckpt, tiny_fp32):
    from zimage_deploy import manifest as manifest_io

    a, b = from_checkpoint(tiny_ckpt), from_graphs(tiny_fp32, manifest_io.load(tiny_fp32))
    assert a.shapes == b.shapes and set(a.aliases) == set(b.aliases)
    assert len(a.shapes) == 25  # every Linear weight of the tiny DiT
    assert a.lookup("layers_1_attention_to_out_0").target == "layers.1.attention.out.weight"
    assert a.lookup("noise_refiner.0.feed_forward.w3").part == 1


def test_edit_targets(edit_ckpt):
    """The Edit DiT's SigLIP embedder and refiner are adaptable too (aliases checked against the loader's map)."""
    t = from_checkpoint(edit_ckpt)
    assert t.lookup("siglip_embedder.1").target == "siglip_linear.weight"
    assert t.lookup("lora_unet_siglip_refiner_0_attention_to_k".removeprefix("lora_unet_")).part == 1
    assert set(t.shapes) == {k for k, v in load_dit(edit_ckpt).state_dict().items()
                             if k.endswith(".weight") and v.dim() == 2}


# -- fused builds ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fused_build(tiny_ckpt, loras, tmp_path_factory):
    out = Path(tmp_path_factory.mktemp("fused"))
    args = ["--model", str(tiny_ckpt), "--target", "cpu", "--precision", "fp32", "--out", str(out),
            "--lora", f"{loras['a']['diffusers']}:{SA}", "--lora", f"{loras['b']['original']}:{SB}"]
    assert build.main(args) == 0
    return out, args


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fused_build_matches_diffusers(fused_build, refs, backend):
    from zimage_deploy import ZImageRuntime

    rt = ZImageRuntime(fused_build[0], backend=backend)
    got = image(rt.generate(PROMPT, seed=SEED, steps=STEPS, height=H, width=W))
    assert np.abs(got - refs["both"]).max() <= 2


def test_fused_build_manifest_and_keys(fused_build, tiny_fp32, loras, capsys, tmp_path):
    import shutil

    from zimage_deploy import manifest as manifest_io

    out = tmp_path / "copy"  # rebuilt below with other inputs: the module's fused build stays as it is
    shutil.copytree(fused_build[0], out)
    args = [str(out) if a == str(fused_build[0]) else a for a in fused_build[1]]
    m, base = manifest_io.load(out), manifest_io.load(tiny_fp32)
    files = [loras["a"]["diffusers"], loras["b"]["original"]]
    assert [(r["sha256"], r["scale"]) for r in m["loras"]] == \
        [(hashlib.sha256(Path(f).read_bytes()).hexdigest(), s) for f, s in zip(files, (SA, SB))]
    assert all((out / r["file"]).read_bytes() == Path(f).read_bytes() for r, f in zip(m["loras"], files))
    assert all(r["file"] == f"loras/{r['sha256'][:16]}.safetensors" for r in m["loras"])
    for name in m["components"]:
        same = m["components"][name]["key"] == base["components"][name]["key"]
        assert same == (name not in ("transformer", "context_refiner")), name
    capsys.readouterr()
    assert build.main(args) == 0  # same inputs: nothing re-exported
    log = capsys.readouterr().out
    assert all(f"[export] {n}: up to date" in log for n in m["components"]), log
    other = [a.replace(f":{SB}", ":-1.0") for a in args]  # another scale: the DiT graphs only
    assert build.main(other) == 0
    log = capsys.readouterr().out
    assert "[export] text_encoder: up to date" in log and "[export] transformer: up to date" not in log
    assert manifest_io.load(out)["loras"][1]["scale"] == -1.0


# -- run time ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", LORA_BACKENDS)
def test_runtime_loras(tiny_fp32, tiny_ckpt, loras, refs, backend):
    from zimage_deploy import ZImageRuntime

    kw = dict(seed=SEED, steps=STEPS, height=H, width=W)
    rt = ZImageRuntime(tiny_fp32, backend=backend)
    base = image(rt.generate(PROMPT, **kw))
    assert np.abs(base - refs["base"]).max() <= 2
    both = image(rt.generate(PROMPT, loras=[(loras["a"]["original"], SA), (loras["b"]["diffusers"], SB)], **kw))
    assert np.abs(both - refs["both"]).max() <= 2
    only_b = image(rt.generate(PROMPT, loras=[(loras["b"]["kohya"], SB)], **kw))
    assert np.abs(only_b - refs["b"]).max() <= 2
    assert np.array_equal(image(rt.generate(PROMPT, loras=[(loras["zero"], 1.0)], **kw)), base)
    # A then B = B alone and no LoRA = the base, bit for bit: tests/backend_conformance.py, for every backend


def test_runtime_loras_concurrent(tiny_fp32, loras):
    """Two threads with different sets on one Torch module and one ONNX Runtime build: each gets its own."""
    from zimage_deploy import ZImageRuntime

    kw = dict(seed=SEED, steps=2, height=H, width=W)
    sets = [[(loras["a"]["diffusers"], SA)], [(loras["b"]["diffusers"], SB)], None]
    for backend in LORA_BACKENDS:
        rt = ZImageRuntime(tiny_fp32, backend=backend, max_concurrent=3)
        expected = [image(rt.generate(PROMPT, loras=s, **kw)) for s in sets]
        got = [None] * len(sets)

        def run(i):
            got[i] = image(rt.generate(PROMPT, loras=sets[i], **kw))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sets)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(np.array_equal(g, e) for g, e in zip(got, expected)), backend


def test_generate_cli_lora(tiny_fp32, loras, refs, tmp_path):
    from PIL import Image

    out = tmp_path / "out.png"
    argv = ["--engine-dir", str(tiny_fp32), "--prompt", PROMPT, "--seed", str(SEED), "--steps", str(STEPS),
            "--height", str(H), "--width", str(W), "--backend", "onnxruntime", "--output", str(out),
            "--lora", f"{loras['a']['original']}:{SA}", "--lora", f"{loras['b']['kohya'].parent}/b:{SB}"]
    assert generate.main(argv) == 0
    assert np.abs(np.asarray(Image.open(out)).astype(np.int16) - refs["both"]).max() <= 2


def test_ort_lora_session_equals_edited_graph(tiny_fp32, loras):
    """The branch session (the graph with a LoRA side branch fed per run) computes what a session on a graph whose
    initializers were edited computes; fed rank 0, the base graph's output bit for bit."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from zimage_deploy import manifest as manifest_io
    from zimage_deploy.lora.onnx_branch import OrtBranchSessions
    from zimage_deploy.runtime.backends import OnnxRuntimeBackend

    m = manifest_io.load(tiny_fp32)
    targets = from_graphs(tiny_fp32, m)
    table = factors([(read_lora(loras["a"]["diffusers"], targets), SA)])
    backend = OnnxRuntimeBackend(tiny_fp32, m)
    ours = OrtBranchSessions(backend, targets.shapes)
    assert {"transformer", "context_refiner"} <= set(ours.sessions)
    g = torch.Generator().manual_seed(0)
    inputs = {"latents": torch.randn(1, 16, 8, 12, generator=g), "timestep": torch.tensor([0.4]),
              "cap_states": torch.randn(1, 32, 64, generator=g), "cap_lens": torch.tensor([17])}
    model = onnx.load(str(tiny_fp32 / m["components"]["transformer"]["onnx"]))
    for init in model.graph.initializer:
        if init.name in table:
            w = torch.from_numpy(numpy_helper.to_array(init).copy())
            for (a, b), down, up, s in table[init.name]:
                w[a:b] += (up @ down) * s
            init.CopyFrom(numpy_helper.from_array(w.numpy(), init.name))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    got = ours.run(backend, "transformer", inputs, ours.prepare(table))["noise_pred"].numpy()
    base = backend.run("transformer", **inputs)["noise_pred"].numpy()
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max() < np.abs(base - expected).max()
    assert np.array_equal(ours.run(backend, "transformer", inputs, ours.prepare({}))["noise_pred"].numpy(), base)


# -- TensorRT refit: the weight mapping on the CPU, execution on a GPU --------------------------------------
def _trt():
    return need("tensorrt_rtx")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_refit_mapping(request, precision, loras, fused_build):
    """Names: every weight a refit sets is a weight of the network TensorRT parses from the graph; layout and
    dtype: the initializer's ([out, in], the graph's dtype); values: base + deltas equal the fused build's
    initializers, and the weights only a previous LoRA adapted go back to base exactly."""
    from zimage_deploy import manifest as manifest_io
    from zimage_deploy.export.weights import TORCH_OF, read_initializer
    from zimage_deploy.lora.tensorrt import adapted_weights
    from zimage_deploy.lora.targets import graph_initializers
    from zimage_deploy.lora.tensorrt import network_weight_names, refit_names

    trt = _trt()
    built = request.getfixturevalue("tiny_fp32" if precision == "fp32" else "tiny_bf16")
    m = manifest_io.load(built)
    targets = from_graphs(built, m)
    la = read_lora(loras["a"]["diffusers"], targets)
    lb = read_lora(loras["b"]["original"], targets)
    table = factors([(la, SA), (lb, SB)])
    for comp in ("transformer", "context_refiner"):
        path = built / m["components"][comp]["onnx"]
        inits = graph_initializers(path)
        names = refit_names(path, table)
        assert names and all(network_weight_names(trt, path, names).values())
        weights = dict(adapted_weights(path, table, names))
        for n, t in weights.items():  # (BF16 graphs keep the timestep embedder in float32)
            assert list(t.shape) == inits[n][0] and t.dtype == TORCH_OF[inits[n][1]], n
        assert precision == "fp32" or any(t.dtype == torch.bfloat16 for t in weights.values())
        if precision == "fp32":  # the fused build holds the same LoRAs at the same scales
            import onnx

            fused_dir = fused_build[0]
            fused = onnx.load(str(fused_dir / m["components"][comp]["onnx"]), load_external_data=False)
            for proto in fused.graph.initializer:
                if proto.name in weights:
                    ref = read_initializer(proto, (fused_dir / m["components"][comp]["onnx"]).parent)[1]
                    assert torch.allclose(weights[proto.name], ref, atol=1e-6, rtol=0), proto.name
        only_b = factors([(lb, SB)])
        switch = refit_names(path, only_b, previous=names)
        assert switch == names  # every weight A touched is set again
        base = {p.name: read_initializer(p, path.parent)[1] for p in
                __import__("onnx").load(str(path), load_external_data=False).graph.initializer if p.name in switch}
        for n, t in adapted_weights(path, only_b, switch):
            if n not in only_b:
                assert torch.equal(t, base[n])


def test_refit_on_gpu(tiny_ckpt, loras, refs, tmp_path):
    """Refittable engines: LoRA A then B equals B alone, base again equals base, and the LoRA image is within
    2/255 of diffusers'. Needs a CUDA GPU and a TensorRT flavour that builds for it."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: refittable engines can be neither built (TensorRT-RTX 1.7 needs CUDA for them) "
                    "nor run here; the weight mapping is checked on the CPU by test_refit_mapping")
    from zimage_deploy import ZImageRuntime
    from zimage_deploy.targets import TARGETS

    cc = torch.cuda.get_device_capability()
    target = next((t.name for t in TARGETS.values() if tuple(t.compute_capability or ()) == cc), None)
    if target is None:
        pytest.skip(f"no target for this GPU (SM{cc[0]}{cc[1]})")
    out = tmp_path / "rtx"
    try:
        assert build.main(["--model", str(tiny_ckpt), "--target", target, "--precision", "fp32", "--refittable",
                           "--skip-parity", "--out", str(out)]) == 0
    except UserError as e:
        pytest.skip(f"cannot build {target} engines here: {e}")
    kw = dict(seed=SEED, steps=STEPS, height=H, width=W)
    rt = ZImageRuntime(out, backend="tensorrt")
    base = image(rt.generate(PROMPT, **kw))
    both = image(rt.generate(PROMPT, loras=[(loras["a"]["diffusers"], SA), (loras["b"]["diffusers"], SB)], **kw))
    assert np.abs(both - refs["both"]).max() <= 2
    only_b = image(rt.generate(PROMPT, loras=[(loras["b"]["diffusers"], SB)], **kw))
    assert np.array_equal(only_b, image(ZImageRuntime(out, backend="tensorrt").generate(
        PROMPT, loras=[(loras["b"]["diffusers"], SB)], **kw)))
    assert np.array_equal(image(rt.generate(PROMPT, **kw)), base)
    from zimage_deploy import refit

    assert refit.main(["--engine-dir", str(out), "--lora", f"{loras['b']['diffusers']}:{SB}"]) == 0
    assert np.array_equal(image(ZImageRuntime(out, backend="tensorrt").generate(PROMPT, **kw)), only_b)
    assert refit.main(["--engine-dir", str(out)]) == 0
    assert np.array_equal(image(ZImageRuntime(out, backend="tensorrt").generate(PROMPT, **kw)), base)


# -- what is refused, and how --------------------------------------------------------------------------------
def _save(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


def test_bad_arguments(loras, tmp_path):
    a = loras["a"]["diffusers"]
    assert parse_lora_arg(str(a)).scale == 1.0 and parse_lora_arg(f"{a}:-0.5").scale == -0.5
    assert parse_lora_arg(str(a.parent)).path == a  # a folder holding one file
    for arg, msg in [(str(tmp_path / "missing.safetensors"), "no such file"), (f"{a}:abc", "malformed scale"),
                     (f"{a}:", "malformed scale"), (f"{a}:inf", "finite"), (f"{a}:nan", "finite"),
                     (f"{a}:1e9", "finite"), (f"{tmp_path}:1", "exactly one")]:
        with pytest.raises(UserError, match=msg):
            parse_lora_arg(arg)
    two = tmp_path / "two"
    two.mkdir()
    (two / "x.safetensors").write_bytes(a.read_bytes())
    (two / "y.safetensors").write_bytes(a.read_bytes())
    with pytest.raises(UserError, match="exactly one"):
        parse_lora_arg(str(two))
    pickle = tmp_path / "lora.ckpt"
    pickle.write_bytes(b"\x80\x04")
    with pytest.raises(UserError, match="pickle"):
        parse_lora_arg(str(pickle))


def test_bad_files(tiny_ckpt, tmp_path):
    targets = from_checkpoint(tiny_ckpt)
    r = lambda *s: torch.randn(*s) * 0.01  # noqa: E731
    q = "transformer.layers.0.attention.to_q"
    cases = {
        "text.safetensors": (None, "not a safetensors file"),
        "empty.safetensors": ({}, "no tensors"),
        "unknown.safetensors": ({"lora_unet_foo_bar.lora_down.weight": r(2, 64),
                                 "lora_unet_foo_bar.lora_up.weight": r(64, 2)}, "match no module"),
        "size.safetensors": ({f"{q}.lora_A.weight": r(2, 96), f"{q}.lora_B.weight": r(96, 2)}, "another model size"),
        "rank.safetensors": ({f"{q}.lora_A.weight": r(65, 64), f"{q}.lora_B.weight": r(64, 65)}, "rank 65"),
        "half.safetensors": ({f"{q}.lora_A.weight": r(2, 64)}, "no up"),
        "te.safetensors": ({"lora_te_text_model_x.lora_down.weight": r(2, 8)}, "text encoder"),
        "dora.safetensors": ({f"{q}.lora_A.weight": r(2, 64), f"{q}.lora_B.weight": r(64, 2),
                              f"{q}.lora_magnitude_vector": r(64)}, "DoRA"),
        "nan.safetensors": ({f"{q}.lora_A.weight": torch.full((2, 64), float("nan")),
                             f"{q}.lora_B.weight": r(64, 2)}, "non-finite"),
        "alpha.safetensors": ({f"{q}.lora_A.weight": r(2, 64), f"{q}.lora_B.weight": r(64, 2),
                               f"{q}.alpha": r(2)}, "one number"),
        "full.safetensors": ({"transformer.layers.0.attention.to_q.weight": r(64, 64)}, "not a LoRA key"),
    }
    for name, (tensors, msg) in cases.items():
        path = tmp_path / name
        if tensors is None:
            path.write_text("not a tensor file")
        else:
            _save(path, tensors)
        with pytest.raises(UserError, match=msg):
            read_lora(path, targets)
    meta = _save(tmp_path / "meta.safetensors", {f"{q}.lora_A.weight": r(2, 64), f"{q}.lora_B.weight": r(64, 2)},
                 {"lora_adapter_metadata": "{not json"})
    with pytest.raises(UserError, match="not valid JSON"):
        read_lora(meta, targets)


def test_bad_lora_fails_build_before_writing(tiny_ckpt, tmp_path, capsys):
    bad = _save(tmp_path / "bad.safetensors", {"lora_unet_foo.lora_down.weight": torch.zeros(1, 4),
                                               "lora_unet_foo.lora_up.weight": torch.zeros(4, 1)})
    out = tmp_path / "out"
    for arg, msg in ((f"{bad}:1", "match no module"), (f"{bad}:abc", "malformed scale"),
                     (str(tmp_path / "missing.safetensors"), "no such file")):
        code, err = cli(build.main, ["--model", str(tiny_ckpt), "--out", str(out), "--lora", arg], capsys)
        assert code == 2 and msg in err, err
        assert not out.exists()


def test_bad_loras_at_run_time(tiny_fp32, loras, tmp_path, capsys):
    from zimage_deploy import ZImageRuntime

    rt = ZImageRuntime(tiny_fp32, backend="onnxruntime")
    for given, msg in [([(tmp_path / "missing.safetensors", 1.0)], "no such file"),
                       ([(loras["a"]["diffusers"], "abc")], "must be a number"),
                       ([(loras["a"]["diffusers"], float("inf"))], "finite"), ("a.safetensors", "list")]:
        with pytest.raises(RequestError, match=msg):
            rt.generate(PROMPT, steps=1, height=H, width=W, loras=given)
    out = tmp_path / "x.png"
    for arg, msg in ((f"{loras['a']['diffusers']}:abc", "malformed scale"), (str(tmp_path), "exactly one")):
        code, err = cli(generate.main, ["--engine-dir", str(tiny_fp32), "--prompt", "x", "--output", str(out),
                                        "--lora", arg], capsys)
        assert code == 2 and msg in err and not out.exists(), err


def test_refused_builds_and_backends(tiny_fp32, loras):
    """TensorRT on quantized builds, non-refittable or low-VRAM TensorRT, weightless engines: clear refusals (Torch
    and ONNX Runtime take LoRAs on quantized builds: tests/test_lora_quantized.py)."""
    from zimage_deploy import manifest as manifest_io
    from zimage_deploy.refit import check_refittable

    lora = [(loras["a"]["diffusers"], 1.0)]
    m = manifest_io.load(tiny_fp32)
    quant = m.to_dict()
    quant["components"]["transformer"]["precision"] = "fp8"
    with pytest.raises(RequestError, match=r"quantized \(fp8\).*no LoRA branch.*--max-lora-rank.*--backend torch or "
                                           r"onnxruntime.*--lora"):
        LoraManager(tiny_fp32, quant, REGISTRY["tensorrt"]).prepare(lora)
    assert LoraManager(tiny_fp32, quant, REGISTRY["onnxruntime"]).prepare(lora)
    with pytest.raises(UserError, match="quantized"):
        check_refittable(tiny_fp32, quant)
    engines = m.to_dict()
    for comp in engines["components"].values():
        comp["engine"] = {"status": "complete", "options": {"refittable": False}}
    with pytest.raises(RequestError, match="not refittable"):
        LoraManager(tiny_fp32, engines, REGISTRY["tensorrt"]).prepare(lora)
    with pytest.raises(UserError, match="not refittable"):
        check_refittable(tiny_fp32, engines)
    for comp in engines["components"].values():
        comp["engine"] = {"status": "complete", "options": {"refittable": True}, "stripped": True}
    with pytest.raises(RequestError, match="low-VRAM"):
        LoraManager(tiny_fp32, engines, REGISTRY["tensorrt"], low_vram=True).prepare(lora)
    with pytest.raises(UserError, match="weightless"):
        check_refittable(tiny_fp32, engines)
    with pytest.raises(UserError, match="no engine"):
        check_refittable(tiny_fp32, m)


def test_refit_cli_errors(tiny_fp32, loras, capsys):
    from zimage_deploy import refit

    code, err = cli(refit.main, ["--engine-dir", str(tiny_fp32), "--lora", f"{loras['a']['diffusers']}:x"], capsys)
    assert code == 2 and "malformed scale" in err
    code, err = cli(refit.main, ["--engine-dir", str(tiny_fp32), "--lora", str(loras["a"]["diffusers"])], capsys)
    assert code == 2 and "no engine" in err


# -- server helpers: names inside a folder, bounded caches ------------------------------------------------------
def test_resolve_lora_name(tmp_path, loras):
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "style.safetensors").write_bytes(loras["a"]["diffusers"].read_bytes())
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"x")
    (folder / "escape.safetensors").symlink_to(secret)
    assert resolve_lora_name(folder, "style") == resolve_lora_name(folder, "style.safetensors") \
        == (folder / "style.safetensors").resolve()
    for name in ("../secret", "escape", "a/b", "/etc/passwd", "", ".hidden", "x" * 200, "style\x00", "nope", None):
        with pytest.raises(RequestError):
            resolve_lora_name(folder, name)
    from zimage_deploy.lora import list_lora_names

    assert list_lora_names(folder) == ["style"]


def test_bounded_cache():
    made = []

    def make(key, size=1):
        made.append(key)
        return np.zeros(size, dtype=np.uint8)

    cache = BoundedCache(2, max_bytes=100, sizeof=lambda v: v.nbytes)
    for key in ("a", "b", "a", "c"):
        cache.get(key, lambda: make(key))
    assert list(cache.items) == ["a", "c"] and made == ["a", "b", "c"]
    cache.get("big", lambda: make("big", 90))
    cache.get("big2", lambda: make("big2", 90))
    assert list(cache.items) == ["big2"]
    slow = threading.Event()
    calls = []

    def slow_make():
        calls.append(1)
        slow.wait(5)
        return np.zeros(1)

    threads = [threading.Thread(target=cache.get, args=("s", slow_make)) for _ in range(3)]
    for t in threads:
        t.start()
    assert cache.get("other", lambda: make("other")) is not None  # not held back by the slow key
    slow.set()
    for t in threads:
        t.join()
    assert len(calls) == 1
