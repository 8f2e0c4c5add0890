"""Which models of a server hold their runtime (GPU memory) at a time: the set plan's answer (plan.py `plan_set`).

`all resident`: every model loaded at start and kept. `swapped`: at most `max_resident` models loaded at once; a
request for another waits in its model's queue while the least recently used idle model is released (after its
work in progress ends: a model running a batch is never released) and its own runtime is opened again from its
build folder. Turns go by age: the model whose waiting work is oldest goes first, interactive requests before
background jobs; a background job that holds the only slot another model's interactive request needs stops between
steps and goes back to the head of its queue (service.py). Loads and releases are counted (`/metrics`
`zimage_model_loads`, `zimage_resident`) and `/v1/models` says which models are resident.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
from pathlib import Path

from ..errors import InternalError, UserError

log = logging.getLogger("zimage_deploy.serve")


class SwappableRuntime:
    """A model's runtime that can be released and opened again: what the server reads of it (variant, backend,
    limits, defaults, manifest, folder) stays; `run` needs it loaded."""

    def __init__(self, runtime, reopen):
        """`runtime`: the loaded, verified ZImageRuntime; `reopen()`: a new one from the same build."""
        self.live, self.reopen = runtime, reopen
        self.variant, self.backend, self.limits = runtime.variant, runtime.backend, runtime.limits
        self.manifest, self.torch_mode = runtime.manifest, runtime.torch_mode
        self.engine_dir = Path(runtime.pipeline.engine_dir)
        self.defaults = dict(runtime.defaults)
        self.loads = 1

    @property
    def loaded(self) -> bool:
        return self.live is not None

    def load(self) -> None:
        if self.live is None:
            self.live = self.reopen()
            self.loads += 1

    def release(self) -> None:
        """Drop the runtime (its engines, sessions or modules); the device's memory goes back to the allocator."""
        self.live = None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def run(self, *args, **kwargs):
        if self.live is None:
            raise InternalError("the model is not resident")  # the residency turn was skipped: a bug of ours
        return self.live.run(*args, **kwargs)

    def fallbacks(self) -> dict[str, int]:
        return self.live.fallbacks() if self.live is not None else {}


