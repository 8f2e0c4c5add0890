"""One server, several builds: `/v1/models`, routing by the `model` field (our JSON and OpenAI's), the default
model, unknown models, per-model queues, limits and metrics, readiness of every model; the command's
`--build-dir NAME=DIR` / `--warmup-sizes` / `--torch-mode` parsing and the runtime's warm-up and fallbacks."""

import concurrent.futures as cf

import httpx
import numpy as np
import pytest

from serve_util import RuntimeSpy, ServerThread, decode, wait_for
from zimage_deploy import ZImageRuntime
from zimage_deploy.errors import UserError
from zimage_deploy.serve import __main__ as serve_cli
from zimage_deploy.serve.app import create_app


@pytest.fixture(scope="module")
def runtimes(tiny_fp32, base_fp32):
    return {"turbo": ZImageRuntime(tiny_fp32), "base": ZImageRuntime(base_fp32)}


@pytest.fixture(scope="module")
def spies(runtimes):
    return {name: RuntimeSpy(rt) for name, rt in runtimes.items()}


@pytest.fixture(scope="module")
def server(spies):
    app = create_app(spies, max_queue=1, batch_wait_ms=0)
    with ServerThread(app) as url:
        yield url, app.state.gateway


def gen(url, **fields):
    return httpx.post(f"{url}/v1/generate", json={"height": 64, "width": 64, "steps": 2, **fields}, timeout=120)


def test_models_listed_and_ready(server):
    url, _ = server
    models = httpx.get(f"{url}/v1/models").json()
    assert [(m["id"], m["variant"], m["default"]) for m in models["data"]] == [
        ("turbo", "turbo", True), ("base", "base", False)]
    assert "z-image-base" in models["data"][1]["aliases"]
    ready = httpx.get(f"{url}/ready")
    assert ready.status_code == 200 and set(ready.json()["models"]) == {"turbo", "base"}


def test_the_model_field_routes_the_request(server, runtimes):
    url, _ = server
    for name in ("turbo", "base"):
        body = gen(url, prompt="a fox", seed=3, model=name).json()
        want = runtimes[name].generate("a fox", seed=3, height=64, width=64, steps=2).images[0]
        assert body["model"] == name
        assert np.abs(decode(body["images"][0]) - np.asarray(want).astype(int)).max() <= 1
    assert gen(url, prompt="a fox", seed=3).json()["model"] == "turbo"  # the default
    openai = httpx.post(f"{url}/v1/images/generations", timeout=120,
                        json={"prompt": "a fox", "model": "z-image-base", "size": "64x64", "seed": 3, "steps": 2})
    assert openai.status_code == 200 and openai.json()["model"] == "base"
    multipart = httpx.post(f"{url}/v1/generate", timeout=120,
                           files={"request": (None, '{"prompt": "a fox", "model": "base", "height": 64, '
                                                    '"width": 64, "steps": 1}')})
    assert multipart.status_code == 200 and multipart.json()["model"] == "base"


@pytest.mark.parametrize("value,status,message", [
    ("dall-e-3", 404, "model 'dall-e-3' is not served here; models: turbo, base"),
    (7, 422, "model must be a model name"),
])
def test_unknown_model_is_refused(server, value, status, message):
    url, _ = server
    for r in (gen(url, prompt="a", model=value),
              httpx.post(f"{url}/v1/images/generations", json={"prompt": "a", "model": value})):
        assert r.status_code == status and message in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "model"


