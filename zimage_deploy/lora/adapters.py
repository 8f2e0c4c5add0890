"""Torch backend: LoRAs as side branches beside the DiT's linear layers (models/lora_branch.py), never merged into
the base weights, so they run on every build: float32, BF16, and the quantized ones (the emulated FP8 / INT4 /
NVFP4 layers, FP8 `_scaled_mm` layers), eager or compiled.

Bounds: a LoRA's rank on each row block of a weight (the fused qkv has 3: to_q, to_k, to_v; w13 has 2) is at most
`max_rank`, and a set holds at most `max_loras` LoRAs; each branch has room for exactly that (capacity
max_rank x max_loras per row block), allocated once when the branches are installed. A switch copies the set's
packed factors into the buffers; the module holds one set at a time (the manager lets generations of one set run
together and makes a switch wait for them).
"""

from __future__ import annotations

import threading

import torch

from ..errors import RequestError
from ..models.lora_branch import LoraBranch, branch_bytes, branches, install
from ..models.stream import Factor
from .spec import MAX_PER_REQUEST
from .targets import Targets

MAX_RANK = 64  # default rank bound per LoRA and row block
MAX_LORAS = MAX_PER_REQUEST  # default LoRAs per set: as many as a server request may name


def block_ranks(targets: Targets, layers) -> dict[tuple[str, int], int]:
    """(target, row block) -> the rank `layers` (LoraLayers, or Factors keyed by target) put on it."""
    ranks: dict[tuple[str, int], int] = {}
    for target, (a, b), r in layers:
        parts = targets.parts(target)
        rows = targets.shapes[target][0] // parts
        for p in range(a // rows, -(-b // rows)):
            ranks[target, p] = ranks.get((target, p), 0) + r
    return ranks


def check_bounds(targets: Targets, items, max_rank: int, max_loras: int) -> None:
    """RequestError for a set of more than `max_loras` LoRAs, or a LoRA of rank above `max_rank` on a row block
    of a weight. `items`: [(Lora, scale), ...]."""
    if len(items) > max_loras:
        raise RequestError(f"{len(items)} LoRAs at once, above this runtime's bound of {max_loras} (max_loras)")
    for lora, _ in items:
        ranks = block_ranks(targets, ((x.target, x.rows, x.down.shape[0]) for x in lora.layers))
        for (target, _), rank in ranks.items():
            if rank > max_rank:
                raise RequestError(f"LoRA {lora.path.name} has rank {rank} on {target[: -len('.weight')]}, above "
                                   f"this runtime's bound of {max_rank} (max_lora_rank)")


def branch_layers(targets: Targets, max_rank: int, max_loras: int) -> dict[str, tuple[int, int]]:
    """Module name -> (capacity, row blocks) of every adaptable weight's branch."""
    return {t[: -len(".weight")]: (max_rank * max_loras, targets.parts(t)) for t in targets.shapes}


def plan_bytes(targets: Targets, max_rank: int, max_loras: int, dtype_bytes: int = 2) -> int:
    """Bytes the branch buffers of every adaptable weight take (what `plan` counts)."""
    layers = branch_layers(targets, max_rank, max_loras)
    return branch_bytes([(targets.shapes[n + ".weight"], c, p) for n, (c, p) in layers.items()], dtype_bytes)


class TorchBranches:
    def __init__(self, model: torch.nn.Module, targets: Targets, max_rank: int = MAX_RANK,
                 max_loras: int = MAX_LORAS):
        """Install branches (or take the ones already there, e.g. put in before compilation) on every linear
        layer of `model` that a LoRA can adapt."""
        present = {n for n, _ in model.named_modules()}
        self.max_rank, self.max_loras = max_rank, max_loras
        wanted = {n: v for n, v in branch_layers(targets, max_rank, max_loras).items() if n in present}
        existing = branches(model)
        self.branches: dict[str, LoraBranch] = {**existing, **install(model, {n: c for n, c in wanted.items()
                                                                              if n not in existing})}
        self._lock = threading.Lock()

    def prepare(self, table: dict[str, list[Factor]]) -> dict[str, tuple]:
        """Module name -> packed factors on the module's device and dtype (RequestError if one does not fit)."""
        prepared = {}
        for target, parts in table.items():
            name = target[: -len(".weight")]
            branch = self.branches.get(name)
            if branch is None:
                raise RequestError(f"this Torch model has no adaptable layer {name}")
            try:
                prepared[name] = branch.pack(parts)
            except ValueError as e:
                raise RequestError(f"LoRA set on {name}: {e}") from None
        return prepared

    def load(self, prepared: dict[str, tuple]) -> None:
        """Make `prepared` the factors of every branch (the others zero)."""
        with self._lock, torch.no_grad():
            for name, branch in self.branches.items():
                packed = prepared.get(name)
                if packed is not None or branch.used:
                    branch.load(packed)


def reserve(model: torch.nn.Module, engine_dir, manifest: dict, max_rank: int = MAX_RANK,
            max_loras: int = MAX_LORAS) -> int:
    """Install the (zero) branches now, before `model` is compiled: the first LoRA then recompiles nothing either.
    Returns how many layers got one."""
    from .targets import of_build

    return len(TorchBranches(model, of_build(engine_dir, manifest), max_rank, max_loras).branches)


def plan_cost(dit: torch.nn.Module, max_rank: int, max_loras: int, image_tokens: int, caption_tokens: int,
              batch: int, dtype_bytes: int = 2) -> tuple[int, float]:
    """(bytes, multiply-add FLOPs x2 per DiT step) of the branches of `dit` (a meta module does): the buffers at
    full capacity (the branch computes all of it, zero or not). Tokens per layer: main blocks image + caption,
    noise refiner and the image in/out layers image, adaLN and timestep layers one; the context refiner and caption
    embedder run once per prompt and are not counted."""
    from .targets import from_module

    targets = from_module(dit)
    flops = 0.0
    for name, (cap, parts) in branch_layers(targets, max_rank, max_loras).items():
        out, inp = targets.shapes[name + ".weight"]
        if "adaLN" in name or name.startswith("t_embedder"):
            tokens = 1
        elif name.startswith("layers."):
            tokens = image_tokens + caption_tokens
        elif name.startswith(("noise_refiner.", "x_embedder", "final_layer")):
            tokens = image_tokens
        else:
            tokens = 0
        flops += 2.0 * batch * tokens * cap * (parts * inp + out)
    return plan_bytes(targets, max_rank, max_loras, dtype_bytes), flops
