"""Background jobs: 202 and an id, states (queued, running step i of n, done with images, failed, cancelled),
cancellation, a job visible only to its key, bounds (queued jobs, per key, retention), interactive requests
first, and a restart that keeps finished results and reports interrupted jobs as failed."""

import concurrent.futures as cf
import threading
import time

import httpx
import numpy as np
import pytest

from serve_util import RuntimeSpy, Served, ServerThread, decode, wait_for
from zimage_deploy import ZImageRuntime
from zimage_deploy.serve.app import create_app
from zimage_deploy.serve.jobs import INTERRUPTED, Jobs, JobStore


@pytest.fixture(scope="module")
def runtime(tiny_fp32):
    return ZImageRuntime(tiny_fp32)


class HeldSpy(RuntimeSpy):
    """A RuntimeSpy whose run can also be held at its n-th between-steps check (`hold_at`, `release`)."""

    def __init__(self, runtime):
        super().__init__(runtime)
        self.hold_at, self.release, self.held = None, threading.Event(), threading.Event()

    def run(self, req, cancel=None, **kwargs):
        seen = [0]

        def check():
            seen[0] += 1
            if seen[0] == self.hold_at:
                self.held.set()
                self.release.wait(60)
            return cancel()

        return super().run(req, cancel=check, **kwargs)


def Server(runtime, folder, api_key=None, shutdown_timeout_s=10.0, **jobs_options):
    """A server with background jobs in `folder` over a HeldSpy."""
    retention = {k: v for k, v in jobs_options.items() if k.startswith("retention")}
    jobs = Jobs(JobStore(folder, **retention), **{k: v for k, v in jobs_options.items() if k not in retention})
    return Served(runtime, spy=HeldSpy, api_key=api_key, batch_wait_ms=0, jobs=jobs,
                  shutdown_timeout_s=shutdown_timeout_s)


def submit(url, key=None, **fields):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/v1/jobs", json={"height": 64, "width": 64, "steps": 2, **fields}, headers=headers,
                      timeout=30)


def state(url, job_id, key=None):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{url}/v1/jobs/{job_id}", headers=headers, timeout=30).json()


def test_job_runs_to_done_with_the_runtimes_image(runtime, tmp_path):
    with Server(runtime, tmp_path) as s:
        r = submit(s.url, prompt="一座灯塔 at dusk", seed=5)
        assert r.status_code == 202 and r.json()["state"] in ("queued", "running", "done")
        job_id = r.json()["id"]
        wait_for(lambda: state(s.url, job_id)["state"] == "done")
        done = state(s.url, job_id)
        want = runtime.generate("一座灯塔 at dusk", seed=5, height=64, width=64, steps=2).images[0]
        assert done["seeds"] == [5] and done["model"] == "turbo"
        assert np.array_equal(decode(done["images"][0]), np.asarray(want).astype(int))
        assert [j["id"] for j in httpx.get(f"{s.url}/v1/jobs").json()["data"]] == [job_id]
        assert "images" not in httpx.get(f"{s.url}/v1/jobs").json()["data"][0]  # the list stays small
        assert httpx.delete(f"{s.url}/v1/jobs/{job_id}").json()["state"] == "removed"
        assert httpx.get(f"{s.url}/v1/jobs/{job_id}").status_code == 404
        assert not (tmp_path / "results" / job_id).exists()


def test_bad_requests_are_refused_at_submission(runtime, tmp_path):
    with Server(runtime, tmp_path) as s:
        for fields, status in (({"prompt": "a", "height": 100}, 422), ({"prompt": "a", "model": "nope"}, 404),
                               ({"prompt": ""}, 422), ({"prompt": "a", "colour": 1}, 422)):
            r = submit(s.url, **fields)
            assert r.status_code == status, r.text
        huge = httpx.post(f"{s.url}/v1/jobs", content=b"x" * (64 << 20), headers={"content-type": "application/json"})
        assert huge.status_code == 413
        assert httpx.get(f"{s.url}/v1/jobs").json()["data"] == [] and s.spy.calls == []
    with ServerThread(create_app(runtime)) as url:
        r = httpx.post(f"{url}/v1/jobs", json={"prompt": "a"})
        assert r.status_code == 404 and "--jobs-dir" in r.json()["error"]["message"]


def test_progress_cancel_and_keys(runtime, tmp_path):
    with Server(runtime, tmp_path, api_key="alice,bob") as s:
        s.spy.hold_at = 4  # the runtime asks before starting and before each step: held after step 2 began
        job_id = submit(s.url, key="alice", prompt="a", steps=4).json()["id"]
        assert s.spy.held.wait(60)
        running = state(s.url, job_id, "alice")
        assert (running["state"], running["step"], running["steps"]) == ("running", 2, 4)
        # another key: not found, not listed, cannot cancel
        assert httpx.get(f"{s.url}/v1/jobs/{job_id}", headers={"authorization": "Bearer bob"}).status_code == 404
        assert httpx.get(f"{s.url}/v1/jobs", headers={"authorization": "Bearer bob"}).json()["data"] == []
        assert httpx.delete(f"{s.url}/v1/jobs/{job_id}", headers={"authorization": "Bearer bob"}).status_code == 404
        assert httpx.get(f"{s.url}/v1/jobs").status_code == 401
        cancel = httpx.delete(f"{s.url}/v1/jobs/{job_id}", headers={"authorization": "Bearer alice"})
        assert cancel.json()["state"] == "cancelling"
        s.spy.release.set()
        wait_for(lambda: state(s.url, job_id, "alice")["state"] == "cancelled")
        assert s.spy.calls[-1]["outcome"] == "GenerationCancelled"


