"""Shared CLI plumbing: user errors become one clear line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from .errors import UserError


BUILT = "a folder written by zimage_deploy.build"


def add_build_dir(ap: argparse.ArgumentParser, help: str = BUILT, required: bool = True) -> None:
    """`--build-dir DIR` (`--engine-dir DIR`, its older name, works the same) -> `args.build_dir`."""
    ap.add_argument("--build-dir", "--engine-dir", dest="build_dir", type=Path, required=required, default=None,
                    metavar="DIR", help=f"{help} (--engine-dir: the same)")


def run_cli(main) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
