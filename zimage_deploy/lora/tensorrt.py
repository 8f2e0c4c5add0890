"""TensorRT: run-time LoRAs, two ways.

1. Engines built with the LoRA side branch (`build --max-lora-rank R [--max-loras N]`; float, FP8, INT4, NVFP4):
   the DiT graph is rewritten before the engine build (`BranchGraph`: lora/onnx_branch.py's rewrite, written to a
   folder of its own, its external data hard links to the graph's: no copy) so that beside every adaptable layer

       Y' = Y + ((X @ down_t) * scale) @ up_t

   runs in the graph's float dtype on the unquantized activation X (before an FP8 QuantizeLinear, before an INT4
   AWQ scale), never re-quantized into the base weights. The factors are ENGINE INPUTS of fixed shape: rank
   R x N x (row blocks of the weight) per layer, the columns past a set's own zero. A LoRA set is then a feed: the
   TensorRT backend keeps the factors in fixed device buffers bound at every call (zeros until a set is loaded),
   a switch copies the new set's factors into them (`branch_feeds`), and nothing is refitted, rebuilt or
   re-captured (a static engine's CUDA graph reads the same buffers). No LoRA = zero factors = the base output bit
   for bit (Y + 0). Inputs rather than refittable weights because: quantized engines cannot be refitted with a
   float delta, a refit of the branch alone would still need REFIT engines (TensorRT-RTX cannot build those ahead
   of time without a GPU; TensorRT documents that REFIT may cost build-time optimisations), and a feed switches
   in a copy of the factors instead of a refit. The cost: the branch's two thin matmuls run at every call, also with no LoRA (the rank bound sets it;
   `plan --max-lora-rank` counts its memory).
2. Refittable engines without the branch (`--refittable`, float builds only): refitted with LoRAs, always from the
   base weights (never stacked). The engines were parsed from the build's ONNX graphs, so their refittable weights
   carry the graphs' initializer names, which are our DiT weight names; a weight is given in its initializer's
   dtype and layout ([out, in], as the module holds it: TensorRT applies the transposes it folded at build time
   itself). A refit sets every weight the new set adapts to base (read from the graph on disk) + deltas, and every
   weight the previous set adapted and the new one does not back to base. Weights are set in chunks of a bounded
   size (one refit per chunk), so host memory holds at most one chunk of weights at a time.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..engines.profiles import fixed_profile
from ..errors import UserError
from ..fsutil import atomic_dir
from ..models.stream import Factor, fused_weight
from .onnx_branch import SUFFIXES, add_branches, feeds
from .targets import Targets, dit_components, graph_initializers

CHUNK_BYTES = 1 << 30
_TRT_DTYPES = {torch.float32: "FLOAT", torch.bfloat16: "BF16", torch.float16: "HALF"}
_DTYPE_NAMES = {1: "float32", 16: "bfloat16"}  # ONNX data type -> export/specs.py DTYPES name


# -- engines with the branch: factors as inputs ------------------------------------------------------------------
class BranchGraph:
    """A DiT component's graph (`graph`: float or Q/DQ) with the LoRA branch beside every adaptable layer, at fixed
    ranks: `max_rank` per LoRA and row block, `max_loras` per set. `unquantized`: the component's float graph (our
    weight names and shapes, the dtype each layer runs in). `record`: what the engine's manifest entry keeps (the
    runtime sizes its buffers from it); `profile`: the factor inputs' (fixed) shapes."""

    def __init__(self, graph: Path, unquantized: Path, patch: int, max_rank: int, max_loras: int):
        import onnx

        if min(max_rank, max_loras) < 1:
            raise UserError("--max-lora-rank and --max-loras must be >= 1")
        self.graph = Path(graph)
        inits = graph_initializers(unquantized)
        targets = Targets({k: tuple(d) for k, (d, _) in inits.items()}, patch)
        adaptable = {a.target for a in targets.aliases.values()}
        shapes = {t: s for t, s in targets.shapes.items() if t in adaptable and inits[t][1] in _DTYPE_NAMES}
        ranks = {t: max_rank * max_loras * targets.parts(t) for t in shapes}
        self.model = onnx.load(str(graph), load_external_data=False)
        adapted = add_branches(self.model, shapes, {t: inits[t][1] for t in shapes}, ranks)
        self.record = {"max_rank": int(max_rank), "max_loras": int(max_loras),
                       "layers": {t: {"shape": list(shapes[t]), "rank": ranks[t],
                                      "dtype": _DTYPE_NAMES[inits[t][1]]} for t in adapted}}

    @property
    def profile(self) -> dict[str, list[list[int]]]:
        return fixed_profile({name: shape for name, (shape, _) in branch_inputs(self.record).items()})

    def write(self, path: Path) -> Path:
        """The rewritten graph at `path`, alone in its folder with its external data files: hard links to the
        graph's (copies where the file system has none)."""
        import onnx

        path = Path(path)
        data = {e.value for i in self.model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL
                for e in i.external_data if e.key == "location"}
        with atomic_dir(path.parent) as tmp:
            for name in sorted(data):
                try:
                    os.link(self.graph.parent / name, tmp / name)
                except OSError:
                    shutil.copyfile(self.graph.parent / name, tmp / name)
            (tmp / path.name).write_bytes(self.model.SerializeToString())
        return path


