"""Error answers of the HTTP server and the Ray Serve app: one JSON shape, no server paths."""

from __future__ import annotations

import re
from pathlib import Path

# OpenAI's error types by status, for clients of the Images API
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 408: "timeout", 413: "invalid_request_error", 415: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_exceeded", 499: "cancelled", 500: "server_error",
          501: "server_error", 503: "server_error", 504: "timeout"}
_KINDS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "bad_request", 408: "timeout",
          413: "too_large", 415: "bad_request", 422: "bad_request", 429: "overloaded", 499: "cancelled",
          500: "internal", 501: "not_implemented", 503: "unavailable", 504: "timeout"}
_PATH = re.compile(r"(?<![\w.:/>-])(?:~|\.{1,2})?/(?:[\w.@+-]+/)*[\w.@+-]+/?")


class ApiError(Exception):
    """An error answer: HTTP status and a message for the client (`kind` groups the metrics)."""

    def __init__(self, status: int, message: str, kind: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind or _KINDS.get(status,
                                                                                                 "bad_request"), param

    def body(self, hidden: tuple[str, ...] = ()) -> dict:
        """{"error": {"message", "type", "kind", "param", "code"}} (OpenAI's shape plus `kind`)."""
        return {"error": {"message": scrub(self.message, hidden), "type": _TYPES.get(self.status, "error"),
                          "kind": self.kind, "param": self.param, "code": self.status}}


def scrub(message: str, hidden: tuple[str, ...] = ()) -> str:
    """Remove file system paths: the given ones (e.g. the build folder) by name, any other absolute path."""
    for h in sorted((str(x) for x in hidden if str(x) not in ("", ".", "/")), key=len, reverse=True):
        message = message.replace(h, "<build>")
    return _PATH.sub(lambda m: m.group(0) if m.group(0).count("/") < 2 else "<path>", message)


def hidden_paths(engine_dir) -> tuple[str, ...]:
    p = Path(engine_dir)
    return (str(p.resolve()), str(p.absolute()), str(p))
