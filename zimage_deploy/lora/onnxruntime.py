"""ONNX Runtime backend: a LoRA set runs in its own sessions, whose adapted initializers are replaced.

Each DiT graph the set adapts gets a session created from the build's graph with `SessionOptions.add_initializer`
overriding the adapted weights (base weight from the graph + LoRA deltas, computed in float32, stored in the
initializer's dtype and layout). ONNX Runtime's constant folding reads the graph's own initializers before the
overrides are applied (measured with onnxruntime 1.32: with it on, the overrides are silently ignored), so these
sessions run with the ConstantFolding optimizer disabled (tested against a session on an edited graph). The base
sessions are never touched: without a set, the backend's own sessions run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..models.stream import Factor, fused_weight
from .targets import dit_components, graph_path

DISABLED = ["ConstantFolding"]


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


class OrtLoraSessions:
    """The sessions of one LoRA set (component -> session), built from the backend's own settings."""

    def __init__(self, backend, table: dict[str, list[Factor]]):
        ort = backend.ort
        self.sessions, self._values = {}, []
        for name in dit_components(backend.manifest):
            path = graph_path(backend.engine_dir, backend.components[name])
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            count = 0
            for init, tensor in adapted_weights(path, table):
                value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(tensor.numpy()))
                opts.add_initializer(init, value)
                self._values.append(value)  # ONNX Runtime uses the memory as is: it must outlive the session
                count += 1
            if count:
                self.sessions[name] = ort.InferenceSession(str(path), opts, providers=backend.providers,
                                                           disabled_optimizers=DISABLED)

    def run(self, backend, component: str, inputs: dict) -> dict[str, torch.Tensor]:
        """The ONNX Runtime backend's `run`, on this set's session."""
        feeds = {k: v.detach().cpu().numpy() for k, v in backend._cast_inputs(component, inputs).items()}
        outputs = self.sessions[component].run(None, feeds)
        names = [o["name"] for o in backend.components[component]["outputs"]]
        return {n: torch.from_numpy(np.asarray(o)) for n, o in zip(names, outputs)}
