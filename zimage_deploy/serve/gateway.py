"""The front of a server with one or more models (builds): the routes of the HTTP server and the Ray Serve app.

    POST /v1/generate, /v1/images/generations, /v1/images/edits   a generation, routed by its `model` field
    POST /v1/jobs, GET /v1/jobs, GET|DELETE /v1/jobs/{id}        background jobs (jobs.py; with --jobs-dir)
    GET /v1/models                                               the models (OpenAI's list shape)
    GET /health, /ready, /metrics; GET / (a page to try it: page.py)

A request, in order: API key (401) -> content type (415) -> admission: at most `max_live` live requests (being
read, parsed, waiting or running) in all, else 429 at once -> body read under the largest model's cap (413,
chunked bodies included; 408 when it does not arrive in time) -> in a small thread pool: the `model` field
picked (unknown: 404; absent: the default model), the body checked against that model's caps and parsed,
validated and decoded (400 / 413 / 422) -> that model's queue (service.py; 429 when it is full).

A model answers to its name and to `z-image-<variant>` when no other model has that variant (OpenAI clients
send a model name). API keys: one or several (comma-separated); a background job belongs to the key that made
it. Errors are JSON (`{"error": {"message", "type", "kind", "param", "code"}}`) without server paths.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from ..errors import RequestError
from .errors import ApiError
from .residency import Residency
from .schema import peek_model
from .service import ClientGone, Service

log = logging.getLogger("zimage_deploy.serve")


class _Fallbacks:
    """/metrics: each runtime's compiled-to-eager fallbacks (`ZImageRuntime.fallbacks()`), read at scrape time."""

    def __init__(self, services: dict[str, Service]):
        self.services = services

    def collect(self):
        family = CounterMetricFamily("zimage_fallbacks", "components run eagerly after their compilation failed",
                                     labels=["model", "component"])
        for name, service in self.services.items():
            counts = getattr(service.runtime, "fallbacks", None)
            for component, n in (counts() if callable(counts) else {}).items():
                family.add_metric([name, component], n)
        yield family


