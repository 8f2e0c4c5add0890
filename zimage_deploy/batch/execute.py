"""Running groups of items on a runtime — the same code in this process and in each Ray actor — and writing
what comes back (in the driver only: one writer for the images and `results.jsonl`)."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from PIL import Image

from ..errors import RequestError
from ..runtime.validate import decode_image
from ..fsutil import atomic_file
from .plan import Item, error_record
from .requests import RowError

Outcome = tuple[dict, bytes | None]  # (record, PNG bytes when the image was made)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_group(runtime, items: list[Item], worker: str = "") -> list[Outcome]:
    """One runtime call for the group; if it fails, each item alone, so that only a bad item fails."""
    try:
        return _run(runtime, items, worker)
    except Exception as e:  # noqa: BLE001 - every failure becomes a record; KeyboardInterrupt still stops
        if len(items) > 1:
            return [o for item in items for o in run_group(runtime, [item], worker)]
        kind = "request" if isinstance(e, (RequestError, RowError)) else "internal"
        message = str(e) if kind == "request" else f"{type(e).__name__}: {e}"
        item = items[0]
        return [(error_record(item.line, message, kind, id=item.id, seed=item.seed, output=item.output,
                              request=item.request, fingerprint=item.fingerprint, worker=worker), None)]


def _run(runtime, items: list[Item], worker: str) -> list[Outcome]:
    t0 = time.perf_counter()
    first = items[0]
    images = [load_image(path, sha, runtime.limits) for path, sha in first.files["images"]]
    mask = load_image(*first.files["mask"], runtime.limits) if first.files["mask"] else None
    control = load_image(*first.files["control_image"], runtime.limits) if first.files["control_image"] else None
    loras = load_loras(runtime, first.files["loras"])
    result = runtime.generate([i.request["prompt"] for i in items], seed=[i.seed for i in items],
                              images=images or None, mask=mask, control_image=control, loras=loras, **first.call)
    seconds = (time.perf_counter() - t0) / len(items)
    outcomes = []
    for item, image in zip(items, result.images):
        t = time.perf_counter()
        png = encode_png(image)
        timings = {**{k: round(v, 6) for k, v in result.timings.items()}, "write": time.perf_counter() - t}
        outcomes.append(({"line": item.line, "id": item.id, "seed": item.seed, "output": item.output,
                          "status": "ok", "request": item.request, "fingerprint": item.fingerprint,
                          "sha256": hashlib.sha256(png).hexdigest(), "width": image.width, "height": image.height,
                          "batch_size": len(items), "seconds": round(seconds, 6), "timings": timings,
                          "worker": worker}, png))
    return outcomes


def load_image(path: str, sha256: str, limits) -> Image.Image:
    """An input image as planned: the same bytes (else the row fails: the file changed since the job started),
    decoded by the validator's rules."""
    name = Path(path).name
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise RowError(f"{name} cannot be read: {e.strerror or e}") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise RowError(f"{name} changed while the job ran; run the job again")
    return decode_image(data, limits, name)


def load_loras(runtime, loras: list):
    """The LoRAs as planned ([[name, scale, path, sha256], ...]) prepared by the runtime; the files must be the
    planned versions (else the row fails: a LoRA changed since the job started)."""
    if not loras:
        return None
    lora_set = runtime.loras.prepare([(path, scale) for _, scale, path, _ in loras])
    read = [sha for sha, _ in lora_set.key]
    if read != [sha for _, _, _, sha in loras]:
        raise RowError("a LoRA file changed while the job ran; run the job again")
    return lora_set


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def run_local(groups: list[list[Item]], engine_dir: Path, backend: str, cfg_mode: str,
              torch_mode: str | None = None, ort_providers: list[str] | None = None) -> Iterator[Outcome]:
    """The groups on one runtime in this process (loaded only when there is work)."""
    if not groups:
        return
    from ..runtime.api import ZImageRuntime

    runtime = ZImageRuntime(engine_dir, backend=backend, cfg_mode=cfg_mode, torch_mode=torch_mode,
                            ort_providers=ort_providers)
    worker = worker_name()
    for group in groups:
        yield from run_group(runtime, group, worker)


def write_outcome(out_dir: Path, record: dict, png: bytes | None, log) -> None:
    """The image first (atomically), then its record: a record never names a missing or partial image."""
    if png is not None:
        t = time.perf_counter()
        with atomic_file(out_dir / record["output"], suffix=".png") as tmp:
            tmp.write_bytes(png)
        record["timings"]["write"] = round(record["timings"]["write"] + time.perf_counter() - t, 6)
    log.add(record)
