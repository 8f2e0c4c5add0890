"""Weights into exported graphs.

Graphs are traced with the parameters as named graph inputs (`export_params=False`, no constant folding), so
every weight keeps its module name. `attach_weights` then turns those inputs into initializers, taking the
tensors one at a time from any source (a loaded module's state dict, or a stream read straight from the
checkpoint's safetensors) and, above 512 MiB, appending them to one external data file. The whole model is never
in memory at once on the streaming path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

EXTERNAL_THRESHOLD = 512 << 20  # above this, weights go to one external data file (streamed, little memory)
DATA_FILE = "model.onnx.data"
TORCH_OF = {TensorProto.FLOAT: torch.float32, TensorProto.BFLOAT16: torch.bfloat16,
            TensorProto.FLOAT16: torch.float16, TensorProto.INT64: torch.int64}


def _raw(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (bfloat16 through an int16 view: numpy has no bfloat16)."""
    t = tensor.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def param_inputs(model: onnx.ModelProto, io_names: set[str]) -> dict[str, onnx.ValueInfoProto]:
    """The graph inputs that are weights (every input not in the component's declared I/O)."""
    return {i.name: i for i in model.graph.input if i.name not in io_names}


def attach_weights(model: onnx.ModelProto, io_names: set[str], source: Iterable[tuple[str, torch.Tensor]],
                   folder: Path, total_bytes: int | None = None, strip_prefix: str = "") -> dict:
    """Replace weight inputs by initializers from `source` ((name, tensor) pairs, any order, extra names
    ignored); tensors are cast to the dtype the graph declares; `strip_prefix` comes off the initializer
    names (a wrapper's attribute name), so every graph names a weight as the model does. Returns a summary
    (count, bytes, external)."""
    wanted = param_inputs(model, io_names)
    if total_bytes is None:
        total_bytes = 0
        for vi in wanted.values():
            dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
            total_bytes += int(np.prod(dims)) * (2 if vi.type.tensor_type.elem_type == TensorProto.BFLOAT16 else 4)
    external = total_bytes > EXTERNAL_THRESHOLD
    data = open(folder / DATA_FILE, "wb") if external else None
    initializers, offset, written = [], 0, 0
    try:
        for name, tensor in source:
            vi = wanted.pop(name, None)
            if vi is None:
                continue
            elem = vi.type.tensor_type.elem_type
            dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
            if list(tensor.shape) != dims:
                raise ValueError(f"weight {name}: checkpoint shape {list(tensor.shape)} != graph shape {dims}")
            raw = _raw(tensor.to(TORCH_OF[elem]))
            short = name[len(strip_prefix):] if strip_prefix and name.startswith(strip_prefix) else name
            proto = TensorProto(name=short, data_type=elem, dims=dims)
            if external:
                data.write(raw)
                proto.data_location = TensorProto.EXTERNAL
                for key, value in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(len(raw)))):
                    entry = proto.external_data.add()
                    entry.key, entry.value = key, value
                offset += len(raw)
            else:
                proto.raw_data = raw.tobytes()
            initializers.append(proto)
            written += len(raw)
    finally:
        if data is not None:
            data.close()
    if wanted:
        raise ValueError(f"no weights for {len(wanted)} graph inputs, e.g. {sorted(wanted)[:5]}")
    if strip_prefix:
        for node in model.graph.node:
            node.input[:] = [i[len(strip_prefix):] if i.startswith(strip_prefix) and i not in io_names else i
                             for i in node.input]
    kept = [i for i in model.graph.input if i.name in io_names]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    model.graph.initializer.extend(initializers)
    return {"initializers": len(initializers), "weight_bytes": written, "external_data": external}


def module_weights(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.state_dict().items()


def to_numpy(proto: TensorProto, folder: Path) -> np.ndarray:
    """An initializer's values (external data read from `folder`)."""
    return numpy_helper.to_array(proto, base_dir=str(folder))
