"""The ONNX Runtime backend: the conformance rules (tests/backend_conformance.py) and its execution providers,
taken by option from those the installed onnxruntime offers."""

import onnxruntime as ort
import pytest

from backend_conformance import BackendConformance
from zimage_deploy import generate
from zimage_deploy.cli import run_cli
from zimage_deploy.errors import UserError
from zimage_deploy.runtime.backends import make_backend


class TestOnnxRuntimeConformance(BackendConformance):
    backend = "onnxruntime"


def test_providers_by_option(tiny_fp32):
    """Default: the CPU's; asked for: those given, in order; one the installed package lacks: a UserError naming
    the ones it offers; the option of another backend: refused."""
    from zimage_deploy import ZImageRuntime, manifest as manifest_io

    manifest = manifest_io.load(tiny_fp32)
    assert make_backend("onnxruntime", tiny_fp32, manifest).providers == ["CPUExecutionProvider"]
    rt = ZImageRuntime(tiny_fp32, backend="onnxruntime", ort_providers=["CPUExecutionProvider"])
    assert rt.pipeline.backend.providers == ["CPUExecutionProvider"]
    assert rt.pipeline.backend.session("vae_decoder").get_providers() == ["CPUExecutionProvider"]
    missing = "NoSuchExecutionProvider"
    offered = ", ".join(ort.get_available_providers())
    with pytest.raises(UserError, match=f"{missing} not available in the installed onnxruntime; it offers: {offered}"):
        ZImageRuntime(tiny_fp32, backend="onnxruntime", ort_providers=[missing])
    with pytest.raises(UserError, match="--ort-providers CPUExecutionProvider is an option of the onnxruntime "
                                        "backend, not of torch"):
        make_backend("torch", tiny_fp32, manifest, ort_providers=["CPUExecutionProvider"])


def test_providers_flag(tiny_fp32, tmp_path, capsys):
    out = tmp_path / "out.png"
    argv = ["--engine-dir", str(tiny_fp32), "--prompt", "a cat", "--steps", "1", "--height", "64", "--width", "64",
            "--backend", "onnxruntime", "--output", str(out)]
    assert generate.main([*argv, "--ort-providers", "CPUExecutionProvider"]) == 0 and out.is_file()
    out.unlink()
    capsys.readouterr()
    providers = "NoSuchExecutionProvider,CPUExecutionProvider"
    assert run_cli(lambda: generate.main([*argv, "--ort-providers", providers])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ONNX Runtime execution provider NoSuchExecutionProvider not available in the "
                          "installed onnxruntime; it offers: "), err
    assert not out.exists()


def test_providers_flag_of_the_other_commands(tiny_fp32, tmp_path, capsys):
    """batch and serve take the flag too: refused before anything runs, one `error:` line."""
    from zimage_deploy.batch.job import main as batch
    from zimage_deploy.serve.__main__ import main as serve

    (tmp_path / "in.txt").write_text("a cat\n")
    common = ["--engine-dir", str(tiny_fp32)]
    for main, argv, message in (
            (batch, ["--input", str(tmp_path / "in.txt"), "--out", str(tmp_path / "out"), "--backend", "onnxruntime",
                     "--ort-providers", "NoSuchExecutionProvider"], "NoSuchExecutionProvider not available"),
            (batch, ["--input", str(tmp_path / "in.txt"), "--out", str(tmp_path / "out"), "--backend", "torch",
                     "--ort-providers", "CPUExecutionProvider"], "is an option of the onnxruntime backend, not of torch"),
            (serve, ["--backend", "onnxruntime", "--ort-providers", "NoSuchExecutionProvider"],
             "NoSuchExecutionProvider not available")):
        capsys.readouterr()
        assert run_cli(lambda: main([*common, *argv])) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()
