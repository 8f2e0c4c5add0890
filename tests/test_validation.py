"""One request validator (runtime/validate.py) for the CLI, the runtime API and the HTTP server: the same bad
request gets the same message from all three, before any model loads; image inputs are judged from their
headers; the build is verified against its manifest at load (size always, sha256 once, then a stamp)."""

import io
import json
import math
import shutil
import struct
import subprocess
import sys
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import synthetic_image
from zimage_deploy import generate
from zimage_deploy.cli import run_cli
from zimage_deploy.errors import RequestError, UserError
from zimage_deploy.runtime import verify
from zimage_deploy.runtime.validate import (BadInput, ImageInfo, Limits, TooLarge, check_request, condition_size,
                                            decode_image, probe_image)
from serve_util import ServerThread

# (fields, message): every case is refused with this message by the CLI, the runtime API and the server
BAD = [
    (dict(height=0), "height must be a positive multiple of 16, got 0"),
    (dict(width=100), "width must be a positive multiple of 16, got 100"),
    (dict(height=4096), "height 4096 is above this build's largest side 512"),
    (dict(width=32), "width 32 is below this build's smallest side 64"),
    (dict(steps=0), "steps must be in 1..100, got 0"),
    (dict(steps=101), "steps must be in 1..100, got 101"),
    (dict(seed=-1), "seed must be in 0..9223372036854775807 (2**63 - 1), got -1"),
    (dict(seed=2**70), f"seed must be in 0..9223372036854775807 (2**63 - 1), got {2**70}"),
    (dict(guidance_scale=math.inf), "guidance_scale must be in [0, 30], got inf"),
    (dict(guidance_scale=math.nan), "guidance_scale must be in [0, 30], got nan"),
    (dict(guidance_scale=-1.0), "guidance_scale must be in [0, 30], got -1.0"),
    (dict(cfg_normalization=math.nan, guidance_scale=2.0), "cfg_normalization must be in [0, 10], got nan"),
    (dict(cfg_truncation=2.0), "cfg_truncation must be in [0, 1], got 2.0"),
    (dict(prompt="   "), "prompt is empty"),
    (dict(prompt="x" * 10_001), "prompt is 10001 characters; the limit is 10000"),
    (dict(negative_prompt="blurry"), "a negative prompt needs classifier-free guidance"),
    (dict(strength=0.5), "strength needs an input image"),
]
FLAGS = {"height": "--height", "width": "--width", "steps": "--steps", "seed": "--seed",
         "guidance_scale": "--guidance-scale", "cfg_normalization": "--cfg-normalization",
         "cfg_truncation": "--cfg-truncation", "negative_prompt": "--negative-prompt", "strength": "--strength"}


@pytest.fixture(scope="module")
def runtime(tiny_fp32):
    from zimage_deploy import ZImageRuntime

    return ZImageRuntime(tiny_fp32)


@pytest.fixture(scope="module")
def server(runtime):
    from zimage_deploy.serve.app import create_app

    with ServerThread(create_app(runtime)) as url:
        yield url


def _cli_error(engine_dir, fields, tmp_path, capsys) -> str:
    argv = ["--engine-dir", str(engine_dir), "--prompt", fields.get("prompt", "a cat"), "--output",
            str(tmp_path / "x.png")]
    for k, v in fields.items():
        if k in FLAGS:
            argv += [FLAGS[k], str(v)]
    if "strength" in fields:  # the CLI's own pre-check says "--strength needs --image": send it through the API
        return None
    code = run_cli(lambda: generate.main(argv))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())
    return err[len("error: "):].strip()


@pytest.mark.parametrize("fields,message", BAD, ids=[f"{list(f)[0]}={str(list(f.values())[0])[:12]}"
                                                     for f, _ in BAD])
