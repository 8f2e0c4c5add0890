"""Scale-out on Ray Serve: one runtime replica per GPU (per CPU slot for CPU builds), Ray's autoscaling and
queueing in front. Each replica runs the HTTP server's Service (service.py: the same validation, limits,
batching, cancellation and answers, plus `replica` in /v1/generate and /health answers).

    python -m zimage_deploy.serve.ray_app --engine-dir DIR --replicas 2 --port 8000
    python -m zimage_deploy.serve.ray_app --engine-dir DIR --autoscale 1:8 --address auto   # existing cluster

Every replica loads the build from DIR, so DIR must be readable at the same path on every node.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from ray import serve
from starlette.requests import Request

from ..cli import add_build_dir, run_cli
from ..errors import UserError
from .__main__ import API_KEY_ENV, SWITCH_INTERVAL_S, add_limit_options, load_runtime, serve_limits
from .gateway import Gateway
from .service import Service


class ZImageReplica:
    """One replica: one runtime and one Service, the HTTP server's code (limits, validation, batching,
    cancellation, answers); Ray routes and queues requests in front. A client that disconnects makes Ray cancel
    its request, which stops its work between denoising steps."""

    def __init__(self, engine_dir: str, backend: str = "auto", options: dict | None = None):
        options = dict(options or {})
        sys.setswitchinterval(SWITCH_INTERVAL_S)  # this process serves one replica
        self.runtime = load_runtime(Path(engine_dir), backend)
        limits = serve_limits(self.runtime, argparse.Namespace(**{**_LIMIT_DEFAULTS, **options.pop("limits", {})}))
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.service = Service(self.runtime, limits, watch_disconnect=False, tag={"replica": self.replica},
                               **options)
        self.gateway = Gateway([self.service], tag={"replica": self.replica})

    async def __call__(self, request: Request):
        return await self.gateway.dispatch(request)

    def __del__(self):  # Ray calls it when the replica shuts down: stop the work in progress between steps
        service = getattr(self, "service", None)
        for job in list(service.pending) + list(service.running) if service is not None else []:
            job.cancel.set()


_LIMIT_DEFAULTS = dict(timeout=120.0, max_steps=None, max_side=None, max_prompt_chars=None, max_batch_pixels=None,
                       max_image_bytes=None, max_body_bytes=None, lora_dir=None, max_lora_sets=2)


def deployment(engine_dir: str, replicas: int = 1, autoscale: tuple[int, int] | None = None,
               gpus_per_replica: float | None = None, backend: str = "auto", max_ongoing_requests: int = 8,
               max_queued_requests: int = 64, service: dict | None = None, limits: dict | None = None,
               shutdown_timeout_s: float = 10.0):
    """The bound Ray Serve application. GPU builds (engines present) take one GPU per replica by default.
    `service`: Service options per replica (max_batch, batch_wait_ms, timeout_s, api_key, ...); `limits`: the
    server's limit options (max_batch_pixels, max_side, ...). Ray answers 503 beyond `max_queued_requests`."""
    from .. import manifest as manifest_io

    manifest = manifest_io.load(Path(engine_dir))
    has_engines = any((c.get("engine") or {}).get("status") == "complete" for c in manifest["components"].values())
    gpus = gpus_per_replica if gpus_per_replica is not None else (1.0 if has_engines else 0.0)
    options = dict(ray_actor_options={"num_gpus": gpus, "num_cpus": 0 if gpus else 1},
                   max_ongoing_requests=max_ongoing_requests, max_queued_requests=max_queued_requests,
                   graceful_shutdown_timeout_s=shutdown_timeout_s, graceful_shutdown_wait_loop_s=0.5)
    if autoscale:
        options["autoscaling_config"] = {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                         "target_ongoing_requests": 2, "upscale_delay_s": 5,
                                         "downscale_delay_s": 60}
    else:
        options["num_replicas"] = replicas
    per_replica = {"max_queue": max_ongoing_requests, **(service or {}), "limits": dict(limits or {})}
    return serve.deployment(ZImageReplica, name="zimage", **options).bind(str(Path(engine_dir).resolve()), backend,
                                                                          per_replica)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zimage_deploy.serve.ray_app", description=__doc__.split("\n")[0])
    add_build_dir(ap)
    ap.add_argument("--replicas", type=int, default=1, help="default: 1")
    ap.add_argument("--autoscale", default=None, metavar="MIN:MAX", help="autoscaling replica range instead")
    ap.add_argument("--gpus-per-replica", type=float, default=None, help="default: 1 for engine builds, else 0")
    ap.add_argument("--backend", default="auto", help="default: auto")
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
    stop = threading.Event()
    ray.init(address=args.address, include_dashboard=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(deployment(str(args.build_dir), args.replicas, autoscale, args.gpus_per_replica, args.backend,
                             args.max_ongoing, args.max_queued, service, limits, args.shutdown_timeout),
                  route_prefix="/")
        # after ray.init, whose handlers abort the driver (SIGABRT, exit 134) on SIGTERM
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: stop.set())
        print(f"Ray Serve: {args.build_dir} on http://{args.host}:{args.port}/v1/generate (SIGTERM or Ctrl-C "
              "stops)", flush=True)
        while not stop.wait(0.5):
            pass
        print(f"stopping: requests in progress get up to {args.shutdown_timeout:g} s", flush=True)
        serve.shutdown()  # the proxy stops taking requests; replicas drain, then are stopped
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
