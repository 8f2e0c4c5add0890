"""Torch backend: LoRAs applied at run time without touching the base weights.

A forward hook on each adapted Linear adds `scale * (x @ down.T) @ up.T` to the rows it adapts (the q/k/v third of a
fused `qkv`, the w1/w3 half of a fused `w13`) — PEFT's unfused LoRA arithmetic. The hooks read the active set
from a context variable, so threads running different LoRA sets on the same module do not see each other's, and a
hook with no active set returns the base output untouched (the base image, bit for bit).
"""

from __future__ import annotations

import contextvars
import threading

import torch
import torch.nn.functional as F

from ..models.stream import Factor


class TorchAdapters:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.active: contextvars.ContextVar[dict | None] = contextvars.ContextVar(f"lora_{id(self)}", default=None)
        self.hooked: dict[str, object] = {}
        self._lock = threading.Lock()

    def prepare(self, table: dict[str, list[Factor]]) -> dict[str, list[Factor]]:
        """Factors on the module's device, in each adapted layer's compute dtype, keyed by module name; hooks are
        installed (once per module) on the modules the set adapts."""
        params = dict(self.model.named_parameters())
        prepared = {}
        for target, parts in table.items():
            weight = params[target]
            prepared[target[: -len(".weight")]] = [
                (rows, down.to(weight.device, weight.dtype), up.to(weight.device, weight.dtype), scale)
                for rows, down, up, scale in parts]
        with self._lock:
            for module in prepared:
                if module not in self.hooked:
                    self.hooked[module] = self.model.get_submodule(module).register_forward_hook(self._hook(module))
        return prepared

    def _hook(self, module: str):
        def hook(layer, args, output):
            active = self.active.get()
            parts = None if active is None else active.get(module)
            if not parts:
                return None
            x = args[0].to(parts[0][1].dtype)
            extra = torch.zeros_like(output)
            for (a, b), down, up, scale in parts:
                extra[..., a:b] += F.linear(F.linear(x, down), up) * scale
            return output + extra

        return hook

    def use(self, prepared: dict | None):
        """Make `prepared` the active set in this context; returns the token for `reset`."""
        return self.active.set(prepared)

    def reset(self, token) -> None:
        self.active.reset(token)
