"""HTTP server (FastAPI): the gateway's routes (gateway.py) over one or more models. `GET /openapi.json`
describes them, request bodies included (openapi.py)."""

from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import ApiError
from .gateway import Gateway
from .openapi import BODIES
from .schema import ServeLimits
from .service import Metrics, Service

log = logging.getLogger("zimage_deploy.serve")


def create_app(runtime, limits: ServeLimits | dict | None = None, max_queue: int = 64, max_batch: int = 4,
               batch_wait_ms: float = 10, timeout_s: float = 120.0, *, api_key: str | None = None,
               shutdown_timeout_s: float = 10.0, service: Service | None = None, default: str | None = None,
               jobs=None, services: list[Service] | None = None, residency=None) -> FastAPI:
    """The app for one runtime, or a {name: runtime} dict (`limits` then a {name: ServeLimits} dict), or given
    `services`; `app.state.service` is the default model's Service, `app.state.gateway` the Gateway (see
    service.py and gateway.py for the parameters)."""
    if services is None and service is not None:
        services = [service]
    if services is None:
        runtimes = runtime if isinstance(runtime, dict) else {None: runtime}
        metrics = Metrics()
        services = [Service(rt, (limits or {}).get(name) if isinstance(limits, dict) else limits,
                            max_queue=max_queue, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                            timeout_s=timeout_s, shutdown_timeout_s=shutdown_timeout_s, name=name, metrics=metrics)
                    for name, rt in runtimes.items()]
    gateway = Gateway(services, default, api_keys=(api_key,) if api_key else (), jobs=jobs, residency=residency)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        gateway.start()
        yield
        await gateway.stop()

    app = FastAPI(title="zimage-deploy", lifespan=lifespan)
    app.state.gateway = gateway
    app.state.service = gateway.service
    for (method, path), name in Gateway.ROUTES.items():
        app.add_api_route(path, getattr(gateway, name), methods=[method], openapi_extra=BODIES.get((method, path)),
                          include_in_schema=path != "/")
    for method, name in Gateway.JOB_ROUTES.items():
        app.add_api_route("/v1/jobs/{job_id}", getattr(gateway, name), methods=[method])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # 404, 405, ... in the one JSON shape
        return gateway._error(ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return gateway._error(ApiError(422, "invalid request"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):  # never a bare 500 with a traceback
        log.exception("unhandled error")
        return gateway._error(ApiError(500, "internal error (details in the server log)"))

    return app
