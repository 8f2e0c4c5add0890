"""HTTP server (FastAPI): `POST /v1/generate`, `GET /health`, `GET /metrics` (Prometheus).

A bounded queue in front of one runtime: when it is full, requests are answered 429 at once instead of waiting
without bound. One worker takes the oldest request and, for text-to-image, up to `max_batch - 1` more waiting
requests with the same size, steps and guidance settings (waiting at most `batch_wait_ms` for them), and runs
them as one batch; each keeps its own seed, so its image is the one it would get alone. A request still
waiting after `timeout_s` gets 504 and is dropped from the queue.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..errors import InternalError, RequestError
from .schema import ApiError, Limits, ParsedRequest, encode_png, parse

STAGES = ("queue", "encode", "denoise", "decode", "total")


class Metrics:
    """Per-app registry (no global state: several apps can live in one process)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.queue_depth = Gauge("zimage_queue_depth", "requests waiting", registry=self.registry)
        self.latency = Histogram("zimage_request_seconds", "request latency by stage", ["stage"],
                                 registry=self.registry,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.images = Counter("zimage_images", "images served", registry=self.registry)
        self.errors = Counter("zimage_errors", "failed requests by kind", ["kind"], registry=self.registry)
        self.batch = Histogram("zimage_batch_size", "requests per runtime call", registry=self.registry,
                               buckets=(1, 2, 3, 4, 6, 8, 16))


@dataclass
class Job:
    parsed: ParsedRequest
    seed: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False

    def batch_key(self):
        """Requests with the same key can share one runtime call (text-to-image only)."""
        r = self.parsed.request
        if self.parsed.images or self.parsed.mask is not None:
            return None
        return (r.steps, r.height, r.width, r.guidance_scale, r.negative_prompt, r.cfg_normalization,
                r.cfg_truncation)


def run_jobs(runtime, jobs: list[Job]) -> list[dict]:
    """Run one batch of compatible jobs (or one job) on the runtime; one answer per job."""
    r = jobs[0].parsed.request
    kwargs = dict(steps=r.steps, height=r.height, width=r.width, negative_prompt=r.negative_prompt,
                  guidance_scale=r.guidance_scale, cfg_normalization=r.cfg_normalization,
                  cfg_truncation=r.cfg_truncation)
    if len(jobs) == 1:
        kwargs.update(images=jobs[0].parsed.images or None, mask=jobs[0].parsed.mask)
        if r.strength is not None:
            kwargs["strength"] = r.strength
    result = runtime.generate([j.parsed.request.prompt for j in jobs], seed=[j.seed for j in jobs], **kwargs)
    return [{"images": [encode_png(im)], "seed": j.seed, "width": im.width, "height": im.height,
             "timings": result.timings, "batch_size": len(jobs)} for j, im in zip(jobs, result.images)]


class Batcher:
    def __init__(self, runtime, metrics: Metrics, max_queue: int, max_batch: int, batch_wait_s: float,
                 timeout_s: float):
        self.runtime, self.metrics = runtime, metrics
        self.max_queue, self.max_batch, self.batch_wait_s, self.timeout_s = max_queue, max_batch, batch_wait_s, \
            timeout_s
        self.pending: collections.deque[Job] = collections.deque()
        self.wakeup = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zimage-runtime")

    async def submit(self, parsed: ParsedRequest) -> dict:
        if len(self.pending) >= self.max_queue:
            raise ApiError(429, f"server busy: {len(self.pending)} requests waiting; retry later", "overloaded")
        seed = parsed.request.seed if parsed.request.seed is not None else secrets.randbelow(2**31)
        job = Job(parsed, seed, asyncio.get_running_loop().create_future())
        self.pending.append(job)
        self.metrics.queue_depth.set(len(self.pending))
        self.wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.timeout_s)
        except asyncio.TimeoutError:
            job.cancelled = True
            raise ApiError(504, f"request not served within {self.timeout_s:g} s", "timeout") from None

    def _take_batch(self) -> list[Job]:
        job = self.pending.popleft()
        batch, key = [job], job.batch_key()
        if key is not None:
            for other in list(self.pending):
                if len(batch) >= self.max_batch:
                    break
                if not other.cancelled and other.batch_key() == key:
                    self.pending.remove(other)
                    batch.append(other)
        return batch

    async def worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                self.wakeup.clear()
                await self.wakeup.wait()
            if self.pending[0].cancelled:
                self.pending.popleft()
                continue
            if self.max_batch > 1 and self.pending[0].batch_key() is not None and len(self.pending) < self.max_batch:
                await asyncio.sleep(self.batch_wait_s)  # let compatible requests arrive
            batch = [j for j in self._take_batch() if not j.cancelled]
            self.metrics.queue_depth.set(len(self.pending))
            if not batch:
                continue
            started = time.perf_counter()
            for j in batch:
                self.metrics.latency.labels("queue").observe(started - j.enqueued)
            self.metrics.batch.observe(len(batch))
            try:
                answers = await loop.run_in_executor(self.executor, run_jobs, self.runtime, batch)
            except RequestError as e:
                answers = [ApiError(422, str(e))] * len(batch)
            except InternalError as e:
                answers = [ApiError(500, f"internal error: {e}", "internal")] * len(batch)
            except Exception as e:  # noqa: BLE001
                answers = [ApiError(500, f"internal error: {type(e).__name__}: {e}", "internal")] * len(batch)
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


def create_app(runtime, limits: Limits, max_queue: int = 64, max_batch: int = 4, batch_wait_ms: float = 10,
               timeout_s: float = 120.0) -> FastAPI:
    metrics = Metrics()
    state: dict = {}
    max_body = 6 * limits.max_image_bytes + (1 << 20)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["batcher"] = batcher = Batcher(runtime, metrics, max_queue, max_batch, batch_wait_ms / 1000, timeout_s)
        task = asyncio.create_task(batcher.worker())
        yield
        task.cancel()
        batcher.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="zimage-deploy", lifespan=lifespan)

    def error(e: ApiError) -> JSONResponse:
        metrics.errors.labels(e.kind).inc()
        return JSONResponse({"error": {"message": e.message, "kind": e.kind}}, status_code=e.status)

    @app.post("/v1/generate")
    async def generate(request: Request):
        t0 = time.perf_counter()
        try:
            if int(request.headers.get("content-length") or 0) > max_body:
                raise ApiError(413, f"request body above {max_body} bytes")
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                parsed = await _parse_multipart(request, limits)
            else:
                parsed = parse(await request.body(), limits)
            answer = await state["batcher"].submit(parsed)
        except ApiError as e:
            return error(e)
        metrics.images.inc(len(answer["images"]))
        metrics.latency.labels("total").observe(time.perf_counter() - t0)
        return answer

    @app.get("/health")
    async def health():
        return {"status": "ok", "variant": runtime.variant, "backend": runtime.backend,
                "queue_depth": len(state["batcher"].pending) if "batcher" in state else 0}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _parse_multipart(request: Request, limits: Limits) -> ParsedRequest:
    """multipart/form-data: a `request` field with the JSON object, `image` files (repeatable), a `mask` file."""
    import json

    form = await request.form()
    try:
        body = json.loads(form.get("request") or "{}")
    except json.JSONDecodeError as e:
        raise ApiError(400, f"malformed JSON in the `request` field: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the `request` field must be a JSON object")
    files = {"image": [await f.read() for f in form.getlist("image")],
             "mask": [await f.read() for f in form.getlist("mask")]}
    return parse(body, limits, files)
