"""One model's serving core, shared by the HTTP server (app.py, FastAPI + uvicorn) and the Ray Serve app
(ray_app.py): its queue, batching under a pixel budget, cancellation, background jobs' turns. The gateway
(gateway.py) in front does what is common to all models: API keys, content types, admission, body limits,
parsing, routing by `model`.

Queued requests, in order: one worker takes the oldest interactive request and, for text-to-image, more waiting
requests with the same settings while the batch stays within `max_batch` images and `max_batch_pixels` (waiting
at most `batch_wait_ms` for them), and runs them on the runtime in one thread; each keeps its own seed. A
background job runs (alone) only when no interactive request waits or runs on any model of the server, and it
pauses between denoising steps while another model's interactive requests wait or run (they share the device);
where models are swapped in and out (residency.py) and such a request waits for the slot the job holds, the job
stops between steps and goes back to the head of its queue (it starts again from step 0 on its next turn).
A request that times out (504) or whose client disconnects leaves the queue at once, and a batch whose
requests are all gone stops between denoising steps (GenerationCancelled). Shutdown: new requests get 503, work
in progress may finish for `shutdown_timeout_s`, then everything left is cancelled. Errors are JSON
(`{"error": {"message", "type", "kind", "param", "code"}}`) without server paths.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.requests import Request

from ..errors import RequestError
from ..runtime.pipeline import GenerationCancelled
from .errors import ApiError, hidden_paths
from .schema import (Parsed, ServeLimits, encode_image, parse_generate_json, parse_generate_multipart,
                     parse_openai_edits, parse_openai_generations)

log = logging.getLogger("zimage_deploy.serve")


class Metrics:
    """Per-server registry (no global state: several apps can live in one process), labelled by model."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.queue_depth = Gauge("zimage_queue_depth", "requests waiting", ["model"], registry=self.registry)
        self.live = Gauge("zimage_live_requests", "requests admitted and not yet answered", ["model"],
                          registry=self.registry)
        self.latency = Histogram("zimage_request_seconds", "request latency by stage", ["model", "stage"],
                                 registry=self.registry,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.images = Counter("zimage_images", "images served", ["model"], registry=self.registry)
        self.errors = Counter("zimage_errors", "failed requests by kind", ["model", "kind"], registry=self.registry)
        self.batch = Histogram("zimage_batch_size", "images per runtime call", ["model"], registry=self.registry,
                               buckets=(1, 2, 3, 4, 6, 8, 16))
        self.cancelled = Counter("zimage_cancelled_batches", "runtime calls stopped between steps", ["model"],
                                 registry=self.registry)
        self.jobs = Counter("zimage_jobs", "background jobs finished by state", ["model", "state"],
                            registry=self.registry)
        self.resident = Gauge("zimage_resident", "1 while the model's runtime is loaded (residency.py)", ["model"],
                              registry=self.registry)
        self.loads = Counter("zimage_model_loads", "runtimes loaded again after a swap (residency.py)", ["model"],
                             registry=self.registry)


class ClientGone(Exception):
    """The client disconnected before its answer."""


@dataclass(eq=False)
class Job:
    """A queued unit of work: an interactive request, or a background job's run (`background`; `on_check` is
    called at each of the runtime's between-steps checks: the job's progress)."""

    parsed: Parsed
    future: asyncio.Future
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)
    background: bool = False
    on_check: object = None
    preempted: bool = False  # a background run stopped to give its model's slot to an interactive request

    @property
    def cost(self) -> int:
        return self.parsed.request.pixels

    @property
    def count(self) -> int:
        return self.parsed.request.batch

    def batch_key(self):
        """Requests with the same key can share one runtime call (text-to-image only, the same LoRAs; a control
        image is the request's own; background jobs run alone)."""
        r = self.parsed.request
        if r.images or r.mask or r.control_image or self.background:
            return None
        loras = self.parsed.lora_set.key if self.parsed.lora_set is not None else None
        return (r.steps, r.height, r.width, r.guidance_scale, r.negative_prompt, r.cfg_normalization,
                r.cfg_truncation, loras)


def run_batch(runtime, jobs: list[Job], should_stop=None) -> list[dict]:
    """One runtime call for a batch of compatible jobs (or one job); answers per job, images encoded here (in
    the runtime thread, not on the event loop). Stops between steps once every job is cancelled (`should_stop`
    replaces that rule)."""
    reqs = [j.parsed.request for j in jobs]
    req = reqs[0] if len(jobs) == 1 else replace(reqs[0], prompts=sum((r.prompts for r in reqs), ()),
                                                 seeds=sum((r.seeds for r in reqs), ()),
                                                 pixels=sum(r.pixels for r in reqs))
    first = jobs[0].parsed
    result = runtime.run(req, images=first.images or None, mask=first.mask, control_image=first.control_image,
                         loras=first.lora_set,
                         cancel=should_stop or (lambda: all(j.cancel.is_set() for j in jobs)))
    answers, k = [], 0
    for j in jobs:
        images, seeds = result.images[k:k + j.count], result.seeds[k:k + j.count]
        k += j.count
        answers.append({"images": [encode_image(im, j.parsed.output_format) for im in images], "seeds": seeds,
                        "width": images[0].width, "height": images[0].height, "timings": result.timings,
                        "batch_size": len(result.images), "output_format": j.parsed.output_format.lower()})
    return answers


