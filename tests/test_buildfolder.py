"""The build folder's layout (buildfolder.py): one place for every path, and a manifest's recorded paths kept inside
the folder (a manifest is input: a hostile or corrupted one must not make the runtime read or delete elsewhere)."""

import json
import shutil

import pytest

from zimage_deploy import generate
from zimage_deploy.buildfolder import BuildFolder
from zimage_deploy.cli import run_cli
from zimage_deploy.errors import UserError

ESCAPES = ["../outside/model.onnx", "onnx/../../outside/model.onnx", "/etc/passwd", "C:/graphs/model.onnx",
           "..\\outside\\model.onnx", "", ".", 7, None, ["onnx", "x"],
           # rooted once backslashes are separators (a review found "\\tmp\\x" resolved to /tmp/x), drive or
           # stream names anywhere, control characters, a name no file system takes, bytes
           "\\etc\\passwd", "\\\\server\\share\\x", "\\/x", "onnx/D:y", "onnx/a\x00b", "onnx/a\nb",
           "onnx/" + "x" * 300, b"onnx/x"]


def test_layout_is_what_the_stages_record(tiny_fp32):
    """Every path the build recorded is the one BuildFolder derives; every file it names exists."""
    folder = BuildFolder(tiny_fp32)
    manifest = json.loads((tiny_fp32 / "manifest.json").read_text())
    for name, comp in manifest["components"].items():
        assert comp["onnx"] == BuildFolder.graph_rel(name), name
        assert folder.file(comp["onnx"]) == folder.graph(name) and folder.graph(name).is_file(), name
    assert (folder.tokenizer / "tokenizer.json").is_file()
    assert (folder.scheduler / "scheduler_config.json").is_file()
    assert BuildFolder.graph_rel("transformer", "fp8") == "onnx/transformer.fp8/model.onnx"
    assert BuildFolder.scales_rel("transformer", "fp8") == "quant/transformer.fp8.safetensors"
    assert BuildFolder.plan_rel("vae_decoder") == "engines/vae_decoder.plan"
    assert BuildFolder.lora_rel("ab" * 32) == "loras/" + "ab" * 8 + ".safetensors"


@pytest.mark.parametrize("rel", ESCAPES, ids=repr)
def test_paths_leaving_the_folder_are_refused(tmp_path, rel):
    with pytest.raises(UserError, match="manifest.json records"):
        BuildFolder(tmp_path).file(rel)


def test_nested_relative_paths_stay_inside(tmp_path):
    assert BuildFolder(tmp_path).file("onnx/transformer/model.onnx") == tmp_path / "onnx" / "transformer" / "model.onnx"
    assert BuildFolder(tmp_path).file("onnx\\transformer\\model.onnx").parent == tmp_path / "onnx" / "transformer"


@pytest.mark.parametrize("field", ["onnx", "scales"])
def test_hostile_manifest_path_is_refused_at_load(tiny_fp32, tmp_path, capsys, field):
    """A manifest pointing a graph (or a scale file) outside the build: generate exits 2 naming the manifest, reads
    nothing there, writes no image."""
    d = tmp_path / "build"
    shutil.copytree(tiny_fp32, d)
    outside = tmp_path / "outside"
    shutil.copytree(d / "onnx" / "transformer", outside)  # a real graph, so only the location can be refused
    manifest = json.loads((d / "manifest.json").read_text())
    comp = manifest["components"]["transformer"]
    if field == "onnx":
        comp["onnx"] = "../outside/model.onnx"
    else:
        comp["quantization"] = {"scheme": "fp8", "scales": "../outside/model.onnx", "scales_sha256": "0" * 64}
    (d / "manifest.json").write_text(json.dumps(manifest))
    image = tmp_path / "x.png"
    backend = ["--backend", "torch"] if field == "scales" else []  # scale files are read by the Torch backend
    code = run_cli(lambda: generate.main(["--engine-dir", str(d), "--prompt", "a", "--height", "64", "--width", "64",
                                          "--output", str(image), *backend]))
    err = capsys.readouterr().err
    assert code == 2 and "leaves the build folder" in err, err
    assert not image.exists()


def test_previous_manifest_with_a_bad_path_does_not_block_the_rebuild(tiny_fp32, tmp_path):
    """A build folder whose manifest points a graph outside: the same build again re-exports that component (the
    recorded path is not trusted, not reused) and the folder is whole again."""
    from zimage_deploy import build as build_cli

    d = tmp_path / "build"
    shutil.copytree(tiny_fp32, d)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["components"]["vae_decoder"]["onnx"] = "\\tmp\\elsewhere\\model.onnx"
    (d / "manifest.json").write_text(json.dumps(manifest))
    argv = ["--model", manifest["model"]["path"], "--target", "cpu", "--precision", "fp32", "--out", str(d)]
    assert run_cli(lambda: build_cli.main(argv)) == 0
    again = json.loads((d / "manifest.json").read_text())
    assert again["components"]["vae_decoder"]["onnx"] == BuildFolder.graph_rel("vae_decoder")
    assert again["components"]["transformer"]["onnx_sha256"] == manifest["components"]["transformer"]["onnx_sha256"]


def test_drop_graph_deletes_only_inside(tmp_path):
    """--drop-intermediate deletes the graph folder the manifest names, never one outside the build."""
    outside = tmp_path / "keep"
    outside.mkdir()
    (outside / "model.onnx").write_bytes(b"x")
    build = tmp_path / "build"
    (build / "onnx" / "t").mkdir(parents=True)
    (build / "onnx" / "t" / "model.onnx").write_bytes(b"y")
    logged = []
    with pytest.raises(UserError):
        BuildFolder(build).drop_graph({"onnx": "../keep/model.onnx"}, logged.append, "t")
    assert (outside / "model.onnx").is_file()
    entry = {"onnx": "onnx/t/model.onnx"}
    BuildFolder(build).drop_graph(entry, logged.append, "t")
    assert entry["dropped"] and not (build / "onnx" / "t").exists() and logged
