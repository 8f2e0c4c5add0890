"""The Torch modules a build exports and checks: each loaded once per (loader, dtype), with the build's LoRAs fused
and its ControlNet attached; for the memory-lean export, two-layer templates and the weight streams."""

from __future__ import annotations

from pathlib import Path

import torch

from ..components import loader_of
from ..models.load import LOADERS, TEMPLATES, stream_weights


class Modules:
    def __init__(self, ckpt: Path, loras, controlnet=None):
        """`loras`: lora.fuse.BuildLoras; `controlnet`: controlnet.BuildControlNet (or None)."""
        self.ckpt, self.loras, self.controlnet = ckpt, loras, controlnet
        self.loaded: dict[tuple, torch.nn.Module] = {}

    def _controlnet(self, loader: str) -> dict:
        return self.controlnet.kwargs(loader) if self.controlnet else {}

    def _kwargs(self, loader: str) -> dict:
        return {**(self.loras.kwargs(loader) if self.loras else {}), **self._controlnet(loader)}

    def module(self, component: str, dtype: torch.dtype) -> torch.nn.Module:
        """The whole module that serves `component` (models/load.py LOADERS)."""
        key = (loader_of(component), dtype)
        if key not in self.loaded:
            self.loaded[key] = LOADERS[key[0]](self.ckpt, dtype, **self._kwargs(key[0]))
        return self.loaded[key]

    def has_template(self, component: str) -> bool:
        return loader_of(component) in TEMPLATES

    def template(self, component: str, dtype: torch.dtype) -> tuple[torch.nn.Module, int]:
        """A two-layer template of the module that serves `component`, and the real depth."""
        loader = loader_of(component)
        key = (loader, dtype, "template")
        if key not in self.loaded:
            self.loaded[key] = TEMPLATES[loader](self.ckpt, dtype, **self._controlnet(loader))
        return self.loaded[key]

    def weights(self, component: str):
        """The weight stream of the module that serves `component`, in our naming."""
        loader = loader_of(component)
        return stream_weights(self.ckpt, loader, **self._kwargs(loader))

    def keep_only(self, components) -> None:
        """Free what none of `components` needs (the lean path's point is bounded memory)."""
        loaders = {loader_of(c) for c in components}
        for key in [k for k in self.loaded if k[0] not in loaders]:
            del self.loaded[key]
