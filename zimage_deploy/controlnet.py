"""ControlNets for a build (`build --controlnet PATH`): finding, checking and reading them, and what the build and
the runtime record and reload.

Accepted (safetensors only):
- a diffusers `ZImageControlNetModel` folder (config.json + *.safetensors);
- a `ZImageControlNetPipeline` checkpoint: its `controlnet/` folder, also picked up by `build --model` without the
  flag;
- a single `.safetensors` in the released Z-Image-Turbo-Fun-Controlnet-Union format (diffusers key names, no
  config). Its config comes from a `config.json` beside it when that is a ZImageControlNetModel config, else from the
  weights: dim, heads and control_in_dim from the shapes; the control-refiner kind as diffusers' single-file loader
  decides it (refiner blocks with a non-zero `before_proj`: "control_noise_refiner"; none, or a zero `before_proj`:
  "control_layers"; plain refiner blocks: none); refiner hints on the first noise-refiner layers; the control blocks
  spread evenly over the main layers (layer i * (n_layers // n_blocks)): [0, 5, .., 25] for the 6 blocks of
  Union 1.0, [0, 2, .., 28] for the 15 of Union 2.x, as their published configs say. A ControlNet whose blocks sit
  elsewhere needs its config.json.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from .checkpoint import read_config
from .components import with_controlnet, with_controlnet_precision
from .errors import UserError
from .hashing import remembered_sha256
from .manifest import Manifest, parse
from .models.controlnet import ControlBranch, ControlNetConfig
from .models.dit import DiTConfig, convert_diffusers_key, iter_fused
from .variants import is_omni

DEFAULT_SCALE = 0.75  # diffusers' controlnet_conditioning_scale default
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "controlnet.")  # wrappers some exporters add
# Saved by diffusers beside the ControlNet's own weights when it was attached to a transformer (from_transformer):
# copies of the transformer's modules, which the pipeline replaces by the transformer's own. Ignored, as diffusers
# ignores them when loading.
SHARED = ("t_embedder.", "all_x_embedder.", "cap_embedder.", "noise_refiner.", "context_refiner.", "x_pad_token",
          "cap_pad_token", "all_final_layer.", "layers.", "siglip_embedder.", "siglip_refiner.", "siglip_pad_token")
OWN = ("control_layers.", "control_noise_refiner.", "control_all_x_embedder.")


@dataclass
class ControlNetSource:
    """A checked ControlNet: where it is, its config, how its keys map to ours."""

    path: Path  # the folder or the single file given
    files: tuple[Path, ...]
    config: ControlNetConfig
    origin: str  # "diffusers folder", "pipeline checkpoint", "single file"
    config_from: str  # "config.json" or "inferred from the weights"
    prefix: str = ""
    drop: tuple[str, ...] = ()  # key prefixes left out (a zero control_noise_refiner read as "control_layers")
    _sha: str | None = field(default=None, repr=False)

    def raw_items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(diffusers key, tensor) of the ControlNet's own weights, one at a time."""
        for file in self.files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    name = self._own(key)
                    if name is not None:
                        yield name, f.get_tensor(key)

    def _own(self, key: str) -> str | None:
        name = key[len(self.prefix):] if self.prefix and key.startswith(self.prefix) else key
        if not name.startswith(OWN) or name.startswith(self.drop):
            return None
        return name

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(our name, tensor): `control.`-prefixed, q/k/v and w1/w3 fused like the DiT's."""
        for key, tensor in iter_fused(self.raw_items()):
            if key.startswith("control_all_x_embedder."):
                key = "control_x_embedder." + key.split(".", 2)[2]
            yield "control." + key, tensor

    @property
    def sha256(self) -> str:
        if self._sha is None:
            h = hashlib.sha256()
            for f in self.files:
                h.update(f.name.encode() + b"\0" + remembered_sha256([f])[f].encode())
            h.update(json.dumps(self.config.as_dict(), sort_keys=True).encode())  # an inferred config is part of it
            self._sha = h.hexdigest()
        return self._sha

    def record(self) -> dict:
        """The manifest's `controlnet` entry."""
        return {"path": str(self.path), "files": [str(f) for f in self.files], "origin": self.origin,
                "sha256": self.sha256, "config": self.config.as_dict(), "config_from": self.config_from,
                "key_prefix": self.prefix, "dropped": list(self.drop)}

    @classmethod
    def from_record(cls, rec: dict) -> "ControlNetSource":
        """The ControlNet a build recorded, checked to be the same files (sha256) as at build time."""
        config = ControlNetConfig.from_record(rec["config"])
        files = tuple(Path(f) for f in rec["files"])
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise UserError(f"the build's ControlNet ({rec['path']}) is not there any more (missing {missing[0]}): "
                            "the torch backend loads its weights from it; restore it or rebuild")
        src = cls(Path(rec["path"]), files, config, rec["origin"], rec["config_from"], rec.get("key_prefix", ""),
                  tuple(rec.get("dropped", ())))
        if src.sha256 != rec["sha256"]:
            raise UserError(f"the build's ControlNet ({rec['path']}) changed since the build (sha256 differs): rebuild")
        return src