class Service:
    def __init__(self, runtime, limits: ServeLimits | None = None, *, max_queue: int = 64, max_batch: int = 4,
                 batch_wait_ms: float = 10.0, timeout_s: float = 120.0, api_key: str | None = None,
                 shutdown_timeout_s: float = 10.0, watch_disconnect: bool = True, tag: dict | None = None,
                 lora_dir: str | None = None, name: str | None = None, metrics: Metrics | None = None):
        """`max_queue`: this model's live requests (waiting or running) before 429; `watch_disconnect`: notice
        clients that leave while waiting (uvicorn; Ray cancels such requests itself); `tag`: fields added to
        /health and /v1/generate answers (the Ray replica's id); `lora_dir`: the folder whose LoRAs requests may
        name (`loras` field; none: the field is refused); `name`: the model's name (default: its variant);
        `api_key`: the key(s) the gateway requires (comma-separated: several)."""
        if max_queue < 1 or max_batch < 1 or timeout_s <= 0 or batch_wait_ms < 0 or shutdown_timeout_s < 0:
            raise ValueError("max_queue and max_batch must be >= 1, timeout_s > 0, waits >= 0")
        self.runtime = runtime
        self.name = name or runtime.variant
        self.limits = limits or ServeLimits.for_build(runtime.limits)
        self.max_queue, self.timeout_s = max_queue, timeout_s
        self.max_batch = min(max_batch, self.limits.request.max_batch)
        self.batch_wait_s, self.shutdown_timeout_s = batch_wait_ms / 1000, shutdown_timeout_s
        self.api_key = api_key or None
        self.watch_disconnect = watch_disconnect
        self.tag = dict(tag or {})
        self.lora_dir = lora_dir
        self.metrics = metrics or Metrics()
        self.hidden = hidden_paths(getattr(runtime, "engine_dir", None) or runtime.pipeline.engine_dir)
        self.residency = None  # the gateway's (residency.py): whose runtime is loaded
        self.live = 0
        self.pending: collections.deque[Job] = collections.deque()  # interactive requests
        self.background: collections.deque[Job] = collections.deque()  # background jobs' runs
        self.running: list[Job] = []
        self.others_busy = lambda: False  # the gateway's: other models have interactive work waiting or running
        self.run_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"zimage-{self.name}")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.worker: asyncio.Task | None = None
        self.wakeup: asyncio.Event | None = None
        self.closing = False

    def label(self, metric):
        return metric.labels(self.name)

    @property
    def interactive_busy(self) -> bool:
        """Interactive requests wait or run here (read from other threads: a background job's pause)."""
        return bool(self.pending) or any(not j.background for j in list(self.running))

    # -- life cycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker on the running loop (idempotent: the Ray app calls it on each request)."""
        if self.worker is None:
            self.loop = asyncio.get_running_loop()
            self.wakeup = asyncio.Event()
            self.worker = self.loop.create_task(self._work())

    @property
    def is_ready(self) -> bool:
        return self.worker is not None and not self.worker.done() and not self.closing

    def begin_shutdown(self) -> None:
        """From any thread (a signal handler): refuse new requests, cancel what is left after the timeout."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._begin_shutdown)

    def _begin_shutdown(self) -> None:
        if not self.closing:
            self.closing = True
            log.warning("shutting down %s: %d requests in progress get up to %.0f s", self.name, self.live,
                        self.shutdown_timeout_s)
            self.loop.call_later(self.shutdown_timeout_s, self.cancel_all, "the server is shutting down")

    def cancel_all(self, message: str) -> int:
        """Answer every waiting and running request (and background run) with 503 and stop the running batch
        between steps."""
        jobs = list(self.pending) + list(self.background) + list(self.running)
        self.pending.clear()
        self.background.clear()
        for job in jobs:
            job.cancel.set()
            if not job.future.done():
                job.future.set_exception(ApiError(503, message))
        if jobs:
            log.warning("cancelled %d requests: %s", len(jobs), message)
        return len(jobs)

    async def stop(self) -> None:
        self.closing = True
        self.cancel_all("the server is shutting down")
        if self.worker is not None:
            self.worker.cancel()
        self.run_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def drained(self) -> bool:
        return not (self.pending or self.background or self.running)

    # -- requests ------------------------------------------------------------------------------------------
    def parser(self, endpoint: str, content_type: str | None):
        """-> (parse(body) -> Parsed, the body's size limit) for an endpoint and content type (415 otherwise)."""
        kind = (content_type or "").split(";")[0].strip().lower()
        lim = self.limits
        if endpoint == "generations":
            if kind != "application/json":
                raise ApiError(415, "Content-Type must be application/json")
            return functools.partial(parse_openai_generations, limits=lim), lim.max_json_bytes
        if endpoint == "edits":
            if kind != "multipart/form-data":
                raise ApiError(415, "Content-Type must be multipart/form-data (image files and text fields)")
            return functools.partial(parse_openai_edits, content_type, limits=lim), lim.max_body_bytes
        if kind == "application/json":
            return functools.partial(parse_generate_json, limits=lim), lim.max_body_bytes
        if kind == "multipart/form-data":
            return functools.partial(parse_generate_multipart, content_type, limits=lim), lim.max_body_bytes
        raise ApiError(415, "Content-Type must be application/json (or multipart/form-data with a `request` field "
                            "and image files)")

    def with_loras(self, parsed: Parsed) -> Parsed:
        """Resolve the request's LoRA names in --lora-dir and prepare the set (files read and checked, bounded
        cache), before the request is queued: a bad LoRA is the client's 4xx, not a failed generation."""
        if parsed.loras:
            if not self.lora_dir:
                raise ApiError(422, "this server takes no LoRAs (start it with --lora-dir)", param="loras")
            from ..lora import resolve_lora_name

            specs = [(resolve_lora_name(self.lora_dir, name), scale) for name, scale in parsed.loras]
            parsed.lora_set = self.runtime.loras.prepare(specs)
        return parsed

    async def submit(self, parsed: Parsed, request: Request | None = None, t0: float | None = None) -> dict:
        """Queue an interactive request and wait for its answer (ApiError: 429 when this model's queue is full,
        503 while shutting down, 504 after `timeout_s` from `t0`; ClientGone)."""
        self.start()
        t0 = time.perf_counter() if t0 is None else t0
        if self.closing:
            raise ApiError(503, "the server is shutting down")
        if self.live >= self.max_queue:
            raise ApiError(429, f"model {self.name} busy: {self.live} requests in progress; retry later")
        self.live += 1
        self.label(self.metrics.live).set(self.live)
        job = Job(parsed, self.loop.create_future())
        try:
            self.pending.append(job)
            self.label(self.metrics.queue_depth).set(len(self.pending))
            self.wakeup.set()
            answer = await self._wait(job, request, t0)
        except asyncio.CancelledError:  # the server or Ray cancelled this request (Ray: the client left)
            job.cancel.set()
            raise
        finally:
            self.live -= 1
            self.label(self.metrics.live).set(self.live)
            self._forget(job)
        self.label(self.metrics.images).inc(len(answer["images"]))
        self.metrics.latency.labels(self.name, "total").observe(time.perf_counter() - t0)
        return answer

    async def run_background(self, parsed: Parsed, cancel: threading.Event, on_check=None) -> dict:
        """Run a background job when its turn comes (see the module's docstring) -> its answer; ApiError when
        it failed or was cancelled (`cancel` set)."""
        self.start()
        if self.closing:
            raise ApiError(503, "the server is shutting down")
        job = Job(parsed, self.loop.create_future(), cancel=cancel, background=True, on_check=on_check)
        self.background.append(job)
        self.wakeup.set()
        try:
            return await job.future
        finally:
            self._forget(job)

    async def _wait(self, job: Job, request: Request | None, t0: float) -> dict:
        waiters = {job.future}
        gone = asyncio.ensure_future(self._disconnected(request)) \
            if self.watch_disconnect and request is not None else None
        if gone is not None:
            waiters.add(gone)
        try:
            done, _ = await asyncio.wait(waiters, timeout=max(0.0, self.timeout_s - (time.perf_counter() - t0)),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            if gone is not None:
                gone.cancel()
        if job.future in done:
            return job.future.result()
        job.cancel.set()
        if gone is not None and gone in done:
            raise ClientGone
        raise ApiError(504, f"request not served within {self.timeout_s:g} s")

    @staticmethod
    async def _disconnected(request: Request) -> None:
        """Returns when the client disconnects (the body was read: the server's next message is the disconnect)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return
            await asyncio.sleep(0.05)  # not expected after the body; never spin

    def _forget(self, job: Job) -> None:
        """The request is answered or gone: out of the queue, and its work stops if nobody else needs it."""
        if not job.future.done():
            job.cancel.set()
            job.future.cancel()
        for queue in (self.pending, self.background):
            try:
                queue.remove(job)
            except ValueError:
                pass
        self.label(self.metrics.queue_depth).set(len(self.pending))

    # -- the worker ------------------------------------------------------------------------------------------
    def _cap(self, job: Job) -> int:
        """Images one runtime call may hold for this job's settings (CFG doubles the engines' batch)."""
        lim = self.limits.request
        doubled = lim.cfg_doubles_batch and job.parsed.request.guidance_scale > 0
        return max(1, min(self.max_batch, lim.max_batch // (2 if doubled else 1)))

    def _take(self) -> list[Job]:
        head = self.pending.popleft()
        batch, cost, count, key = [head], head.cost, head.count, head.batch_key()
        if key is not None:
            cap = self._cap(head)
            for other in list(self.pending):
                if (not other.cancel.is_set() and other.batch_key() == key and count + other.count <= cap
                        and cost + other.cost <= self.limits.max_batch_pixels):
                    self.pending.remove(other)
                    batch.append(other)
                    cost, count = cost + other.cost, count + other.count
        return batch

    def _purge(self) -> None:
        for name in ("pending", "background"):
            queue = getattr(self, name)
            if any(j.cancel.is_set() for j in queue):
                for j in queue:
                    if j.cancel.is_set() and not j.future.done():
                        j.future.set_exception(ApiError(499, "cancelled"))
                setattr(self, name, collections.deque(j for j in queue if not j.cancel.is_set()))
        self.label(self.metrics.queue_depth).set(len(self.pending))

    async def _work(self) -> None:
        while True:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the worker must outlive any one batch
                log.exception("worker error")
                await asyncio.sleep(0.1)

    def _background_stop(self, job: Job):
        """A background run's between-steps check: its progress, a pause while other models' interactive work
        waits or runs (not while this model's own requests wait behind it), then whether to stop."""
        def check() -> bool:
            if job.on_check is not None:
                job.on_check()
            while not job.cancel.is_set() and self.others_busy() and not self.pending:
                if self.residency is not None and self.residency.contended(self):  # it waits for our slot
                    job.preempted = True
                    return True
                time.sleep(0.01)
            return job.cancel.is_set()
        return check

    async def _step(self) -> None:
        self._purge()
        if not self.pending:
            if self.background and not self.others_busy():
                batch = [self.background.popleft()]
                await self._run(batch, self._background_stop(batch[0]))
                return
            self.wakeup.clear()
            if self.background:  # its turn comes when the other models' interactive work is done
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), 0.05)
            else:
                await self.wakeup.wait()
            return
        head = self.pending[0]
        if self.batch_wait_s > 0 and head.batch_key() is not None and self._cap(head) > head.count:
            companions = sum(j.count for j in self.pending if j.batch_key() == head.batch_key())
            if companions < self._cap(head):
                await asyncio.sleep(self.batch_wait_s)  # let compatible requests arrive
                self._purge()
                if not self.pending:
                    return
        await self._run(self._take())

    async def _run(self, batch: list[Job], should_stop=None) -> None:
        self.label(self.metrics.queue_depth).set(len(self.pending))
        started = time.perf_counter()
        for j in batch:
            self.metrics.latency.labels(self.name, "queue").observe(started - j.enqueued)
        self.label(self.metrics.batch).observe(sum(j.count for j in batch))
        self.running = batch
        entered = False
        try:
            if self.residency is not None:
                await self.residency.enter(self, (int(batch[0].background), min(j.enqueued for j in batch)))
                entered = True
            answers = await self.loop.run_in_executor(self.run_pool, run_batch, self.runtime, batch, should_stop)
        except GenerationCancelled:
            if batch[0].preempted and not batch[0].cancel.is_set():  # its turn comes again (service docstring)
                batch[0].preempted = False
                self.background.appendleft(batch[0])
                answers = []
            else:
                self.label(self.metrics.cancelled).inc()
                answers = [ApiError(503, "cancelled")] * len(batch)
        except RequestError as e:
            answers = [ApiError(getattr(e, "status", 422), str(e))] * len(batch)
        except RuntimeError as e:
            if "shutdown" not in str(e):
                log.exception("generation failed")
            answers = [ApiError(503 if self.closing else 500, "internal error (details in the server log)")] * \
                len(batch)
        except Exception:  # noqa: BLE001 - InternalError and anything else: ours, details in the log only
            log.exception("generation failed")
            answers = [ApiError(500, "internal error (details in the server log)")] * len(batch)
        finally:
            self.running = []
            if entered:
                self.residency.leave(self)
        for job, answer in zip(batch, answers):
            if job.future.done():
                continue
            if isinstance(answer, ApiError):
                job.future.set_exception(answer)
            else:
                for stage in ("encode", "denoise", "decode"):
                    if stage in answer["timings"]:
                        self.metrics.latency.labels(self.name, stage).observe(answer["timings"][stage])
                job.future.set_result(answer)
