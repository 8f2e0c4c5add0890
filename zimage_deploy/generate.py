"""`python -m zimage_deploy.generate`: one image from a built engine directory."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .cli import run_cli
from .fsutil import atomic_file
from .errors import UserError
from .runtime.backends import BACKENDS


def check_output(output: Path) -> None:
    from PIL import Image

    if output.suffix.lower() not in Image.registered_extensions():
        raise UserError(f"--output {output}: unknown image extension {output.suffix!r} (use .png)")


def write_image(image, output: Path) -> None:
    """Save atomically: a failed save leaves no partial file at `output`."""
    check_output(output)
    with atomic_file(output, suffix=output.suffix.lower()) as tmp:
        image.save(tmp)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zimage_deploy.generate", description=__doc__.split("\n")[0])
    ap.add_argument("--engine-dir", type=Path, required=True, help="a folder written by zimage_deploy.build")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--negative-prompt", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="default: the variant's (Turbo: 8)")
    ap.add_argument("--height", type=int, default=None, help="pixels, multiple of 16 (default: from the build)")
    ap.add_argument("--width", type=int, default=None, help="pixels, multiple of 16 (default: from the build)")
    ap.add_argument("--guidance-scale", type=float, default=None,
                    help="classifier-free guidance scale; 0 turns CFG off (default: the variant's: Turbo 0)")
    ap.add_argument("--cfg-normalization", type=float, default=0.0,
                    help="cap |guided| at this multiple of |positive| (diffusers' cfg_normalization; 0 = off)")
    ap.add_argument("--cfg-truncation", type=float, default=1.0,
                    help="guidance off once (1000 - t) / 1000 exceeds this (diffusers' cfg_truncation)")
    ap.add_argument("--cfg-mode", default="batch", choices=("batch", "sequential"),
                    help="CFG as one batch-2 transformer call per step (default) or two calls")
    ap.add_argument("--image", action="append", default=None, type=Path,
                    help="input image (img2img / inpaint); Edit builds: condition image, repeatable")
    ap.add_argument("--strength", type=float, default=None, help="img2img / inpaint strength in (0, 1] (0.6)")
    ap.add_argument("--mask", type=Path, default=None, help="inpainting mask, white = repaint (needs --image)")
    ap.add_argument("--backend", default="auto", choices=BACKENDS)
    ap.add_argument("--low-vram", action="store_true", help="TensorRT: keep one engine in GPU memory at a time")
    ap.add_argument("--output", type=Path, required=True)
    args = ap.parse_args(argv)

    check_output(args.output)
    if args.strength is not None and not args.image:
        raise UserError("--strength needs --image (img2img / inpainting)")
    if args.mask and not args.image:
        raise UserError("--mask needs --image (inpainting)")

    from . import manifest as manifest_io
    from .runtime.images import open_image
    from .runtime.pipeline import open_pipeline

    edit = manifest_io.load(args.engine_dir)["variant"] == "edit"
    if edit and (args.mask or args.strength is not None):
        raise UserError("the Edit variant takes condition images only: no --mask or --strength")
    if not edit and args.image and len(args.image) > 1:
        raise UserError("several --image (condition images) need an Edit build (--variant edit); "
                        "img2img and inpainting take one --image")
    images = [open_image(p) for p in args.image or []]
    mask = open_image(args.mask) if args.mask else None
    t0 = time.perf_counter()
    pipe = open_pipeline(args.engine_dir, backend=args.backend, cfg_mode=args.cfg_mode, low_vram=args.low_vram)
    if not images:
        pipe.check_size(args.height or pipe.defaults["height"], args.width or pipe.defaults["width"])
    t1 = time.perf_counter()
    common = dict(height=args.height, width=args.width, steps=args.steps, seed=args.seed,
                  negative_prompt=args.negative_prompt, guidance_scale=args.guidance_scale,
                  cfg_normalization=args.cfg_normalization, cfg_truncation=args.cfg_truncation)
    if edit:
        (result,) = pipe(args.prompt, images=images, **common)
    else:
        (result,) = pipe(args.prompt, image=images[0] if images else None, mask=mask,
                         strength=0.6 if args.strength is None else args.strength, **common)
    t2 = time.perf_counter()
    write_image(result, args.output)
    print(f"wrote {args.output} ({result.width}x{result.height}, backend {pipe.backend.name}, "
          f"load {t1 - t0:.2f} s, generate {t2 - t1:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