# -- finding and checking --------------------------------------------------------------------------------------
def open_controlnet(arg, ckpt: Path) -> ControlNetSource | None:
    """`arg` (build --controlnet; None: the checkpoint's own `controlnet/` if it has one) -> a checked source, or
    None. UserError for anything that is not a ControlNet this checkpoint's transformer can run."""
    if arg is None:
        own = Path(ckpt) / "controlnet"
        return _open_folder(own, ckpt, "pipeline checkpoint") if (own / "config.json").is_file() else None
    path = Path(arg).expanduser()
    if not path.exists():
        raise UserError(f"--controlnet {arg}: no such file or folder")
    if path.is_dir():
        if (path / "model_index.json").is_file() and (path / "controlnet").is_dir():
            return _open_folder(path / "controlnet", ckpt, "pipeline checkpoint")
        if (path / "config.json").is_file():
            return _open_folder(path, ckpt, "diffusers folder")
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return _open_file(files[0], ckpt)
        raise UserError(f"--controlnet {arg}: a folder needs a ZImageControlNetModel config.json and safetensors "
                        f"weights (or exactly one .safetensors file); found {len(files)} .safetensors files")
    return _open_file(path, ckpt)


def _dit_config(ckpt) -> DiTConfig:
    """The transformer config a ControlNet is checked against: a checkpoint's (a path), or one given (the planner
    checks against the real Z-Image config without the checkpoint)."""
    return ckpt if isinstance(ckpt, DiTConfig) else DiTConfig.from_diffusers(read_config(ckpt, "transformer"))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} is not a readable JSON config ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a ControlNet config (a JSON {type(data).__name__})")
    return data


def _open_folder(folder: Path, ckpt: Path, origin: str) -> ControlNetSource:
    files = tuple(sorted(folder.glob("*.safetensors")))
    if not files:
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        hint = f" (found pickle files {pickles}: convert them to safetensors)" if pickles else ""
        raise UserError(f"ControlNet folder {folder} has no .safetensors weights{hint}")
    cfg = _read_json(folder / "config.json")
    if cfg.get("_class_name") not in (None, "ZImageControlNetModel"):
        raise UserError(f"{folder / 'config.json'} describes a {cfg['_class_name']}, not a ZImageControlNetModel")
    config = ControlNetConfig.from_diffusers(cfg)
    src = ControlNetSource(folder.resolve(), tuple(f.resolve() for f in files), config, origin, "config.json",
                           _prefix(files))
    return _checked(src, _dit_config(ckpt))


def _open_file(file: Path, ckpt: Path) -> ControlNetSource:
    if file.suffix in PICKLE_SUFFIXES:
        raise UserError(f"--controlnet {file}: pickle files are not read (security); convert it to .safetensors")
    if file.suffix != ".safetensors":
        raise UserError(f"--controlnet {file}: expected a .safetensors file or a folder")
    dit = _dit_config(ckpt)
    shapes = _shapes((file,))
    prefix = _prefix((file,), shapes)
    beside = file.parent / "config.json"
    if beside.is_file() and "control_layers_places" in _read_json(beside):
        config, how, drop = ControlNetConfig.from_diffusers(_read_json(beside)), "config.json", ()
    else:
        config, drop = infer_config({k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)},
                                    dit, lambda key: _tensor(file, prefix + key))
        how = "inferred from the weights"
    if config.add_control_noise_refiner == "control_layers" and not drop:
        drop = ("control_noise_refiner.",)  # what diffusers' single-file conversion leaves out for this kind
    src = ControlNetSource(file.resolve(), (file.resolve(),), config, "single file", how, prefix, drop)
    return _checked(src, dit)