def test_same_message_cli_api_server(runtime, server, tiny_fp32, tmp_path, capsys, fields, message):
    with pytest.raises(RequestError) as api:
        runtime.generate(**{"prompt": "a cat", **fields})
    assert message in str(api.value)
    cli = _cli_error(tiny_fp32, fields, tmp_path, capsys)
    if cli is not None:
        assert cli == str(api.value)
    body = json.dumps({"prompt": "a cat", **fields}).encode()  # NaN / Infinity: Python's JSON literals
    r = httpx.post(f"{server}/v1/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code in (413, 422) and r.json()["error"]["message"] == str(api.value)


def test_cli_checks_before_loading_any_model(tiny_fp32, tmp_path, capsys, monkeypatch):
    """A bad request never reaches open_pipeline (no model loads)."""
    import zimage_deploy.runtime.open as opening

    monkeypatch.setattr(opening, "open_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    assert _cli_error(tiny_fp32, dict(steps=0), tmp_path, capsys).startswith("steps must be")


@pytest.fixture(scope="module")
def limits(runtime):
    return runtime.limits


def test_limits_of_the_tiny_build(limits):
    assert (limits.min_side, limits.max_side, limits.multiple, limits.max_batch) == (64, 512, 16, 4)
    assert limits.default_steps == 8 and limits.default_guidance == 0.0


def test_engine_profile_limits(limits, runtime):
    """With engines the profile decides: sides, batch, static shapes (CFG doubles the batch on TensorRT)."""
    manifest = runtime.manifest.to_dict()
    for comp in manifest["components"].values():
        comp["engine"] = {"status": "complete"}
    manifest["tensorrt"]["options"].update(min_side=128, max_side=256, max_batch=2)
    lim = Limits.for_build(manifest, backend="tensorrt")
    assert (lim.min_side, lim.max_side, lim.max_batch, lim.cfg_doubles_batch) == (128, 256, 2, True)
    with pytest.raises(RequestError, match="above this build's largest side 256"):
        check_request(lim, "a", height=512, width=128)
    with pytest.raises(TooLarge, match="at most 1 with classifier-free guidance"):
        check_request(lim, ["a", "b"], seed=[1, 2], height=128, width=128, guidance_scale=3.0)
    assert check_request(lim, ["a", "b"], seed=[1, 2], height=128, width=128).batch == 2
    manifest["tensorrt"]["options"].update(static=[128, 192], static_batch=1)
    lim = Limits.for_build(manifest, backend="tensorrt", cfg_mode="sequential")
    check_request(lim, "a", height=128, width=192, guidance_scale=3.0)
    with pytest.raises(RequestError, match="192x128 only"):
        check_request(lim, "a", height=128, width=128)


def test_normalised_request(limits):
    r = check_request(limits, "a fox")
    assert (r.prompts, r.seeds, r.steps, r.height, r.width, r.guidance_scale) == (("a fox",), (0,), 8, 256, 256, 0.0)
    assert r.strength is None and r.pixels == 256 * 256
    r = check_request(limits, "a fox", images=[ImageInfo(100, 90)], mask=ImageInfo(100, 90))
    assert (r.height, r.width, r.strength, r.images, r.mask) == (80, 96, 0.6, 1, True)
    with pytest.raises(RequestError, match="must be the same size"):
        check_request(limits, "a", images=[ImageInfo(100, 90)], mask=ImageInfo(90, 100))
    with pytest.raises(RequestError, match="leaves no step to run"):
        check_request(limits, "a", images=[ImageInfo(64, 64)], strength=1e-20, steps=8)
    with pytest.raises(RequestError, match="integer"):
        check_request(limits, "a", steps=True)
    with pytest.raises(RequestError, match="integer"):
        check_request(limits, "a", height=64.0)
    with pytest.raises(RequestError, match="number"):
        check_request(limits, "a", guidance_scale="3")
    with pytest.raises(RequestError, match="valid Unicode"):
        check_request(limits, "a \ud800 b")
    with pytest.raises(RequestError, match="one seed per prompt"):
        check_request(limits, ["a", "b"], seed=[1])


def test_input_images_beyond_the_profile_are_too_large(limits):
    """img2img: the output takes the image's size; above the largest side it is refused (413), not resized."""
    with pytest.raises(TooLarge, match="above this build's largest side 512"):
        check_request(limits, "a", images=[ImageInfo(1536, 1536)])
    with pytest.raises(TooLarge, match="limited to 16777216 pixels"):
        check_request(limits, "a", images=[ImageInfo(8192, 4096)])
    with pytest.raises(TooLarge, match="budget is 100000 pixels"):
        from dataclasses import replace

        check_request(replace(limits, max_request_pixels=100_000), ["a", "b"], seed=[1, 2], height=256, width=256)


@pytest.mark.parametrize("w,h,hw", [(96, 96, None), (300, 200, None), (1100, 1000, None), (1100, 1000, (128, 96)),
                                    (3000, 600, None), (513, 127, None)])
def test_condition_size_matches_the_edit_pipeline(w, h, hw):
    """The validator's arithmetic for Edit condition images equals what runtime/omni.py really prepares."""
    from zimage_deploy.runtime.omni import prepare_condition

    height, width = hw or (None, None)
    _, vae_input, size = prepare_condition(Image.new("RGB", (w, h)), 16, height, width)
    assert condition_size(w, h, 16, height, width) == size == tuple(vae_input.shape[-2:])


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares a size and holds almost no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def test_images_are_judged_from_their_header(limits):
    # 5000 x 5000 declared in 70 bytes: refused for its size before any decoding (decoding would fail: BadInput)
    with pytest.raises(TooLarge, match="limited to 16777216 pixels"):
        decode_image(_png_header(5000, 5000), limits)
    with pytest.raises(TooLarge):  # beyond PIL's own decompression-bomb guard
        probe_image(_png_header(100_000, 100_000))
    with pytest.raises(BadInput, match="damaged"):  # a small header that lies is caught when decoding
        decode_image(_png_header(64, 64), limits)
    assert probe_image(_png_header(1536, 1536)) == ImageInfo(1536, 1536, "PNG")


@pytest.mark.parametrize("fmt,ok", [("PNG", True), ("JPEG", True), ("WEBP", True), ("GIF", False), ("BMP", False),
                                    ("TIFF", False)])
def test_image_formats(limits, fmt, ok):
    buf = io.BytesIO()
    synthetic_image(64, 48).save(buf, format=fmt)
    if ok:
        assert decode_image(buf.getvalue(), limits).size == (64, 48)
    else:
        with pytest.raises(BadInput, match="PNG, JPEG or WebP"):
            decode_image(buf.getvalue(), limits)


# -- the build, verified at load ------------------------------------------------------------------------------
@pytest.fixture
def build_copy(tiny_fp32, tmp_path):
    d = tmp_path / "build"
    shutil.copytree(tiny_fp32, d)
    return d


def _generate(engine_dir, tmp_path, capsys):
    code = run_cli(lambda: generate.main(["--engine-dir", str(engine_dir), "--prompt", "a cat", "--height", "64",
                                          "--width", "64", "--steps", "1", "--output", str(tmp_path / "o.png")]))
    return code, capsys.readouterr().err


def test_truncated_graph_refused_at_load(build_copy, tmp_path, capsys):
    graph = build_copy / "onnx" / "transformer" / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:-1000])
    code, err = _generate(build_copy, tmp_path, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"graph {graph} is truncated" in err and not (tmp_path / "o.png").exists()


def test_corrupted_graph_refused_then_stamp_remembers(build_copy, tmp_path, capsys, monkeypatch):
    """Same size, other bytes: the sha256 finds it; a verified file is hashed once (then the stamp), again
    after it changes."""
    (build_copy / verify.STAMP).unlink(missing_ok=True)  # copytree keeps sizes and mtimes: the stamp would hold
    hashed = []
    real = verify.folder_sha256
    monkeypatch.setattr(verify, "folder_sha256", lambda folder: hashed.append(folder.name) or real(folder))
    code, err = _generate(build_copy, tmp_path, capsys)
    assert code == 0, err
    assert sorted(hashed) == sorted(["text_encoder", "context_refiner", "transformer", "vae_decoder",
                                     "vae_encoder"])
    assert (build_copy / verify.STAMP).is_file()
    hashed.clear()
    assert _generate(build_copy, tmp_path, capsys)[0] == 0 and hashed == []
    graph = build_copy / "onnx" / "transformer" / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    code, err = _generate(build_copy, tmp_path, capsys)
    assert hashed == ["transformer"]
    assert code == 2 and f"graph {graph} is corrupted (sha256 differs from the manifest)" in err


@pytest.mark.parametrize("damage,message", [
    ("manifest_list", "is not a build manifest: it holds a JSON list"),
    ("manifest_no_defaults", "'defaults' missing"),
    ("no_tokenizer", "tokenizer is missing"),
    ("no_scheduler", "scheduler is missing"),
    ("no_graph", "onnx/vae_decoder/model.onnx is missing"),
])
def test_broken_build_is_one_error_line(build_copy, tmp_path, capsys, damage, message):
    manifest = build_copy / "manifest.json"
    if damage == "manifest_list":
        manifest.write_text("[1, 2, 3]")
    elif damage == "manifest_no_defaults":
        m = json.loads(manifest.read_text())
        del m["defaults"]
        manifest.write_text(json.dumps(m))
    elif damage == "no_graph":
        (build_copy / "onnx" / "vae_decoder" / "model.onnx").unlink()
    else:
        shutil.rmtree(build_copy / damage[3:])
    code, err = _generate(build_copy, tmp_path, capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    from zimage_deploy import ZImageRuntime

    with pytest.raises(UserError) as e:
        ZImageRuntime(build_copy)
    assert message in str(e.value)


def test_server_refuses_to_start_on_a_broken_build(build_copy):
    graph = build_copy / "onnx" / "transformer" / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:100])
    r = subprocess.run([sys.executable, "-m", "zimage_deploy.serve", "--engine-dir", str(build_copy), "--port", "9"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error: graph" in r.stderr and "truncated" in r.stderr
    assert "Traceback" not in r.stderr


def test_api_generate_matches_the_pipeline(runtime):
    """The validated path changes nothing: same image as the pipeline called directly."""
    got = runtime.generate("a lighthouse", seed=9, height=64, width=96, steps=3).images[0]
    want = runtime.pipeline("a lighthouse", 64, 96, 3, 9, progress=False)[0]
    assert np.array_equal(np.asarray(got), np.asarray(want))


# what the pipelines checked themselves before (with other messages) or let through
PIPELINE_BAD = [
    (dict(negative_prompt=["fog"], guidance_scale=2.0), "negative_prompt must be a string, got list"),
    (dict(mask=Image.new("L", (64, 64))), "inpainting needs an input image as well as the mask"),
    (dict(images=[synthetic_image(64, 64)], strength=0.0), "strength must be in (0, 1], got 0.0"),
    (dict(images=[synthetic_image(64, 48)], mask=Image.new("L", (48, 64))), "the mask is 48x64 but the image"),
    (dict(controlnet_scale=0.5), "controlnet_scale needs a control image"),
    (dict(control_image=synthetic_image(64, 64)), "this build has no ControlNet"),
]
EDIT_BAD = [
    (dict(), "the Edit variant needs at least one condition image"),
    (dict(images=[synthetic_image(48, 96)]), "condition image 0: condition image too small: 48x96"),
    (dict(images=[synthetic_image(96, 96)] * 3), "3 condition images; this build takes at most 2"),
    (dict(images=[synthetic_image(96, 96)], strength=1.5), "strength must be in (0, 1], got 1.5"),
    (dict(images=[synthetic_image(96, 96)], height=64), "with a mask or a strength below 1 the output is"),
]


def _refused_by_the_validator(pipe, monkeypatch, fields, message):
    """The pipeline's call is refused with the validator's RequestError and message, before any model runs."""
    monkeypatch.setattr(pipe.backend, "run", lambda *a, **k: pytest.fail("a model ran for a refused request"))
    fields = dict(fields)
    prompt = fields.pop("prompt", "a fox")
    with pytest.raises(RequestError) as want:
        check_request(Limits.for_build(pipe.manifest, pipe.backend.name, pipe.cfg_mode), prompt, **fields)
    with pytest.raises(RequestError) as got:
        pipe(prompt, progress=False, **fields)
    assert message in str(want.value) and str(got.value) == str(want.value)


@pytest.mark.parametrize("fields,message", BAD + PIPELINE_BAD)
def test_pipeline_checks_with_the_validator(runtime, monkeypatch, fields, message):
    _refused_by_the_validator(runtime.pipeline, monkeypatch, fields, message)


@pytest.mark.parametrize("fields,message", EDIT_BAD)
def test_edit_pipeline_checks_with_the_validator(edit_fp32, monkeypatch, fields, message):
    from zimage_deploy.runtime.open import open_pipeline

    if "height" in fields:  # a mask edits the first condition image in place: its prepared size is the output
        fields = dict(fields, mask=Image.new("L", (96, 96)))
    _refused_by_the_validator(open_pipeline(edit_fp32, "onnxruntime"), monkeypatch, fields, message)


def test_pipeline_run_takes_the_checked_images(runtime):
    """`run` samples a checked request with the images it was checked with; others are an internal error."""
    from zimage_deploy.errors import InternalError

    pipe = runtime.pipeline
    req = pipe.check("a fox", images=[synthetic_image(64, 64)])
    with pytest.raises(InternalError, match="checked with 1 image"):
        pipe.run(req)
    with pytest.raises(InternalError, match="prepares to"):
        pipe.run(req, [synthetic_image(96, 64)])
    with pytest.raises(RequestError, match="images must be a list of PIL images"):
        pipe.check("a fox", images=[ImageInfo(64, 64)])


def test_server_limits(limits):
    """The server's defaults follow the build; its options only narrow the build's range."""
    from zimage_deploy.serve.schema import ServeLimits

    sl = ServeLimits.for_build(limits)
    assert sl.max_batch_pixels == sl.request.max_request_pixels == 512 * 512 and sl.max_images == 1
    assert sl.max_image_bytes < 3 << 20 and sl.max_body_bytes < 8 << 20 and sl.max_json_bytes < 512 << 10
    narrow = ServeLimits.for_build(limits, max_side=256, max_steps=10, max_prompt_chars=50)
    assert (narrow.request.max_side, narrow.request.max_steps, narrow.request.max_prompt_chars) == (256, 10, 50)
    with pytest.raises(RequestError, match="above this build's largest side 256"):
        check_request(narrow.request, "a", height=512, width=64)
    with pytest.raises(UserError, match="multiple of 16"):
        ServeLimits.for_build(limits, max_side=100)
    with pytest.raises(UserError, match="below the smallest image"):
        ServeLimits.for_build(limits, max_batch_pixels=1000)
    assert ServeLimits.for_build(limits, max_steps=1000).request.max_steps == 100  # never widened
