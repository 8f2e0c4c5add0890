"""`results.jsonl` — one record per image (request, seed, output file, timings) or per failure — and what makes a
re-run resumable.

While a job runs, each record is appended (and flushed) right after its image has been written atomically, so
an interrupted job leaves complete images and the records of those images, nothing half-written. At the end
the file is rewritten atomically with one record per output in input order. A re-run skips an image whose
record says `ok` with the same fingerprint (same request, seed, build and runtime) and whose file still has
the recorded sha256; the record of an image to be made again is kept until it is (it still describes the file).
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from ..fsutil import atomic_file
from ..hashing import file_sha256

RESULTS = "results.jsonl"
SUMMARY = "summary.json"
STAGES = ("encode", "denoise", "decode", "write")


def record_key(record: dict) -> str:
    return record.get("output") or f"line:{record['line']}"


def load_previous(out_dir: Path) -> dict[str, dict]:
    """The last record per output of an earlier run (unreadable lines — an interrupted append — are ignored)."""
    path = out_dir / RESULTS
    found: dict[str, dict] = {}
    if not path.is_file():
        return found
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("output"), str):
                found[record["output"]] = record
    return found


def describes_file(record: dict | None, out_dir: Path) -> bool:
    """An `ok` record whose image is in the folder with the recorded sha256. Such an image is done when its
    record's fingerprint is the item's (same request, input image hashes, seed, build and backend)."""
    if not record or record.get("status") != "ok":
        return False
    try:
        path = out_dir / record["output"]
        return path.is_file() and file_sha256(path) == record.get("sha256")
    except (OSError, TypeError, ValueError):
        return False


def remove_stale_temps(out_dir: Path, names: set[str]) -> int:
    """Temp files (`.NAME.XXXXXXXX.png`, see fsutil.atomic_file) of outputs an interrupted run was writing."""
    removed = 0
    for entry in out_dir.iterdir() if out_dir.is_dir() else ():
        body = entry.name[1:].rsplit(".", 1)[0]  # drop the suffix, then the random part
        if entry.name.startswith(".") and "." in body and body.rsplit(".", 1)[0] in names and entry.is_file():
            entry.unlink(missing_ok=True)
            removed += 1
    return removed


class ResultsLog:
    def __init__(self, out_dir: Path):
        self.path = out_dir / RESULTS
        self.records: dict[str, dict] = {}
        self.added: set[str] = set()  # keys of the records made by this run
        self._f = None

    def keep(self, record: dict) -> None:
        """Carry a record over without appending it (a skipped, already done image)."""
        self.records[record_key(record)] = record

    def add(self, record: dict) -> None:
        self.records[record_key(record)] = record
        self.added.add(record_key(record))
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()

    def finish(self) -> list[dict]:
        """Rewrite the file atomically: one record per output, in input order."""
        if self._f is not None:
            self._f.close()
            self._f = None
        ordered = sorted(self.records.values(), key=lambda r: (r.get("line") or 0, r.get("seed") or 0))
        with atomic_file(self.path, suffix=".jsonl") as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                for r in ordered:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return ordered


def summarize(records: list[dict], fresh: list[dict], written: int, skipped: int, wall_s: float) -> dict:
    """Images, failures, wall time, images/s, and per-image stage medians over this run's images (`fresh`)."""
    per_image = {}
    for stage in STAGES:
        values = [r["timings"][stage] / (r.get("batch_size") or 1) if stage != "write" else r["timings"][stage]
                  for r in fresh if stage in (r.get("timings") or {})]
        if values:
            per_image[stage] = statistics.median(values)
    failed = [r for r in records if r.get("status") == "error"]
    return {"images": written, "skipped": skipped, "failures": len(failed),
            "failed_lines": sorted({r["line"] for r in failed}), "wall_s": round(wall_s, 3),
            "images_per_s": round(written / wall_s, 4) if wall_s > 0 else None,
            "median_s_per_image": {k: round(v, 5) for k, v in per_image.items()}}


def write_summary(out_dir: Path, summary: dict) -> None:
    with atomic_file(out_dir / SUMMARY, suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2) + "\n")
