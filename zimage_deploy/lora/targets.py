"""The DiT weights a LoRA can adapt, and every name they go by in the LoRA formats in circulation.

Targets are named as our export-friendly DiT names its weights (models/dit.py): that is what the loaded module, the
ONNX graphs' initializers and the TensorRT engines' refittable weights are called, so one name serves every
backend. Each target's aliases:
- diffusers (`ZImageTransformer2DModel`, PEFT / `save_lora_weights`): `layers.0.attention.to_q`, `to_k`, `to_v`
  (row thirds of our fused `qkv`), `to_out.0`, `feed_forward.w1` / `w3` (row halves of our fused `w13`), `w2`,
  `adaLN_modulation.0`, `all_x_embedder.2-1`, `all_final_layer.2-1.linear` / `.adaLN_modulation.1`,
  `t_embedder.mlp.0` / `.2`, `cap_embedder.1`, `siglip_embedder.1`;
- the original Z-Image repository: fused `attention.qkv`, `attention.out`, `x_embedder`, `final_layer.*`, and the
  diffusers names elsewhere (w1/w2/w3, adaLN_modulation.0, t_embedder.mlp.*, cap_embedder.1);
- kohya-style keys flatten either naming with underscores (`lora_unet_layers_0_attention_to_q`): looked up by the
  flattened alias.
The diffusers aliases are checked against `convert_diffusers_key`, the checkpoint loader's own mapping.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..components import DIT, loader_of
from ..errors import InternalError
from ..models.dit import convert_diffusers_key


@dataclass(frozen=True)
class Alias:
    target: str  # our weight name, e.g. "layers.0.attention.qkv.weight"
    part: int  # which row block of the target (q/k/v, w1/w3); 0 when whole
    parts: int  # how many row blocks the target has under this alias (1: the whole weight)
    naming: str  # "diffusers" | "original"


# (pattern on our module name, [(alias template, part, parts, naming)]); {p}: the patch key ("2-1")
D, O = "diffusers", "original"
_RULES = [
    (r"x_embedder", [("all_x_embedder.{p}", 0, 1, D), ("x_embedder", 0, 1, O)]),
    (r"final_layer\.linear", [("all_final_layer.{p}.linear", 0, 1, D), ("final_layer.linear", 0, 1, O)]),
    (r"final_layer\.adaLN_modulation", [("all_final_layer.{p}.adaLN_modulation.1", 0, 1, D),
                                        ("final_layer.adaLN_modulation.1", 0, 1, O)]),
    (r"t_embedder\.linear_1", [("t_embedder.mlp.0", 0, 1, D)]),
    (r"t_embedder\.linear_2", [("t_embedder.mlp.2", 0, 1, D)]),
    (r"cap_linear", [("cap_embedder.1", 0, 1, D)]),
    (r"siglip_linear", [("siglip_embedder.1", 0, 1, D)]),
    (r"(?P<b>.+)\.attention\.qkv", [("{b}.attention.to_q", 0, 3, D), ("{b}.attention.to_k", 1, 3, D),
                                    ("{b}.attention.to_v", 2, 3, D), ("{b}.attention.qkv", 0, 1, O)]),
    (r"(?P<b>.+)\.attention\.out", [("{b}.attention.to_out.0", 0, 1, D), ("{b}.attention.out", 0, 1, O)]),
    (r"(?P<b>.+)\.feed_forward\.w13", [("{b}.feed_forward.w1", 0, 2, D), ("{b}.feed_forward.w3", 1, 2, D)]),
    (r"(?P<b>.+)\.feed_forward\.w2", [("{b}.feed_forward.w2", 0, 1, D)]),
    (r"(?P<b>.+)\.adaLN_modulation", [("{b}.adaLN_modulation.0", 0, 1, D)]),
]


def flatten(module: str) -> str:
    return module.replace(".", "_")


class Targets:
    """The LoRA-adaptable weights of one DiT: our weight name -> (out, in), and the alias tables."""

    def __init__(self, shapes: dict[str, tuple[int, int]], patch: int = 2):
        self.shapes = {k: tuple(v) for k, v in shapes.items() if k.endswith(".weight") and len(v) == 2}
        self.patch_key = f"{patch}-1"
        self.aliases: dict[str, Alias] = {}
        for name in self.shapes:
            module = name[: -len(".weight")]
            for pattern, aliases in _RULES:
                m = re.fullmatch(pattern, module)
                if m is None:
                    continue
                for template, part, parts, naming in aliases:
                    alias = template.format(p=self.patch_key, **m.groupdict())
                    self._add(alias, Alias(name, part, parts, naming))
                break
        self.flat: dict[str, Alias | None] = {}
        for alias, a in self.aliases.items():
            f = flatten(alias)
            self.flat[f] = None if f in self.flat and self.flat[f] != a else a  # None: ambiguous, never matched

    def _add(self, alias: str, a: Alias) -> None:
        if a.naming == "diffusers":  # the loader's own mapping must agree
            expected = a.target + (f"#{a.part}" if a.parts > 1 else "")
            got = convert_diffusers_key(alias + ".weight", self.patch_key)
            if got != expected:
                raise InternalError(f"LoRA alias {alias} maps to {expected}, the checkpoint loader says {got}")
        self.aliases[alias] = a

    def lookup(self, module: str) -> Alias | None:
        """The target a LoRA module name (any naming, dotted or kohya-flattened) adapts, or None."""
        return self.aliases.get(module) or self.flat.get(flatten(module))

    def rows(self, a: Alias) -> tuple[int, int]:
        out = self.shapes[a.target][0]
        if out % a.parts:
            raise InternalError(f"{a.target} has {out} rows, not divisible into {a.parts} parts")
        n = out // a.parts
        return a.part * n, (a.part + 1) * n

    def parts(self, target: str) -> int:
        """How many row blocks LoRAs may adapt separately in `target` (3 for a fused qkv, 2 for w13, else 1)."""
        return max((a.parts for a in self.aliases.values() if a.target == target), default=1)

    def examples(self, n: int = 4) -> list[str]:
        return [k for k, a in self.aliases.items() if a.naming == "diffusers"][:n]

    @property
    def fingerprint(self) -> tuple:
        return tuple(sorted(self.shapes.items())), self.patch_key


def from_checkpoint(ckpt: Path) -> Targets:
    """From the headers of the checkpoint's transformer safetensors (no tensor is read)."""
    from ..checkpoint import iter_shapes, read_config

    shapes: dict[str, list[int]] = {}
    for key, shape in iter_shapes(Path(ckpt) / "transformer"):
        ours = convert_diffusers_key(key)
        name = ours.split("#")[0]
        if name in shapes and "#" in ours and len(shape) == 2:
            shapes[name][0] += shape[0]
        else:
            shapes[name] = list(shape)
    cfg = read_config(Path(ckpt), "transformer")
    return Targets({k: tuple(v) for k, v in shapes.items()}, (cfg.get("all_patch_size") or [2])[0])