def _shapes(files) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as e:  # safetensors raises its own error types for damaged headers
            raise UserError(f"{file} is not a readable safetensors file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    return shapes


def _tensor(file: Path, key: str) -> torch.Tensor:
    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(key)


def _prefix(files, shapes=None) -> str:
    """A wrapper prefix every ControlNet key carries (e.g. `model.diffusion_model.`), or ''."""
    keys = list(shapes or _shapes(files))
    for prefix in PREFIXES:
        if any(k.startswith(prefix + "control_") for k in keys):
            return prefix
    return ""


def infer_config(shapes: dict[str, tuple], dit: DiTConfig, tensor) -> tuple[ControlNetConfig, tuple[str, ...]]:
    """The config of a single-file ControlNet from its key names and shapes (`tensor(key)` reads one tensor) ->
    (config, key prefixes to leave out). See the module docstring for the rules."""
    emb = shapes.get("control_all_x_embedder.2-1.weight")
    blocks = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("control_layers.")
                     and k.split(".")[1].isdigit()})
    if emb is None or not blocks:
        raise UserError("not a Z-Image ControlNet: no control_all_x_embedder.2-1.weight / control_layers.* weights "
                        f"(keys look like {sorted(shapes)[:3]})")
    if blocks != list(range(len(blocks))):
        raise UserError(f"the ControlNet's control_layers are numbered {blocks}, not 0..{len(blocks) - 1}")
    dim, patch_dim = emb
    p = dit.patch_size
    if patch_dim % (p * p):
        raise UserError(f"the ControlNet's patch embedder takes {patch_dim} inputs, not a multiple of {p * p}")
    norm_q = shapes.get("control_layers.0.attention.norm_q.weight")
    head_dim = norm_q[0] if norm_q else dit.head_dim
    refiner = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("control_noise_refiner.")
                      and k.split(".")[1].isdigit()})
    drop: tuple[str, ...] = ()
    if not refiner:
        kind = "control_layers"
    elif "control_noise_refiner.0.before_proj.weight" in shapes:
        if torch.all(tensor("control_noise_refiner.0.before_proj.weight") == 0):
            kind, drop = "control_layers", ("control_noise_refiner.",)  # Union 2.0: an untrained refiner
        else:
            kind = "control_noise_refiner"
    else:
        kind = None
    n_refiner = len(refiner) if kind != "control_layers" else dit.n_refiner_layers
    n = len(blocks)
    step = dit.n_layers // n if n <= dit.n_layers else 0
    if step == 0:
        raise UserError(f"the ControlNet has {n} control blocks for a transformer of {dit.n_layers} layers")
    refiner_blocks = n if kind == "control_layers" else n_refiner
    config = ControlNetConfig(
        control_layers_places=tuple(i * step for i in range(n)),
        control_refiner_layers_places=tuple(range(min(dit.n_refiner_layers, refiner_blocks))) if kind else (),
        control_in_dim=patch_dim // (p * p), add_control_noise_refiner=kind, dim=dim, n_refiner_layers=n_refiner,
        n_heads=dim // head_dim if head_dim else dit.n_heads, norm_eps=dit.norm_eps, qk_norm=norm_q is not None,
        patch_size=p)
    return config, drop


def _checked(src: ControlNetSource, dit: DiTConfig) -> ControlNetSource:
    """The config against the transformer, then the weights' names and shapes (headers only) against the config."""
    src.config.check(dit)
    with torch.device("meta"):
        expected = {"control." + k: tuple(v.shape) for k, v in ControlBranch(src.config, dit).state_dict().items()}
    found: dict[str, list[int]] = {}
    unknown = []
    for key, shape in _shapes(src.files).items():
        name = key[len(src.prefix):] if src.prefix and key.startswith(src.prefix) else key
        if src._own(key) is None:
            if not name.startswith(SHARED) and not name.startswith(OWN):
                unknown.append(key)
            continue
        converted = convert_diffusers_key(name)
        ours = "control." + converted.split("#")[0].replace("control_all_x_embedder.2-1.", "control_x_embedder.")
        part = "#" in converted
        if ours in found and part:
            found[ours][0] += shape[0]
        else:
            found[ours] = list(shape)
    if unknown:
        raise UserError(f"{src.path} is not a Z-Image ControlNet (or holds other weights too): unexpected keys "
                        f"{unknown[:4]}")
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = [f"{k} {tuple(found[k])} (config: {expected[k]})" for k in sorted(set(found) & set(expected))
             if tuple(found[k]) != expected[k]]
    if missing or extra or wrong:
        raise UserError(f"the ControlNet weights in {src.path} do not match its config ({src.config_from}): "
                        f"missing {missing[:3]}, unexpected {extra[:3]}, shapes {wrong[:3]}")
    return src


