"""Run-time LoRA sets on the TensorRT backend, one set at a time (lora/runtime.py calls `load` with no generation
running):

- `EngineBranch`: engines built with the LoRA side branch (`build --max-lora-rank`): the set's factors are engine
  inputs, copied into the backend's fixed buffers (`TensorRTBackend.load_lora`); no refit, no re-capture;
- `EngineRefit`: float engines without it: the DiT's engines refitted, always from the base weights
  (lora/tensorrt.py); a captured CUDA graph is re-captured after."""

from __future__ import annotations

import torch

from ..lora.targets import dit_components, graph_path
from ..lora.tensorrt import branch_feeds, refit_engine, refit_names


class EngineRefit:
    def __init__(self, backend):
        self.backend = backend
        self.modified: dict[str, set] = {}  # component -> weights holding a LoRA delta now

    def prepare(self, table: dict) -> dict:
        return table

    def load(self, table: dict) -> None:
        backend = self.backend
        torch.cuda.synchronize()
        for name in dit_components(backend.manifest):
            path = graph_path(backend.engine_dir, backend.components[name])
            names = refit_names(path, table, self.modified.get(name, ()))
            eng = backend._engine(name)
            refit_engine(backend.trt, eng.engine, backend.logger, path, table, names)
            eng.graph = None  # a captured CUDA graph is re-captured with the new weights
            self.modified[name] = {n for n in names if n in table}


class EngineBranch:
    def __init__(self, backend):
        self.backend = backend

    def prepare(self, table: dict) -> dict:
        comps = self.backend.components
        return {n: branch_feeds(comps[n]["engine"]["lora_branch"], table) for n in dit_components(self.backend.manifest)}

    def load(self, factors: dict) -> None:
        self.backend.load_lora(factors)  # {}: zeros, the base output
