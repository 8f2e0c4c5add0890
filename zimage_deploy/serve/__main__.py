"""`python -m zimage_deploy.serve --engine-dir DIR --host H --port P`: the HTTP server on one runtime.

The build is loaded and verified against its manifest, and one small warm-up image is generated, before the
server listens: a broken build stops it with one `error:` line and exit code 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..cli import add_build_dir, run_cli
from ..errors import UserError
from ..runtime.backends import BACKENDS
from ..variants import is_omni

API_KEY_ENV = "ZIMAGE_API_KEY"
# The event loop shares the GIL with the runtime and parsing threads: a shorter switch interval than Python's
# 5 ms lets it answer 429s, /health and /ready promptly while they work (p99 of 429s about halved under load).
SWITCH_INTERVAL_S = 0.001


def add_limit_options(ap: argparse.ArgumentParser) -> None:
    """Options shared with the Ray Serve app."""
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds a request may take from arrival to answer; 504 after, and its work stops "
                         "(default: 120)")
    ap.add_argument("--max-steps", type=int, default=None, help="largest steps accepted (default: 100)")
    ap.add_argument("--max-side", type=int, default=None,
                    help="largest height/width accepted, within the build's range (default: the build's)")
    ap.add_argument("--max-prompt-chars", type=int, default=None, help="prompt length limit (default: 10000)")
    ap.add_argument("--max-batch-pixels", type=int, default=None,
                    help="pixel budget of one runtime call, and of one request: images out x output pixels "
                         "(+ Edit condition images) (default: one maximum-size image; Edit: plus its "
                         "maximum-size condition images)")
    ap.add_argument("--max-image-bytes", type=int, default=None,
                    help="largest input image file (default: from the build's largest side, at most 16 MiB)")
    ap.add_argument("--max-body-bytes", type=int, default=None,
                    help="largest request body (default: the input images in base64 plus 1 MiB)")
    ap.add_argument("--lora-dir", type=Path, default=None,
                    help="a folder of .safetensors LoRAs that requests may name in their `loras` field (names only, "
                         "never paths; unquantized builds; default: none, the field is refused)")
    ap.add_argument("--max-lora-sets", type=int, default=2,
                    help="LoRA combinations kept prepared at once (each holds its adapted weights; default: 2)")
    ap.add_argument("--api-key", default=None,
                    help=f"require `Authorization: Bearer KEY` (default: the {API_KEY_ENV} environment variable; "
                         "none: no authentication)")


def serve_limits(runtime, args):
    from .schema import ServeLimits

    for name in ("max_steps", "max_side", "max_prompt_chars", "max_batch_pixels", "max_image_bytes",
                 "max_body_bytes"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.timeout <= 0:
        raise UserError(f"--timeout must be > 0, got {args.timeout}")
    if getattr(args, "lora_dir", None) is not None:
        if not Path(args.lora_dir).is_dir():
            raise UserError(f"--lora-dir {args.lora_dir}: no such folder")
        if getattr(args, "max_lora_sets", 2) < 1:
            raise UserError("--max-lora-sets must be >= 1")
        runtime.loras.configure(max_sets=args.max_lora_sets)
    return ServeLimits.for_build(runtime.limits, max_batch_pixels=args.max_batch_pixels,
                                 max_image_bytes=args.max_image_bytes, max_body_bytes=args.max_body_bytes,
                                 max_steps=args.max_steps, max_side=args.max_side,
                                 max_prompt_chars=args.max_prompt_chars)


def load_runtime(engine_dir: Path, backend: str):
    """Load, verify and warm up (one smallest image, 1 step): any failure is a broken build (UserError)."""
    from ..errors import InternalError, RequestError
    from ..runtime.api import ZImageRuntime

    runtime = ZImageRuntime(engine_dir, backend=backend)
    lim = runtime.limits
    h, w = lim.static or (lim.min_side, lim.min_side)
    try:
        if is_omni(runtime.variant):
            from PIL import Image

            side = max(64, lim.min_side)
            runtime.generate("warm-up", seed=0, steps=1, height=h, width=w,
                             images=[Image.new("RGB", (side, side), (128, 128, 128))])
        else:
            runtime.generate("warm-up", seed=0, steps=1, height=h, width=w)
    except (InternalError, RequestError) as e:
        raise UserError(f"{engine_dir}: the warm-up generation failed ({e}): the build is broken; rebuild it") \
            from None
    return runtime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zimage_deploy.serve", description=__doc__.split("\n")[0])
    add_build_dir(ap)
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    ap.add_argument("--backend", default="auto", choices=BACKENDS, help="default: auto")
    ap.add_argument("--max-queue", type=int, default=64,
                    help="live requests (being read, waiting or running) before answering 429 (default: 64)")
    ap.add_argument("--max-batch", type=int, default=4,
                    help="text-to-image images per runtime call, within the build's profile (default: 4)")
    ap.add_argument("--batch-wait-ms", type=float, default=10.0,
                    help="how long to wait for batch companions (default: 10)")
    ap.add_argument("--shutdown-timeout", type=float, default=10.0,
                    help="on SIGTERM/SIGINT, seconds work in progress may finish before it is cancelled "
                         "(default: 10)")
    add_limit_options(ap)
    args = ap.parse_args(argv)
    if args.max_queue < 1 or args.max_batch < 1 or args.batch_wait_ms < 0 or args.shutdown_timeout < 0:
        raise UserError("--max-queue and --max-batch must be >= 1, --batch-wait-ms and --shutdown-timeout >= 0")

    import uvicorn

    from .app import create_app
    from .service import Service

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    runtime = load_runtime(args.build_dir, args.backend)
    limits = serve_limits(runtime, args)
    service = Service(runtime, limits, max_queue=args.max_queue, max_batch=args.max_batch,
                      batch_wait_ms=args.batch_wait_ms, timeout_s=args.timeout,
                      api_key=args.api_key or os.environ.get(API_KEY_ENV), shutdown_timeout_s=args.shutdown_timeout,
                      lora_dir=args.lora_dir)
    app = create_app(runtime, service=service)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # the drain starts now, bounded by --shutdown-timeout
            service.begin_shutdown()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.shutdown_timeout + 5)
    print(f"serving {args.build_dir} ({runtime.variant}, backend {runtime.backend}) on "
          f"http://{args.host}:{args.port}  {limits.request.sizes_text()}, batch budget "
          f"{limits.max_batch_pixels} px{', API key required' if service.api_key else ''}", flush=True)
    Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
