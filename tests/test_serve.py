"""Embedding and serving: the runtime API from many threads, cancellation, the HTTP server's answers compared
with the runtime's own images, and the Ray Serve app (the same Service code) on one CPU replica.
Load behaviour (429 rates, batch sizes, replicas sharing work) is measured by benchmarks/serve_load.py."""

import concurrent.futures as cf
import json
import threading

import httpx
import numpy as np
import pytest

from conftest import synthetic_image
from serve_util import ServerThread, b64, decode, free_port, png_bytes
from zimage_deploy import ZImageRuntime
from zimage_deploy.errors import RequestError
from zimage_deploy.runtime.api import GenerationCancelled


def arr(image):
    return np.asarray(image).astype(int)


@pytest.fixture(scope="module")
def runtime(tiny_fp32):
    return ZImageRuntime(tiny_fp32)


def test_api_threads_match_sequential(runtime):
    seeds = list(range(6))
    sequential = [runtime.generate("a lighthouse", seed=s, height=64, width=64).images[0] for s in seeds]
    with cf.ThreadPoolExecutor(6) as ex:
        threaded = list(ex.map(lambda s: runtime.generate("a lighthouse", seed=s, height=64, width=64).images[0],
                               seeds))
    for a, b in zip(sequential, threaded):
        assert np.array_equal(arr(a), arr(b))
    assert not np.array_equal(arr(sequential[0]), arr(sequential[1]))


def test_api_batch_equals_single_calls_and_latents(runtime):
    batch = runtime.generate(["a cat", "a dog"], seed=[4, 5], height=64, width=96, return_latents=True)
    single = runtime.generate("a dog", seed=5, height=64, width=96)
    assert np.abs(arr(batch.images[1]) - arr(single.images[0])).max() <= 1
    assert batch.latents.shape == (2, 16, 8, 12)
    assert set(batch.timings) == {"encode", "denoise", "decode"}


def test_two_runtimes_in_one_process(tiny_fp32):
    a, b = ZImageRuntime(tiny_fp32, backend="onnxruntime"), ZImageRuntime(tiny_fp32, backend="torch")
    ia = a.generate("a cat", seed=1, height=64, width=64).images[0]
    ib = b.generate("a cat", seed=1, height=64, width=64).images[0]
    assert a.backend != b.backend and np.abs(arr(ia) - arr(ib)).max() <= 2


def test_api_error_types(runtime):
    with pytest.raises(RequestError, match="multiple of 16"):
        runtime.generate("a cat", height=100, width=64)
    with pytest.raises(RequestError, match="one seed per prompt"):
        runtime.generate(["a", "b"], seed=[1])
    with pytest.raises(RequestError, match="list of PIL images"):
        runtime.generate("a cat", images=["not an image"])


@pytest.mark.parametrize("stop_at", [1, 3, 10])
def test_cancel_stops_between_steps(runtime, stop_at, monkeypatch):
    """`cancel` is asked before starting, before each of the 8 steps and before decoding: true at its n-th
    question, n - 2 transformer steps ran (none for n = 1; all 8, and no decoding, for n = 10)."""
    backend = runtime.pipeline.backend
    calls = []
    real = backend.run
    monkeypatch.setattr(backend, "run", lambda component, **kw: calls.append(component) or real(component, **kw))
    asked = []
    with pytest.raises(GenerationCancelled):
        runtime.generate("a cat", seed=1, height=64, width=64, steps=8,
                         cancel=lambda: asked.append(1) or len(asked) >= stop_at)
    assert calls.count("transformer") == max(0, stop_at - 2) and "vae_decoder" not in calls
    event = threading.Event()
    event.set()
    with pytest.raises(GenerationCancelled):
        runtime.generate("a cat", seed=1, height=64, width=64, cancel=event)


# -- HTTP server ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(runtime):
    from zimage_deploy.serve.app import create_app

    with ServerThread(create_app(runtime, max_queue=8, max_batch=4, batch_wait_ms=5)) as url:
        yield url


def test_answers_equal_the_runtime(server, runtime):
    """Concurrent requests (batched or not, whatever the timing) answer the image of a single call."""
    def one(i):
        r = httpx.post(f"{server}/v1/generate", timeout=120,
                       json={"prompt": "a red fox", "seed": i, "height": 64, "width": 64, "steps": 3})
        return i, r.status_code, r.json()

    with cf.ThreadPoolExecutor(6) as ex:
        answers = list(ex.map(one, range(6)))
    for i, code, body in answers:
        assert code == 200, body
        want = runtime.generate("a red fox", seed=i, height=64, width=64, steps=3).images[0]
        assert body["seed"] == i and (body["width"], body["height"]) == (64, 64)
        assert np.abs(decode(body["images"][0]) - arr(want)).max() <= 1
    metrics = httpx.get(f"{server}/metrics").text
    assert 'zimage_images_total{model="turbo"} 6.0' in metrics and 'zimage_request_seconds_count{model="turbo",stage="denoise"}' in metrics


