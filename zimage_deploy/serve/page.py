"""`GET /`: a page to try the server (page.html: plain HTML, CSS and JavaScript, no build step, nothing
fetched from elsewhere). It reads /v1/models, posts to /v1/generate (or /v1/jobs), lists /v1/jobs."""

from __future__ import annotations

import functools
from importlib import resources


@functools.lru_cache(maxsize=1)
def page_html() -> str:
    return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