class Residency:
    def __init__(self, max_resident: int | None = None, reason: str = "all resident"):
        """`max_resident`: models loaded at once (None: all, nothing is ever released); `reason`: the start-up
        statement (which plan decided it)."""
        if max_resident is not None and max_resident < 1:
            raise ValueError("max_resident must be >= 1")
        self.max_resident, self.reason = max_resident, reason
        self.resident: collections.OrderedDict = collections.OrderedDict()  # name -> Service, least recent first
        self.busy: set[str] = set()
        self.waiting: dict[str, tuple] = {}  # name -> (key, future, service)
        self.metrics, self.names = None, []

    @property
    def swapping(self) -> bool:
        return self.max_resident is not None

    @property
    def policy(self) -> str:
        return f"swapped, at most {self.max_resident} resident" if self.swapping else "all resident"

    def attach(self, services: list, metrics) -> None:
        """At start: the first `max_resident` models stay loaded, the others are released now."""
        self.metrics, self.names = metrics, [s.name for s in services]
        if self.swapping and len(services) <= self.max_resident:
            self.max_resident = None
        for i, s in enumerate(services):
            s.residency = self
            if self.swapping and not isinstance(s.runtime, SwappableRuntime):
                raise ValueError("a swapped model needs a SwappableRuntime")
            if not self.swapping or i < self.max_resident:
                self.resident[s.name] = s
            else:
                s.runtime.release()
        self._gauges()

    def is_resident(self, name: str) -> bool:
        return not self.swapping or name in self.resident

    def contended(self, service) -> bool:
        """Whether an interactive request of another model waits for a slot while this model holds one."""
        return self.swapping and any(key[0] == 0 and name not in self.resident
                                     for name, (key, _, _) in self.waiting.items() if name != service.name)

    # -- a model's turn ----------------------------------------------------------------------------------------
    async def enter(self, service, key: tuple) -> None:
        """Before a runtime call: wait for this model's turn (`key`: (0 interactive / 1 background, enqueued
        time)), releasing another model and loading this one where needed. `leave` after the call."""
        if not self.swapping:
            return
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.waiting[service.name] = (key, future, service)
        self._grant()
        try:
            victim = await future
        except BaseException:
            self.waiting.pop(service.name, None)
            if future.done() and not future.cancelled():  # granted just as we were cancelled: give it back
                self.leave(service)
            raise
        if service.runtime.loaded:
            return
        try:
            if victim is not None:
                await loop.run_in_executor(victim.run_pool, victim.runtime.release)
                log.warning("model %s released (swapped out for %s)", victim.name, service.name)
            await loop.run_in_executor(service.run_pool, service.runtime.load)
        except Exception as e:
            self.resident.pop(service.name, None)
            self.leave(service)
            log.exception("loading model %s failed", service.name)
            raise InternalError(f"loading model {service.name} failed") from e
        if self.metrics is not None:
            self.metrics.loads.labels(service.name).inc()
        log.warning("model %s loaded (resident: %s)", service.name, ", ".join(self.resident))
        self._gauges()

    def leave(self, service) -> None:
        if not self.swapping:
            return
        self.busy.discard(service.name)
        if service.name in self.resident:
            self.resident.move_to_end(service.name)
        self._grant()

    def _grant(self) -> None:
        """Turns in age order; the first that cannot go yet (every slot busy) stops the others behind it."""
        for name, (key, future, service) in sorted(self.waiting.items(), key=lambda kv: kv[1][0]):
            if future.done():
                self.waiting.pop(name, None)
                continue
            victim = None
            if name not in self.resident:
                if len(self.resident) >= self.max_resident:
                    idle = [n for n in self.resident if n not in self.busy and n not in self.waiting]
                    idle = idle or [n for n in self.resident if n not in self.busy]
                    if not idle:
                        return
                    victim = self.resident.pop(idle[0])
                self.resident[name] = service
            self.busy.add(name)
            self.waiting.pop(name)
            future.set_result(victim)
        self._gauges()

    def _gauges(self) -> None:
        if self.metrics is not None:
            for name in self.names:
                self.metrics.resident.labels(name).set(1 if self.is_resident(name) else 0)


def plan_residency(specs: list[tuple[str, Path]], max_resident: int | None = None, target: str | None = None,
                   vram_gib: float | None = None) -> Residency:
    """The server's policy for its builds: `--max-resident N` as given; else, for two or more builds on a GPU
    target (their own, or `--target`; `--vram-gib` replacing its memory), the set plan's answer; CPU builds without
    `--target` stay all resident (host memory: there is no card to plan)."""
    from .. import manifest as manifest_io
    from ..plan import GIB, plan_set
    from ..targets import get_target

    if max_resident is not None:
        if max_resident < 1:
            raise UserError(f"--max-resident must be >= 1, got {max_resident}")
        return Residency(max_resident if max_resident < len(specs) else None, f"--max-resident {max_resident}")
    if len(specs) < 2:
        if vram_gib is not None or target is not None:
            raise UserError("--target / --vram-gib plan a set of models: serve two or more --build-dir")
        return Residency(None, "one model")
    targets = {manifest_io.load(folder)["target"] for _, folder in specs}
    on_cpu = target is None and all(get_target(t).compute_capability is None for t in targets)
    if on_cpu:
        if vram_gib is not None:
            raise UserError("--vram-gib with CPU builds: pass --target, the card to plan them on")
        return Residency(None, "CPU builds: host memory, no card to plan (--target plans one)")
    s = plan_set([folder for _, folder in specs], target, memory_gib=vram_gib)
    where = f"set plan on {s.target} ({s.memory / GIB:.1f} GiB): {s.mode}"
    if s.mode == "does-not-fit":
        raise UserError(f"{where}: a build does not fit the card even alone (python -m zimage_deploy.plan "
                        "--build-dir DIR says why)")
    if s.mode == "resident-together":
        return Residency(None, f"{where}, {s.together / GIB:.2f} GiB together")
    return Residency(s.max_resident, f"{where}, {s.together / GIB:.2f} GiB together")