def test_bounds(runtime, tmp_path):
    with Server(runtime, tmp_path, api_key="alice,bob", max_queued=3, max_per_key=2) as s:
        s.spy.gate.clear()  # nothing finishes
        codes = [submit(s.url, key="alice", prompt="a").status_code for _ in range(3)]
        assert codes == [202, 202, 429]
        assert submit(s.url, key="bob", prompt="a").status_code == 202
        full = submit(s.url, key="bob", prompt="a")
        assert full.status_code == 429 and "background jobs are waiting" in full.json()["error"]["message"]
        s.spy.gate.set()
    store = JobStore(tmp_path / "r", retention_s=3600, retention_bytes=1)
    ids = [store.create("", "turbo", 1) for _ in range(2)]
    for job_id in ids:
        store.done(job_id, {"images": ["aGVsbG8="], "seeds": [1], "width": 64, "height": 64, "timings": {}})
    assert store.get(ids[0], "") is None and store.get(ids[1], "") is None  # 5 bytes each, over 1 byte
    store.retention_bytes = 1 << 20
    kept = store.create("", "turbo", 1)
    store.done(kept, {"images": ["aGVsbG8="], "seeds": [1], "width": 64, "height": 64, "timings": {}})
    assert store.get(kept, "")["state"] == "done" and store.prune(now=time.time() + 7200) == 1
    store.close()


def test_interactive_requests_go_before_waiting_jobs(runtime, tmp_path):
    with Server(runtime, tmp_path) as s:
        s.spy.gate.clear()
        with cf.ThreadPoolExecutor(2) as ex:
            first = ex.submit(httpx.post, f"{s.url}/v1/generate", timeout=60,
                              json={"prompt": "a", "height": 64, "width": 64, "steps": 1})
            wait_for(lambda: len(s.spy.calls) == 1)
            job_id = submit(s.url, prompt="a job", steps=3).json()["id"]
            second = ex.submit(httpx.post, f"{s.url}/v1/generate", timeout=60,
                               json={"prompt": "b", "height": 64, "width": 64, "steps": 2})
            wait_for(lambda: s.app.state.service.pending)
            s.spy.gate.set()
            assert first.result().status_code == 200 and second.result().status_code == 200
        wait_for(lambda: state(s.url, job_id)["state"] == "done")
        assert [c["steps"] for c in s.spy.calls] == [1, 2, 3]


def test_restart_keeps_results_and_fails_interrupted_jobs(runtime, tmp_path):
    with Server(runtime, tmp_path, shutdown_timeout_s=0.5) as s:
        done_id = submit(s.url, prompt="kept", seed=1).json()["id"]
        wait_for(lambda: state(s.url, done_id)["state"] == "done")
        s.spy.gate.clear()
        waiting_id = submit(s.url, prompt="interrupted").json()["id"]
    # the server stopped with a job in progress; a new one on the same folder
    with Server(runtime, tmp_path) as s:
        assert state(s.url, done_id)["state"] == "done" and len(state(s.url, done_id)["images"]) == 1
        failed = state(s.url, waiting_id)
        assert failed["state"] == "failed" and failed["error"] == INTERRUPTED
    store = JobStore(tmp_path)
    assert sorted(r["state"] for r in store._rows("SELECT state FROM jobs")) == ["done", "failed"]
    store.close()


def test_one_server_per_jobs_folder(tmp_path):
    from zimage_deploy.errors import UserError

    store = JobStore(tmp_path)
    try:
        with pytest.raises(UserError, match="in use by another server"):
            JobStore(tmp_path)
    finally:
        store.close()


def test_a_running_job_pauses_for_another_models_requests(runtime, base_fp32, tmp_path):
    """A base job between its steps waits while a turbo request runs (they share the device), then goes on."""
    events = []

    class Logged(HeldSpy):
        def run(self, req, cancel=None, **kwargs):
            def check():
                events.append(("job check", len([e for e in events if e[0] == "job check"]) + 1))
                return cancel()
            return super().run(req, cancel=check, **kwargs)

    base = Logged(ZImageRuntime(base_fp32))
    turbo = RuntimeSpy(runtime)
    jobs = Jobs(JobStore(tmp_path))
    with ServerThread(create_app({"turbo": turbo, "base": base}, batch_wait_ms=0, jobs=jobs)) as url:
        base.hold_at = 3
        job_id = submit(url, prompt="a job", model="base", steps=4).json()["id"]
        assert base.held.wait(60)
        turbo.gate.clear()
        with cf.ThreadPoolExecutor(1) as ex:
            interactive = ex.submit(httpx.post, f"{url}/v1/generate", timeout=60,
                                    json={"prompt": "a", "model": "turbo", "height": 64, "width": 64, "steps": 1})
            wait_for(lambda: turbo.calls)
            base.release.set()  # the job's next check finds turbo's request running: it waits
            time.sleep(1)  # room for a job that would not wait to take its next steps
            events.append(("turbo released", 0))
            turbo.gate.set()
            assert interactive.result().status_code == 200
        wait_for(lambda: state(url, job_id)["state"] == "done")
    released = events.index(("turbo released", 0))
    assert [e for e in events[:released] if e[0] == "job check"][-1] == ("job check", 3)
