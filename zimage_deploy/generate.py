"""`python -m zimage_deploy.generate`: one image from a built engine directory."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from .cli import run_cli
from .errors import UserError
from .runtime.backends import BACKENDS


def write_image(image, output: Path) -> None:
    """Save atomically: a failed save leaves no partial file at `output`."""
    from PIL import Image

    ext = output.suffix.lower()
    if ext not in Image.registered_extensions():
        raise UserError(f"--output {output}: unknown image extension {ext!r} (use .png)")
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=ext, dir=output.parent)
    os.close(fd)
    try:
        image.save(tmp)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zimage_deploy.generate", description=__doc__.split("\n")[0])
    ap.add_argument("--engine-dir", type=Path, required=True, help="a folder written by zimage_deploy.build")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--negative-prompt", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="default: the variant's (Turbo: 8)")
    ap.add_argument("--height", type=int, default=None, help="pixels, multiple of 16 (default: from the build)")
    ap.add_argument("--width", type=int, default=None, help="pixels, multiple of 16 (default: from the build)")
    ap.add_argument("--guidance-scale", type=float, default=None)
    ap.add_argument("--image", action="append", default=None, type=Path)
    ap.add_argument("--strength", type=float, default=None)
    ap.add_argument("--mask", type=Path, default=None)
    ap.add_argument("--backend", default="auto", choices=BACKENDS)
    ap.add_argument("--output", type=Path, required=True)
    args = ap.parse_args(argv)

    if args.negative_prompt is not None or args.guidance_scale not in (None, 0.0):
        raise UserError("Z-Image-Turbo runs without classifier-free guidance: --negative-prompt and "
                        "--guidance-scale need the Base variant (Base/Edit issue #5)")
    if args.image or args.mask or args.strength is not None:
        raise UserError("--image / --mask / --strength (img2img, inpaint, edit) land with the Base/Edit issue (#5)")

    from .runtime.pipeline import TurboPipeline

    t0 = time.perf_counter()
    pipe = TurboPipeline(args.engine_dir, backend=args.backend)
    pipe.check_size(args.height or pipe.manifest["defaults"]["height"], args.width or pipe.manifest["defaults"]["width"])
    t1 = time.perf_counter()
    (image,) = pipe(args.prompt, height=args.height, width=args.width, steps=args.steps, seed=args.seed)
    t2 = time.perf_counter()
    write_image(image, args.output)
    print(f"wrote {args.output} ({image.width}x{image.height}, backend {pipe.backend.name}, "
          f"load {t1 - t0:.2f} s, generate {t2 - t1:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
