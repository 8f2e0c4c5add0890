"""`python -m zimage_deploy.serve --build-dir [NAME=]DIR ... --host H --port P`: the HTTP server on one or more
builds (models).

Each build is loaded and verified against its manifest, and warm-up images are generated, before the server
listens: a broken build stops it with one `error:` line and exit code 2."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import signal
import sys
from pathlib import Path

from ..cli import BUILT, run_cli
from ..errors import UserError
from ..runtime.api import TORCH_MODES
from ..runtime.backends import BACKENDS, add_providers_flag
from ..runtime.offload import OFFLOAD_CHOICES

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
                         "never paths; default: none, the field is refused)")
    ap.add_argument("--max-lora-sets", type=int, default=2,
                    help="LoRA combinations kept prepared at once (each holds its adapted weights; default: 2)")
    ap.add_argument("--api-key", default=None,
                    help=f"require `Authorization: Bearer KEY`; several keys comma-separated, each with its own "
                         f"background jobs (default: the {API_KEY_ENV} environment variable; none: no "
                         "authentication)")


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


NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def add_models_options(ap: argparse.ArgumentParser) -> None:
    """The builds served (shared with the Ray Serve app)."""
    ap.add_argument("--build-dir", "--engine-dir", dest="build_dirs", action="append", required=True,
                    metavar="[NAME=]DIR",
                    help=f"{BUILT}; repeat it to serve several models, each named by NAME (default: the build's "
                         "variant: turbo, base, edit); requests pick one with their `model` field "
                         "(--engine-dir: the same)")
    ap.add_argument("--default-model", default=None,
                    help="the model of requests without a `model` field (default: the first --build-dir)")
    ap.add_argument("--backend", default="auto", choices=BACKENDS, help="default: auto")
    ap.add_argument("--torch-mode", default=None, choices=TORCH_MODES,
                    help="the Torch backend's execution: compiled (default on CUDA) or eager (default on the CPU)")
    ap.add_argument("--offload", default="auto", choices=OFFLOAD_CHOICES,
                    help="the memory mode, as generate --offload (default: auto, the build's VRAM plan's)")
    add_providers_flag(ap)
    ap.add_argument("--warmup-sizes", default=None, metavar="WxH[,WxH...]",
                    help="sizes (width x height) to generate once at start, before /ready (default: the smallest)")


def add_residency_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--max-resident", type=int, default=None, metavar="N",
                    help="models whose runtime stays loaded at once; the others are swapped in on demand, the least "
                         "recently used idle one released (default: the VRAM plan of the set decides: all when "
                         "they fit the card together)")
    ap.add_argument("--target", default=None, metavar="TARGET",
                    help="the card the set of models is planned on (default: the builds'; CPU builds: not planned, "
                         "all resident)")
    ap.add_argument("--vram-gib", type=float, default=None, metavar="GIB",
                    help="plan the set on this much GPU memory instead of the card's")


def build_specs(values: list) -> list[tuple[str | None, Path]]:
    """`--build-dir` values -> [(name or None: the variant's, folder)]: NAME=DIR, or a bare DIR (a folder whose
    own name holds `=` stays whole when it exists)."""
    out = []
    for value in values:
        value = str(value)
        name, sep, rest = value.partition("=")
        if sep and not Path(value).exists():
            if not NAME.match(name):
                raise UserError(f"--build-dir {value}: a model name is letters, digits, '_', '.', '-' (up to 64)")
            out.append((name, Path(rest)))
        else:
            out.append((None, Path(value)))
    return out


def parse_sizes(text: str | None) -> list[tuple[int, int]]:
    """"1024x1024,768x1344" (width x height) -> [(height, width), ...]."""
    sizes = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        m = re.fullmatch(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*", item)
        if not m:
            raise UserError(f"--warmup-sizes: {item.strip()!r} is not WIDTHxHEIGHT (e.g. 1024x1024)")
        sizes.append((int(m.group(2)), int(m.group(1))))
    return sizes


def load_runtime(engine_dir: Path, backend: str, torch_mode: str | None = None, warmup_sizes=(),
                 offload: str = "auto", ort_providers: list[str] | None = None):
    """Load, verify and warm up (one smallest image, 1 step, then each of `warmup_sizes` (height, width) the
    build can make): any failure is a broken build (UserError). `ort_providers`: ONNX Runtime's execution
    providers."""
    from ..errors import InternalError, RequestError
    from ..runtime.api import ZImageRuntime

    runtime = ZImageRuntime(engine_dir, backend=backend, torch_mode=torch_mode, offload=offload,
                            ort_providers=ort_providers)
    lim = runtime.limits
    smallest = lim.static or (lim.min_side, lim.min_side)
    for h, w in warmup_sizes:
        try:
            runtime.check("warm-up", height=h, width=w, steps=1)
        except RequestError as e:
            raise UserError(f"--warmup-sizes {w}x{h} for {engine_dir}: {e}") from None
    try:
        runtime.warmup([tuple(smallest), *[s for s in warmup_sizes if tuple(s) != tuple(smallest)]])
    except (InternalError, RequestError) as e:
        raise UserError(f"{engine_dir}: the warm-up generation failed ({e}): the build is broken; rebuild it") \
            from None
    return runtime


def check_common(args) -> None:
    if args.max_queue < 1 or args.max_batch < 1 or args.batch_wait_ms < 0 or args.shutdown_timeout < 0:
        raise UserError("--max-queue and --max-batch must be >= 1, --batch-wait-ms and --shutdown-timeout >= 0")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zimage_deploy.serve", description=__doc__.split("\n")[0])
    add_models_options(ap)
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    ap.add_argument("--max-queue", type=int, default=64,
                    help="live requests per model (being read, waiting or running) before answering 429 "
                         "(default: 64)")
    ap.add_argument("--max-batch", type=int, default=4,
                    help="text-to-image images per runtime call, within the build's profile (default: 4)")
    ap.add_argument("--batch-wait-ms", type=float, default=10.0,
                    help="how long to wait for batch companions (default: 10)")
    ap.add_argument("--shutdown-timeout", type=float, default=10.0,
                    help="on SIGTERM/SIGINT, seconds work in progress may finish before it is cancelled "
                         "(default: 10)")
    add_residency_options(ap)
    add_jobs_options(ap)
    add_limit_options(ap)
    args = ap.parse_args(argv)
    check_common(args)
    specs = build_specs(args.build_dirs)
    sizes = parse_sizes(args.warmup_sizes)
    from .residency import plan_residency

    residency = plan_residency(specs, args.max_resident, args.target, args.vram_gib)
    if residency.swapping and args.lora_dir is not None:
        raise UserError("--lora-dir with models swapped in and out is not supported: serve fewer models, or raise "
                        "--max-resident / --vram-gib so that all stay resident")

    import uvicorn

    from .app import create_app
    from .residency import SwappableRuntime
    from .service import Metrics, Service

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    jobs = open_jobs(args)
    metrics, services = Metrics(), {}
    api_key = args.api_key or os.environ.get(API_KEY_ENV)
    # swapped models: those released at start are loaded (verified, warmed up) and released first, so that no more
    # than the resident ones are ever loaded together
    keep = len(specs) if not residency.swapping else residency.max_resident
    for i in sorted(range(len(specs)), key=lambda i: i < keep):
        name, folder = specs[i]
        opened = functools.partial(load_runtime, folder, args.backend, args.torch_mode, sizes, args.offload,
                                   args.ort_providers)
        runtime = opened()
        if residency.swapping:
            runtime = SwappableRuntime(runtime, opened)
            if i >= keep:
                runtime.release()
        name = name or runtime.variant
        if any(s.name == name for s in services.values()):
            raise UserError(f"two builds named {name!r}: name them (--build-dir NAME=DIR)")
        services[i] = Service(runtime, serve_limits(runtime, args), max_queue=args.max_queue,
                              max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, timeout_s=args.timeout,
                              api_key=api_key, shutdown_timeout_s=args.shutdown_timeout, lora_dir=args.lora_dir,
                              name=name, metrics=metrics)
    services = [services[i] for i in range(len(specs))]
    if args.default_model is not None and args.default_model not in {s.name for s in services}:
        raise UserError(f"--default-model {args.default_model}: not among {', '.join(s.name for s in services)}")
    app = create_app(None, services=services, default=args.default_model, jobs=jobs, residency=residency)
    gateway = app.state.gateway

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # the drain starts now, bounded by --shutdown-timeout
            gateway.begin_shutdown()
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:  # a clean stop: exit 0 (uvicorn would raise the signal again at the end)
                self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.shutdown_timeout + 5)
    for s in services:
        print(f"model {s.name}{' (default)' if s.name == gateway.default else ''}: {s.runtime.variant}, backend "
              f"{s.runtime.backend}, {s.limits.request.sizes_text()}, batch budget {s.limits.max_batch_pixels} px",
              flush=True)
    print(f"models: {residency.policy} ({residency.reason})", flush=True)
    print(f"serving on http://{args.host}:{args.port}{', API key required' if gateway.api_keys else ''}"
          f"{f', background jobs in {args.jobs_dir}' if jobs else ''}", flush=True)
    Server(config).run()
    return 0


def add_jobs_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--jobs-dir", type=Path, default=None,
                    help="folder of the background jobs' database and images (default: none, /v1/jobs is off)")
    ap.add_argument("--max-jobs", type=int, default=64, help="background jobs waiting or running (default: 64)")
    ap.add_argument("--max-jobs-per-key", type=int, default=16,
                    help="background jobs waiting or running per API key (default: 16)")
    ap.add_argument("--job-retention", type=float, default=24.0,
                    help="hours a finished job and its images are kept (default: 24)")
    ap.add_argument("--job-retention-bytes", type=int, default=1 << 30,
                    help="finished jobs' images kept in all, the oldest removed first (default: 1 GiB)")


def open_jobs(args):
    from .jobs import Jobs, JobStore

    if args.jobs_dir is None:
        return None
    if args.job_retention <= 0 or args.job_retention_bytes < 1:
        raise UserError("--job-retention and --job-retention-bytes must be > 0")
    store = JobStore(args.jobs_dir, retention_s=args.job_retention * 3600, retention_bytes=args.job_retention_bytes)
    return Jobs(store, max_queued=args.max_jobs, max_per_key=args.max_jobs_per_key)


if __name__ == "__main__":
    sys.exit(run_cli(main))
