"""Helpers for the serving tests: an in-process uvicorn server on a free loopback port, a runtime spy."""

import base64
import io
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """`with ServerThread(app) as url:` uvicorn in a thread (lifespan included), stopped on exit."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="critical",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


class Served:
    """A server over a spy of `runtime` (RuntimeSpy or a subclass) with its own create_app options; `url`,
    `spy`, `app`, `service`. On exit the spy's gates open once the server has stopped."""

    def __init__(self, runtime, limits=None, spy=None, **options):
        from zimage_deploy.serve.app import create_app

        self.spy = (spy or RuntimeSpy)(runtime)
        self.app = create_app(self.spy, limits, **options)
        self.service = self.app.state.service
        self.thread = ServerThread(self.app)

    def __enter__(self):
        self.url = self.thread.__enter__()
        return self

    def __exit__(self, *exc):
        self.thread.__exit__(*exc)
        self.spy.gate.set()
        if hasattr(self.spy, "release"):
            self.spy.release.set()


class RuntimeSpy:
    """The runtime, with a record of every runtime call: its pixel cost, images, outcome and how many times
    it asked whether to stop (once per denoising step, once before decoding)."""

    def __init__(self, runtime):
        self.runtime, self.calls = runtime, []
        self.gate = threading.Event()  # runs wait for it: clear it to hold the runtime busy
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def run(self, req, cancel=None, **kwargs):
        mask = kwargs.get("mask")
        call = {"pixels": req.pixels, "images": req.batch, "steps": req.steps, "checks": 0, "outcome": None,
                "mask": None if mask is None else mask.convert("L").getextrema()}
        self.calls.append(call)

        def counted():
            call["checks"] += 1
            return cancel()

        try:
            assert self.gate.wait(timeout=60), "the test never opened the gate"
            result = self.runtime.run(req, cancel=counted, **kwargs)
        except BaseException as e:
            call["outcome"] = type(e).__name__
            raise
        call["outcome"] = "done"
        return result


def png_bytes(image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def decode(b64_text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_text))).convert("RGB")).astype(int)


def wait_for(predicate, timeout=30.0, every=0.02):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "condition not reached in time"
        time.sleep(every)


def start_server(args, module="zimage_deploy.serve", env=None, timeout=120):
    """`python -m module --port P *args` in a subprocess, until its /ready answers 200 -> (process, url)."""
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", module, "--port", str(port), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"

    def up():
        assert proc.poll() is None, proc.communicate()
        try:
            return httpx.get(f"{url}/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=timeout, every=0.2)
    return proc, url