def test_random_seed_is_returned_and_reproduces(server, runtime):
    body = httpx.post(f"{server}/v1/generate", json={"prompt": "a fox", "height": 64, "width": 64, "steps": 2},
                      timeout=60).json()
    assert 0 <= body["seed"] < 2**31
    want = runtime.generate("a fox", seed=body["seed"], height=64, width=64, steps=2).images[0]
    assert np.abs(decode(body["images"][0]) - arr(want)).max() <= 1


@pytest.mark.parametrize("body,status,message", [
    (b"{not json", 400, "malformed JSON"),
    (b'{"prompt": "a", "height": 100, "width": 64}', 422, "multiple of 16"),
    (b'{"prompt": "a", "height": 4096, "width": 64}', 422, "above this build's largest side 512"),
    (b'{"prompt": ""}', 422, "prompt is empty"),
    (b'{"height": 64}', 422, "prompt is required"),
    (b'{"prompt": "a", "colour": "red"}', 422, "unknown field `colour`"),
    (b'{"prompt": "a", "images": ["@@@"]}', 400, "not valid base64"),
    (b'{"prompt": "a", "images": ["aGVsbG8gd29ybGQ="]}', 400, "not an image"),
    (b'{"prompt": "a", "steps": "8"}', 422, "steps must be an integer"),
    (b'[1, 2]', 400, "must be a JSON object"),
])
def test_bad_requests(server, body, status, message):
    r = httpx.post(f"{server}/v1/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status and message in r.json()["error"]["message"], r.text


def test_multipart_img2img_equals_runtime(server, runtime):
    image = synthetic_image(96, 64)
    ok = httpx.post(f"{server}/v1/generate", data={"request": '{"prompt": "a door", "seed": 3, "strength": 0.8}'},
                    files={"image": ("in.png", png_bytes(image), "image/png")}, timeout=60)
    assert ok.status_code == 200, ok.text
    want = runtime.generate("a door", seed=3, images=[image], strength=0.8).images[0]
    got = decode(ok.json()["images"][0])
    assert got.shape == (64, 96, 3) and np.array_equal(got, arr(want))
    json_body = httpx.post(f"{server}/v1/generate", timeout=60, json={
        "prompt": "a door", "seed": 3, "strength": 0.8, "images": [b64(png_bytes(image))]}).json()
    assert np.array_equal(decode(json_body["images"][0]), arr(want))


def test_multipart_inpainting_equals_runtime(server, runtime):
    from PIL import Image

    image = synthetic_image(64, 64, seed=2)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    r = httpx.post(f"{server}/v1/generate", data={"request": '{"prompt": "a window", "seed": 5, "steps": 4}'},
                   files=[("image", ("i.png", png_bytes(image), "image/png")),
                          ("mask", ("m.png", png_bytes(mask), "image/png"))], timeout=60)
    assert r.status_code == 200, r.text
    want = runtime.generate("a window", seed=5, steps=4, images=[image], mask=mask).images[0]
    assert np.array_equal(decode(r.json()["images"][0]), arr(want))


def test_health_and_ready(server):
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["variant"] == "turbo"
    ready = httpx.get(f"{server}/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


# -- Ray Serve --------------------------------------------------------------------------------------------
def test_ray_serve_shares_the_service(tiny_fp32, runtime):
    import ray  # CI installs zimage-deploy[ray]
    from ray import serve

    from zimage_deploy.serve.ray_app import deployment

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(str(tiny_fp32), replicas=1, limits={"max_batch_pixels": 2 * 64 * 64}),
                  route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/ready", timeout=30).status_code == 200
        for seed in (1, 2):
            body = httpx.post(f"{url}/v1/generate", timeout=120,
                              json={"prompt": "a cat", "seed": seed, "height": 64, "width": 64}).json()
            want = runtime.generate("a cat", seed=seed, height=64, width=64).images[0]
            assert np.array_equal(decode(body["images"][0]), arr(want)) and body["replica"]
        image = synthetic_image(64, 64)
        r = httpx.post(f"{url}/v1/images/edits", timeout=120,
                       data={"prompt": "a door", "seed": "3", "response_format": "b64_json"},
                       files={"image": ("in.png", png_bytes(image), "image/png")})
        want = runtime.generate("a door", seed=3, images=[image]).images[0]
        assert r.status_code == 200 and np.array_equal(decode(r.json()["data"][0]["b64_json"]), arr(want))
        # the same limits and answers as the HTTP server
        assert httpx.post(f"{url}/v1/generate", content=b"{oops",
                          headers={"content-type": "application/json"}).status_code == 400
        big = httpx.post(f"{url}/v1/generate", json={"prompt": "a", "height": 128, "width": 128})
        assert big.status_code == 413 and "budget is 8192 pixels" in big.json()["error"]["message"]
        huge = httpx.post(f"{url}/v1/generate", content=b"x" * (64 << 20), headers={"content-type":
                                                                                    "application/json"})
        assert huge.status_code == 413 and "limit" in huge.json()["error"]["message"]
        assert httpx.post(f"{url}/v1/generate", content=b"{}", headers={"content-type": "text/plain"}
                          ).status_code == 415
        assert json.loads(httpx.get(f"{url}/nowhere").text)["error"]["code"] == 404
    finally:
        serve.shutdown()
        ray.shutdown()

