"""Scale-out on Ray Serve: one runtime replica per GPU (per CPU slot for CPU builds), the same request schema
and answers as the HTTP server, Ray's autoscaling and queueing in front.

    python -m zimage_deploy.serve.ray_app --engine-dir DIR --replicas 2 --port 8000
    python -m zimage_deploy.serve.ray_app --engine-dir DIR --autoscale 1:8 --address auto   # existing cluster

Every replica loads the build from DIR, so DIR must be readable at the same path on every node.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
from pathlib import Path

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..cli import run_cli
from .app import Job, _parse_multipart, run_jobs
from .schema import ApiError, Limits, parse


class ZImageReplica:
    """One replica: one runtime; requests run one at a time on it (Ray queues the rest)."""

    def __init__(self, engine_dir: str, backend: str = "auto"):
        from ..runtime.api import ZImageRuntime

        self.runtime = ZImageRuntime(engine_dir, backend=backend)
        self.limits = Limits.for_build(self.runtime.manifest)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.lock = asyncio.Lock()

    async def __call__(self, request: Request):
        if request.url.path.rstrip("/").endswith("/health"):
            return {"status": "ok", "variant": self.runtime.variant, "backend": self.runtime.backend,
                    "replica": self.replica}
        if request.method != "POST" or not request.url.path.rstrip("/").endswith("/v1/generate"):
            return JSONResponse({"error": {"message": "not found", "kind": "bad_request"}}, status_code=404)
        t0 = time.perf_counter()
        try:
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                parsed = await _parse_multipart(request, self.limits)
            else:
                parsed = parse(await request.body(), self.limits)
            seed = parsed.request.seed if parsed.request.seed is not None else secrets.randbelow(2**31)
            async with self.lock:
                (answer,) = await asyncio.to_thread(run_jobs, self.runtime, [Job(parsed, seed, None)])
        except ApiError as e:
            return JSONResponse({"error": {"message": e.message, "kind": e.kind}}, status_code=e.status)
        except Exception as e:  # noqa: BLE001 - RequestError / InternalError from the runtime
            from ..errors import RequestError

            status = 422 if isinstance(e, RequestError) else 500
            return JSONResponse({"error": {"message": str(e), "kind": "bad_request" if status == 422 else
                                           "internal"}}, status_code=status)
        answer.update(replica=self.replica, seconds=time.perf_counter() - t0)
        return answer


def deployment(engine_dir: str, replicas: int = 1, autoscale: tuple[int, int] | None = None,
               gpus_per_replica: float | None = None, backend: str = "auto", max_ongoing_requests: int = 4):
    """The bound Ray Serve application. GPU builds (engines present) take one GPU per replica by default."""
    import json

    manifest = json.loads((Path(engine_dir) / "manifest.json").read_text())
    has_engines = any((c.get("engine") or {}).get("status") == "complete" for c in manifest["components"].values())
    gpus = gpus_per_replica if gpus_per_replica is not None else (1.0 if has_engines else 0.0)
    options = dict(ray_actor_options={"num_gpus": gpus, "num_cpus": 0 if gpus else 1},
                   max_ongoing_requests=max_ongoing_requests)
    if autoscale:
        options["autoscaling_config"] = {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                         "target_ongoing_requests": 2, "upscale_delay_s": 5,
                                         "downscale_delay_s": 60}
    else:
        options["num_replicas"] = replicas
    return serve.deployment(ZImageReplica, name="zimage", **options).bind(str(Path(engine_dir).resolve()), backend)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zimage_deploy.serve.ray_app", description=__doc__.split("\n")[0])
    ap.add_argument("--engine-dir", type=Path, required=True)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--autoscale", default=None, metavar="MIN:MAX", help="autoscaling replica range instead")
    ap.add_argument("--gpus-per-replica", type=float, default=None)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args(argv)
    import ray

    autoscale = tuple(int(x) for x in args.autoscale.split(":")) if args.autoscale else None
    ray.init(address=args.address, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(deployment(str(args.engine_dir), args.replicas, autoscale, args.gpus_per_replica, args.backend),
              route_prefix="/")
    print(f"Ray Serve: {args.engine_dir} on http://{args.host}:{args.port}/v1/generate (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
