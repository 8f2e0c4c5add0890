"""Bad input: a clear message, a non-zero exit, and nothing half-written."""

import shutil
import subprocess
import sys

import pytest

from zimage_deploy import build, generate
from zimage_deploy.cli import run_cli


def cli(main, argv, capsys):
    code = run_cli(lambda: main(argv))
    return code, capsys.readouterr().err


def run_module(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600)


def test_size_not_multiple_of_16(tiny_fp32, tmp_path):
    out = tmp_path / "x.png"
    r = run_module("zimage_deploy.generate", "--engine-dir", str(tiny_fp32), "--prompt", "a cat",
                   "--height", "100", "--width", "128", "--output", str(out))
    assert r.returncode == 2
    assert "height must be a positive multiple of 16, got 100" in r.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "notes.txt").write_text("hello")
    out = tmp_path / "out"
    r = run_module("zimage_deploy.build", "--model", str(tmp_path / "ckpt"), "--out", str(out))
    assert r.returncode == 2
    assert "not a complete Z-Image checkpoint" in r.stderr and "model_index.json" in r.stderr
    assert not out.exists()


def test_missing_component(tiny_ckpt, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    shutil.rmtree(ckpt / "vae")
    out = tmp_path / "out"
    code, err = cli(build.main, ["--model", str(ckpt), "--out", str(out)], capsys)
    assert code == 2 and "vae/config.json" in err and "vae/*.safetensors" in err
    assert not out.exists()


def test_pickle_weights_refused(tiny_ckpt, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    weights = ckpt / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    code, err = cli(build.main, ["--model", str(ckpt), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "pickle" in err and "safetensors" in err


def test_hub_id_offline(tmp_path, capsys):
    code, err = cli(build.main, ["--model", "Tongyi-MAI/Z-Image-Turbo", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "cannot fetch 'Tongyi-MAI/Z-Image-Turbo'" in err and "transformer/config.json" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,message", [
    (["--target", "rtx9999"], "invalid choice: 'rtx9999'"),
    (["--precision", "fp16"], "invalid choice: 'fp16'"),
])
def test_unknown_target_or_precision(argv, message, tmp_path):
    r = run_module("zimage_deploy.build", "--model", "tiny", "--out", str(tmp_path / "out"), *argv)
    assert r.returncode == 2 and message in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,message", [
    (["--target", "cpu", "--precision", "nvfp4"], "not supported on target 'cpu'"),
    (["--target", "rtx4090", "--precision", "fp8", "--calib-size", "0"], "--calib-size must be >= 1"),
    (["--precision", "int4", "--calib-size", "1000"], "holds only 72 prompts"),
    (["--target", "cpu", "--precision", "fp8", "--text-encoder-precision", "int4", "--int4-block", "24"],
     "multiple of 16"),
    (["--variant", "edit"], "--variant edit contradicts the checkpoint"),
])
def test_unsupported_combinations(argv, message, tmp_path, capsys):
    code, err = cli(build.main, ["--model", "tiny", "--out", str(tmp_path / "out"), *argv], capsys)
    assert code == 2 and message in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra,message", [
    (["--negative-prompt", "blurry"], "needs classifier-free guidance"),
    (["--guidance-scale", "-1"], "guidance_scale must be in [0, 30], got -1.0"),
    (["--guidance-scale", "inf"], "guidance_scale must be in [0, 30], got inf"),
    (["--seed", "-1"], "seed must be in 0..9223372036854775807"),
    (["--steps", "0"], "steps must be in 1..100, got 0"),
    (["--height", "0"], "height must be a positive multiple of 16, got 0"),
    (["--strength", "0.5"], "strength needs an input image"),
    (["--mask", "{tmp}/m.png"], "inpainting needs an input image as well as the mask"),
    (["--output", "{tmp}/x.notanimage"], "unknown image extension"),
    (["--offload", "model"], "the onnxruntime backend runs on the CPU: offload mode model has nothing to move"),
    (["--offload", "sequential", "--low-vram"], "--offload asks for sequential: give one of them"),
])
def test_generate_refuses_unsupported_options(tiny_fp32, tmp_path, capsys, extra, message):
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    argv = ["--engine-dir", str(tiny_fp32), "--prompt", "a cat", "--height", "64", "--width", "64",
            "--output", str(tmp_path / "x.png")] + extra
    code, err = cli(generate.main, argv, capsys)
    assert code == 2 and message in err
    assert not list(tmp_path.iterdir())


def test_engine_dir_without_manifest(tmp_path, capsys):
    code, err = cli(generate.main, ["--engine-dir", str(tmp_path), "--prompt", "a", "--output",
                                    str(tmp_path / "x.png")], capsys)
    assert code == 2 and "has no manifest.json" in err


def test_long_prompt_truncated_with_warning(tiny_fp32, tmp_path):
    out = tmp_path / "x.png"
    r = run_module("zimage_deploy.generate", "--engine-dir", str(tiny_fp32), "--prompt", "lorem ipsum " * 400,
                   "--height", "64", "--width", "64", "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert "truncated to 512" in r.stderr
    assert out.is_file()


def test_incomplete_build_refused(tiny_fp32, tmp_path, capsys):
    """A build whose manifest lacks a component (e.g. interrupted) is refused, not half-used."""
    import json

    d = tmp_path / "build"
    shutil.copytree(tiny_fp32, d)
    manifest = json.loads((d / "manifest.json").read_text())
    del manifest["components"]["vae_decoder"]
    (d / "manifest.json").write_text(json.dumps(manifest))
    code, err = cli(generate.main, ["--engine-dir", str(d), "--prompt", "a", "--output", str(tmp_path / "x.png")],
                    capsys)
    assert code == 2 and "not a complete build" in err and "vae_decoder" in err


def test_optional_component_missing(tiny_fp32, tmp_path, capsys):
    """A basic-layout build without its VAE encoder (an optional component: img2img and inpainting only) still
    generates from text; a request that needs it gets a clear error and no image."""
    import json

    d = tmp_path / "build"
    shutil.copytree(tiny_fp32, d)
    manifest = json.loads((d / "manifest.json").read_text())
    del manifest["components"]["vae_encoder"]
    (d / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(d / "onnx" / "vae_encoder")
    text = tmp_path / "text.png"
    argv = ["--engine-dir", str(d), "--prompt", "a", "--height", "64", "--width", "64"]
    code, err = cli(generate.main, [*argv, "--output", str(text)], capsys)
    assert code == 0 and text.is_file(), err
    edited = tmp_path / "edited.png"
    code, err = cli(generate.main, [*argv, "--image", str(text), "--output", str(edited)], capsys)
    assert code == 2 and "no vae_encoder graph" in err and not edited.exists()
