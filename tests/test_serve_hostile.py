"""The HTTP server against hostile clients on loopback (tiny fp32 build, largest side 512): memory budgets,
streamed body limits, multipart limits before decoding, bounded strings, cancellation of timed-out and
abandoned work, a queue of live requests only, no bare 500s or server paths, API keys, content types, and a
bounded shutdown. Each test is bounded: small images, a few requests."""

import concurrent.futures as cf
import json
import re
import signal
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import synthetic_image
from image_modes import cases, rgb_png
from serve_util import Served, b64, decode, png_bytes, start_server, wait_for
from zimage_deploy import ZImageRuntime
from zimage_deploy.runtime.images import preprocess_image
from zimage_deploy.serve.schema import ServeLimits

JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def runtime(tiny_fp32):
    return ZImageRuntime(tiny_fp32)


@pytest.fixture(scope="module")
def served(runtime):
    with Served(runtime, max_queue=8) as s:
        yield s


def post(url, body: bytes, ct="application/json", **kw):
    return httpx.post(url, content=body, headers={"content-type": ct}, timeout=60, **kw)


# -- memory budgets ---------------------------------------------------------------------------------------
def test_large_input_image_refused_before_decoding(served):
    """A 1536x1536 PNG of a few KB (the output would take its size) is refused from its header: 413."""
    data = png_bytes(Image.new("RGB", (1536, 1536), (90, 120, 30)))
    assert len(data) < 20_000
    before = len(served.spy.calls)
    r = httpx.post(f"{served.url}/v1/generate", data={"request": '{"prompt": "a field"}'},
                   files={"image": ("big.png", data, "image/png")}, timeout=30)
    assert r.status_code == 413 and "above this build's largest side 512" in r.json()["error"]["message"]
    j = post(f"{served.url}/v1/generate", json.dumps({"prompt": "a", "images": [b64(data)]}).encode())
    assert j.status_code == 413
    assert len(served.spy.calls) == before  # nothing reached the runtime


def test_batches_stay_within_the_pixel_budget(runtime):
    """Maximum-size requests arriving together run one per call (budget: one 512x512 image); small ones share."""
    with Served(runtime, max_batch=4, batch_wait_ms=50) as s:
        budget = s.service.limits.max_batch_pixels
        assert budget == 512 * 512

        def one(args):
            side, seed = args
            return httpx.post(f"{s.url}/v1/generate", timeout=120, json={
                "prompt": "a fox", "seed": seed, "height": side, "width": side, "steps": 1}).status_code

        with cf.ThreadPoolExecutor(8) as ex:
            codes = list(ex.map(one, [(512, i) for i in range(3)] + [(128, i) for i in range(5)]))
        assert codes == [200] * 8
        assert sum(c["images"] for c in s.spy.calls) == 8
        assert max(c["pixels"] for c in s.spy.calls) <= budget
        big = post(f"{s.url}/v1/images/generations", json.dumps({"prompt": "a", "n": 2, "size": "512x512"}).encode())
        assert big.status_code == 413 and f"budget is {budget} pixels" in big.json()["error"]["message"]


