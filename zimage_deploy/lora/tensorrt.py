"""TensorRT: refittable engines refitted with LoRAs, always from the base weights (never stacked).

The engines were parsed from the build's ONNX graphs, so their refittable weights carry the graphs' initializer
names, which are our DiT weight names; a weight is given in its initializer's dtype and layout ([out, in], as the
module holds it: TensorRT applies the transposes it folded at build time itself). A refit sets every weight the new
set adapts to base (read from the graph on disk) + deltas, and every weight the previous set adapted and the new
one does not back to base. Weights are set in chunks of a bounded size (one refit per chunk), so host memory holds
at most one chunk of weights at a time.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..models.stream import Factor, fused_weight
from .targets import graph_initializers

CHUNK_BYTES = 1 << 30
_TRT_DTYPES = {torch.float32: "FLOAT", torch.bfloat16: "BF16", torch.float16: "HALF"}


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
