"""SIGTERM, the signal process managers and Kubernetes send, to both front ends in a subprocess: they stop
taking requests, cancel work still in progress after --shutdown-timeout, record background jobs, and exit 0."""

import concurrent.futures as cf
import signal
import time

import httpx

from serve_util import start_server, wait_for
from zimage_deploy.serve.jobs import INTERRUPTED, JobStore

LONG = {"prompt": "a slow one", "seed": 1, "height": 512, "width": 512, "steps": 100}  # ~10 s on 2 cores


def _stop(proc, deadline=60):
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=deadline)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, time.monotonic() - t0


def test_uvicorn_server_two_models_and_jobs(tiny_fp32, base_fp32, tmp_path):
    jobs_dir = tmp_path / "jobs"
    proc, url = start_server(["--build-dir", f"turbo={tiny_fp32}", "--build-dir", f"base={base_fp32}",
                              "--jobs-dir", jobs_dir, "--shutdown-timeout", "1", "--warmup-sizes", "64x64"])
    try:
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["turbo", "base"]
        done = httpx.post(f"{url}/v1/jobs", json={"prompt": "kept", "height": 64, "width": 64, "steps": 1}).json()
        wait_for(lambda: httpx.get(f"{url}/v1/jobs/{done['id']}").json()["state"] == "done")
        with cf.ThreadPoolExecutor(1) as ex:
            slow = ex.submit(httpx.post, f"{url}/v1/generate", json={**LONG, "model": "base"}, timeout=120)
            wait_for(lambda: httpx.get(f"{url}/health").json()["live_requests"] == 1)
            late = httpx.post(f"{url}/v1/jobs", json={**LONG, "model": "turbo"}).json()
            code, elapsed = _stop(proc)
            answer = slow.result()
        assert code == 0, proc.stderr.read()
        assert answer.status_code == 503 and "shutting down" in answer.json()["error"]["message"]
        assert elapsed < 30, f"shutdown took {elapsed:.1f} s"  # a hang guard: the 100-step work was cut short
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    store = JobStore(jobs_dir)
    try:
        assert store.get(done["id"], "")["state"] == "done" and len(store.images(store.get(done["id"], ""))) == 1
        interrupted = store.get(late["id"], "")
        assert (interrupted["state"], interrupted["error"]) == ("failed", INTERRUPTED)
    finally:
        store.close()


def test_ray_app_models_behind_one_ingress_and_sigterm(tiny_fp32, base_fp32):
    """The Ray app with two builds (a deployment per model behind one ingress, routed by `model`), then SIGTERM:
    exit 0 (it was SIGABRT, 134)."""
    proc, url = start_server(["--build-dir", f"turbo={tiny_fp32}", "--build-dir", f"base={base_fp32}",
                              "--shutdown-timeout", "1", "--api-key", "k"], module="zimage_deploy.serve.ray_app",
                             timeout=240)
    auth = {"authorization": "Bearer k"}
    try:
        assert set(httpx.get(f"{url}/ready", timeout=30).json()["models"]) == {"turbo", "base"}
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401
        models = httpx.get(f"{url}/v1/models", headers=auth, timeout=30).json()["data"]
        assert [(m["id"], m["default"]) for m in models] == [("turbo", True), ("base", False)]
        for model in ("base", None):
            fields = {"prompt": "a cat", "seed": 1, "height": 64, "width": 64, "steps": 1}
            r = httpx.post(f"{url}/v1/generate", headers=auth, timeout=120,
                           json={**fields, **({"model": model} if model else {})})
            assert r.status_code == 200 and r.json()["model"] == (model or "turbo") and r.json()["replica"]
        unknown = httpx.post(f"{url}/v1/images/generations", headers=auth, json={"prompt": "a", "model": "x"})
        assert unknown.status_code == 404 and "models: turbo, base" in unknown.json()["error"]["message"]
        huge = httpx.post(f"{url}/v1/generate", content=b"x" * (64 << 20),
                          headers={**auth, "content-type": "application/json"})
        assert huge.status_code == 413
        assert httpx.get(f"{url}/", timeout=30).text.startswith("<!doctype html>")
        for method, path in (("POST", "/v1/jobs"), ("GET", "/v1/jobs"), ("GET", "/v1/jobs/x")):  # README: refused
            r = httpx.request(method, f"{url}{path}", headers=auth, json={"prompt": "a"}, timeout=30)
            assert r.status_code == 501 and "not served by the Ray Serve app" in r.json()["error"]["message"]
        metrics = httpx.get(f"{url}/metrics", headers=auth, timeout=30).text
        assert 'model="base"' in metrics and 'model="turbo"' in metrics
        code, _ = _stop(proc, deadline=90)
        assert code == 0, (code, proc.stderr.read()[-3000:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