def test_each_model_has_its_own_queue_and_limits(server, spies):
    """turbo busy and full (max_queue 1): another turbo request gets 429, a base request is served."""
    url, _ = server
    spies["turbo"].gate.clear()
    try:
        with cf.ThreadPoolExecutor(1) as ex:
            first = ex.submit(gen, url, prompt="a", seed=1, model="turbo")
            wait_for(lambda: spies["turbo"].calls and spies["turbo"].calls[-1]["outcome"] is None)
            busy = gen(url, prompt="b", model="turbo")
            assert busy.status_code == 429 and "model turbo busy" in busy.json()["error"]["message"]
            assert gen(url, prompt="c", model="base").status_code == 200
            spies["turbo"].gate.set()
            assert first.result().status_code == 200
    finally:
        spies["turbo"].gate.set()
    # each model's own pixel budget and sizes
    for name in ("turbo", "base"):
        big = gen(url, prompt="a", model=name, height=512, width=512, steps=1)
        assert big.status_code in (200, 413)
        huge = gen(url, prompt="a", model=name, height=4096, width=64)
        assert huge.status_code == 422 and "largest side" in huge.json()["error"]["message"]
    metrics = httpx.get(f"{url}/metrics").text
    assert 'zimage_images_total{model="base"}' in metrics and 'zimage_images_total{model="turbo"}' in metrics
    assert 'zimage_errors_total{kind="overloaded",model="turbo"}' in metrics


def test_fallbacks_are_exported(server, spies, monkeypatch):
    url, _ = server
    monkeypatch.setattr(spies["base"].runtime, "fallbacks", lambda: {"vae_decoder": 2}, raising=False)
    metrics = httpx.get(f"{url}/metrics").text
    assert 'zimage_fallbacks_total{component="vae_decoder",model="base"} 2.0' in metrics


def test_api_keys_hold_for_every_model(spies):
    with ServerThread(create_app(spies, api_key="k1,k2")) as url:
        for name in ("turbo", "base"):
            assert gen(url, prompt="a", model=name).status_code == 401
            ok = httpx.post(f"{url}/v1/generate", headers={"authorization": "Bearer k2"}, timeout=120,
                            json={"prompt": "a", "model": name, "height": 64, "width": 64, "steps": 1})
            assert ok.status_code == 200
        assert httpx.get(f"{url}/v1/models").status_code == 401


# -- the command line and the runtime's serving hooks ----------------------------------------------------------
def test_build_specs_and_sizes(tmp_path):
    assert serve_cli.build_specs(["turbo=/a", "/b", "x.y-1=/c=d"]) == [
        ("turbo", serve_cli.Path("/a")), (None, serve_cli.Path("/b")), ("x.y-1", serve_cli.Path("/c=d"))]
    odd = tmp_path / "a=b"
    odd.mkdir()
    assert serve_cli.build_specs([str(odd)]) == [(None, odd)]  # an existing folder stays whole
    with pytest.raises(UserError, match="model name"):
        serve_cli.build_specs(["bad name=/a"])
    assert serve_cli.parse_sizes("1024x1024, 768x1344") == [(1024, 1024), (1344, 768)]
    with pytest.raises(UserError, match="WIDTHxHEIGHT"):
        serve_cli.parse_sizes("1024")


def test_duplicate_names_and_bad_warmup_sizes_stop_the_server(tiny_fp32, capsys):
    from zimage_deploy.cli import run_cli

    assert run_cli(lambda: serve_cli.main(["--build-dir", str(tiny_fp32), "--build-dir", str(tiny_fp32)])) == 2
    assert "two builds named 'turbo'" in capsys.readouterr().err
    assert run_cli(lambda: serve_cli.main(["--build-dir", str(tiny_fp32), "--warmup-sizes", "100x64"])) == 2
    assert "--warmup-sizes 100x64" in capsys.readouterr().err
    assert run_cli(lambda: serve_cli.main(["--build-dir", str(tiny_fp32), "--default-model", "nope",
                                           "--warmup-sizes", "64x64"])) == 2
    assert "--default-model nope" in capsys.readouterr().err
    assert run_cli(lambda: serve_cli.main(["--build-dir", str(tiny_fp32), "--offload", "model"])) == 2
    assert "onnxruntime backend runs on the CPU: offload mode model" in capsys.readouterr().err


def test_runtime_warmup_torch_mode_and_fallbacks(runtimes):
    rt = runtimes["turbo"]
    took = rt.warmup([(64, 96), (64, 64)])["seconds_per_size"]
    assert list(took) == ["64x96", "64x64"] and all(t >= 0 for t in took.values())
    assert rt.fallbacks() == {} and rt.torch_mode is None  # ONNX Runtime: no torch mode
    with pytest.raises(UserError, match="torch_mode"):
        ZImageRuntime(rt.pipeline.engine_dir, torch_mode="fast")
