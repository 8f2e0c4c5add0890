"""`python -m zimage_deploy.refit --engine-dir DIR [--lora PATH[:SCALE] ...]`: bake LoRAs into refittable engines.

Every LoRA-adaptable weight of the DiT engines (context refiner, transformer, SigLIP refiner) is refitted from the
base weights (the build's ONNX graphs) plus the given LoRAs' deltas, so a refit never stacks on an earlier one;
without --lora the engines go back to the base weights. The refitted plans are written atomically (temp name,
rename) and the manifest records their new hashes and the LoRAs they hold. Needs the build's GPU and TensorRT;
the engines must have been built with --refittable (and not weightless: those load their weights from the graphs,
use run-time LoRAs for them: generate --lora). Run-time swapping without touching the plans: `generate --lora`,
`ZImageRuntime.generate(..., loras=...)`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import manifest as manifest_io
from .buildfolder import BuildFolder
from .cli import add_build_dir, run_cli
from .errors import UserError
from .fsutil import atomic_file, folder_lock


def check_refittable(engine_dir: Path, manifest: manifest_io.Manifest | dict) -> list[str]:
    """The DiT components whose engines can be refitted, or a UserError saying why not."""
    from .lora.runtime import QUANTIZED_MESSAGE
    from .lora.targets import dit_components
    from .targets import QUANTIZED

    manifest = manifest_io.parse(manifest, Path(engine_dir) / manifest_io.NAME)
    names = dit_components(manifest)
    comps = manifest.components
    quantized = sorted({comps[n].precision for n in names} & set(QUANTIZED))
    if quantized:
        raise UserError(QUANTIZED_MESSAGE.format(", ".join(quantized)))
    for name in names:
        eng = comps[name].engine
        if not comps[name].has_engine:
            raise UserError(f"{engine_dir} has no engine for {name}: build it for a GPU target with --refittable")
        if not eng.refittable:
            raise UserError(f"the {name} engine in {engine_dir} is not refittable: rebuild with --refittable")
        if eng.stripped:
            raise UserError(f"the {name} engine in {engine_dir} is weightless (its weights load from the graph): "
                            "swap LoRAs at run time instead (generate --lora)")
    return names


def refit(engine_dir: Path, loras=(), log=print) -> dict:
    """Refit the DiT engines of `engine_dir` to base + `loras` ((path, scale) pairs or 'PATH[:SCALE]')."""
    import torch

    from .engines.builder import device_capability
    from .hashing import file_sha256
    from .engines.flavour import import_trt, version
    from .lora.formats import read_lora
    from .models.stream import factors
    from .lora.spec import as_spec
    from .lora.targets import from_graphs, graph_initializers, graph_path
    from .lora.tensorrt import refit_engine
    from .runtime.tensorrt_backend import check_compat, check_plans

    engine_dir = Path(engine_dir)
    manifest = manifest_io.load(engine_dir)
    names = check_refittable(engine_dir, manifest)
    targets = from_graphs(engine_dir, manifest)
    items = [(read_lora(spec.path, targets), spec.scale) for spec in map(as_spec, loras)]
    table = factors(items)
    trt = import_trt(manifest.tensorrt.flavour)
    check_plans(engine_dir, manifest)
    check_compat(manifest, version(trt), device_capability())
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    record = [{"source": str(lora.path), "scale": scale, **lora.record()} for lora, scale in items]
    data = manifest.to_dict()  # what is written back, the refitted engines' records updated
    with folder_lock(engine_dir):
        for name in names:
            t0 = time.perf_counter()
            comp = data["components"][name]
            plan = BuildFolder(engine_dir).file(manifest.components[name].engine.plan)
            engine = runtime.deserialize_cuda_engine(plan.read_bytes())
            if engine is None:
                raise UserError(f"TensorRT could not deserialize {plan} (see its log above)")
            onnx_path = graph_path(engine_dir, comp)
            adaptable = set(graph_initializers(onnx_path)) & set(targets.shapes)  # all: earlier LoRAs undone
            refit_engine(trt, engine, logger, onnx_path, table, adaptable)
            torch.cuda.synchronize()
            serialized = engine.serialize()
            with atomic_file(plan, suffix=".plan") as tmp:
                tmp.write_bytes(memoryview(serialized))
            del serialized, engine
            comp["engine"].update(plan_sha256=file_sha256(plan), bytes=plan.stat().st_size, loras=record)
            manifest_io.save(engine_dir, data)
            changed = sum(1 for n in adaptable if n in table)
            log(f"[refit] {name}: {changed} of {len(adaptable)} adaptable weights with LoRA deltas, the rest base "
                f"({time.perf_counter() - t0:.1f} s)")
    return {"components": names, "loras": record}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zimage_deploy.refit", description=__doc__.split("\n")[0])
    add_build_dir(ap, "a build with --refittable engines")
    ap.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                    help="LoRA to refit in (repeatable; scale default 1); none: back to the base weights")
    args = ap.parse_args(argv)
    from .lora.spec import parse_lora_arg

    specs = [parse_lora_arg(a) for a in args.lora]  # malformed arguments fail before anything loads
    refit(args.build_dir, specs)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
