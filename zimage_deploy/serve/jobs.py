"""Background jobs: `POST /v1/jobs` (a generation's body, any model) answers 202 with an id at once; the job
runs when no interactive request needs the device (service.py); `GET /v1/jobs/{id}` tells its state (queued,
running step i of n, done with its images, failed, cancelled), `DELETE` cancels it (or, once finished, removes
it and its images), `GET /v1/jobs` lists the caller's jobs.

State lives in an embedded SQLite database (`jobs.sqlite3`) and images in `results/<id>/` under the jobs folder,
written atomically before the job is marked done: a restart keeps every finished result and marks the jobs it
interrupted (queued or running) as failed, never silently dropping one. Bounded: at most `max_queued` jobs
waiting or running (429 beyond), `max_per_key` per API key, finished jobs kept `retention_s` seconds and their
images at most `retention_bytes` in all (the oldest go first). A job belongs to the key that made it: another
key gets 404 for it and never sees it listed. One server owns the folder at a time (a lock file).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import shutil
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from ..errors import UserError
from ..fsutil import atomic_dir, folder_lock
from .errors import ApiError

log = logging.getLogger("zimage_deploy.serve")

ACTIVE = ("queued", "running")
INTERRUPTED = "interrupted: the server stopped before the job finished; submit it again"
_SCHEMA = """CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, model TEXT NOT NULL, state TEXT NOT NULL, step INTEGER NOT NULL,
    steps INTEGER NOT NULL, created REAL NOT NULL, started REAL, finished REAL, error TEXT, result TEXT,
    bytes INTEGER NOT NULL DEFAULT 0)"""


class JobStore:
    """The database and the result files (thread-safe: one connection behind a lock)."""

    def __init__(self, folder: Path, retention_s: float = 86400.0, retention_bytes: int = 1 << 30):
        self.folder = Path(folder)
        self.results = self.folder / "results"
        self.retention_s, self.retention_bytes = retention_s, retention_bytes
        self._hold = contextlib.ExitStack()
        try:
            self._hold.enter_context(folder_lock(self.folder))
        except UserError:
            raise UserError(f"--jobs-dir {folder} is in use by another server") from None
        self.results.mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self.db = sqlite3.connect(self.folder / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(_SCHEMA)
        interrupted = self._write("UPDATE jobs SET state = 'failed', error = ?, finished = ? WHERE state IN "
                                  "('queued', 'running')", (INTERRUPTED, time.time()))
        if interrupted:
            log.warning("%d background jobs were interrupted by the last stop: marked failed", interrupted)
        for stray in self.results.iterdir():  # result folders of jobs no longer known (a crash mid-removal)
            if not self._row(stray.name):
                shutil.rmtree(stray, ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            self.db.close()
        self._hold.close()

    def _write(self, sql: str, args=()) -> int:
        with self._lock:
            return self.db.execute(sql, args).rowcount

    def _rows(self, sql: str, args=()) -> list[sqlite3.Row]:
        with self._lock:
            return self.db.execute(sql, args).fetchall()

    def _row(self, job_id: str):
        rows = self._rows("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return rows[0] if rows else None

    # -- state changes -----------------------------------------------------------------------------------
    def create(self, owner: str, model: str, steps: int) -> str:
        job_id = "job_" + uuid.uuid4().hex
        self._write("INSERT INTO jobs (id, owner, model, state, step, steps, created) VALUES (?, ?, ?, 'queued', 0, "
                    "?, ?)", (job_id, owner, model, steps, time.time()))
        return job_id

    def running(self, job_id: str) -> None:
        self._write("UPDATE jobs SET state = 'running', started = ? WHERE id = ? AND state = 'queued'",
                    (time.time(), job_id))

    def done(self, job_id: str, answer: dict) -> None:
        """The images on disk first (atomically), then the row: a done row always has its images."""
        ext = answer.get("output_format", "png")
        blobs = [base64.b64decode(b) for b in answer["images"]]
        with atomic_dir(self.results / job_id) as tmp:
            for i, blob in enumerate(blobs):
                (tmp / f"{i}.{ext}").write_bytes(blob)
        meta = {"files": [f"{i}.{ext}" for i in range(len(blobs))], "seeds": answer["seeds"],
                "width": answer["width"], "height": answer["height"], "timings": answer["timings"],
                "output_format": ext}
        self._write("UPDATE jobs SET state = 'done', step = steps, finished = ?, result = ?, bytes = ? WHERE id = ?",
                    (time.time(), json.dumps(meta), sum(map(len, blobs)), job_id))
        self.prune()

    def failed(self, job_id: str, state: str, error: str) -> None:
        self._write("UPDATE jobs SET state = ?, error = ?, finished = ? WHERE id = ? AND state IN ('queued', "
                    "'running')", (state, error[:500], time.time(), job_id))

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self.results / job_id, ignore_errors=True)
        self._write("DELETE FROM jobs WHERE id = ?", (job_id,))

    def interrupt_all(self, error: str = INTERRUPTED) -> int:
        return self._write("UPDATE jobs SET state = 'failed', error = ?, finished = ? WHERE state IN ('queued', "
                           "'running')", (error, time.time()))

    def prune(self, now: float | None = None) -> int:
        """Forget finished jobs older than the retention time, then the oldest results beyond the byte budget."""
        now = time.time() if now is None else now
        old = [r["id"] for r in self._rows("SELECT id FROM jobs WHERE state NOT IN ('queued', 'running') AND "
                                           "finished < ?", (now - self.retention_s,))]
        total = 0
        for r in self._rows("SELECT id, bytes FROM jobs WHERE state = 'done' ORDER BY finished DESC"):
            total += r["bytes"]
            if total > self.retention_bytes and r["id"] not in old:
                old.append(r["id"])
        for job_id in old:
            self.remove(job_id)
        return len(old)

    # -- reading -----------------------------------------------------------------------------------------
    def get(self, job_id: str, owner: str):
        """The job's row, or None when it does not exist or belongs to another key."""
        row = self._row(job_id) if isinstance(job_id, str) and len(job_id) <= 64 else None
        return row if row is not None and secrets_equal(row["owner"], owner) else None

    def list(self, owner: str, limit: int = 100) -> list[sqlite3.Row]:
        return self._rows("SELECT * FROM jobs WHERE owner = ? ORDER BY created DESC LIMIT ?", (owner, limit))

    def active(self, owner: str | None = None) -> int:
        if owner is None:
            return self._rows("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')")[0][0]
        return self._rows("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running') AND owner = ?",
                          (owner,))[0][0]

    def images(self, row) -> list[str]:
        meta = json.loads(row["result"])
        return [base64.b64encode((self.results / row["id"] / name).read_bytes()).decode() for name in meta["files"]]


