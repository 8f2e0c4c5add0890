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


def test_ray_app_exits_0_on_sigterm(tiny_fp32):
    proc, url = start_server(["--engine-dir", tiny_fp32, "--shutdown-timeout", "1"],
                             module="zimage_deploy.serve.ray_app", timeout=180)
    try:
        r = httpx.post(f"{url}/v1/generate", json={"prompt": "a", "height": 64, "width": 64, "steps": 1},
                       timeout=60)
        assert r.status_code == 200
        code, elapsed = _stop(proc, deadline=90)
        assert code == 0, (code, proc.stderr.read()[-3000:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
