"""The same job on Ray Data: the planned groups become a dataset (one group per row), `map_batches` runs them on a
fixed pool of actors — one runtime per actor, one GPU per actor for engine builds, one CPU for CPU builds — and
the driver streams the results back and writes images and records exactly as the local path does.

Every actor loads the build from the engine folder and reads the rows' image files, at the same absolute paths:
on a multi-node cluster they must be on storage every node sees. Outputs travel back to the driver as PNG bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from ..manifest import has_engines
from .execute import Outcome, run_group, worker_name
from .plan import Item

MAX_BLOCKS = 10_000  # one group per block (fine-grained streaming and resumption) up to this many
ACTOR_START_S = 1800  # how long the actors may take to start (load the build) before the job fails


class GroupWorker:
    """One actor: one runtime, then batches of groups."""

    def __init__(self, engine_dir: str, backend: str, cfg_mode: str, torch_mode: str | None = None,
                 ort_providers: list[str] | None = None):
        from ..runtime.api import ZImageRuntime

        self.runtime = ZImageRuntime(engine_dir, backend=backend, cfg_mode=cfg_mode, torch_mode=torch_mode,
                                     ort_providers=ort_providers)
        self.worker = worker_name()

    def __call__(self, batch: dict) -> dict:
        records, pngs = [], []
        for text in batch["group"]:
            group = [Item.from_json(s) for s in json.loads(str(text))]
            for record, png in run_group(self.runtime, group, self.worker):
                records.append(json.dumps(record))
                pngs.append(png or b"")
        return {"record": records, "png": pngs}


uses_gpu = has_engines  # the actors take a GPU where the build runs on TensorRT


def run_ray(groups: list[list[Item]], address: str | None, actors: int | None, engine_dir: Path, backend: str,
            cfg_mode: str, manifest: dict, torch_mode: str | None = None,
            ort_providers: list[str] | None = None) -> Iterator[Outcome]:
    if not groups:
        return
    import ray
    import ray.data

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        gpu = uses_gpu(manifest)
        kind = "GPU" if gpu else "CPU"
        have = int(ray.cluster_resources().get(kind, 0))
        if have < (actors or 1):
            raise UserError(f"--ray: {actors or 1} actors need {actors or 1} {kind}s (one each"
                            f"{': this build has engines' if gpu else ''}); the cluster has {have}")
        n = min(actors or have, len(groups))
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the batch command shows its own
        ctx.wait_for_min_actors_s = ACTOR_START_S  # every actor's runtime loaded before work is handed out
        rows = [{"group": json.dumps([item.to_json() for item in group])} for group in groups]
        ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), MAX_BLOCKS))
        ds = ds.map_batches(GroupWorker, batch_size=1, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=n, max_tasks_in_flight_per_actor=2),
                            fn_constructor_kwargs=dict(engine_dir=str(Path(engine_dir).resolve()), backend=backend,
                                                       cfg_mode=cfg_mode, torch_mode=torch_mode,
                                                       ort_providers=ort_providers),
                            num_gpus=1 if gpu else 0, num_cpus=0 if gpu else 1)
        for row in ds.iter_rows():
            png = bytes(row["png"])
            yield json.loads(row["record"]), (png or None)
    finally:
        if started:
            ray.shutdown()
