"""`python -m zimage_deploy.serve --engine-dir DIR --host H --port P`: the HTTP server on one runtime."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import run_cli
from ..runtime.backends import BACKENDS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zimage_deploy.serve", description=__doc__.split("\n")[0])
    ap.add_argument("--engine-dir", type=Path, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--backend", default="auto", choices=BACKENDS)
    ap.add_argument("--max-queue", type=int, default=64, help="requests waiting before answering 429")
    ap.add_argument("--max-batch", type=int, default=4, help="compatible text-to-image requests per runtime call")
    ap.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long to wait for batch companions")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds a request may wait and run (504 after)")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--max-side", type=int, default=None, help="largest height/width accepted")
    ap.add_argument("--max-prompt-chars", type=int, default=None)
    ap.add_argument("--max-image-bytes", type=int, default=None)
    args = ap.parse_args(argv)

    import uvicorn

    from ..runtime.api import ZImageRuntime
    from .app import create_app
    from .schema import Limits

    runtime = ZImageRuntime(args.engine_dir, backend=args.backend)
    limits = Limits.for_build(runtime.manifest, max_steps=args.max_steps, max_side=args.max_side,
                              max_prompt_chars=args.max_prompt_chars, max_image_bytes=args.max_image_bytes)
    app = create_app(runtime, limits, args.max_queue, args.max_batch, args.batch_wait_ms, args.timeout)
    print(f"serving {args.engine_dir} ({runtime.variant}, backend {runtime.backend}) on "
          f"http://{args.host}:{args.port}  sides {limits.min_side}..{limits.max_side}")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