# -- bodies -----------------------------------------------------------------------------------------------
def _raw_request(port, head: bytes, chunks, read_timeout=20.0) -> bytes:
    """Send `head` then each chunk (stopping quietly if the server closes), and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        sock.sendall(head)
        for c in chunks:
            try:
                sock.sendall(c)
            except OSError:
                break
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer) < answer.index(b"\r\n\r\n") + 4 + 20:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        return answer


def _chunked(body: bytes, size: int = 1 << 16):
    for i in range(0, len(body), size):
        part = body[i:i + size]
        yield b"%x\r\n%s\r\n" % (len(part), part)
    yield b"0\r\n\r\n"


def test_chunked_body_stopped_at_the_limit(runtime):
    """A chunked body (no Content-Length) of exactly the body limit set here is read; one byte more is refused,
    and a longer one as soon as it passes the limit: the answer comes while the client still holds the rest (it
    never sends more than the limit + 1 MiB)."""
    limit = 3 << 20
    with Served(runtime, ServeLimits.for_build(runtime.limits, max_body_bytes=limit)) as s:
        port = int(s.url.rsplit(":", 1)[1])
        head = (b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        request = b'{"prompt": "a", "seed": 1, "steps": 1, "height": 64, "width": 64}'
        exact = request + b" " * (limit - len(request))  # JSON allows trailing white space
        assert _raw_request(port, head, _chunked(exact), read_timeout=60).startswith(b"HTTP/1.1 200")
        answer = _raw_request(port, head, _chunked(exact + b" "))
        assert answer.startswith(b"HTTP/1.1 413") and f"above the limit of {limit} bytes".encode() in answer, \
            answer[:300]
        chunk = b"x" * (1 << 16)
        answer = _raw_request(port, head, (b"%x\r\n%s\r\n" % (len(chunk), chunk)
                                           for _ in range((limit + (1 << 20)) // len(chunk))))
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert f"above the limit of {limit} bytes".encode() in answer


def test_declared_length_refused_without_reading(served):
    port = int(served.url.rsplit(":", 1)[1])
    head = (b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 67108864\r\n\r\n")
    answer = _raw_request(port, head, [])  # not one byte of the body is sent
    assert answer.startswith(b"HTTP/1.1 413") and b"67108864 bytes" in answer


def test_slow_body_times_out(runtime):
    limits = ServeLimits.for_build(runtime.limits, body_timeout_s=0.5)
    with Served(runtime, limits) as s:
        port = int(s.url.rsplit(":", 1)[1])
        head = (b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{\"prompt\"")
        answer = _raw_request(port, head, [])
        assert answer.startswith(b"HTTP/1.1 408")
        assert httpx.get(f"{s.url}/health").json()["live_requests"] == 0


# -- multipart ----------------------------------------------------------------------------------------------
def test_multipart_parts_counted_before_decoding(served):
    """50 `image` parts of garbage: refused for their number (413), not for failing to decode (400)."""
    files = [("image", (f"{i}.png", b"garbage", "image/png")) for i in range(50)]
    r = httpx.post(f"{served.url}/v1/generate", data={"request": '{"prompt": "a"}'}, files=files, timeout=30)
    assert r.status_code == 413, r.text
    # the server's cap: its image count plus a mask and a control image, far below the 50 parts sent
    allowed = re.fullmatch(r"more than (\d+) files in the multipart body", r.json()["error"]["message"])
    assert allowed and 3 <= int(allowed.group(1)) < 50, r.json()
    fields = {f"f{i}": "x" for i in range(200)}
    r = httpx.post(f"{served.url}/v1/images/edits", data=fields,
                   files={"image": ("i.png", b"garbage", "image/png")}, timeout=30)
    assert r.status_code == 413 and "text fields" in r.json()["error"]["message"]


def test_multipart_file_too_large(served):
    limit = served.service.limits.max_image_bytes
    r = httpx.post(f"{served.url}/v1/generate", data={"request": '{"prompt": "a"}'},
                   files={"image": ("i.png", b"\0" * (limit + 1), "image/png")}, timeout=30)
    assert r.status_code == 413 and f"limit of {limit} bytes" in r.json()["error"]["message"]


@pytest.mark.parametrize("parts,message", [
    ([("request", "r.json", b'{"prompt": "a"}')], "`request` must be a text field, not a file upload"),
    ([("request", None, b'{"prompt": "a"}'), ("image", None, b"not a file")], "`image` must be a file upload"),
    ([("request", None, b'{"prompt": "a"')], "malformed JSON"),
    ([("request", None, b'{"prompt": "a"}'), ("other", None, b"x")], "unknown field `other`"),
    ([("request", None, b'{"prompt": "a"}'), ("request", None, b'{"prompt": "b"}')], "exactly one `request`"),
    ([("request", None, b"\xff\xfe")], "not UTF-8"),
])
def test_multipart_field_kinds(served, parts, message):
    r = post(f"{served.url}/v1/generate", _multipart(parts), ct="multipart/form-data; boundary=BOUNDARY")
    assert r.status_code in (400, 422) and message in r.json()["error"]["message"], r.text


def _multipart(parts) -> bytes:
    """(name, filename or None, bytes) parts -> a multipart body with the boundary BOUNDARY."""
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--BOUNDARY\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + b"--BOUNDARY--\r\n"


def test_malformed_multipart(served):
    r = post(f"{served.url}/v1/generate", b"--BOUNDARY\r\nContent-Disposition: form-data; name=\"request\"\r\n\r\n{",
             ct="multipart/form-data; boundary=BOUNDARY")
    assert r.status_code == 400 and "closing boundary" in r.json()["error"]["message"]
    r = post(f"{served.url}/v1/generate", b"whatever", ct="multipart/form-data")
    assert r.status_code == 400 and "boundary" in r.json()["error"]["message"]


def test_parsing_and_decoding_run_off_the_event_loop(served, monkeypatch):
    import zimage_deploy.serve.schema as schema

    threads = []
    real = schema.decode_image
    monkeypatch.setattr(schema, "decode_image",
                        lambda *a, **k: threads.append(threading.current_thread().name) or real(*a, **k))
    r = httpx.post(f"{served.url}/v1/generate", data={"request": '{"prompt": "a", "seed": 1, "steps": 1}'},
                   files={"image": ("i.png", png_bytes(synthetic_image(64, 64)), "image/png")}, timeout=60)
    assert r.status_code == 200 and threads and all(t.startswith("zimage-parse") for t in threads)


# -- bounded strings and values -------------------------------------------------------------------------------
@pytest.mark.parametrize("body,status,message", [
    ({"prompt": "a", "negative_prompt": "n" * 20_000, "guidance_scale": 2.0}, 422,
     "negative_prompt is 20000 characters; the limit is 10000"),
    ({"prompt": "a \ud800"}, 422, "not valid Unicode"),
    ({"prompt": ["a", "b"]}, 422, "prompt must be a string"),
    ({"prompt": {"x": 1}}, 422, "prompt must be a string"),
    ({"prompt": "a", "images": "abc"}, 422, "images must be a list"),
    ({"prompt": "a", "images": ["aGk="] * 5}, 422, "need an Edit build"),
    ({"prompt": "a", "seed": 1.5}, 422, "seed must be an integer"),
    ({"prompt": "a", "steps": None, "height": True}, 422, "height must be an integer"),
])
def test_bounded_fields(served, body, status, message):
    r = post(f"{served.url}/v1/generate", json.dumps(body).encode())
    assert r.status_code == status and message in r.json()["error"]["message"], r.text


def test_huge_negative_prompt_never_reaches_the_worker(served):
    before = len(served.spy.calls)
    r = post(f"{served.url}/v1/generate", json.dumps({"prompt": "a", "guidance_scale": 2,
                                                      "negative_prompt": "n" * (10 << 20)}).encode())
    assert r.status_code == 413 and len(served.spy.calls) == before


@pytest.mark.parametrize("body,status", [
    (b"[" * 100_000 + b"]" * 100_000, 400),  # deep nesting
    (b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}", 400),  # integer too long to convert
    (b'{"prompt": "\xff\xfe"}', 400),  # not UTF-8
    (b'{"prompt": "a", "guidance_scale": 1e999}', 422),  # parses as inf
    (b"", 400),
])
def test_malformed_json_is_400_not_500(served, body, status):
    r = post(f"{served.url}/v1/generate", body)
    assert r.status_code == status and r.json()["error"]["message"]


@pytest.mark.parametrize("ct", ["text/plain", "application/x-www-form-urlencoded", "", "application/jsonx"])
def test_json_only_with_a_json_content_type(served, ct):
    r = httpx.post(f"{served.url}/v1/generate", content=b'{"prompt": "a"}', headers={"content-type": ct})
    assert r.status_code == 415 and "Content-Type" in r.json()["error"]["message"]


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "ICO"])
def test_images_limited_to_png_jpeg_webp(served, fmt):
    data = png_bytes(synthetic_image(64, 64), fmt)
    r = post(f"{served.url}/v1/generate", json.dumps({"prompt": "a", "images": [b64(data)]}).encode())
    assert r.status_code == 400 and "PNG, JPEG or WebP" in r.json()["error"]["message"]


MODES = cases(64, 80)  # the build's smallest side is 64
UPLOADS = [name for name, (source, _, _) in MODES.items() if isinstance(source, bytes)]


@pytest.mark.parametrize("name", UPLOADS)
def test_unusual_image_modes(served, name, monkeypatch):
    """An upload in an unusual mode (16-bit, palette, transparency, CMYK, EXIF-rotated) reaches the runtime as the
    picture a person sees: its img2img input (the runtime's preprocessing) equals that of the 8-bit RGB PNG of
    the same picture (tests/image_modes.py; a level apart where alpha compositing or CMYK rounds). The tiny model's
    image hardly depends on its input image, so the input is compared, not the output."""
    data, expected, tol = MODES[name]
    received, run = [], served.spy.run

    def recording(req, cancel=None, **kwargs):
        received.append(kwargs["images"][0])
        return run(req, cancel=cancel, **kwargs)

    monkeypatch.setattr(served.spy, "run", recording)
    for upload in (data, rgb_png(expected)):
        r = post(f"{served.url}/v1/generate", json.dumps({"prompt": "a", "seed": 1, "steps": 1,
                                                          "images": [b64(upload)]}).encode())
        assert r.status_code == 200, r.text
        assert decode(r.json()["images"][0]).shape == (80, 64, 3)
    got, want = (preprocess_image(im, 16) for im in received)
    assert (got - want).abs().max() <= 2.0 / 255 * (tol + 0.5)


def test_longest_prompts_fit_the_body_limit(served):
    """10 000 characters of emoji in both prompts, JSON-escaped (12 bytes each): accepted, not 413."""
    body = json.dumps({"prompt": "\U0001F98A" * 10_000, "negative_prompt": "\U0001F32B" * 10_000, "seed": 1,
                       "steps": 1, "guidance_scale": 1.5, "size": "64x64"}).encode()
    assert len(body) > 240_000
    r = httpx.post(f"{served.url}/v1/images/generations", content=body, headers=JSON, timeout=60)
    assert r.status_code == 200, r.text


# -- cancellation and the queue ---------------------------------------------------------------------------------
LONG = {"prompt": "a slow one", "seed": 1, "height": 512, "width": 512, "steps": 100}  # ~10 s on 2 cores


def test_timed_out_work_stops_between_steps(runtime):
    with Served(runtime, timeout_s=0.5) as s:
        r = post(f"{s.url}/v1/generate", json.dumps(LONG).encode())
        assert r.status_code == 504
        wait_for(lambda: s.spy.calls and s.spy.calls[-1]["outcome"] is not None)
        call = s.spy.calls[-1]
        assert call["outcome"] == "GenerationCancelled" and call["checks"] < 100
        assert 'zimage_cancelled_batches_total{model="turbo"} 1.0' in httpx.get(f"{s.url}/metrics").text


def test_disconnected_client_stops_its_work(runtime):
    with Served(runtime) as s:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{s.url}/v1/generate", json=LONG, timeout=0.5)
        wait_for(lambda: s.spy.calls and s.spy.calls[-1]["outcome"] is not None)
        assert s.spy.calls[-1]["outcome"] == "GenerationCancelled" and s.spy.calls[-1]["checks"] < 100
        wait_for(lambda: httpx.get(f"{s.url}/health").json()["live_requests"] == 0)


def test_queue_counts_live_requests_only(runtime):
    """Two requests time out; their slots are free at once although the runtime may still be busy."""
    with Served(runtime, max_queue=2, timeout_s=0.5) as s:
        with cf.ThreadPoolExecutor(2) as ex:
            codes = list(ex.map(lambda _: post(f"{s.url}/v1/generate", json.dumps(LONG).encode()).status_code,
                                range(2)))
        assert codes == [504, 504]
        assert httpx.get(f"{s.url}/health").json()["live_requests"] == 0
        s.service.timeout_s = 60
        r = post(f"{s.url}/v1/generate", json.dumps({"prompt": "a", "height": 64, "width": 64, "steps": 1}).encode())
        assert r.status_code == 200


def test_429_while_full_and_nothing_lost(runtime):
    with Served(runtime, max_queue=1) as s:
        s.spy.gate.clear()  # the runtime stays busy with the first request
        with cf.ThreadPoolExecutor(1) as ex:
            first = ex.submit(post, f"{s.url}/v1/generate",
                              json.dumps({"prompt": "a", "seed": 1, "height": 64, "width": 64, "steps": 1}).encode())
            wait_for(lambda: len(s.spy.calls) == 1)
            busy = post(f"{s.url}/v1/generate", b'{"prompt": "b"}')
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
            assert "busy" in busy.json()["error"]["message"] and not first.done()
            s.spy.gate.set()
            assert first.result().status_code == 200


# -- errors ---------------------------------------------------------------------------------------------------
def test_no_bare_500_and_no_server_paths(runtime, tiny_fp32, monkeypatch):
    with Served(runtime) as s:
        def boom(*a, **k):
            raise RuntimeError(f"failed to read {tiny_fp32}/onnx/transformer/model.onnx and /etc/secret")

        monkeypatch.setattr(s.spy, "run", boom)
        r = post(f"{s.url}/v1/generate", b'{"prompt": "a", "steps": 1}')
        assert r.status_code == 500 and r.json()["error"]["kind"] == "internal"
        assert str(tiny_fp32) not in r.text and "/etc" not in r.text and "Traceback" not in r.text
        from zimage_deploy.errors import RequestError

        def user(*a, **k):
            raise RequestError(f"{tiny_fp32} has no vae_encoder graph (needed for an input image)")

        monkeypatch.setattr(s.spy, "run", user)
        r = post(f"{s.url}/v1/generate", b'{"prompt": "a", "steps": 1}')
        assert r.status_code == 422 and str(tiny_fp32) not in r.text and "<build> has no vae_encoder" in r.text
        assert httpx.get(f"{s.url}/ready").status_code == 200  # the worker survived


def test_shutdown_refuses_new_work_and_is_not_ready(runtime):
    with Served(runtime, shutdown_timeout_s=30) as s:
        assert httpx.get(f"{s.url}/ready").status_code == 200
        s.service.begin_shutdown()
        wait_for(lambda: s.service.closing)
        ready = httpx.get(f"{s.url}/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "shutting down"
        r = post(f"{s.url}/v1/generate", b'{"prompt": "a"}')
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        assert httpx.get(f"{s.url}/health").status_code == 200  # alive, though not ready


def test_unknown_routes_and_methods_are_json(served):
    for r in (httpx.get(f"{served.url}/nope"), httpx.get(f"{served.url}/v1/generate"),
              httpx.delete(f"{served.url}/health")):
        assert r.status_code in (404, 405) and r.json()["error"]["code"] == r.status_code


def test_api_key(runtime):
    with Served(runtime, api_key="s3cret") as s:
        body = json.dumps({"prompt": "a", "height": 64, "width": 64, "steps": 1}).encode()
        assert post(f"{s.url}/v1/generate", body).status_code == 401
        wrong = httpx.post(f"{s.url}/v1/generate", content=body, headers={**JSON, "authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        ok = httpx.post(f"{s.url}/v1/generate", content=body, headers={**JSON, "authorization": "Bearer s3cret"},
                        timeout=60)
        assert ok.status_code == 200
        assert httpx.get(f"{s.url}/metrics").status_code == 401
        assert httpx.get(f"{s.url}/health").status_code == 200 and httpx.get(f"{s.url}/ready").status_code == 200


# -- the process: readiness and a bounded shutdown --------------------------------------------------------------
def test_bounded_shutdown_cancels_work_in_progress(tiny_fp32):
    proc, url = start_server(["--engine-dir", tiny_fp32, "--shutdown-timeout", "1"], env={"ZIMAGE_API_KEY": "k"})
    try:
        assert httpx.post(f"{url}/v1/generate", json={"prompt": "a"}).status_code == 401  # the env variable
        with cf.ThreadPoolExecutor(1) as ex:
            slow = ex.submit(httpx.post, f"{url}/v1/generate", json=LONG, timeout=120,
                             headers={"authorization": "Bearer k"})
            wait_for(lambda: httpx.get(f"{url}/health").json()["live_requests"] == 1)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            answer = slow.result()
            proc.wait(timeout=60)
            elapsed = time.monotonic() - t0
        assert answer.status_code == 503 and "shutting down" in answer.json()["error"]["message"]
        assert elapsed < 30, f"shutdown took {elapsed:.1f} s"  # a hang guard: the 100-step request was cut short
        assert "cancelled 1 requests" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
