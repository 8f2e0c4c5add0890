"""`python -m zimage_deploy.generate`: one image from a built engine directory.

The request is checked by runtime/validate.py before any model loads (the same rules and messages as the
runtime API and the server); a bad request prints one `error:` line and exits with code 2."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .cli import add_build_dir, run_cli
from .fsutil import atomic_file
from .errors import RequestError, UserError
from .runtime.backends import BACKENDS, TORCH_MODES, add_providers_flag
from .runtime.offload import OFFLOAD_CHOICES, asked_mode


def check_output(output: Path) -> None:
    from PIL import Image

    if output.suffix.lower() not in Image.registered_extensions():
        raise UserError(f"--output {output}: unknown image extension {output.suffix!r} (use .png)")


def write_image(image, output: Path) -> None:
    """Save atomically: a failed save leaves no partial file at `output`."""
    check_output(output)
    with atomic_file(output, suffix=output.suffix.lower()) as tmp:
        image.save(tmp)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m zimage_deploy.generate", description=__doc__.split("\n")[0])
    add_build_dir(ap)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--negative-prompt", default=None)
    ap.add_argument("--seed", type=int, default=0, help="0 .. 2**63 - 1 (default: 0)")
    ap.add_argument("--steps", type=int, default=None, help="1 .. 100 (default: the variant's; Turbo: 8)")
    ap.add_argument("--height", type=int, default=None,
                    help="pixels, a multiple of 16 within the build's size range (default: from the build)")
    ap.add_argument("--width", type=int, default=None,
                    help="pixels, a multiple of 16 within the build's size range (default: from the build)")
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
    ap.add_argument("--strength", type=float, default=None,
                    help="img2img / inpaint strength in (0, 1] (0.6); Edit builds: (1), edits the first --image")
    ap.add_argument("--mask", type=Path, default=None,
                    help="inpainting mask, white = repaint (needs --image; Edit builds: the first --image's size)")
    ap.add_argument("--control-image", type=Path, default=None,
                    help="ControlNet builds: the control image (edges, depth, pose, ...), resized to the output size; "
                         "with an inpainting ControlNet, --image and --mask condition it too")
    ap.add_argument("--controlnet-scale", type=float, default=None,
                    help="how strongly the control image steers, in [0, 2] (default 0.75; 0 = the plain image)")
    ap.add_argument("--backend", default="auto", choices=BACKENDS)
    ap.add_argument("--torch-mode", default=None, choices=TORCH_MODES,
                    help="the torch backend: compiled (torch.compile, a CUDA graph per denoising step, FP8 builds "
                         "through FP8 matmuls; the default on CUDA) or eager (the default on the CPU)")
    ap.add_argument("--offload", default="auto", choices=OFFLOAD_CHOICES,
                    help="the memory mode: auto (default: the one the build's VRAM plan picked for its target, see "
                         "python -m zimage_deploy.plan), none (all resident), model (one stage resident at a time), "
                         "text-encoder-cpu (model, the text encoder run on the CPU), sequential (Torch: layer by "
                         "layer; TensorRT: weight streaming, where the build planned it)")
    ap.add_argument("--low-vram", action="store_true", default=None, help="the same as --offload model")
    add_providers_flag(ap)
    ap.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                    help="apply a LoRA for this run (repeatable; scale default 1; any precision on torch and "
                         "onnxruntime; TensorRT: unquantized --refittable engines, refitted from the base weights)")
    ap.add_argument("--output", type=Path, required=True)
    return ap


def _check_flags(args) -> None:
    """Flags that need another flag: the validator's messages, before reading any file."""
    from .runtime.validate import MASK_NEEDS_IMAGE, SCALE_NEEDS_CONTROL, STRENGTH_NEEDS_IMAGE

    if args.strength is not None and not args.image:
        raise RequestError(STRENGTH_NEEDS_IMAGE)
    if args.mask and not args.image:
        raise RequestError(MASK_NEEDS_IMAGE)
    if args.controlnet_scale is not None and args.control_image is None:
        raise RequestError(SCALE_NEEDS_CONTROL)


def _check_backend(args, manifest) -> str | None:
    """The backend's options (torch mode, ONNX Runtime providers) checked -> the memory mode asked for."""
    from .runtime.backends import check_options, check_providers, check_torch_mode, resolve_backend

    check_torch_mode(resolve_backend(args.backend, manifest), args.torch_mode)
    offload = asked_mode(args.offload, args.low_vram)
    check_options(resolve_backend(args.backend, manifest), ort_providers=args.ort_providers)
    if args.ort_providers is not None:
        check_providers(args.ort_providers)
    return offload


def _request(args, limits):
    """The request checked against the build's limits (the same rules and messages as the runtime API and the
    server), the input images from their headers only; then the images decoded -> (Request, images, mask,
    control image)."""
    from .runtime.validate import check_request, decode_image, probe_image

    paths = list(args.image or [])
    mask_what, control_what = f"mask {args.mask}", f"control image {args.control_image}"
    infos = [probe_image(p, f"image {p}") for p in paths]
    mask_info = probe_image(args.mask, mask_what) if args.mask else None
    control_info = probe_image(args.control_image, control_what) if args.control_image else None
    req = check_request(limits, args.prompt, seed=args.seed, steps=args.steps, height=args.height,
                        width=args.width, negative_prompt=args.negative_prompt, guidance_scale=args.guidance_scale,
                        cfg_normalization=args.cfg_normalization, cfg_truncation=args.cfg_truncation,
                        strength=args.strength, images=infos, mask=mask_info, control_image=control_info,
                        controlnet_scale=args.controlnet_scale)
    images = [decode_image(p, limits, f"image {p}") for p in paths]
    mask = decode_image(args.mask, limits, mask_what) if args.mask else None
    control = decode_image(args.control_image, limits, control_what) if args.control_image else None
    return req, images, mask, control


def main(argv=None) -> int:
    args = parser().parse_args(argv)

    from . import manifest as manifest_io
    from .lora import LoraManager, parse_lora_arg
    from .runtime.backends import backend_entry, resolve_backend
    from .runtime.open import open_pipeline
    from .runtime.validate import Limits

    check_output(args.output)
    lora_specs = [parse_lora_arg(a) for a in args.lora]
    _check_flags(args)
    # everything is checked before any model loads
    manifest = manifest_io.load(args.build_dir)
    offload = _check_backend(args, manifest)
    limits = Limits.for_build(manifest, resolve_backend(args.backend, manifest), args.cfg_mode)
    req, images, mask, control = _request(args, limits)
    loras = LoraManager(args.build_dir, manifest, backend_entry(resolve_backend(args.backend, manifest)),
                        None if offload is None else offload != "none")
    lora_set = loras.prepare(lora_specs)
    t0 = time.perf_counter()
    pipe = open_pipeline(args.build_dir, backend=args.backend, cfg_mode=args.cfg_mode, torch_mode=args.torch_mode,
                         torch_options={"ort_providers": args.ort_providers} if args.ort_providers else None,
                         offload=offload)
    t1 = time.perf_counter()
    with loras.bind(pipe).use(lora_set):
        (result,) = pipe.run(req, images, mask, control)
    t2 = time.perf_counter()
    write_image(result, args.output)
    mode = f" {pipe.backend.torch_mode}" if getattr(pipe.backend, "torch_mode", None) else ""
    print(f"wrote {args.output} ({result.width}x{result.height}, backend {pipe.backend.name}{mode}, "
          f"load {t1 - t0:.2f} s, generate {t2 - t1:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
