"""LoRA as a side branch beside a linear layer, in fixed-size buffers: y = base(x) + ((x A^T) * s) B^T.

`LoraBranch` wraps any linear layer (the plain one, an emulated quantized one (models/emulate.py: its activation
pre-hook stays on the wrapped layer, so the base sees Q(x) and the branch the unquantized x), models/fast.py's
FP8Linear) and holds A, B and a per-rank-column scale s up to a fixed rank `capacity`, in a high-precision dtype
(the layer's own float dtype; bfloat16 beside an FP8 layer), zero where unused. The base weights are never touched.

Several LoRAs at once are their factors concatenated along the rank (a sum of branches); a LoRA of part of the
rows (the q third of a fused qkv) has B zero outside its rows. Switching sets copies factors into the buffers
(`load`): no module is added or replaced, so compiled code (dynamo guards on shapes and dtypes, not values) and
captured CUDA graphs (which read the buffers in place) stay valid. With all buffers zero the branch adds exact
zeros: the base output, bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Packed = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # down (parts, r, in), up (parts, rows, r), scale (parts, r)


def branch_dtype(layer: nn.Module) -> torch.dtype:
    """The layer's float compute dtype; bfloat16 for layers holding FP8 or integer weights."""
    w = getattr(layer, "weight", None)
    if isinstance(w, torch.Tensor) and w.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return w.dtype
    return torch.bfloat16


def _features(layer: nn.Module) -> tuple[int, int]:
    w = getattr(layer, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        return w.shape[1], w.shape[0]
    wt = getattr(layer, "weight_t", None)  # FP8Linear: (in, out)
    if isinstance(wt, torch.Tensor):
        return wt.shape[0], wt.shape[1]
    raise TypeError(f"{type(layer).__name__} is not a linear layer")


def _device(layer: nn.Module) -> torch.device:
    return next(iter((*layer.parameters(), *layer.buffers()))).device


class LoraBranch(nn.Module):
    """`parts` row blocks (3 for a fused qkv, 2 for w13), each with its own `capacity` rank columns: A is
    (parts * capacity, in), B (parts, out / parts, capacity), so a LoRA of rank r on each of to_q, to_k, to_v
    takes r columns of each block and the branch costs capacity * (parts * in + out) multiply-adds per token."""

    def __init__(self, base: nn.Module, capacity: int, parts: int = 1):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = _features(base)
        if self.out_features % parts:
            raise ValueError(f"{self.out_features} rows do not split into {parts} parts")
        self.parts, self.rows = parts, self.out_features // parts
        dtype, device = branch_dtype(base), _device(base)
        self.register_buffer("down", torch.zeros(parts * capacity, self.in_features, dtype=dtype, device=device))
        self.register_buffer("up", torch.zeros(parts, self.rows, capacity, dtype=dtype, device=device))
        self.register_buffer("scale", torch.zeros(parts * capacity, dtype=dtype, device=device))
        self.used = 0  # columns per part the loaded factors occupy (host side; the forward never reads it)

    @property
    def capacity(self) -> int:
        return self.up.shape[2]

    @property
    def weight(self):
        """The base layer's weight (its dtype is what callers read)."""
        return getattr(self.base, "weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = F.linear(x.to(self.down.dtype), self.down) * self.scale  # (..., parts * capacity)
        if self.parts == 1:
            return y + F.linear(h, self.up[0]).to(y.dtype)
        lead = h.shape[:-1]
        h = h.reshape(-1, self.parts, self.up.shape[2]).transpose(0, 1)  # (parts, N, capacity)
        z = torch.bmm(h, self.up.transpose(1, 2)).transpose(0, 1)  # (N, parts, rows)
        return y + z.reshape(*lead, self.out_features).to(y.dtype)

    def pack(self, parts) -> Packed:
        """[(rows, down, up, scale), ...] -> (down (parts, r, in), up (parts, rows, r), scale (parts, r)): each
        factor in the row blocks it covers (a factor over all rows of a fused weight is repeated in each block),
        concatenated along the rank per block, on this branch's device and dtype. ValueError when a block's
        ranks exceed the capacity."""
        cols = [[] for _ in range(self.parts)]  # per block: (down, up rows of the block, scale)
        for (a, b), d, u, s in parts:
            for p in range(self.parts):
                lo, hi = max(a, p * self.rows), min(b, (p + 1) * self.rows)
                if lo >= hi:
                    continue
                up = torch.zeros(self.rows, d.shape[0])
                up[lo - p * self.rows:hi - p * self.rows] = u[lo - a:hi - a].float()
                cols[p].append((d.float(), up, float(s)))
        rank = max(sum(d.shape[0] for d, _, _ in c) for c in cols)
        if rank > self.capacity:
            raise ValueError(f"total rank {rank} above the branch's capacity {self.capacity}")
        down = torch.zeros(self.parts, rank, self.in_features)
        up = torch.zeros(self.parts, self.rows, rank)
        scale = torch.zeros(self.parts, rank)
        for p, c in enumerate(cols):
            col = 0
            for d, u, s in c:
                r = d.shape[0]
                down[p, col:col + r], up[p, :, col:col + r], scale[p, col:col + r] = d, u, s
                col += r
        dtype, device = self.down.dtype, self.down.device
        return down.to(device, dtype), up.to(device, dtype), scale.to(device, dtype)

    @torch.no_grad()
    def load(self, packed: Packed | None) -> None:
        """Copy packed factors into the buffers (None: none); the columns used before are zeroed first."""
        down = self.down.view(self.parts, self.capacity, self.in_features)
        scale = self.scale.view(self.parts, self.capacity)
        if self.used:
            down[:, : self.used].zero_()
            self.up[:, :, : self.used].zero_()
            scale[:, : self.used].zero_()
        self.used = 0
        if packed is not None:
            d, u, s = packed
            r = d.shape[1]
            down[:, :r].copy_(d)
            self.up[:, :, :r].copy_(u)
            scale[:, :r].copy_(s)
            self.used = r


def install(model: nn.Module, layers: dict[str, tuple[int, int]]) -> dict[str, LoraBranch]:
    """Wrap each named linear layer of `model` (module name -> (capacity, parts)) in a LoraBranch, in place;
    layers already wrapped are kept as they are. Returns module name -> branch."""
    out = {}
    for name, (capacity, parts) in layers.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, LoraBranch):
            parent, _, attr = name.rpartition(".")
            layer = LoraBranch(layer, capacity, parts)
            setattr(model.get_submodule(parent) if parent else model, attr, layer)
        out[name] = layer
    return out


def branches(model: nn.Module) -> dict[str, LoraBranch]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraBranch)}


def branch_bytes(layers, dtype_bytes: int = 2) -> int:
    """Bytes of the branch buffers of layers [((out, in), capacity, parts), ...]."""
    return sum(c * (p * i + o + p) * dtype_bytes for (o, i), c, p in layers)
