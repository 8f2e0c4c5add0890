"""Scale-out on Ray Serve: one runtime replica per GPU (per CPU slot for CPU builds), Ray's autoscaling and
queueing in front. Each replica runs the HTTP server's code (gateway.py and service.py: the same validation,
limits, batching, cancellation and answers, plus `replica` in /v1/generate and /health answers). Several
builds: one application, a deployment per model behind one ingress (`ZImageIngress`: routing by `model`).

    python -m zimage_deploy.serve.ray_app --engine-dir DIR --replicas 2 --port 8000
    python -m zimage_deploy.serve.ray_app --engine-dir DIR --autoscale 1:8 --address auto   # existing cluster
    python -m zimage_deploy.serve.ray_app --build-dir turbo=DIR1 --build-dir base=DIR2

Every replica loads the build from DIR, so DIR must be readable at the same path on every node.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
from pathlib import Path

from ray import serve
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from ..cli import run_cli
from ..errors import UserError
from .__main__ import (API_KEY_ENV, SWITCH_INTERVAL_S, add_limit_options, add_models_options, build_specs,
                       load_runtime, parse_sizes, serve_limits)
from .errors import ApiError
from .gateway import Gateway
from .schema import peek_model
from .service import Service


# Background jobs need one owner of their SQLite database and results folder, and their turns follow the
# interactive work of every model of one process (service.py); Ray's replicas share neither.
NO_JOBS = ("background jobs (/v1/jobs) are not served by the Ray Serve app: run them on `python -m "
           "zimage_deploy.serve --jobs-dir DIR`, or queue interactive requests from your own job runner")


class ZImageReplica:
    """One replica: one runtime and one Service, the HTTP server's code (limits, validation, batching,
    cancellation, answers); Ray routes and queues requests in front. A client that disconnects makes Ray cancel
    its request, which stops its work between denoising steps."""

    def __init__(self, engine_dir: str, backend: str = "auto", options: dict | None = None):
        options = dict(options or {})
        sys.setswitchinterval(SWITCH_INTERVAL_S)  # this process serves one replica
        self.runtime = load_runtime(Path(engine_dir), backend, options.pop("torch_mode", None),
                                    options.pop("warmup_sizes", ()), options.pop("offload", "auto"))
        limits = serve_limits(self.runtime, argparse.Namespace(**{**_LIMIT_DEFAULTS, **options.pop("limits", {})}))
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.service = Service(self.runtime, limits, watch_disconnect=False, tag={"replica": self.replica},
                               **options)
        self.gateway = Gateway([self.service], tag={"replica": self.replica}, jobs_off=NO_JOBS)

    async def __call__(self, request: Request):
        return await self.gateway.dispatch(request)

    async def forward(self, method: str, path: str, headers: list, body: bytes) -> tuple[int, list, bytes]:
        """A request the ingress read (several models behind one ingress) -> (status, headers, body)."""
        response = await self.gateway.dispatch(forwarded_request(method, path, headers, body), path)
        return response.status_code, [(k, v) for k, v in response.headers.items() if k != "content-length"], \
            bytes(response.body)

    def info(self) -> dict:
        """What the ingress needs to route: the name, variant and body cap."""
        return {"name": self.service.name, "variant": self.runtime.variant,
                "max_body_bytes": self.service.limits.max_body_bytes,
                "body_timeout_s": self.service.limits.body_timeout_s}

    def __del__(self):  # Ray calls it when the replica shuts down: stop the work in progress between steps
        service = getattr(self, "service", None)
        for job in list(service.pending) + list(service.running) if service is not None else []:
            job.cancel.set()


def forwarded_request(method: str, path: str, headers: list, body: bytes) -> Request:
    """A Starlette request over a body already read (the replica never waits for a disconnect: Ray cancels)."""
    sent = []

    async def receive():
        if not sent:
            sent.append(True)
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(bytes(k), bytes(v)) for k, v in headers], "http_version": "1.1", "scheme": "http",
             "server": ("ray", 0), "client": None, "root_path": ""}
    return Request(scope, receive)


class ZImageIngress:
    """Several models behind one ingress: it reads the body (under the largest model's cap), picks the model
    from the `model` field (gateway.py's rules: a name or z-image-<variant>, unknown: 404, absent: the default)
    and forwards the request to that model's deployment, whose replicas run the HTTP server's code. Lists,
    health, readiness and metrics gather every model's; `GET /` is the page."""

    def __init__(self, default: str, **handles):
        self.handles, self.default = handles, default
        self.infos: dict | None = None

    async def _infos(self) -> dict:
        if self.infos is None:
            self.infos = {n: await h.info.remote() for n, h in self.handles.items()}
        return self.infos

    async def _forward(self, name: str, request: Request, path: str, body: bytes = b"") -> Response:
        status, headers, content = await self.handles[name].forward.remote(
            request.method, path, [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()],
            body)
        return Response(content, status_code=status, headers=dict(headers))

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/") or "/"
        if path == "/v1/jobs" or path.startswith("/v1/jobs/"):
            return JSONResponse(ApiError(501, NO_JOBS).body(), status_code=501)
        if request.method == "GET" and path == "/":
            from .page import page_html

            return HTMLResponse(page_html())
        if request.method == "GET" and path in ("/v1/models", "/health", "/ready", "/metrics"):
            return await self._gather(request, path)
        if request.method == "POST" and path in ENDPOINTS:
            infos = await self._infos()
            try:
                body = await read_capped(request, max(i["max_body_bytes"] for i in infos.values()))
                name = pick_model(infos, self.default, peek_model(ENDPOINTS[path], request.headers.get(
                    "content-type"), body))
            except ApiError as e:
                return JSONResponse(e.body(), status_code=e.status)
            return await self._forward(name, request, path, body)
        return await self._forward(self.default, request, path)

    async def _gather(self, request: Request, path: str) -> Response:
        answers = {n: await self._forward(n, request, path) for n in self.handles}
        bad = [a for a in answers.values() if a.status_code == 401]
        if bad:
            return bad[0]
        if path == "/metrics":
            return Response(b"".join(a.body for a in answers.values()), media_type=answers[self.default].media_type)
        bodies = {n: json.loads(a.body) for n, a in answers.items()}
        if path == "/v1/models":
            data = [{**m, "default": n == self.default} for n, b in bodies.items() for m in b["data"]]
            return JSONResponse({"object": "list", "data": data})
        ok = all(a.status_code == 200 for a in answers.values())
        return JSONResponse({**bodies[self.default], "default_model": self.default, "models": bodies},
                            status_code=200 if ok else 503)


ENDPOINTS = {"/v1/generate": "generate", "/v1/images/generations": "generations", "/v1/images/edits": "edits",
             "/v1/jobs": "generate"}


def pick_model(infos: dict, default: str, name) -> str:
    """The model a request names (gateway.py's rules)."""
    if name is None:
        return default
    if not isinstance(name, str) or len(name) > 200:
        raise ApiError(422, "model must be a model name (GET /v1/models lists them)", param="model")
    variants = [i["variant"] for i in infos.values()]
    aliases = {f"z-image-{i['variant']}": n for n, i in infos.items() if variants.count(i["variant"]) == 1}
    aliases.update({n: n for n in infos})
    found = aliases.get(name, aliases.get(name.strip().lower()))
    if found is None:
        raise ApiError(404, f"model {name[:60]!r} is not served here; models: {', '.join(infos)}",
                       kind="unknown_model", param="model")
    return found


async def read_capped(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {int(declared)} bytes; the limit is {limit}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"request body above the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def application(builds: dict, default: str | None = None, backend: str = "auto", replicas: int = 1,
                gpus_per_replica: float | None = None, max_ongoing_requests: int = 8, max_queued_requests: int = 64,
                service: dict | None = None, limits: dict | None = None, shutdown_timeout_s: float = 10.0):
    """One application: a deployment per model ({name: build folder}) behind one ingress (`service`, `limits`:
    as for `deployment`, for every model)."""
    handles = {}
    for name, folder in builds.items():
        options = _options(folder, replicas, None, gpus_per_replica, max_ongoing_requests, max_queued_requests,
                           shutdown_timeout_s)
        per_replica = {"max_queue": max_ongoing_requests, **(service or {}), "limits": dict(limits or {}),
                       "name": name}
        handles[name] = serve.deployment(ZImageReplica, name=f"zimage-{name}", **options).bind(
            str(Path(folder).resolve()), backend, per_replica)
    ingress = serve.deployment(ZImageIngress, name="zimage-ingress", num_replicas=1,
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=max_queued_requests * 4,
                               graceful_shutdown_timeout_s=shutdown_timeout_s + 1)
    return ingress.bind(default or next(iter(builds)), **handles)


_LIMIT_DEFAULTS = dict(timeout=120.0, max_steps=None, max_side=None, max_prompt_chars=None, max_batch_pixels=None,
                       max_image_bytes=None, max_body_bytes=None, lora_dir=None, max_lora_sets=2)


def deployment(engine_dir: str, replicas: int = 1, autoscale: tuple[int, int] | None = None,
               gpus_per_replica: float | None = None, backend: str = "auto", max_ongoing_requests: int = 8,
               max_queued_requests: int = 64, service: dict | None = None, limits: dict | None = None,
               shutdown_timeout_s: float = 10.0):
    """The bound Ray Serve application. GPU builds (engines present) take one GPU per replica by default.
    `service`: Service options per replica (max_batch, batch_wait_ms, timeout_s, api_key, ...); `limits`: the
    server's limit options (max_batch_pixels, max_side, ...). Ray answers 503 beyond `max_queued_requests`."""
    options = _options(engine_dir, replicas, autoscale, gpus_per_replica, max_ongoing_requests, max_queued_requests,
                       shutdown_timeout_s)
    per_replica = {"max_queue": max_ongoing_requests, **(service or {}), "limits": dict(limits or {})}
    return serve.deployment(ZImageReplica, name="zimage", **options).bind(str(Path(engine_dir).resolve()), backend,
                                                                          per_replica)


def _options(engine_dir, replicas, autoscale, gpus_per_replica, max_ongoing_requests, max_queued_requests,
             shutdown_timeout_s) -> dict:
    from .. import manifest as manifest_io

    manifest = manifest_io.load(Path(engine_dir))
    gpus = gpus_per_replica if gpus_per_replica is not None else (1.0 if manifest.has_engines else 0.0)
    options = dict(ray_actor_options={"num_gpus": gpus, "num_cpus": 0 if gpus else 1},
                   max_ongoing_requests=max_ongoing_requests, max_queued_requests=max_queued_requests,
                   graceful_shutdown_timeout_s=shutdown_timeout_s, graceful_shutdown_wait_loop_s=0.5)
    if autoscale:
        options["autoscaling_config"] = {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                         "target_ongoing_requests": 2, "upscale_delay_s": 5,
                                         "downscale_delay_s": 60}
    else:
        options["num_replicas"] = replicas
    return options


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zimage_deploy.serve.ray_app", description=__doc__.split("\n")[0])
    add_models_options(ap)
    ap.add_argument("--replicas", type=int, default=1, help="default: 1")
    ap.add_argument("--autoscale", default=None, metavar="MIN:MAX", help="autoscaling replica range instead")
    ap.add_argument("--gpus-per-replica", type=float, default=None, help="default: 1 for engine builds, else 0")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    ap.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="default: 8000")
    ap.add_argument("--max-ongoing", type=int, default=8, help="requests per replica at once (default: 8)")
    ap.add_argument("--max-queued", type=int, default=64, help="requests Ray queues before 503 (default: 64)")
    ap.add_argument("--max-batch", type=int, default=4, help="text-to-image images per runtime call (default: 4)")
    ap.add_argument("--shutdown-timeout", type=float, default=10.0,
                    help="on SIGTERM/SIGINT, seconds requests in progress may finish before they are cancelled "
                         "(default: 10)")
    add_limit_options(ap)
    args = ap.parse_args(argv)
    import ray

    try:
        autoscale = tuple(int(x) for x in args.autoscale.split(":")) if args.autoscale else None
    except ValueError:
        raise UserError(f"--autoscale must be MIN:MAX, got {args.autoscale!r}") from None
    limits = {k: getattr(args, k) for k in _LIMIT_DEFAULTS}
    service = dict(max_batch=args.max_batch, timeout_s=args.timeout,
                   api_key=args.api_key or os.environ.get(API_KEY_ENV),
                   lora_dir=str(args.lora_dir.resolve()) if args.lora_dir else None)
    limits["max_lora_sets"] = args.max_lora_sets
    limits["lora_dir"] = service["lora_dir"]
    specs = build_specs(args.build_dirs)
    service["torch_mode"], service["warmup_sizes"] = args.torch_mode, parse_sizes(args.warmup_sizes)
    service["offload"] = args.offload
    if len(specs) == 1 and specs[0][0] is None:
        app = deployment(str(specs[0][1]), args.replicas, autoscale, args.gpus_per_replica, args.backend,
                         args.max_ongoing, args.max_queued, service, limits, args.shutdown_timeout)
    else:
        from .. import manifest as manifest_io

        builds = {}
        for name, folder in specs:
            name = name or manifest_io.load(folder).variant
            if name in builds:
                raise UserError(f"two builds named {name!r}: name them (--build-dir NAME=DIR)")
            builds[name] = folder
        if args.default_model is not None and args.default_model not in builds:
            raise UserError(f"--default-model {args.default_model}: not among {', '.join(builds)}")
        app = application(builds, args.default_model, args.backend, args.replicas, args.gpus_per_replica,
                          args.max_ongoing, args.max_queued, service, limits, args.shutdown_timeout)
    stop = threading.Event()
    ray.init(address=args.address, include_dashboard=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, route_prefix="/")
        # after ray.init, whose handlers abort the driver (SIGABRT, exit 134) on SIGTERM
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: stop.set())
        print(f"Ray Serve: {', '.join(str(f) for _, f in specs)} on http://{args.host}:{args.port}/ (SIGTERM or "
              "Ctrl-C stops)", flush=True)
        while not stop.wait(0.5):
            pass
        print(f"stopping: requests in progress get up to {args.shutdown_timeout:g} s", flush=True)
        serve.shutdown()  # the proxy stops taking requests; replicas drain, then are stopped
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
