"""The interface every backend implements (runtime/backends.py: ONNX Runtime, Torch and the factory;
runtime/tensorrt_backend.py: TensorRT): run a component by name on named torch tensors, get named torch tensors."""

from __future__ import annotations

from pathlib import Path

import torch

from ..export.specs import DTYPES


class Backend:
    name = "base"
    device = torch.device("cpu")

    def __init__(self, engine_dir: Path, manifest: dict):
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        self.components = manifest["components"]

    def run(self, component: str, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _cast_inputs(self, component: str, inputs: dict) -> dict[str, torch.Tensor]:
        spec = self.components[component]
        names = [i["name"] for i in spec["inputs"]]
        if sorted(inputs) != sorted(names):
            raise ValueError(f"{component} takes {names}, got {sorted(inputs)}")
        return {i["name"]: inputs[i["name"]].to(DTYPES[i["dtype"]]) for i in spec["inputs"]}
