"""HTTP server (FastAPI): `POST /v1/generate`, the OpenAI Images API (`POST /v1/images/generations`,
`POST /v1/images/edits`), `GET /health` (alive), `GET /ready` (loaded, verified, not shutting down) and
`GET /metrics` (Prometheus). The behaviour is service.py's, shared with the Ray Serve app."""

from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import ApiError
from .schema import ServeLimits
from .service import Service

log = logging.getLogger("zimage_deploy.serve")


def create_app(runtime, limits: ServeLimits | None = None, max_queue: int = 64, max_batch: int = 4,
               batch_wait_ms: float = 10, timeout_s: float = 120.0, *, api_key: str | None = None,
               shutdown_timeout_s: float = 10.0, service: Service | None = None) -> FastAPI:
    """The app for one runtime; `app.state.service` is its Service (see service.py for the parameters)."""
    service = service or Service(runtime, limits, max_queue=max_queue, max_batch=max_batch,
                                 batch_wait_ms=batch_wait_ms, timeout_s=timeout_s, api_key=api_key,
                                 shutdown_timeout_s=shutdown_timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start()
        yield
        await service.stop()

    app = FastAPI(title="zimage-deploy", lifespan=lifespan)
    app.state.service = service
    app.add_api_route("/health", service.health, methods=["GET"])
    app.add_api_route("/ready", service.ready, methods=["GET"])
    app.add_api_route("/metrics", service.prometheus, methods=["GET"])
    app.add_api_route("/v1/generate", service.generate, methods=["POST"])
    app.add_api_route("/v1/images/generations", service.images_generations, methods=["POST"])
    app.add_api_route("/v1/images/edits", service.images_edits, methods=["POST"])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # 404, 405, ... in the one JSON shape
        return service._error(ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return service._error(ApiError(422, "invalid request"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):  # never a bare 500 with a traceback
        log.exception("unhandled error")
        return service._error(ApiError(500, "internal error (details in the server log)"))

    return app
