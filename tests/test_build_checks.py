"""The build enforces parity (a wrong graph fails the build and is refused by the runtime), locks its output
folder, and reads the variant from the checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest

from zimage_deploy import build
from zimage_deploy import manifest as manifest_io
from zimage_deploy.cli import run_cli
from zimage_deploy.errors import UserError
from zimage_deploy.export import onnx_export
from zimage_deploy.fsutil import folder_lock
from zimage_deploy.runtime.open import open_pipeline


def _run(argv, capsys):
    code = run_cli(lambda: build.main(argv))
    return code, capsys.readouterr().err


def _wrong_weights(monkeypatch, suffix="conv_out.weight"):
    """An exporter bug stand-in: one weight of the VAE graphs is scaled while the Torch module keeps the real one."""
    original = onnx_export.module_weights

    def scaled(module):
        for name, tensor in original(module):
            yield name, tensor * 1.5 if name.endswith(suffix) else tensor

    monkeypatch.setattr(onnx_export, "module_weights", scaled)


def test_parity_failure_fails_the_build(tiny_ckpt, tmp_path, monkeypatch, capsys):
    _wrong_weights(monkeypatch)
    out = tmp_path / "build"
    code, err = _run(["--model", str(tiny_ckpt), "--out", str(out)], capsys)
    assert code == 2 and "parity check failed" in err and "vae_decoder" in err
    manifest = manifest_io.load(out)
    comps = manifest["components"]
    assert manifest["stages"]["parity"]["status"] == "failed"
    assert comps["vae_decoder"]["status"] == "rejected" and comps["vae_decoder"]["parity"]["passed"] is False
    assert comps["vae_decoder"]["parity"]["rel_l2"] > comps["vae_decoder"]["parity"]["tolerance"]
    assert comps["transformer"]["status"] == "complete" and comps["transformer"]["parity"]["passed"] is True
    with pytest.raises(UserError, match="rejected"):
        open_pipeline(out, "onnxruntime")

    # a rebuild with the exporter fixed re-exports the rejected components (never reuses them) and passes
    monkeypatch.undo()
    assert build.main(["--model", str(tiny_ckpt), "--out", str(out)]) == 0
    comps = manifest_io.load(out)["components"]
    assert all(c["status"] == "complete" and c["parity"]["passed"] for c in comps.values())
    open_pipeline(out, "onnxruntime")


def test_skip_parity_builds_without_the_check(tiny_ckpt, tmp_path, monkeypatch, capsys):
    _wrong_weights(monkeypatch)
    out = tmp_path / "build"
    code, _ = _run(["--model", str(tiny_ckpt), "--out", str(out), "--skip-parity"], capsys)
    manifest = manifest_io.load(out)
    assert code == 0 and manifest["stages"]["parity"] == {"status": "skipped", "reason": "--skip-parity"}


def test_second_build_into_a_locked_folder_is_refused(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "build"
    with folder_lock(out):
        code, err = _run(["--model", str(tiny_ckpt), "--out", str(out)], capsys)
    assert code == 2 and "being written by another build" in err
    assert not (out / manifest_io.NAME).exists() and not (out / "onnx").exists()


def test_lock_is_released_and_held_across_processes(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "locked"
    with folder_lock(out):
        probe = ("import sys; from zimage_deploy.fsutil import folder_lock\n"
                 "try:\n    with folder_lock(sys.argv[1]): print('got it')\n"
                 "except Exception as e: print('refused:', e)")
        held = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True).stdout
    free = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True).stdout
    assert held.startswith("refused:") and "pid" in held
    assert free.strip() == "got it"


@pytest.mark.parametrize("model,asked,expected", [
    ("tiny-edit", None, "edit"),
    ("tiny-base", None, "base"),
    ("tiny", None, "turbo"),
    ("tiny", "base", "base"),
])
def test_variant_from_the_checkpoint(model, asked, expected):
    from zimage_deploy.checkpoint import resolve

    assert resolve(model, asked)[1] == expected


@pytest.mark.parametrize("model,asked", [("tiny-edit", "turbo"), ("tiny-edit", "base"), ("tiny", "edit")])
def test_contradicting_variant_is_an_error(model, asked, tmp_path, capsys):
    out = tmp_path / "build"
    code, err = _run(["--model", model, "--variant", asked, "--out", str(out)], capsys)
    assert code == 2 and f"--variant {asked} contradicts the checkpoint" in err
    assert not out.exists()


@pytest.mark.parametrize("index,message", [
    ("{not json", "not a valid model index"),
    ('["a list"]', "not a valid model index"),
    ('{"_class_name": "StableDiffusionPipeline"}', "not a Z-Image pipeline"),
    ('{"_class_name": 7}', "not a Z-Image pipeline"),
])
def test_bad_model_index(tiny_ckpt, tmp_path, capsys, index, message):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    (ckpt / "model_index.json").write_text(index)
    code, err = _run(["--model", str(ckpt), "--out", str(tmp_path / "build")], capsys)
    assert code == 2 and message in err
    assert not (tmp_path / "build").exists()


def test_tiny_edit_default_folder_is_an_edit_build(tmp_path, monkeypatch):
    """`build --model tiny-edit` without --variant: an Edit build (it once made a Turbo build in that folder)."""
    monkeypatch.chdir(tmp_path)
    assert build.main(["--model", "tiny-edit", "--skip-parity"]) == 0
    (folder,) = (tmp_path / "export").iterdir()
    manifest = json.loads((folder / manifest_io.NAME).read_text())
    assert manifest["variant"] == "edit" and "vision_encoder" in manifest["components"]
