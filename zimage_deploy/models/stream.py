"""The DiT's weight stream, the one every DiT consumer reads (the loaded module for ordinary export, parity, the
Torch backend and calibration; the memory-lean export, which streams weights into the graphs):

checkpoint tensors -> our fused naming -> LoRA deltas added (build --lora) -> the ControlNet's weights and hint
slots appended (build --controlnet).

The LoRAs are (lora, scale) pairs whose `lora.layers` carry `target`, `rows`, `down`, `up`, `scale` (lora/formats.py
reads them from files); the ControlNet is a controlnet.ControlNetSource (`weights()`, `config`). A fused weight is
`W + sum(scale * up @ down)` in float32 (diffusers' `fuse_lora` arithmetic), handed on in float32 and cast by its
consumer to the build's dtype."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from ..checkpoint import iter_tensors, read_config
from ..errors import InternalError
from .controlnet import hint_buffers
from .dit import DiTConfig, iter_fused

Factor = tuple[tuple[int, int], torch.Tensor, torch.Tensor, float]  # rows, down, up, total scale
Pairs = Iterable[tuple[str, torch.Tensor]]


def factors(loras: Sequence[tuple]) -> dict[str, list[Factor]]:
    """target weight -> its low-rank factors, in the order given, each with scale = user scale x file scale."""
    table: dict[str, list[Factor]] = {}
    for lora, scale in loras:
        for layer in lora.layers:
            table.setdefault(layer.target, []).append((layer.rows, layer.down, layer.up, scale * layer.scale))
    return table


def fused_weight(weight: torch.Tensor, parts: list[Factor]) -> torch.Tensor:
    """`weight` + its LoRA deltas, in float32."""
    w = weight.float().clone()
    for (a, b), down, up, scale in parts:
        w[a:b] += (up @ down) * scale
    return w


def fuse_stream(items: Pairs, loras: Sequence[tuple]) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, tensor) pairs with the LoRA deltas added to the weights they adapt."""
    table = factors(loras)
    seen = set()
    for name, tensor in items:
        parts = table.get(name)
        if parts:
            if tensor.dim() != 2 or tensor.shape[1] != parts[0][1].shape[1]:
                raise InternalError(f"LoRA target {name} has shape {tuple(tensor.shape)}")
            tensor = fused_weight(tensor, parts)
            seen.add(name)
        yield name, tensor
    if set(table) - seen:
        raise InternalError(f"LoRA targets missing from the weight stream: {sorted(set(table) - seen)[:5]}")


def with_controlnet(items: Pairs, source, n_layers: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The DiT's weight stream with the ControlNet's weights and the hint slots appended."""
    yield from items
    yield from source.weights()
    yield from hint_buffers(source.config, n_layers)


def dit_weights(ckpt: Path, loras=(), controlnet=None) -> Iterator[tuple[str, torch.Tensor]]:
    """The DiT's weights in our naming, with the LoRAs fused (and the ControlNet's after them)."""
    items = iter_fused(iter_tensors(ckpt / "transformer"))
    if loras:
        items = fuse_stream(items, loras)
    if controlnet is not None:
        items = with_controlnet(items, controlnet, DiTConfig.from_diffusers(read_config(ckpt, "transformer")).n_layers)
    return items
