"""`GET /`, the page to try the server, in headless Chromium (Debian's `chromium`; scripts/setup.sh installs it),
driven over the Chrome DevTools Protocol: it loads and lists the models, a generation from the page shows an
image with its timing, a bad value shows the server's own error, and a background job appears in the list."""

import itertools
import json
import shutil
import subprocess
import time

import httpx
import pytest

from conftest import in_ci
from conftest import synthetic_image
from serve_util import RuntimeSpy, ServerThread, png_bytes, wait_for
from zimage_deploy import ZImageRuntime
from zimage_deploy.serve.app import create_app
from zimage_deploy.serve.jobs import Jobs, JobStore


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if path is None:
        if in_ci():
            pytest.fail("chromium is not installed (scripts/setup.sh installs it as root)")
        pytest.skip("no chromium on PATH (scripts/setup.sh installs it as root; CI fails instead)")
    return path


class Browser:
    """One headless Chromium page, driven with Runtime.evaluate over the DevTools websocket."""

    def __init__(self, url, folder):
        from websockets.sync.client import connect

        log = folder / "chromium.log"
        self.proc = subprocess.Popen([chromium(), "--headless=new", "--no-sandbox", "--disable-gpu",
                                      "--no-first-run", "--remote-debugging-port=0",
                                      f"--user-data-dir={folder / 'profile'}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=log.open("w"))
        wait_for(lambda: "DevTools listening on" in log.read_text() or self.proc.poll() is not None, timeout=60)
        assert self.proc.poll() is None, log.read_text()
        port = log.read_text().split("DevTools listening on ws://127.0.0.1:")[1].split("/")[0]
        page = next(t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page")
        self.connection = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.ws = self.connection.__enter__()
        self.ids = itertools.count(1)
        self.send("Page.navigate", url=url)
        self.wait("document.readyState === 'complete' && document.getElementById('generate') !== null")

    def send(self, method, **params):
        n = next(self.ids)
        self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == n:
                assert "error" not in message, message
                return message["result"]

    def eval(self, expression):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait(self, expression, timeout=60):
        deadline = time.time() + timeout
        while not self.eval(expression):
            assert time.time() < deadline, f"never true: {expression}"
            time.sleep(0.1)

    def fill(self, **values):
        for name, value in values.items():
            self.eval(f"document.getElementById({name!r}).value = {json.dumps(str(value))}")

    def close(self):
        self.connection.__exit__(None, None, None)
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def page(tiny_fp32, tmp_path_factory):
    chromium()
    folder = tmp_path_factory.mktemp("page")
    spy = RuntimeSpy(ZImageRuntime(tiny_fp32))
    app = create_app(spy, batch_wait_ms=0, jobs=Jobs(JobStore(folder / "jobs")))
    with ServerThread(app) as url:
        browser = Browser(url + "/", folder)
        try:
            yield browser, url, spy, folder
        finally:
            browser.close()


def test_page_is_self_contained(page):
    _, url, *_ = page
    html = httpx.get(url + "/").text
    assert "<script>" in html and "http://" not in html and "https://" not in html  # nothing fetched elsewhere


def test_page_generates_an_image(page):
    browser, *_ = page
    assert browser.eval("[...document.getElementById('model').options].map(o => o.value)") == ["turbo"]
    assert browser.eval("document.getElementById('width').value") == "512"  # the model's largest side here
    browser.fill(prompt="一只猫 a cat", width=64, height=64, steps=2, seed=3)
    browser.eval("document.getElementById('generate').click()")
    browser.wait("document.querySelector('#images img') !== null")
    assert browser.eval("document.querySelector('#images img').src").startswith("data:image/png;base64,")
    assert browser.eval("document.querySelector('#images img').naturalWidth") == 64
    timing = browser.eval("document.getElementById('timing').textContent")
    assert "64x64, seed 3" in timing and "denoise" in timing
    assert browser.eval("document.getElementById('error').textContent") == ""


def test_page_shows_the_servers_error(page):
    browser, *_ = page
    browser.fill(prompt="a cat", width=100, height=64, steps=1)
    browser.eval("document.getElementById('generate').click()")
    browser.wait("document.getElementById('error').textContent !== ''")
    assert "multiple of 16" in browser.eval("document.getElementById('error').textContent")


def test_page_runs_a_background_job(page):
    browser, *_ = page
    browser.fill(prompt="a job", width=64, height=64, steps=1, seed="")
    browser.eval("document.getElementById('submit-job').click()")
    browser.wait("[...document.querySelectorAll('#jobs tr')].some(r => r.dataset.state === 'done')")
    browser.eval("[...document.querySelectorAll('#jobs tr')].find(r => r.dataset.state === 'done')"
                 ".querySelector('button').click()")
    browser.wait("document.getElementById('timing').textContent.startsWith('turbo: 64x64')")


def test_page_inpaints_with_a_drawn_mask(page):
    """An uploaded image, a mask drawn on the canvas (white where painted, black elsewhere), strength."""
    browser, _, spy, folder = page
    picture = folder / "in.png"
    picture.write_bytes(png_bytes(synthetic_image(64, 64)))
    node = browser.send("Runtime.evaluate", expression="document.getElementById('image')")["result"]["objectId"]
    # DOM.setFileInputFiles fires the input's change event itself (a second one would load the image again and
    # clear the mask drawn meanwhile: the page clears the mask for a new image)
    browser.send("DOM.setFileInputFiles", files=[str(picture)], objectId=node)
    browser.wait("document.getElementById('mask-canvas').width === 64")
    browser.eval("""(() => { const c = document.getElementById('mask-canvas'), r = c.getBoundingClientRect();
        const at = (type, f) => c.dispatchEvent(new PointerEvent(type, {clientX: r.left + f * r.width,
                                                                        clientY: r.top + f * r.height}));
        at('pointerdown', 0.5); at('pointermove', 0.6); window.dispatchEvent(new PointerEvent('pointerup')); })()""")
    browser.fill(prompt="a window", width=64, height=64, steps=2, seed=1, strength=0.9)
    calls = len(spy.calls)
    browser.eval("document.getElementById('generate').click()")
    browser.wait("document.getElementById('timing').textContent.includes('x64, seed 1,')")
    assert browser.eval("document.getElementById('error').textContent") == ""
    assert len(spy.calls) == calls + 1 and spy.calls[-1]["mask"] == (0, 255)  # painted and unpainted parts