def dit_components(manifest: dict) -> list[str]:
    """The build's components that run DiT weights (context refiner, transformer, SigLIP refiner)."""
    return [n for n in manifest["components"] if loader_of(n) == DIT]


def graph_path(engine_dir: Path, comp: dict) -> Path:
    """A component's float graph (the unquantized one of a quantized component)."""
    from ..buildfolder import BuildFolder

    return BuildFolder(engine_dir).file(comp.get("unquantized", comp)["onnx"])


def graph_initializers(path: Path) -> dict[str, tuple[list[int], int]]:
    """name -> (dims, ONNX data type) of a graph's initializers, without reading external data."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {i.name: (list(i.dims), i.data_type) for i in model.graph.initializer}


def from_graphs(engine_dir: Path, manifest: dict) -> Targets:
    """From the build's DiT graphs (initializer names and shapes; no weight is read)."""
    shapes = {}
    for name in dit_components(manifest):
        for init, (dims, _) in graph_initializers(graph_path(engine_dir, manifest["components"][name])).items():
            shapes[init] = tuple(dims)
    return Targets(shapes, manifest["model"]["facts"].get("patch_size", 2))


def of_build(engine_dir: Path, manifest: dict) -> Targets:
    """A build's adaptable weights: from its DiT graphs, or from its checkpoint where the build has no graphs (a
    graphless build for the compiled Torch runtime: the same names and shapes, the modules are the checkpoint's)."""
    from ..buildfolder import CHECKPOINT

    if any(manifest["components"][n].get("source") == CHECKPOINT for n in dit_components(manifest)):
        return from_checkpoint(Path(manifest["model"]["path"]))
    return from_graphs(engine_dir, manifest)


def from_module(model) -> Targets:
    return Targets({k: tuple(v.shape) for k, v in model.state_dict().items()}, model.cfg.patch_size)
