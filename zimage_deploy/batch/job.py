"""`python -m zimage_deploy.batch`: images in bulk from a JSONL / CSV / text file of requests, resumable.

    python -m zimage_deploy.batch --build-dir DIR --input prompts.csv --out out/ \\
        --template "a poster of {product}, {style}" --seeds 4 --batch-size 4 [--ray [ADDRESS]]

Exit code: 0 when every line made its images, 1 when any line failed (see results.jsonl), 2 for a bad command
(an `error:` line), 130 when interrupted (re-run the same command to go on).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from ..cli import add_build_dir, run_cli
from ..errors import UserError
from ..runtime.backends import (BACKENDS, TORCH_MODES, add_providers_flag, backend_entry, check_options,
                                check_providers, check_torch_mode, resolve_backend)
from ..runtime.validate import Limits
from .execute import run_local, write_outcome
from .inputs import Template, detect_format, read_rows
from .plan import MAX_SEEDS, SEED_MAX, Options, check_columns, make_groups, make_plan
from .requests import RowError, check
from .ray_data import uses_gpu
from .results import RESULTS, SUMMARY, ResultsLog, describes_file, load_previous, remove_stale_temps, summarize, \
    write_summary

LOCK = ".batch.lock"
MAX_IMAGES = 1_000_000  # per job: the plan is held in memory


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m zimage_deploy.batch", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_build_dir(ap)
    ap.add_argument("--input", type=Path, required=True,
                    help="requests: .jsonl (one /v1/generate object per line), .csv (header row naming the fields) "
                         "or .txt (one prompt per line); image/mask paths relative to this file's folder")
    ap.add_argument("--out", type=Path, required=True, help="output folder: images, results.jsonl, summary.json")
    ap.add_argument("--input-format", default="auto", choices=("auto", "jsonl", "csv", "text"),
                    help="auto: from the suffix")
    ap.add_argument("--template", default=None,
                    help='prompt template filled from each row\'s fields, e.g. "a poster of {product}, {style}" '
                         "({prompt} is the row's prompt, or the line of a text file)")
    ap.add_argument("--seed", type=int, default=0, help="seed of rows that give none")
    ap.add_argument("--seeds", type=int, default=1, help="images per request, with consecutive seeds")
    ap.add_argument("--steps", type=int, default=None, help="for rows that give none (default: the build's)")
    ap.add_argument("--height", type=int, default=None, help="for text-to-image rows that give none (build's)")
    ap.add_argument("--width", type=int, default=None, help="for text-to-image rows that give none (build's)")
    ap.add_argument("--guidance-scale", type=float, default=None, help="for rows that give none (build's)")
    ap.add_argument("--negative-prompt", default=None, help="for rows that give none (needs guidance > 0)")
    ap.add_argument("--strength", type=float, default=None,
                    help="img2img / inpaint / Edit rows with images that give none (0.6; Edit: 1)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="compatible text-to-image requests per runtime call (engine builds: at most their "
                         "profile's batch, halved with CFG). Default: 4 on ONNX Runtime, whose images are bit "
                         "for bit those of `generate` whatever the grouping; 1 on Torch and TensorRT, whose "
                         "batched kernels may round differently (N > 1 on Torch: within 1/255, measured)")
    ap.add_argument("--backend", default="auto", help=", ".join(BACKENDS))
    ap.add_argument("--cfg-mode", default="batch", choices=("batch", "sequential"))
    ap.add_argument("--torch-mode", default=None, choices=TORCH_MODES,
                    help="the torch backend: compiled (default on CUDA) or eager (default on the CPU)")
    add_providers_flag(ap)
    ap.add_argument("--overwrite", action="store_true", help="make every image again, even those already done")
    ap.add_argument("--allow-outside", action="store_true",
                    help="let rows name image files outside the input file's folder")
    ap.add_argument("--lora-dir", type=Path, default=None,
                    help="folder of LoRA .safetensors files that rows may name in a `loras` field (as the server's "
                         "--lora-dir: names, never paths; a CSV cell: \"name:0.8|other\")")
    ap.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                    help="run on Ray Data: alone, a local Ray (or RAY_ADDRESS); 'auto' or an address for a cluster")
    ap.add_argument("--actors", type=int, default=None,
                    help="Ray actors (default: the cluster's GPUs for engine builds, CPUs for CPU builds)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _check_args(args, limits) -> dict:
    if not 1 <= args.seeds <= MAX_SEEDS:
        raise UserError(f"--seeds must be between 1 and {MAX_SEEDS}, got {args.seeds}")
    if not 0 <= args.seed <= SEED_MAX:
        raise UserError(f"--seed must be between 0 and {SEED_MAX}, got {args.seed}")
    if args.batch_size is not None and not 1 <= args.batch_size <= 1024:
        raise UserError(f"--batch-size must be between 1 and 1024, got {args.batch_size}")
    if args.actors is not None and args.actors < 1:
        raise UserError(f"--actors must be >= 1, got {args.actors}")
    if args.lora_dir is not None and not args.lora_dir.is_dir():
        raise UserError(f"--lora-dir {args.lora_dir}: not a folder")
    defaults = {k: getattr(args, k) for k in ("steps", "height", "width", "guidance_scale", "negative_prompt",
                                               "strength")}
    if defaults["strength"] is not None and not 0.0 < defaults["strength"] <= 1.0:
        raise UserError(f"--strength must be in (0, 1], got {defaults['strength']}")
    given = {k: v for k, v in defaults.items() if v is not None and k != "strength"}
    try:  # the same rules as a row's values (those of a text-to-image row)
        check(replace(limits, variant="turbo"), {"prompt": "-", **given}, [], None)
    except RowError as e:
        raise UserError(f"command-line request defaults: {e}") from None
    return defaults


@contextlib.contextmanager
def _locked(out: Path):
    """One job at a time per output folder (flock: released when the process ends, even killed)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"--out {out}: {e.strerror or e}") from None
    previous = signal.signal(signal.SIGTERM, _stop) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{out} is being written by another batch job; wait for it or choose another --out") \
                from None
        yield
    finally:
        os.close(fd)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stop(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (a CI job cancelled): finish like Ctrl-C, results.jsonl rewritten


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    t_start = time.perf_counter()
    from .. import manifest as manifest_io

    manifest = manifest_io.load(args.build_dir)
    backend = args.backend
    if args.ray is not None and backend == "auto" and uses_gpu(manifest):
        backend = "tensorrt"  # what the GPU actors will run, whatever this driver has
    backend = resolve_backend(backend, manifest)
    check_torch_mode(backend, args.torch_mode)
    check_options(backend, ort_providers=args.ort_providers)
    if args.ort_providers is not None:
        args.ort_providers = list(check_providers(args.ort_providers))
    limits = Limits.for_build(manifest, backend, args.cfg_mode)
    if args.batch_size is None:
        # the largest grouping whose images are bit for bit `generate`'s (its abilities; tested)
        args.batch_size = backend_entry(backend).abilities.exact_batch
    defaults = _check_args(args, limits)
    fmt = detect_format(args.input, args.input_format)
    template = Template(args.template) if args.template is not None else None
    if args.ray is not None:
        try:
            importlib.import_module("ray.data")
        except ImportError:
            raise UserError("--ray needs Ray Data: pip install 'zimage-deploy[ray]'") from None
    rows, header = read_rows(args.input, fmt)
    if len(rows) * args.seeds > MAX_IMAGES:
        raise UserError(f"{len(rows)} lines x --seeds {args.seeds} is more than {MAX_IMAGES} images: split the job")
    if header is not None:
        check_columns(header, template)
    if fmt == "text" and template and set(template.fields) - {"prompt"}:
        raise UserError(f"--template: a text file gives each line as {{prompt}} only, not {template.fields}")
    opts = Options(args.input.parent, manifest, limits, template, args.seed, args.seeds, defaults,
                   args.allow_outside, {"backend": backend, "cfg_mode": args.cfg_mode,
                   **({"torch_mode": args.torch_mode} if args.torch_mode else {}),
                   **({"ort_providers": args.ort_providers} if args.ort_providers else {})}, args.lora_dir)
    plan = make_plan(rows, opts)
    with _locked(args.out):
        return _run(args, manifest, limits, plan, len(rows), t_start)


def _run(args, manifest, limits, plan, n_rows: int, t_start: float) -> int:
    out = args.out
    previous = load_previous(out)
    log = ResultsLog(out)
    todo = []
    for item in plan.items:
        prev = previous.get(item.output)
        on_disk = describes_file(prev, out)
        if on_disk and prev.get("fingerprint") == item.fingerprint and not args.overwrite:
            log.keep({**prev, "line": item.line, "id": item.id})  # done (the row may have moved)
            continue
        if on_disk:
            log.keep(prev)  # true of the file until it is made again
        todo.append(item)
    skipped = len(plan.items) - len(todo)
    remove_stale_temps(out, {i.output for i in plan.items} | {RESULTS, SUMMARY})
    for record in plan.errors:
        log.add(record)
    groups = make_groups(todo, args.batch_size, limits)
    print(f"batch: {n_rows} lines -> {len(plan.items)} images ({skipped} already done), {len(plan.errors)} bad "
          f"lines; {len(todo)} to make in {len(groups)} runtime calls{' on Ray' if args.ray is not None else ''}",
          file=sys.stderr)
    if args.ray is not None:
        from .ray_data import run_ray

        outcomes = run_ray(groups, args.ray or None, args.actors, args.build_dir, args.backend, args.cfg_mode,
                           manifest, args.torch_mode, args.ort_providers)
    else:
        outcomes = run_local(groups, args.build_dir, args.backend, args.cfg_mode, args.torch_mode, args.ort_providers)
    written = failed = 0
    interrupted = False
    bar = tqdm(total=len(todo), unit="img", desc="batch", disable=args.no_progress or not todo, file=sys.stderr)
    stopped = None
    try:
        for record, png in outcomes:
            write_outcome(out, record, png, log)
            written += png is not None
            failed += png is None
            bar.update(1)
            if failed:
                bar.set_postfix(failed=failed, refresh=False)
    except KeyboardInterrupt:
        interrupted = True
    except Exception as e:  # noqa: BLE001 - a runtime that cannot load, a Ray job that fails: keep what is done
        stopped = e if isinstance(e, UserError) else UserError(f"the job stopped: {type(e).__name__}: "
                                                               f"{str(e)[:1000]}")
    finally:
        bar.close()
        records = log.finish()
    fresh = [r for r in records if r.get("status") == "ok" and r.get("output") in log.added]
    summary = summarize(records, fresh, written, skipped, time.perf_counter() - t_start)
    summary["interrupted"] = interrupted
    if stopped is not None:
        summary["stopped"] = str(stopped)
    write_summary(out, summary)
    _print_summary(summary, out)
    if stopped is not None:
        raise stopped
    if interrupted:
        print("interrupted: run the same command again to go on", file=sys.stderr)
        return 130
    return 1 if summary["failures"] else 0


def _print_summary(s: dict, out: Path) -> None:
    medians = ", ".join(f"{k} {v:.3g} s" for k, v in s["median_s_per_image"].items())
    failed = f"{s['failures']} failed (lines {', '.join(map(str, s['failed_lines'][:20]))}" \
             f"{', ...' if len(s['failed_lines']) > 20 else ''})" if s["failures"] else "0 failed"
    print(f"batch: {s['images']} images made, {s['skipped']} already done, {failed}; {s['wall_s']:.1f} s, "
          f"{s['images_per_s'] or 0:.3g} images/s" + (f"; median per image: {medians}" if medians else "") +
          f"\nresults: {out / RESULTS}", file=sys.stderr)


def cli() -> int:
    return run_cli(main)