def branch_bounds(manifest: dict) -> tuple[int, int] | None:
    """(max rank, max LoRAs) of a build whose DiT engines all carry the LoRA branch, or None."""
    records = [((manifest["components"][n].get("engine") or {}).get("lora_branch")) for n in dit_components(manifest)]
    if not records or not all(records):
        return None
    return min(r["max_rank"] for r in records), min(r["max_loras"] for r in records)


def branch_inputs(record: dict) -> dict[str, tuple[list[int], str]]:
    """Input name -> (shape, dtype name) of every factor an engine with the branch takes."""
    out = {}
    for weight, layer in record["layers"].items():
        (rows, inp), r, dtype = layer["shape"], layer["rank"], layer["dtype"]
        base = weight[: -len(".weight")]
        for suffix, shape in zip(SUFFIXES, ([inp, r], [r, rows], [r])):
            out[base + suffix] = (shape, dtype)
    return out


def branch_feeds(record: dict, table: dict[str, list[Factor]]) -> dict[str, torch.Tensor]:
    """The factor inputs of one engine for a set's factors `table` (float32 on the host; the backend copies them
    into its buffers in the engine's dtype)."""
    layers = record["layers"]
    arrays = feeds({w: tuple(x["shape"]) for w, x in layers.items()}, list(layers), table,
                   ranks={w: x["rank"] for w, x in layers.items()})
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


# -- refittable engines without the branch -----------------------------------------------------------------------


def adapted_weights(onnx_path: Path, table: dict[str, list[Factor]], names=None):
    """(initializer name, tensor) for every initializer of the graph at `onnx_path` that `table` adapts (or, with
    `names`, for each of those names): base from the graph + deltas, in the initializer's dtype and shape (our
    weights' [out, in] layout: exported graphs keep each Linear weight as the module holds it)."""
    import onnx

    from ..export.weights import read_initializer

    folder = Path(onnx_path).parent
    model = onnx.load(str(onnx_path), load_external_data=False)
    wanted = set(table) if names is None else set(names)
    for proto in model.graph.initializer:
        if proto.name not in wanted:
            continue
        _, base = read_initializer(proto, folder)
        parts = table.get(proto.name)
        yield proto.name, (fused_weight(base, parts).to(base.dtype) if parts else base.clone())


def refit_names(onnx_path: Path, table: dict[str, list[Factor]], previous=()) -> set[str]:
    """The graph's weights a refit to `table` sets: those it adapts and those `previous` adapted."""
    inits = graph_initializers(onnx_path)
    return {n for n in set(table) | set(previous) if n in inits}


def refit_engine(trt, engine, logger, onnx_path: Path, table: dict[str, list[Factor]], names, chunk_bytes=CHUNK_BYTES):
    """Refit `names` of `engine` (built from `onnx_path`) to base + the deltas of `table`. The caller makes sure no
    work is queued on the engine."""
    if not names:
        return
    if not getattr(engine, "refittable", True):
        raise UserError(f"the engine built from {onnx_path} is not refittable: build it with --refittable")
    batch: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in adapted_weights(onnx_path, table, names):
        batch.append((name, tensor.contiguous()))
        size += tensor.nbytes
        if size >= chunk_bytes:
            _refit(trt, engine, logger, onnx_path, batch)
            batch, size = [], 0
    if batch:
        _refit(trt, engine, logger, onnx_path, batch)


def _refit(trt, engine, logger, onnx_path: Path, batch) -> None:
    refitter = trt.Refitter(engine, logger)  # one per chunk: a refitter keeps pointing at the weights it was given
    held = list(batch)
    for name, tensor in batch:
        _set(trt, refitter, name, tensor)
    missing = [m for m in refitter.get_missing_weights() if m]
    if missing:  # weights TensorRT combined with the ones set: given their current (base) values
        for name, tensor in adapted_weights(onnx_path, {}, missing):
            held.append((name, tensor.contiguous()))
            _set(trt, refitter, name, held[-1][1])
    if refitter.get_missing_weights():
        raise UserError(f"refit of the engine built from {onnx_path} needs weights the graph does not name: "
                        f"{refitter.get_missing_weights()[:5]}")
    if not refitter.refit_cuda_engine():
        raise UserError(f"TensorRT refused the refit of the engine built from {onnx_path} (see its log above)")
    del held


def _set(trt, refitter, name: str, tensor: torch.Tensor) -> None:
    weights = trt.Weights(getattr(trt.DataType, _TRT_DTYPES[tensor.dtype]), tensor.data_ptr(), tensor.numel())
    if not refitter.set_named_weights(name, weights):
        raise UserError(f"TensorRT has no refittable weight {name!r} of {tensor.dtype} x {tensor.numel()} in this "
                        "engine (was it built with --refittable from this graph?)")


def network_weight_names(trt, onnx_path: Path, names) -> dict[str, bool]:
    """Whether TensorRT's ONNX parser gives the network a weight of each name (CPU only: no engine is built)."""
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise UserError(f"cannot parse {onnx_path}")
    return {n: bool(network.mark_weights_refittable(n)) for n in names}
