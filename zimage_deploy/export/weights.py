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


class ExternalWriter:
    """Initializers built one at a time: raw bytes appended to one external data file (`external`) or kept
    inline in the proto."""

    def __init__(self, folder: Path, external: bool):
        self.external, self.offset, self.bytes_written = external, 0, 0
        self.file = open(Path(folder) / DATA_FILE, "wb") if external else None

    def add(self, name: str, elem: int, dims: list[int], raw) -> TensorProto:
        proto = TensorProto(name=name, data_type=elem, dims=dims)
        n = len(raw) if isinstance(raw, (bytes, bytearray)) else raw.nbytes
        if self.external:
            self.file.write(raw)
            proto.data_location = TensorProto.EXTERNAL
            for key, value in (("location", DATA_FILE), ("offset", str(self.offset)), ("length", str(n))):
                entry = proto.external_data.add()
                entry.key, entry.value = key, value
            self.offset += n
        else:
            proto.raw_data = bytes(raw)
        self.bytes_written += n
        return proto

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def read_initializer(proto: TensorProto, folder: Path) -> tuple[bytes, torch.Tensor | None]:
    """One initializer's raw bytes (from the external data file if it lives there) and, for float types, its
    values as a torch tensor."""
    if proto.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in proto.external_data}
        with open(Path(folder) / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            raw = f.read(int(info["length"]))
    elif proto.raw_data:
        raw = proto.raw_data
    else:
        raw = numpy_helper.to_array(proto).tobytes()
    dims = list(proto.dims)
    if proto.data_type == TensorProto.BFLOAT16:
        return raw, torch.frombuffer(bytearray(raw), dtype=torch.int16).view(torch.bfloat16).reshape(dims)
    if proto.data_type == TensorProto.FLOAT:
        return raw, torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(dims)
    return raw, None


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
    writer = ExternalWriter(folder, external=total_bytes > EXTERNAL_THRESHOLD)
    initializers = []
    try:
        for name, tensor in source:
            vi = wanted.pop(name, None)
            if vi is None:
                continue
            elem = vi.type.tensor_type.elem_type
            dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
            if list(tensor.shape) != dims:
                raise ValueError(f"weight {name}: checkpoint shape {list(tensor.shape)} != graph shape {dims}")
            short = name[len(strip_prefix):] if strip_prefix and name.startswith(strip_prefix) else name
            initializers.append(writer.add(short, elem, dims, _raw(tensor.to(TORCH_OF[elem]))))
    finally:
        writer.close()
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
    return {"initializers": len(initializers), "weight_bytes": writer.bytes_written,
            "external_data": writer.external}


def module_weights(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.state_dict().items()


def to_numpy(proto: TensorProto, folder: Path) -> np.ndarray:
    """An initializer's values (external data read from `folder`)."""
    return numpy_helper.to_array(proto, base_dir=str(folder))
