"""Read a LoRA file (safetensors only) into low-rank factors on our DiT weights, whatever format it is in.

Formats (detected per key, converted by one table: lora/targets.py):
- diffusers / PEFT, as `ZImagePipeline.save_lora_weights` writes it: `transformer.<module>.lora_A.weight` /
  `.lora_B.weight`, the PEFT config in the `lora_adapter_metadata` header (r, lora_alpha, rank_pattern,
  alpha_pattern, use_rslora); raw PEFT keys (`.lora_A.default.weight`, `base_model.model.` prefix) too;
- kohya / sd-scripts style: `lora_unet_<flattened module>.lora_down.weight` / `.lora_up.weight` / `.alpha`;
- the original Z-Image repository's module names (`diffusion_model.` prefix, fused `attention.qkv`, `attention.out`,
  `x_embedder`, `final_layer`), with lora_A/B, lora_down/up or `.lora.down` / `.lora.up` keys.

Scaling follows diffusers: a module's delta is `scale * up @ down` with scale = alpha / rank when the file has an
`.alpha` for it, times lora_alpha / rank (or / sqrt(rank) with use_rslora) from the PEFT metadata when present,
else 1. Every check that the header allows (keys, pairs, shapes, ranks) runs before any tensor is read.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from .spec import file_sha256
from .targets import Targets

_PREFIXES = ("transformer.", "model.diffusion_model.", "diffusion_model.", "base_model.model.", "lora_unet_",
             "lora_transformer_", "unet.")
_TEXT_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_", "te.")
_FACTOR = re.compile(r"(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up)"
                     r"(?:\.(?P<adapter>[^.]+))?\.weight")
_DOWN = {"lora_A", "lora_down", "lora.down"}
_UNSUPPORTED = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "lokr_": "LoKr", "hada_": "LoHa",
                "lora_B.bias": "LoRA biases", "lora_up.bias": "LoRA biases"}


@dataclass(frozen=True)
class LoraLayer:
    target: str  # our weight name
    rows: tuple[int, int]  # the target's rows this layer adapts (a q/k/v or w1/w3 block, or all of them)
    down: torch.Tensor  # (rank, in) float32
    up: torch.Tensor  # (rows, rank) float32
    scale: float  # the file's own scaling (alpha / rank, PEFT metadata)
    source: str  # the module name as the file writes it


@dataclass
class Lora:
    path: Path
    sha256: str
    format: str
    layers: list[LoraLayer] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(layer.down.nbytes + layer.up.nbytes for layer in self.layers)

    @property
    def rank(self) -> int:
        return max((layer.down.shape[0] for layer in self.layers), default=0)

    def record(self) -> dict:
        return {"sha256": self.sha256, "format": self.format, "modules": len(self.layers), "rank": self.rank}


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _peft_config(metadata: dict, path: Path) -> dict | None:
    raw = (metadata or {}).get("lora_adapter_metadata")
    if raw is None:
        return None
    try:
        cfg = json.loads(raw)
        if not isinstance(cfg, dict):
            raise ValueError("not an object")
    except (ValueError, RecursionError) as e:
        raise UserError(f"LoRA {path}: its lora_adapter_metadata header is not valid JSON ({e})") from None
    cfg = {k.split(".", 1)[1] if k.startswith("transformer.") else k: v for k, v in cfg.items()}
    for flag, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases"), ("fan_in_fan_out", "fan_in_fan_out")):
        if cfg.get(flag):
            raise UserError(f"LoRA {path}: {what} is not supported (only plain LoRA)")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"LoRA {path}: PEFT type {cfg.get('peft_type')!r} is not supported (only LORA)")
    return cfg


def _peft_scale(cfg: dict, module: str, rank: int, path: Path) -> float:
    alpha = cfg.get("lora_alpha", rank)
    for key, value in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            alpha = value
            break
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise UserError(f"LoRA {path}: lora_alpha of {module} is {alpha!r}, not a number")
    return float(alpha) / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def read_lora(path: Path, targets: Targets, sha256: str | None = None) -> Lora:
    """Read and convert `path` against `targets` (UserError for anything that does not fit)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"LoRA {path} is not a safetensors file ({str(e).splitlines()[0][:120]})") from None
    with handle as f:
        keys = list(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        cfg = _peft_config(f.metadata(), path)
        modules = _parse_keys(keys, path)
        layers, styles = _match(modules, shapes, targets, path)
        loaded = []
        for module, (alias, down_key, up_key, alpha_key) in layers.items():
            down, up = f.get_tensor(down_key), f.get_tensor(up_key)
            for name, t in ((down_key, down), (up_key, up)):
                if not t.is_floating_point():
                    raise UserError(f"LoRA {path}: {name} holds {t.dtype}, not floating-point weights")
            down, up = down.float(), up.float()
            if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
                raise UserError(f"LoRA {path}: {module} holds non-finite values (NaN or inf)")
            rank = down.shape[0]
            scale = 1.0
            if alpha_key is not None:
                alpha = f.get_tensor(alpha_key)
                if alpha.numel() != 1 or not torch.isfinite(alpha.float()).all():
                    raise UserError(f"LoRA {path}: {alpha_key} must be one finite number")
                scale *= float(alpha.float()) / rank
            if cfg is not None:
                scale *= _peft_scale(cfg, module, rank, path)
            loaded.append(LoraLayer(alias.target, targets.rows(alias), down, up, scale, module))
    style = "kohya" if "kohya" in styles else "peft"
    names = "original" if "original" in styles else "diffusers"
    return Lora(path, sha256 or file_sha256(path), f"{style}/{names}", _dedupe(loaded, targets, path))


def _parse_keys(keys: list[str], path: Path) -> dict[str, dict]:
    """module (prefix stripped) -> {"down": key, "up": key, "alpha": key, "kohya": bool}."""
    if not keys:
        raise UserError(f"LoRA {path} holds no tensors")
    text = [k for k in keys if k.startswith(_TEXT_PREFIXES)]
    if text:
        raise UserError(f"LoRA {path} adapts the text encoder ({text[0]}, {len(text)} keys): only transformer LoRAs "
                        "are supported")
    modules: dict[str, dict] = {}
    for key in keys:
        for marker, what in _UNSUPPORTED.items():
            if marker in key:
                raise UserError(f"LoRA {path}: {what} ({key}) is not supported; only plain LoRA (down/up pairs)")
        if key.endswith((".diff", ".diff_b")):
            raise UserError(f"LoRA {path}: full weight differences ({key}) are not supported; only plain LoRA")
        kohya = key.startswith(("lora_unet_", "lora_transformer_"))
        stripped = _strip(key)
        m = _FACTOR.fullmatch(stripped)
        if m is not None:
            module, slot = m["module"], "down" if m["kind"] in _DOWN else "up"
            kohya = kohya or m["kind"] in ("lora_down", "lora_up")
        elif stripped.endswith(".alpha"):
            module, slot = stripped[: -len(".alpha")], "alpha"
        else:
            raise UserError(f"LoRA {path}: {key} is not a LoRA key (expected <module>.lora_A/.lora_B/.lora_down/"
                            ".lora_up weights and optional .alpha)")
        entry = modules.setdefault(module, {"kohya": False})
        if slot in entry:
            raise UserError(f"LoRA {path}: {module} has two {slot} tensors ({entry[slot]}, {key})")
        entry[slot] = key
        entry["kohya"] |= kohya
    for module, entry in modules.items():
        if "down" not in entry or "up" not in entry:
            missing = "down (lora_A / lora_down)" if "down" not in entry else "up (lora_B / lora_up)"
            raise UserError(f"LoRA {path}: {module} has no {missing} weight")
    return modules


def _match(modules: dict, shapes: dict, targets: Targets, path: Path):
    """Look every module up and check its shapes against the target, from the header alone."""
    unmatched, layers, styles = [], {}, set()
    for module, entry in modules.items():
        alias = targets.lookup(module)
        if alias is None:
            unmatched.append(module)
            continue
        down, up = shapes[entry["down"]], shapes[entry["up"]]
        out_rows, in_features = targets.rows(alias)[1] - targets.rows(alias)[0], targets.shapes[alias.target][1]
        if len(down) != 2 or len(up) != 2 or down[0] != up[1]:
            raise UserError(f"LoRA {path}: {module} has down {list(down)} and up {list(up)}: not a (rank, in) / "
                            "(out, rank) pair of matrices")
        rank = down[0]
        if down[1] != in_features or up[0] != out_rows:
            raise UserError(f"LoRA {path}: {module} adapts a ({out_rows} x {in_features}) weight of this model, but "
                            f"its factors give ({up[0]} x {down[1]}): the LoRA is for another model size")
        if not 1 <= rank <= min(in_features, out_rows):
            raise UserError(f"LoRA {path}: {module} has rank {rank}, outside 1..{min(in_features, out_rows)} "
                            f"(the smaller side of its {out_rows} x {in_features} weight)")
        if "alpha" in entry and math.prod(shapes[entry["alpha"]]) != 1:
            raise UserError(f"LoRA {path}: {entry['alpha']} must be one number, has shape "
                            f"{list(shapes[entry['alpha']])}")
        layers[module] = (alias, entry["down"], entry["up"], entry.get("alpha"))
        styles.add(alias.naming)
        if entry["kohya"]:
            styles.add("kohya")
    if unmatched:
        raise UserError(f"LoRA {path}: {len(unmatched)} of its {len(modules)} modules match no module of this model's "
                        f"transformer, e.g. {', '.join(sorted(unmatched)[:5])}. Known modules look like "
                        f"{', '.join(targets.examples())} (diffusers), layers.0.attention.qkv (original) or "
                        "lora_unet_layers_0_attention_to_q (kohya); is it a LoRA for another model?")
    return layers, styles


def _dedupe(layers: list[LoraLayer], targets: Targets, path: Path) -> list[LoraLayer]:
    """Overlapping rows of one weight adapted twice: some trainers write the fused `qkv` (or bare `out`) next to
    the split diffusers modules as a redundant copy; keep the diffusers ones, as diffusers does. Any other overlap
    is an error."""
    by_target: dict[str, list[LoraLayer]] = {}
    for layer in layers:
        by_target.setdefault(layer.target, []).append(layer)
    kept = []
    for target, group in by_target.items():
        overlap = any(a.rows[0] < b.rows[1] and b.rows[0] < a.rows[1]
                      for i, a in enumerate(group) for b in group[i + 1:])
        if overlap:
            original = [g for g in group if targets.lookup(g.source).naming == "original"]
            rest = [g for g in group if g not in original]
            if not original or not rest or any(a.rows[0] < b.rows[1] and b.rows[0] < a.rows[1]
                                               for i, a in enumerate(rest) for b in rest[i + 1:]):
                raise UserError(f"LoRA {path} adapts the same rows of {target} twice "
                                f"({', '.join(g.source for g in group)})")
            warnings.warn(f"LoRA {path.name}: {', '.join(g.source for g in original)} duplicate "
                          f"{', '.join(g.source for g in rest)}; the latter are used")
            group = rest
        kept.extend(group)
    return kept