def secrets_equal(a: str, b: str) -> bool:
    import secrets

    return secrets.compare_digest(a.encode(), b.encode())


class Jobs:
    """The jobs of one server: admission, one asyncio task per job awaiting its model's turn, answers."""

    def __init__(self, store: JobStore, max_queued: int = 64, max_per_key: int = 16):
        if max_queued < 1 or max_per_key < 1:
            raise UserError("--max-jobs and --max-jobs-per-key must be >= 1")
        self.store, self.max_queued, self.max_per_key = store, max_queued, max_per_key
        self.live: dict[str, tuple[threading.Event, dict]] = {}  # id -> (cancel, progress) of active jobs
        self.tasks: set[asyncio.Task] = set()
        self.closing = False

    def submit(self, service, parsed, owner: str, keyed: bool) -> dict:
        """Queue a checked request on `service` -> the job's view (202). 429 beyond the bounds."""
        if self.closing:
            raise ApiError(503, "the server is shutting down")
        if self.store.active() >= self.max_queued:
            raise ApiError(429, f"{self.max_queued} background jobs are waiting or running; retry later")
        if keyed and self.store.active(owner) >= self.max_per_key:
            raise ApiError(429, f"this API key has {self.max_per_key} background jobs waiting or running; wait for "
                                "one to finish")
        steps = parsed.request.steps
        job_id = self.store.create(owner, service.name, steps)
        cancel, progress = threading.Event(), {"checks": 0}
        self.live[job_id] = (cancel, progress)
        task = asyncio.get_running_loop().create_task(self._run(job_id, service, parsed, cancel, progress))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return self.view(self.store.get(job_id, owner))

    async def _run(self, job_id, service, parsed, cancel, progress) -> None:
        def on_check():  # the runtime asks before starting, before each step and before decoding
            progress["checks"] += 1
            if progress["checks"] == 1:
                self.store.running(job_id)

        try:
            answer = await service.run_background(parsed, cancel, on_check)
        except ApiError as e:
            if cancel.is_set() and not self.closing:
                self.store.failed(job_id, "cancelled", "cancelled by its owner")
            elif self.closing:
                self.store.failed(job_id, "failed", INTERRUPTED)
            else:
                self.store.failed(job_id, "failed", e.message)
            service.metrics.jobs.labels(service.name, "cancelled" if cancel.is_set() else "failed").inc()
        except Exception as e:  # noqa: BLE001 - recorded, never lost
            log.exception("background job failed")
            self.store.failed(job_id, "failed", f"internal error ({type(e).__name__})")
            service.metrics.jobs.labels(service.name, "failed").inc()
        else:  # the images are written off the event loop
            await asyncio.get_running_loop().run_in_executor(None, self.store.done, job_id, answer)
            service.metrics.jobs.labels(service.name, "done").inc()
        finally:
            self.live.pop(job_id, None)

    def cancel(self, row) -> dict:
        """Cancel an active job (it stops between steps), or remove a finished one with its images."""
        if row["state"] in ACTIVE and row["id"] in self.live:
            self.live[row["id"]][0].set()
            return {"id": row["id"], "state": "cancelling"}
        self.store.remove(row["id"])
        return {"id": row["id"], "state": "removed"}

    def view(self, row, images: bool = False) -> dict:
        out = {"id": row["id"], "model": row["model"], "state": row["state"], "steps": row["steps"],
               "created": row["created"], "started": row["started"], "finished": row["finished"]}
        if row["state"] == "running":
            checks = self.live.get(row["id"], (None, {"checks": 0}))[1]["checks"]
            out["step"] = max(1, min(checks - 1, row["steps"]))
        if row["error"]:
            out["error"] = row["error"]
        if row["state"] == "done":
            meta = json.loads(row["result"])
            out.update(seeds=meta["seeds"], width=meta["width"], height=meta["height"], timings=meta["timings"],
                       output_format=meta["output_format"])
            if images:
                out["images"] = self.store.images(row)
        return out

    async def close(self, deadline_s: float) -> None:
        """Shutdown: no new jobs; running ones get `deadline_s` (their models' cancel them after it), then
        everything still active is recorded as interrupted."""
        self.closing = True
        for cancel, progress in list(self.live.values()):
            if progress["checks"] == 0:
                cancel.set()  # not started: it will not
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=deadline_s + 1)
        self.store.interrupt_all()
        self.store.close()
