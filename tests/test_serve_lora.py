"""LoRAs through the HTTP server: requests name LoRAs of the server's --lora-dir (never paths), the answer equals
the runtime's image with the same LoRAs, requests with different LoRAs are never batched together, and a bad
name, scale or file is the client's 4xx before anything is queued."""

from __future__ import annotations

import concurrent.futures as cf
import shutil

import httpx
import numpy as np
import pytest

from serve_util import ServerThread, decode
from test_lora import ALL, make_peft_lora
from zimage_deploy import ZImageRuntime


@pytest.fixture(scope="module")
def lora_dir(tiny_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("lora-dir")
    work = tmp_path_factory.mktemp("lora-work")
    shutil.copy(make_peft_lora(tiny_ckpt, work / "a", 1, ALL, r=4, lora_alpha=8), d / "style.safetensors")
    shutil.copy(make_peft_lora(tiny_ckpt, work / "b", 2, ("to_q", "to_v"), r=2, lora_alpha=2), d / "face.safetensors")
    (d / "notes.txt").write_text("not a LoRA")
    (d / "pickle.safetensors").write_bytes(b"\x80\x04not safetensors")
    outside = work / "secret.safetensors"
    shutil.copy(d / "style.safetensors", outside)
    (d / "escape.safetensors").symlink_to(outside)
    return d


@pytest.fixture(scope="module")
def served(tiny_fp32, lora_dir):
    from zimage_deploy.serve.app import create_app
    from zimage_deploy.serve.service import Service

    runtime = ZImageRuntime(tiny_fp32, backend="onnxruntime")
    service = Service(runtime, max_queue=8, max_batch=4, batch_wait_ms=50, lora_dir=str(lora_dir))
    with ServerThread(create_app(runtime, service=service)) as url:
        yield url, runtime


def _post(url, **fields):
    body = {"prompt": "a red fox", "height": 64, "width": 64, "steps": 3, **fields}
    return httpx.post(f"{url}/v1/generate", json=body, timeout=120)


def test_lora_requests_equal_the_runtime(served, lora_dir):
    url, runtime = served
    plain = runtime.generate("a red fox", seed=3, height=64, width=64, steps=3).images[0]
    want = runtime.generate("a red fox", seed=3, height=64, width=64, steps=3,
                            loras=[(lora_dir / "style.safetensors", 0.8), (lora_dir / "face.safetensors", -1.0)])
    r = _post(url, seed=3, loras=[{"name": "style", "scale": 0.8}, "face.safetensors:-1"])
    assert r.status_code == 200, r.json()
    got = decode(r.json()["images"][0])
    assert np.abs(got - np.asarray(want.images[0]).astype(int)).max() <= 1
    assert np.abs(got - np.asarray(plain).astype(int)).max() > 10  # the LoRAs change the image
    r = _post(url, seed=3)  # and the next request without LoRAs gets the base image back
    assert np.abs(decode(r.json()["images"][0]) - np.asarray(plain).astype(int)).max() <= 1


def test_different_loras_are_not_batched_together(served, lora_dir):
    url, runtime = served
    sets = [[], [{"name": "style"}], [{"name": "style", "scale": 0.5}], [{"name": "face"}]]
    with cf.ThreadPoolExecutor(len(sets)) as ex:
        answers = list(ex.map(lambda s: _post(url, seed=7, loras=s), sets))
    for loras, r in zip(sets, answers):
        assert r.status_code == 200, r.json()
        specs = [(lora_dir / f"{x['name']}.safetensors", x.get("scale", 1.0)) for x in loras]
        want = runtime.generate("a red fox", seed=7, height=64, width=64, steps=3, loras=specs).images[0]
        assert np.abs(decode(r.json()["images"][0]) - np.asarray(want).astype(int)).max() <= 1


@pytest.mark.parametrize("loras,message", [
    ([{"name": "../style"}], "not a valid name"),
    ([{"name": "/etc/passwd"}], "not a valid name"),
    ([{"name": "missing"}], "unknown LoRA"),
    ([{"name": "notes"}], "unknown LoRA"),
    ([{"name": "escape"}], "unknown LoRA"),
    ([{"name": "pickle"}], "safetensors"),
    ([{"name": "style", "scale": "big"}], "scale must be a number"),
    ([{"name": "style", "scale": 1e9}], "scale"),
    (["style:abc"], "scale must be a number"),
    ([{"name": "style", "path": "/tmp/x"}], '"name": NAME'),
    ([{"name": "style"}] * 5, "at most 4"),
    ("style", "must be a JSON list"),
    ([{"name": "x" * 5000}], "not a valid name"),
])
def test_bad_loras_are_refused(served, lora_dir, loras, message):
    url, _ = served
    r = _post(url, loras=loras)
    assert 400 <= r.status_code < 500, r.json()
    assert message in r.json()["error"]["message"]
    assert str(lora_dir) not in r.text  # no server paths in answers


def test_server_without_lora_dir_refuses_the_field(tiny_fp32):
    from zimage_deploy.serve.app import create_app

    runtime = ZImageRuntime(tiny_fp32, backend="onnxruntime")
    with ServerThread(create_app(runtime, max_queue=2)) as url:
        r = _post(url, loras=[{"name": "style"}])
    assert r.status_code == 422 and "--lora-dir" in r.json()["error"]["message"]
