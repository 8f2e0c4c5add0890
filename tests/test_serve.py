"""Embedding and serving: the runtime API from many threads, the HTTP server under a bounded load on loopback,
request validation, and a Ray Serve deployment with two CPU replicas."""

import base64
import concurrent.futures as cf
import io
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import synthetic_image
from zimage_deploy import ZImageRuntime
from zimage_deploy.errors import RequestError


def arr(image):
    return np.asarray(image).astype(int)


@pytest.fixture(scope="module")
def runtime(tiny_fp32):
    return ZImageRuntime(tiny_fp32)


def test_api_threads_match_sequential(runtime):
    seeds = list(range(8))
    sequential = [runtime.generate("a lighthouse", seed=s, height=64, width=64).images[0] for s in seeds]
    with cf.ThreadPoolExecutor(8) as ex:
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


# -- HTTP server ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(runtime):
    from zimage_deploy.serve.app import create_app
    from zimage_deploy.serve.schema import Limits

    limits = Limits.for_build(runtime.manifest, max_image_bytes=200_000)
    with ServerThread(create_app(runtime, limits, max_queue=8, max_batch=4, batch_wait_ms=5)) as url:
        yield url


def png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_load_bounded_queue_no_lost_requests(server, runtime):
    """200 requests, 16 at a time: every one is answered, 200 or 429 (queue bounded at 8), never lost."""
    def one(i):
        r = httpx.post(f"{server}/v1/generate", timeout=120,
                       json={"prompt": "a red fox", "seed": i, "height": 64, "width": 64, "steps": 4})
        return i, r.status_code, r.json()

    with cf.ThreadPoolExecutor(16) as ex:
        answers = list(ex.map(one, range(200)))
    codes = [c for _, c, _ in answers]
    assert len(answers) == 200 and set(codes) <= {200, 429}
    assert codes.count(200) > 0 and codes.count(429) > 0
    for i, code, body in answers:
        if code == 429:
            assert "busy" in body["error"]["message"]
    ok = [(i, body) for i, code, body in answers if code == 200]
    assert max(body["batch_size"] for _, body in ok) > 1, "compatible requests were never batched"
    for i, body in ok[:5]:  # batched answers equal a single call with the same seed
        got = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
        want = runtime.generate("a red fox", seed=i, height=64, width=64, steps=4).images[0]
        assert body["seed"] == i and np.abs(arr(got) - arr(want)).max() <= 1
    metrics = httpx.get(f"{server}/metrics").text
    assert 'zimage_errors_total{kind="overloaded"}' in metrics and "zimage_images_total" in metrics
    assert 'zimage_request_seconds_count{stage="denoise"}' in metrics


@pytest.mark.parametrize("body,status,message", [
    (b"{not json", 400, "malformed JSON"),
    (b'{"prompt": "a", "height": 100, "width": 64}', 422, "multiple of 16"),
    (b'{"prompt": "a", "height": 4096, "width": 64}', 422, "between"),
    (b'{"prompt": ""}', 422, "prompt"),
    (b'{"prompt": "a", "colour": "red"}', 422, "colour"),
    (b'{"prompt": "a", "images": ["@@@"]}', 400, "not valid base64"),
    (b'{"prompt": "a", "images": ["aGVsbG8gd29ybGQ="]}', 400, "not an image"),
])
def test_bad_requests(server, body, status, message):
    r = httpx.post(f"{server}/v1/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status and message in r.json()["error"]["message"]


def test_oversize_image_413(server):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8))
    r = httpx.post(f"{server}/v1/generate", json={"prompt": "a", "images": [png_b64(noise)]})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_multipart_img2img_and_non_image_upload(server):
    img = io.BytesIO()
    synthetic_image(64, 64).save(img, format="PNG")
    ok = httpx.post(f"{server}/v1/generate", data={"request": '{"prompt": "a door", "seed": 3, "strength": 0.8}'},
                    files={"image": ("in.png", img.getvalue(), "image/png")}, timeout=60)
    assert ok.status_code == 200 and ok.json()["width"] == 64
    bad = httpx.post(f"{server}/v1/generate", data={"request": '{"prompt": "a door"}'},
                     files={"image": ("in.png", b"plain text, not a picture", "image/png")})
    assert bad.status_code == 400 and "not an image" in bad.json()["error"]["message"]


def test_health(server):
    body = httpx.get(f"{server}/health").json()
    assert body["status"] == "ok" and body["variant"] == "turbo"


# -- Ray Serve --------------------------------------------------------------------------------------------
def test_ray_serve_two_cpu_replicas(tiny_fp32, runtime):
    import ray  # CI installs zimage-deploy[ray]
    from ray import serve

    from zimage_deploy.serve.ray_app import deployment

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(str(tiny_fp32), replicas=2), route_prefix="/")

        def one(seed):
            r = httpx.post(f"http://127.0.0.1:{port}/v1/generate", timeout=120,
                           json={"prompt": "a cat", "seed": seed, "height": 64, "width": 64})
            return seed, r.status_code, r.json()

        with cf.ThreadPoolExecutor(8) as ex:
            answers = list(ex.map(one, range(8)))
        assert all(code == 200 for _, code, _ in answers)
        assert len({body["replica"] for _, _, body in answers}) == 2, "both replicas should serve"
        for seed, _, body in answers[:3]:
            got = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
            assert np.array_equal(arr(got), arr(runtime.generate("a cat", seed=seed, height=64, width=64).images[0]))
        bad = httpx.post(f"http://127.0.0.1:{port}/v1/generate", content=b"{oops")
        assert bad.status_code == 400
    finally:
        serve.shutdown()
        ray.shutdown()
