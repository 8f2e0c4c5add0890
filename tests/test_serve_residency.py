"""Models swapped in and out of one server (serve/residency.py): the set plan decides (all resident, or at most N
at a time), requests for a released model wait and answer the same images as an all-resident server, the policy is
stated at start, in /v1/models and in /metrics; background jobs give their slot to interactive requests."""

import asyncio
import concurrent.futures as cf
import re
import signal

import httpx
import numpy as np
import pytest

from serve_util import decode, start_server
from zimage_deploy import ZImageRuntime
from zimage_deploy.errors import UserError
from zimage_deploy.plan import GIB, USABLE, plan_set
from zimage_deploy.serve.residency import Residency, SwappableRuntime, plan_residency


@pytest.fixture(scope="module")
def references(tiny_fp32, base_fp32):
    """What an all-resident server answers: the runtimes called directly."""
    out = {}
    for name, folder in (("turbo", tiny_fp32), ("base", base_fp32)):
        rt = ZImageRuntime(folder)
        out[name] = {seed: np.asarray(rt.generate("a fox", seed=seed, height=64, width=64, steps=2).images[0])
                     .astype(int) for seed in (1, 2)}
    return out


def test_one_resident_model_at_a_time(tiny_fp32, base_fp32, references):
    """`serve --max-resident 1` on two builds: interleaved concurrent requests for both models all answer (the
    released model's wait while the other is swapped out) with the all-resident images; the start-up line,
    /v1/models and /metrics say which model is resident and how often one was loaded again."""
    proc, url = start_server(["--build-dir", f"turbo={tiny_fp32}", "--build-dir", f"base={base_fp32}",
                              "--max-resident", "1", "--batch-wait-ms", "0", "--shutdown-timeout", "1"])
    try:
        models = httpx.get(f"{url}/v1/models").json()["data"]
        assert [(m["id"], m["resident"]) for m in models] == [("turbo", True), ("base", False)]
        assert models[0]["residency"] == "swapped, at most 1 resident"
        order = [("turbo", 1), ("base", 1), ("turbo", 2), ("base", 2), ("turbo", 1), ("base", 2)]
        with cf.ThreadPoolExecutor(len(order)) as pool:
            answers = list(pool.map(lambda ms: httpx.post(f"{url}/v1/generate", timeout=120, json={
                "prompt": "a fox", "model": ms[0], "seed": ms[1], "height": 64, "width": 64, "steps": 2}), order))
        for (model, seed), r in zip(order, answers):
            assert r.status_code == 200, r.text
            assert np.abs(decode(r.json()["images"][0]) - references[model][seed]).max() <= 1
        models = httpx.get(f"{url}/v1/models").json()["data"]
        assert sum(m["resident"] for m in models) == 1
        metrics = httpx.get(f"{url}/metrics").text
        loads = {m: float(v) for m, v in re.findall(r'zimage_model_loads_total\{model="(\w+)"\} (\S+)', metrics)}
        assert loads["base"] >= 1  # base was released at start, so it was loaded again at least once
        resident = {m: float(v) for m, v in re.findall(r'zimage_resident\{model="(\w+)"\} (\S+)', metrics)}
        assert sorted(resident.values()) == [0.0, 1.0]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert "models: swapped, at most 1 resident (--max-resident 1)" in out


def test_the_set_plan_decides(tiny_fp32, base_fp32, edit_fp32):
    """CPU builds: all resident unless a card is named; on a card where the set fits together: all resident; on a
    budget that holds one build but not all (`--vram-gib`): one at a time; less than one build: refused. An Edit
    build is part of the set."""
    specs = [("turbo", tiny_fp32), ("base", base_fp32), ("edit", edit_fp32)]
    assert not plan_residency(specs).swapping
    assert not plan_residency(specs, target="h100").swapping
    s = plan_set([d for _, d in specs], "h100")
    assert s.mode == "resident-together" and [b["variant"] for b in s.builds] == ["turbo", "base", "edit"]
    between = (s.one_at_a_time + s.together) / 2 / USABLE / GIB
    r = plan_residency(specs, target="h100", vram_gib=between)
    assert r.swapping and r.max_resident == 1 and "one-at-a-time" in r.reason
    assert plan_residency(specs, max_resident=2).max_resident == 2
    assert not plan_residency(specs, max_resident=3).swapping
    for kwargs, message in ((dict(target="h100", vram_gib=0.1), "does not fit"),
                            (dict(vram_gib=between), "pass --target"),
                            (dict(max_resident=0), "--max-resident must be >= 1")):
        with pytest.raises(UserError, match=message):
            plan_residency(specs, **kwargs)