def key_owner(key: str | None) -> str:
    """A key's identity in the jobs database (never the key itself)."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32] if key else ""


class Gateway:
    def __init__(self, services: list[Service], default: str | None = None, *, api_keys=(), jobs=None,
                 max_live: int | None = None, tag: dict | None = None, residency=None, jobs_off: str | None = None):
        """`services`: one per model (they share one Metrics); `default`: the model of requests without a
        `model` field (default: the first); `api_keys`: keys accepted (also each service's `api_key`; none: no
        authentication); `jobs`: a jobs.Jobs (none: the job routes answer 404); `max_live`: live requests in all
        (default: the sum of the models' queues); `residency`: a residency.Residency, which models hold their
        runtime at a time (default: all); `jobs_off`: why this front end has no background jobs (the job routes
        answer 501 with it; default: 404, start the server with --jobs-dir)."""
        if not services:
            raise ValueError("a gateway needs at least one model")
        self.services = {s.name: s for s in services}
        if len(self.services) != len(services):
            raise ValueError("two models with one name")
        self.default = default or services[0].name
        if self.default not in self.services:
            raise ApiError(404, f"default model {default!r} is not among {', '.join(self.services)}")
        self.metrics = services[0].metrics
        for s in services:
            s.metrics = self.metrics
            s.others_busy = (lambda me: lambda: any(o.interactive_busy for o in services if o is not me))(s)
        self.metrics.registry.register(_Fallbacks(self.services))
        self.residency = residency or Residency()
        self.residency.attach(services, self.metrics)
        keys = [k for k in api_keys if k] + [s.api_key for s in services if s.api_key]
        self.api_keys = tuple(dict.fromkeys(k.strip() for key in keys for k in key.split(",") if k.strip()))
        self.aliases = self._aliases()
        self.jobs, self.jobs_off = jobs, jobs_off
        self.max_live = max_live or sum(s.max_queue for s in services)
        self.tag = dict(tag or {})
        self.hidden = tuple(p for s in services for p in s.hidden)
        self.live = 0
        self.closing = False
        self.parse_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="zimage-parse")

    def _aliases(self) -> dict[str, str]:
        out = {}
        variants = [s.runtime.variant for s in self.services.values()]
        for name, s in self.services.items():
            if variants.count(s.runtime.variant) == 1:
                out[f"z-image-{s.runtime.variant}"] = name
        out.update({name: name for name in self.services})
        return out

    @property
    def service(self) -> Service:
        return self.services[self.default]

    def model(self, name) -> Service:
        if name is None:
            return self.service
        if not isinstance(name, str) or len(name) > 200:
            raise ApiError(422, "model must be a model name (GET /v1/models lists them)", param="model")
        if name.strip().lower() not in self.aliases and name not in self.aliases:
            raise ApiError(404, f"model {name[:60]!r} is not served here; models: {', '.join(self.services)}",
                           kind="unknown_model", param="model")
        return self.services[self.aliases.get(name, self.aliases.get(name.strip().lower()))]

    # -- life cycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        for s in self.services.values():
            s.start()

    @property
    def is_ready(self) -> bool:
        return not self.closing and all(s.is_ready for s in self.services.values())

    def begin_shutdown(self) -> None:
        """From any thread (a signal handler): every model refuses new work, then cancels what is left after its
        deadline; background jobs are recorded as they end."""
        self.closing = True
        if self.jobs is not None:
            self.jobs.closing = True
        for s in self.services.values():
            s.begin_shutdown()

    async def stop(self) -> None:
        self.closing = True
        deadline = max(s.shutdown_timeout_s for s in self.services.values())
        if self.jobs is not None:
            self.jobs.closing = True
            t0 = time.monotonic()
            while any(not s.drained for s in self.services.values()) and time.monotonic() - t0 < deadline:
                await asyncio.sleep(0.05)
        for s in self.services.values():
            await s.stop()
        if self.jobs is not None:
            await self.jobs.close(0)
        self.parse_pool.shutdown(wait=False, cancel_futures=True)

    # -- endpoints -----------------------------------------------------------------------------------------
    def _model_info(self, s: Service) -> dict:
        lim = s.limits.request
        return {"variant": s.runtime.variant, "backend": s.runtime.backend, "ready": s.is_ready,
                "sizes": lim.sizes_text(), "min_side": lim.min_side, "max_side": lim.max_side,
                "multiple": lim.multiple, "static": list(lim.static) if lim.static else None,
                "max_batch_pixels": s.limits.max_batch_pixels,
                "resident": self.residency.is_resident(s.name), "residency": self.residency.policy,
                "queue_depth": len(s.pending), "live_requests": s.live}

    async def health(self, request: Request) -> Response:
        """Alive: the process answers (whether or not it can serve: see /ready)."""
        s = self.service
        return JSONResponse({"status": "ok", "variant": s.runtime.variant, "backend": s.runtime.backend,
                             "queue_depth": sum(len(x.pending) for x in self.services.values()),
                             "live_requests": self.live, "default_model": self.default, **self.tag})

    async def ready(self, request: Request) -> Response:
        """Ready: every model was loaded, verified and warmed up, its worker runs, and no shutdown began."""
        self.start()
        closing = self.closing or any(s.closing for s in self.services.values())
        state = "ready" if self.is_ready else ("shutting down" if closing else "starting")
        s = self.service
        return JSONResponse({"status": state, "variant": s.runtime.variant, "backend": s.runtime.backend,
                             "sizes": s.limits.request.sizes_text(), "max_batch_pixels": s.limits.max_batch_pixels,
                             "default_model": self.default,
                             "models": {n: self._model_info(x) for n, x in self.services.items()}},
                            status_code=200 if state == "ready" else 503)

    async def prometheus(self, request: Request) -> Response:
        try:
            self._auth(request)
        except ApiError as e:
            return self._error(e)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request: Request) -> Response:
        """OpenAI's model list, plus each model's variant, sizes and whether it is the default."""
        try:
            self._auth(request)
        except ApiError as e:
            return self._error(e)
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "zimage-deploy",
                 "aliases": sorted(a for a, m in self.aliases.items() if m == n and a != n),
                 "default": n == self.default, "edit": s.runtime.variant == "edit",
                 "steps": s.runtime.defaults.get("steps") if isinstance(s.runtime.defaults, dict) else None,
                 **self._model_info(s)} for n, s in self.services.items()]
        return JSONResponse({"object": "list", "data": data})

    async def generate(self, request: Request) -> Response:
        return await self._serve(request, "generate")

    async def images_generations(self, request: Request) -> Response:
        return await self._serve(request, "generations")

    async def images_edits(self, request: Request) -> Response:
        return await self._serve(request, "edits")

    async def submit_job(self, request: Request) -> Response:
        return await self._serve(request, "generate", job=True)

    async def list_jobs(self, request: Request) -> Response:
        try:
            owner = self._owner(request)
            jobs = self._jobs()
            jobs.store.prune()
            return JSONResponse({"object": "list", "data": [jobs.view(r) for r in jobs.store.list(owner)]})
        except ApiError as e:
            return self._error(e)

    async def get_job(self, request: Request, job_id: str) -> Response:
        try:
            jobs, row = self._job(request, job_id)
            return JSONResponse(await asyncio.get_running_loop().run_in_executor(
                self.parse_pool, lambda: jobs.view(row, images=True)))
        except ApiError as e:
            return self._error(e)
        except OSError:
            return self._error(ApiError(410, "this job's images are gone (removed by retention)"))

    async def delete_job(self, request: Request, job_id: str) -> Response:
        try:
            jobs, row = self._job(request, job_id)
            return JSONResponse(jobs.cancel(row))
        except ApiError as e:
            return self._error(e)

    async def page(self, request: Request) -> Response:
        from .page import page_html

        return HTMLResponse(page_html())

    ROUTES = {("GET", "/"): "page", ("GET", "/health"): "health", ("GET", "/ready"): "ready",
              ("GET", "/metrics"): "prometheus", ("GET", "/v1/models"): "models",
              ("POST", "/v1/generate"): "generate", ("POST", "/v1/images/generations"): "images_generations",
              ("POST", "/v1/images/edits"): "images_edits", ("POST", "/v1/jobs"): "submit_job",
              ("GET", "/v1/jobs"): "list_jobs"}
    JOB_ROUTES = {"GET": "get_job", "DELETE": "delete_job"}

    async def dispatch(self, request: Request, path: str | None = None) -> Response:
        """Route by method and path (the Ray app; the FastAPI app registers the same methods as routes)."""
        self.start()
        path = (path if path is not None else request.url.path).rstrip("/") or "/"
        name = self.ROUTES.get((request.method, path))
        if name is not None:
            return await getattr(self, name)(request)
        head, _, job_id = path.rpartition("/")
        if head == "/v1/jobs" and job_id:
            if request.method in self.JOB_ROUTES:
                return await getattr(self, self.JOB_ROUTES[request.method])(request, job_id)
            return self._error(ApiError(405, f"{request.method} {path[:100]} is not served here"))
        known = any(p == path for _, p in self.ROUTES)
        return self._error(ApiError(405 if known else 404, f"{request.method} {path[:100]} is not served here"))

    # -- one request -----------------------------------------------------------------------------------------
    async def _serve(self, request: Request, endpoint: str, job: bool = False) -> Response:
        t0 = time.perf_counter()
        service = None
        try:
            self.start()
            owner = self._owner(request)
            if job:
                self._jobs()
            content_type = request.headers.get("content-type")
            limit = max(s.parser(endpoint, content_type)[1] for s in self.services.values())  # 415 first
            if self.closing:
                raise ApiError(503, "the server is shutting down")
            if self.live >= self.max_live:
                raise ApiError(429, f"server busy: {self.live} requests in progress; retry later")
            self.live += 1
            try:
                body = await self._read_body(request, limit)
                service, parsed = await asyncio.get_running_loop().run_in_executor(
                    self.parse_pool, self._parse, endpoint, content_type, body)
                if job:
                    return JSONResponse(self.jobs.submit(service, parsed, owner, bool(self.api_keys)),
                                        status_code=202)
                answer = await service.submit(parsed, request, t0)
            finally:
                self.live -= 1
        except ApiError as e:
            return self._error(e, service)
        except RequestError as e:
            return self._error(ApiError(getattr(e, "status", 422), str(e)), service)
        except ClientGone:
            return self._error(ApiError(499, "the client disconnected"), service)
        except Exception:  # noqa: BLE001 - never a bare 500 with a traceback for the client
            log.exception("request failed")
            return self._error(ApiError(500, "internal error (details in the server log)"), service)
        return JSONResponse(self._format(service, parsed, answer))

    def _parse(self, endpoint: str, content_type: str, body: bytes):
        """In the parse pool: the model, then its caps, parsing, validation, decoding and LoRAs."""
        service = self.model(peek_model(endpoint, content_type, body))
        parse, limit = service.parser(endpoint, content_type)
        if len(body) > limit:
            raise ApiError(413, f"request body of {len(body)} bytes; the limit of model {service.name} is {limit}")
        return service, service.with_loras(parse(body))

    def _jobs(self):
        if self.jobs is None and self.jobs_off:
            raise ApiError(501, self.jobs_off)
        if self.jobs is None:
            raise ApiError(404, "background jobs are off on this server (start it with --jobs-dir)")
        return self.jobs

    def _job(self, request: Request, job_id: str):
        owner = self._owner(request)
        jobs = self._jobs()
        row = jobs.store.get(job_id, owner)
        if row is None:
            raise ApiError(404, f"no job {job_id[:80]!r} (unknown, removed, or made with another API key)")
        return jobs, row

    def _auth(self, request: Request) -> str | None:
        """-> the key given (None without authentication); 401 for a missing or wrong one."""
        if not self.api_keys:
            return None
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        given = token.encode("utf-8", "surrogateescape")
        match = [k for k in self.api_keys if secrets.compare_digest(given, k.encode())]
        if not match:
            raise ApiError(401, "missing or wrong API key (send `Authorization: Bearer KEY`)")
        return match[0]

    def _owner(self, request: Request) -> str:
        return key_owner(self._auth(request))

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

        timeout = max(s.limits.body_timeout_s for s in self.services.values())
        try:
            await asyncio.wait_for(read(), timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"request body not received within {timeout:g} s") from None
        return b"".join(chunks)

    def _format(self, service: Service, parsed, answer: dict) -> dict:
        if parsed.openai:
            return {"created": int(time.time()), "model": service.name,
                    "data": [{"b64_json": b, "seed": s} for b, s in zip(answer["images"], answer["seeds"])],
                    "size": f"{answer['width']}x{answer['height']}", "output_format": parsed.output_format.lower()}
        return {"images": answer["images"], "seed": answer["seeds"][0], "width": answer["width"],
                "height": answer["height"], "timings": answer["timings"], "batch_size": answer["batch_size"],
                "model": service.name, **service.tag}

    def _error(self, e: ApiError, service: Service | None = None) -> JSONResponse:
        self.metrics.errors.labels(service.name if service is not None else "", e.kind).inc()
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else (
            {"Retry-After": "1"} if e.status in (429, 503) else None)
        return JSONResponse(e.body(self.hidden), status_code=e.status, headers=headers)