# -- the build ---------------------------------------------------------------------------------------------
HINTED = ("transformer", "controlnet")  # the graphs a ControlNet changes


class BuildControlNet:
    """The ControlNet a build exports (`build --controlnet PATH`, or a ZImageControlNetPipeline's own)."""

    def __init__(self, arg, ckpt: Path, variant: str):
        self.source = open_controlnet(arg, ckpt)
        if self.source is not None and is_omni(variant):
            raise UserError("a ControlNet runs with the Turbo / Base transformer; the Edit variant does not take one")

    def __bool__(self) -> bool:
        return self.source is not None

    def variant(self, v):
        """The variant's components with `controlnet` (the per-step hints graph) before `transformer`."""
        if not self:
            return v
        return replace(v, components=with_controlnet(v.components))

    def plan(self, plan: dict) -> dict:
        """The control branch is quantized like the DiT (same scheme, calibrated in the same sampling loop)."""
        return with_controlnet_precision(plan) if self else plan

    def facts(self, facts: dict) -> dict:
        if not self:
            return facts
        cn = self.source.config
        return {**facts, "n_hints": cn.n_hints, "control_in_dim": cn.control_in_dim,
                "controlnet": {"inpaint": cn.inpaint(facts["latent_channels"]), **cn.as_dict()}}

    def key_for(self, component: str) -> str:
        return f"|controlnet:{self.source.sha256}" if self and component in HINTED else ""

    def kwargs(self, loader: str) -> dict:
        return {"controlnet": self.source} if self and loader == "transformer" else {}

    def record(self) -> dict | None:
        return self.source.record() if self else None


def loader_kwargs(manifest: Manifest | dict, loader: str) -> dict:
    """Keyword arguments that make the DiT loader (models/load.py) load a build's ControlNet beside the DiT."""
    rec = parse(manifest).controlnet
    if not rec or loader != "transformer":
        return {}
    return {"controlnet": ControlNetSource.from_record(rec)}


# -- calibration and the quality gate ------------------------------------------------------------------------
def line_drawing(width: int, height: int, seed: int, color: bool = False):
    """A deterministic control image like an edge map (white lines, boxes and ellipses on black; `color`: coloured
    shapes on grey, a stand-in photo for inpainting)."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), (128, 128, 128) if color else (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        box = sorted(rng.randrange(width) for _ in range(2)), sorted(rng.randrange(height) for _ in range(2))
        xy = (box[0][0], box[1][0], box[0][1] + 1, box[1][1] + 1)
        fill = tuple(rng.randrange(256) for _ in range(3)) if color else (255, 255, 255)
        shape = rng.choice(("line", "rectangle", "ellipse"))
        if shape == "line":
            draw.line(xy, fill=fill, width=2)
        elif color:
            getattr(draw, shape)(xy, fill=fill)
        else:
            getattr(draw, shape)(xy, outline=fill, width=2)
    return image


def sample_request(facts: dict, i: int, side: int, held_out: bool = False) -> dict:
    """ControlNet builds: the control inputs the calibration loop (and, `held_out`, the quality gate) gives prompt
    i: a line drawing at the default scale; an inpainting ControlNet also gets an image and a mask every other
    prompt. Other builds: {}."""
    cn = facts.get("controlnet")
    if not cn:
        return {}
    from PIL import Image

    seed = i + (10_000 if held_out else 0)
    kwargs = {"control_image": line_drawing(side, side, seed), "controlnet_scale": DEFAULT_SCALE}
    if cn.get("inpaint") and i % 2:
        mask = Image.new("L", (side, side), 0)
        mask.paste(255, (side // 4, side // 4, 3 * side // 4, 3 * side // 4))
        kwargs.update(images=[line_drawing(side, side, seed + 1, color=True)], mask=mask)
    return kwargs