class _Svc:
    def __init__(self, name):
        self.name, self.runtime = name, SwappableRuntime.__new__(SwappableRuntime)
        self.runtime.live, self.runtime.reopen, self.runtime.loads = object(), object, 1
        self.run_pool = None


def test_turns_go_by_age_and_interactive_first():
    """Two models, one slot: the older waiting work goes first, interactive before background; a background run
    holding the slot is told to give it up (`contended`) when another model's interactive request waits."""
    a, b, c = _Svc("a"), _Svc("b"), _Svc("c")

    async def scenario():
        r = Residency(1)
        r.attach([a, b, c], None)
        order = []

        async def turn(svc, key, hold=0.0):
            await r.enter(svc, key)
            order.append(svc.name)
            await asyncio.sleep(hold)
            r.leave(svc)

        first = asyncio.ensure_future(turn(a, (1, 0.0), 0.05))  # a background run holds the slot
        await asyncio.sleep(0.01)
        assert not r.contended(a)
        waiting = [asyncio.ensure_future(turn(c, (1, 1.0))), asyncio.ensure_future(turn(b, (0, 2.0)))]
        await asyncio.sleep(0.01)
        assert r.contended(a)  # b's interactive request waits for a's slot
        await asyncio.gather(first, *waiting)
        return order, r

    order, r = asyncio.run(scenario())
    assert order == ["a", "b", "c"] and list(r.resident) == ["c"]
    assert [s.runtime.loaded for s in (a, b, c)] == [False, False, True]


def test_a_background_job_gives_its_slot_to_an_interactive_request(tiny_fp32, base_fp32, tmp_path):
    """One slot: a base job holds it (base swapped in); a turbo request arrives and waits for the slot; at its next
    check the job stops, goes back to its queue, and turbo is swapped in and answers; then base is swapped in again
    and the job runs from the start to the runtime's image."""
    from test_serve_jobs import HeldSpy, state, submit

    from serve_util import RuntimeSpy, ServerThread, wait_for
    from zimage_deploy.serve.app import create_app
    from zimage_deploy.serve.jobs import Jobs, JobStore

    base_rt = ZImageRuntime(base_fp32)
    base, turbo = HeldSpy(base_rt), RuntimeSpy(ZImageRuntime(tiny_fp32))
    runtimes = {"turbo": SwappableRuntime(turbo, lambda: turbo), "base": SwappableRuntime(base, lambda: base)}
    app = create_app(runtimes, batch_wait_ms=0, jobs=Jobs(JobStore(tmp_path)), residency=Residency(1))
    residency = app.state.gateway.residency
    with ServerThread(app) as url:
        base.hold_at = 2
        job_id = submit(url, prompt="a job", model="base", seed=4, steps=3).json()["id"]
        assert base.held.wait(60) and list(residency.resident) == ["base"]
        with cf.ThreadPoolExecutor(1) as ex:
            interactive = ex.submit(httpx.post, f"{url}/v1/generate", timeout=60,
                                    json={"prompt": "a", "model": "turbo", "height": 64, "width": 64, "steps": 1})
            wait_for(lambda: "turbo" in residency.waiting)
            base.release.set()  # the job's next check finds turbo waiting for its slot: it stops
            assert interactive.result().status_code == 200
        assert base.calls[0]["outcome"] == "GenerationCancelled" and turbo.calls[0]["outcome"] == "done"
        wait_for(lambda: state(url, job_id)["state"] == "done")
        assert [c["outcome"] for c in base.calls] == ["GenerationCancelled", "done"]
        got = decode(httpx.get(f"{url}/v1/jobs/{job_id}").json()["images"][0])
    want = np.asarray(base_rt.generate("a job", seed=4, height=64, width=64, steps=3).images[0]).astype(int)
    assert np.abs(got - want).max() <= 1
