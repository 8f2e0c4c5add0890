"""The serving core shared by the HTTP server (app.py, FastAPI + uvicorn) and the Ray Serve app (ray_app.py):
admission, body limits, parsing off the event loop, batching under a pixel budget, cancellation, answers.

A request, in order: API key (401) -> content type (415) -> admission: at most `max_queue` live requests
(being read, parsed, waiting or running), else 429 at once -> body read under its cap (413, chunked bodies
included; 408 when it does not arrive within `body_timeout_s`) -> parsed, validated and decoded in a small
thread pool (400 / 413 / 422) -> queued. One worker takes the oldest request and, for text-to-image, more
waiting requests with the same settings while the batch stays within `max_batch` images and
`max_batch_pixels` (waiting at most `batch_wait_ms` for them), and runs them on the runtime in one thread;
each keeps its own seed. A request that times out (504) or whose client disconnects leaves the queue at once,
and a batch whose requests are all gone stops between denoising steps (GenerationCancelled). Shutdown: new
requests get 503, work in progress may finish for `shutdown_timeout_s`, then everything left is cancelled.
Errors are JSON (`{"error": {"message", "type", "kind", "param", "code"}}`) without server paths.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import RequestError
from ..runtime.pipeline import GenerationCancelled
from .errors import ApiError, hidden_paths
from .schema import (Parsed, ServeLimits, encode_image, parse_generate_json, parse_generate_multipart,
                     parse_openai_edits, parse_openai_generations)

log = logging.getLogger("zimage_deploy.serve")


class Metrics:
    """Per-service registry (no global state: several apps can live in one process)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.queue_depth = Gauge("zimage_queue_depth", "requests waiting", registry=self.registry)
        self.live = Gauge("zimage_live_requests", "requests admitted and not yet answered", registry=self.registry)
        self.latency = Histogram("zimage_request_seconds", "request latency by stage", ["stage"],
                                 registry=self.registry,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.images = Counter("zimage_images", "images served", registry=self.registry)
        self.errors = Counter("zimage_errors", "failed requests by kind", ["kind"], registry=self.registry)
        self.batch = Histogram("zimage_batch_size", "images per runtime call", registry=self.registry,
                               buckets=(1, 2, 3, 4, 6, 8, 16))
        self.cancelled = Counter("zimage_cancelled_batches", "runtime calls stopped between steps",
                                 registry=self.registry)


class ClientGone(Exception):
    """The client disconnected before its answer."""


@dataclass(eq=False)
class Job:
    parsed: Parsed
    future: asyncio.Future
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def cost(self) -> int:
        return self.parsed.request.pixels

    @property
    def count(self) -> int:
        return self.parsed.request.batch

    def batch_key(self):
        """Requests with the same key can share one runtime call (text-to-image only, the same LoRAs; a control
        image is the request's own)."""
        r = self.parsed.request
        if r.images or r.mask or r.control_image:
            return None
        loras = self.parsed.lora_set.key if self.parsed.lora_set is not None else None
        return (r.steps, r.height, r.width, r.guidance_scale, r.negative_prompt, r.cfg_normalization,
                r.cfg_truncation, loras)


def run_batch(runtime, jobs: list[Job]) -> list[dict]:
    """One runtime call for a batch of compatible jobs (or one job); answers per job, images encoded here (in
    the runtime thread, not on the event loop). Stops between steps once every job is cancelled."""
    reqs = [j.parsed.request for j in jobs]
    req = reqs[0] if len(jobs) == 1 else replace(reqs[0], prompts=sum((r.prompts for r in reqs), ()),
                                                 seeds=sum((r.seeds for r in reqs), ()),
                                                 pixels=sum(r.pixels for r in reqs))
    first = jobs[0].parsed
    result = runtime.run(req, images=first.images or None, mask=first.mask, control_image=first.control_image,
                         loras=first.lora_set,
                         cancel=lambda: all(j.cancel.is_set() for j in jobs))
    answers, k = [], 0
    for j in jobs:
        images, seeds = result.images[k:k + j.count], result.seeds[k:k + j.count]
        k += j.count
        answers.append({"images": [encode_image(im, j.parsed.output_format) for im in images], "seeds": seeds,
                        "width": images[0].width, "height": images[0].height, "timings": result.timings,
                        "batch_size": len(result.images)})
    return answers


class Service:
    def __init__(self, runtime, limits: ServeLimits | None = None, *, max_queue: int = 64, max_batch: int = 4,
                 batch_wait_ms: float = 10.0, timeout_s: float = 120.0, api_key: str | None = None,
                 shutdown_timeout_s: float = 10.0, watch_disconnect: bool = True, tag: dict | None = None,
                 lora_dir: str | None = None):
        """`watch_disconnect`: notice clients that leave while waiting (uvicorn; Ray cancels such requests
        itself); `tag`: fields added to /health and /v1/generate answers (the Ray replica's id); `lora_dir`: the
        folder whose LoRAs requests may name (`loras` field; none: the field is refused)."""
        if max_queue < 1 or max_batch < 1 or timeout_s <= 0 or batch_wait_ms < 0 or shutdown_timeout_s < 0:
            raise ValueError("max_queue and max_batch must be >= 1, timeout_s > 0, waits >= 0")
        self.runtime = runtime
        self.limits = limits or ServeLimits.for_build(runtime.limits)
        self.max_queue, self.timeout_s = max_queue, timeout_s
        self.max_batch = min(max_batch, self.limits.request.max_batch)
        self.batch_wait_s, self.shutdown_timeout_s = batch_wait_ms / 1000, shutdown_timeout_s
        self.api_key = api_key or None
        self.watch_disconnect = watch_disconnect
        self.tag = dict(tag or {})
        self.lora_dir = lora_dir
        self.metrics = Metrics()
        self.hidden = hidden_paths(runtime.pipeline.engine_dir)
        self.live = 0
        self.pending: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []
        self.parse_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="zimage-parse")
        self.run_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zimage-runtime")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.worker: asyncio.Task | None = None
        self.wakeup: asyncio.Event | None = None
        self.closing = False

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
            log.warning("shutting down: %d requests in progress get up to %.0f s", self.live,
                        self.shutdown_timeout_s)
            self.loop.call_later(self.shutdown_timeout_s, self.cancel_all, "the server is shutting down")

    def cancel_all(self, message: str) -> int:
        """Answer every waiting and running request with 503 and stop the running batch between steps."""
        jobs = list(self.pending) + list(self.running)
        self.pending.clear()
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
        self.parse_pool.shutdown(wait=False, cancel_futures=True)
        self.run_pool.shutdown(wait=False, cancel_futures=True)

    # -- endpoints -------------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        """Alive: the process answers (whether or not it can serve: see /ready)."""
        return JSONResponse({"status": "ok", "variant": self.runtime.variant, "backend": self.runtime.backend,
                             "queue_depth": len(self.pending), "live_requests": self.live, **self.tag})

    async def ready(self, request: Request) -> Response:
        """Ready: the build was loaded and verified, the worker runs, and the server is not shutting down."""
        state = "ready" if self.is_ready else ("shutting down" if self.closing else "starting")
        return JSONResponse({"status": state, "variant": self.runtime.variant, "backend": self.runtime.backend,
                             "sizes": self.limits.request.sizes_text(),
                             "max_batch_pixels": self.limits.max_batch_pixels},
                            status_code=200 if self.is_ready else 503)

    async def prometheus(self, request: Request) -> Response:
        try:
            self._auth(request)
        except ApiError as e:
            return self._error(e)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def generate(self, request: Request) -> Response:
        return await self._serve(request, "generate")

    async def images_generations(self, request: Request) -> Response:
        return await self._serve(request, "generations")

    async def images_edits(self, request: Request) -> Response:
        return await self._serve(request, "edits")

    ROUTES = {("GET", "/health"): "health", ("GET", "/ready"): "ready", ("GET", "/metrics"): "prometheus",
              ("POST", "/v1/generate"): "generate", ("POST", "/v1/images/generations"): "images_generations",
              ("POST", "/v1/images/edits"): "images_edits"}

    async def dispatch(self, request: Request, path: str | None = None) -> Response:
        """Route by method and path (the Ray app; the FastAPI app registers the same methods as routes)."""
        self.start()
        path = (path if path is not None else request.url.path).rstrip("/") or "/"
        name = self.ROUTES.get((request.method, path))
        if name is None:
            known = any(p == path for _, p in self.ROUTES)
            return self._error(ApiError(405 if known else 404, f"{request.method} {path[:100]} is not served here"))
        return await getattr(self, name)(request)

    # -- one request -----------------------------------------------------------------------------------------
    async def _serve(self, request: Request, endpoint: str) -> Response:
        t0 = time.perf_counter()
        job = None
        try:
            self.start()
            self._auth(request)
            parse, limit = self._parser(endpoint, request.headers.get("content-type"))
            if self.closing:
                raise ApiError(503, "the server is shutting down")
            if self.live >= self.max_queue:
                raise ApiError(429, f"server busy: {self.live} requests in progress; retry later")
            self.live += 1
            self.metrics.live.set(self.live)
            try:
                body = await self._read_body(request, limit)
                parsed = await self.loop.run_in_executor(self.parse_pool, lambda: self._with_loras(parse(body)))
                job = Job(parsed, self.loop.create_future())
                self.pending.append(job)
                self.metrics.queue_depth.set(len(self.pending))
                self.wakeup.set()
                answer = await self._wait(job, request, t0)
            finally:
                self.live -= 1
                self.metrics.live.set(self.live)
                if job is not None:
                    self._forget(job)
        except ApiError as e:
            return self._error(e)
        except RequestError as e:
            return self._error(ApiError(getattr(e, "status", 422), str(e)))
        except ClientGone:
            return self._error(ApiError(499, "the client disconnected"))
        except asyncio.CancelledError:  # the server or Ray cancelled this request (Ray: the client left)
            if job is not None:
                job.cancel.set()
            raise
        except Exception:  # noqa: BLE001 - never a bare 500 with a traceback for the client
            log.exception("request failed")
            return self._error(ApiError(500, "internal error (details in the server log)"))
        self.metrics.images.inc(len(answer["images"]))
        self.metrics.latency.labels("total").observe(time.perf_counter() - t0)
        return JSONResponse(self._format(job.parsed, answer))

    def _with_loras(self, parsed: Parsed) -> Parsed:
        """Resolve the request's LoRA names in --lora-dir and prepare the set (files read and checked, bounded
        cache), before the request is queued: a bad LoRA is the client's 4xx, not a failed generation."""
        if parsed.loras:
            if not self.lora_dir:
                raise ApiError(422, "this server takes no LoRAs (start it with --lora-dir)", param="loras")
            from ..lora import resolve_lora_name

            specs = [(resolve_lora_name(self.lora_dir, name), scale) for name, scale in parsed.loras]
            parsed.lora_set = self.runtime.loras.prepare(specs)
        return parsed

    def _auth(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not secrets.compare_digest(token.encode("utf-8", "surrogateescape"), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send `Authorization: Bearer KEY`)")

    def _parser(self, endpoint: str, content_type: str | None):
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

    async def _read_body(self, request: Request, limit: int) -> bytes:
        """The body, refused as soon as it passes `limit` (Content-Length or counted: chunked bodies too)."""
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise ApiError(400, "invalid Content-Length")
            if int(declared) > limit:
                raise ApiError(413, f"request body of {int(declared)} bytes; the limit is {limit}")
        chunks, total = [], 0

        async def read():
            nonlocal total
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone
                data = message.get("body", b"")
                total += len(data)
                if total > limit:
                    raise ApiError(413, f"request body above the limit of {limit} bytes")
                chunks.append(data)
                if not message.get("more_body", False):
                    return

        try:
            await asyncio.wait_for(read(), self.limits.body_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"request body not received within {self.limits.body_timeout_s:g} s") from None
        return b"".join(chunks)

    async def _wait(self, job: Job, request: Request, t0: float) -> dict:
        waiters = {job.future}
        gone = asyncio.ensure_future(self._disconnected(request)) if self.watch_disconnect else None
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
        try:
            self.pending.remove(job)
        except ValueError:
            pass
        self.metrics.queue_depth.set(len(self.pending))

    def _format(self, parsed: Parsed, answer: dict) -> dict:
        if parsed.openai:
            return {"created": int(time.time()),
                    "data": [{"b64_json": b, "seed": s} for b, s in zip(answer["images"], answer["seeds"])],
                    "size": f"{answer['width']}x{answer['height']}", "output_format": parsed.output_format.lower()}
        return {"images": answer["images"], "seed": answer["seeds"][0], "width": answer["width"],
                "height": answer["height"], "timings": answer["timings"], "batch_size": answer["batch_size"],
                **self.tag}

    def _error(self, e: ApiError) -> JSONResponse:
        self.metrics.errors.labels(e.kind).inc()
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else (
            {"Retry-After": "1"} if e.status in (429, 503) else None)
        return JSONResponse(e.body(self.hidden), status_code=e.status, headers=headers)

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
        if any(j.cancel.is_set() for j in self.pending):
            self.pending = collections.deque(j for j in self.pending if not j.cancel.is_set())
        self.metrics.queue_depth.set(len(self.pending))

    async def _work(self) -> None:
        while True:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the worker must outlive any one batch
                log.exception("worker error")
                await asyncio.sleep(0.1)

    async def _step(self) -> None:
        self._purge()
        if not self.pending:
            self.wakeup.clear()
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
        batch = self._take()
        self.metrics.queue_depth.set(len(self.pending))
        started = time.perf_counter()
        for j in batch:
            self.metrics.latency.labels("queue").observe(started - j.enqueued)
        self.metrics.batch.observe(sum(j.count for j in batch))
        self.running = batch
        try:
            answers = await self.loop.run_in_executor(self.run_pool, run_batch, self.runtime, batch)
        except GenerationCancelled:
            self.metrics.cancelled.inc()
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
        for job, answer in zip(batch, answers):
            if job.future.done():
                continue
            if isinstance(answer, ApiError):
                job.future.set_exception(answer)
            else:
                for stage in ("encode", "denoise", "decode"):
                    if stage in answer["timings"]:
                        self.metrics.latency.labels(stage).observe(answer["timings"][stage])
                job.future.set_result(answer)
