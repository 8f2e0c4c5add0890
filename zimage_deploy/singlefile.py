"""Checkpoints as users hold them: single safetensors files turned into a diffusers-layout *view* the loaders read.

`prepare` checks the files (what each is, by its keys and shapes; the variant they make), then writes a view
folder in the cache, keyed by the files' sha256 and written atomically (an unchanged rebuild reuses it):

- `transformer/`, `text_encoder/`: `config.json` (inferred from the file's shapes, the rest from `--base` or the
  Z-Image facts) and `source.json` (keymaps.py: the user's file, its layout, prefix, size, sha256) — no weights
  are copied; the loaders stream them from the file, renamed (and FP8 dequantized) as they go;
- `vae/`: the Flux autoencoder converted to diffusers (small: converted once, with diffusers' own converter);
- everything else linked from `--base` (a diffusers folder), or written from facts: the scheduler (the variant's
  shift), the tokenizer (the embedded one for small test files; Qwen3's from the hub's cache for real ones);
- `sources.json`: each source file's role, name, size and sha256 (the manifest's `model.sources`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint import PICKLE_SUFFIXES, read_config, resolve
from .errors import UserError
from .fsutil import atomic_dir
from .hashing import remembered_sha256
from .keymaps import ORIGINAL_EXTRA, SOURCE, fp8_kind, is_aux, original_to_diffusers
from .paths import cache_dir
from .variants import get_variant

VIEW_VERSION = 1  # bump when a view's content for the same files changes
SOURCES = "sources.json"
EXPECTED = {
    "transformer": "a Z-Image transformer (layers.N.attention.qkv / to_q, cap_embedder, x_embedder; original, "
                   "ComfyUI or diffusers key layout)",
    "text_encoder": "a Qwen3 text encoder in transformers' layout (model.layers.N.self_attn.q_norm, "
                    "model.embed_tokens)",
    "vae": "the Flux autoencoder (ae.safetensors: encoder.down.N.block, decoder.up.N.block; 16 latent channels)",
}
# Z-Image facts the weights do not carry (diffusers' config of Tongyi-MAI/Z-Image-Turbo)
DIT_FACTS = dict(all_patch_size=[2], all_f_patch_size=[1], norm_eps=1e-5, qk_norm=True, rope_theta=256.0,
                 t_scale=1000.0, axes_lens=[1536, 512, 512])
QWEN3_FACTS = dict(rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=40960, hidden_act="silu",
                   attention_bias=False, tie_word_embeddings=True)
VAE_FACTS = dict(in_channels=3, out_channels=3, scaling_factor=0.3611, shift_factor=0.1159, act_fn="silu")


@dataclass
class Source:
    role: str  # transformer | text_encoder | vae
    path: str
    name: str
    size: int
    sha256: str
    layout: str  # zimage-original | diffusers | transformers | ldm
    prefix: str
    fp8: str  # none | plain | scaled


# -- what a file is --------------------------------------------------------------------------------------------------
FOREIGN = [  # (what it is, a key fragment that shows it); checked after the LoRA markers
    ("a Z-Image ControlNet (pass it with --controlnet)", ("control_layers.", "control_all_x_embedder.")),
    ("a Flux transformer", ("double_blocks.0.img_attn.qkv.weight", "single_transformer_blocks.0.")),
    ("a Qwen-Image transformer", ("img_in.weight", "transformer_blocks.0.img_mod.1.weight")),
    ("an SD / SDXL UNet checkpoint", ("input_blocks.0.0.weight", "conditioner.embedders.",
                                      "down_blocks.0.resnets.0.time_emb_proj.weight")),
    ("a Qwen2 / Qwen2.5 language model (Qwen-Image's text encoder, without Qwen3's q_norm)",
     ("layers.0.self_attn.q_proj.bias",)),
    ("a CLIP / T5 text encoder", ("text_model.encoder.layers.0.", "encoder.block.0.layer.0.SelfAttention.q.weight")),
]
LORA_MARKERS = ("lora_A.", "lora_B.", "lora_down.", "lora_up.", ".alpha", "lora_unet_", "lora_te")


def _suffix_prefix(keys, suffix: str) -> str | None:
    """The prefix under which `suffix` is a key, or None."""
    for k in keys:
        if k.endswith(suffix) and (len(k) == len(suffix) or k[-len(suffix) - 1] == "."):
            return k[: -len(suffix)]
    return None


def identify(keys: list[str]) -> tuple[str, str, str]:
    """(kind, layout, prefix) of a file from its keys; kind is a role of EXPECTED or a description of another model."""
    keys = [k for k in keys if not is_aux(k)]
    if any(m in k for k in keys for m in LORA_MARKERS):
        return "a LoRA (pass it with --lora)", "", ""
    p = _suffix_prefix(keys, "layers.0.adaLN_modulation.0.weight")
    if p is not None and _suffix_prefix(keys, "cap_embedder.1.weight") == p:
        if p + "x_embedder.weight" in keys:
            return "transformer", "zimage-original", p
        if p + "all_x_embedder.2-1.weight" in keys:
            return "transformer", "diffusers", p
    p = _suffix_prefix(keys, "embed_tokens.weight")
    if p is not None and _suffix_prefix(keys, "layers.0.self_attn.q_norm.weight") is not None:
        return "text_encoder", "transformers", p[: -len("model.")] if p.endswith("model.") else p
    p = _suffix_prefix(keys, "encoder.down.0.block.0.conv1.weight")
    if p is not None and p + "decoder.conv_in.weight" in keys:
        return "vae", "ldm", p
    p = _suffix_prefix(keys, "encoder.down_blocks.0.resnets.0.conv1.weight")
    if p is not None and p + "decoder.conv_in.weight" in keys:
        return "vae", "diffusers", p
    for what, marks in FOREIGN:
        if any(m in k for k in keys for m in marks):
            return what, "", ""
    return f"unrecognised weights (keys such as {', '.join(sorted(keys)[:3]) or 'none'})", "", ""


def open_file(path: Path, role: str, what: str) -> Source:
    """Check that `path` (given as option `what`) is a safetensors file of the `role` component; a Source without
    its hash yet."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{what} {path}: no such file")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if path.suffix in PICKLE_SUFFIXES or head[:2] in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04"):
        raise UserError(f"{what} {path}: found a pickle checkpoint ({path.suffix or 'pickle bytes'}); expected "
                        f"{EXPECTED[role]} as .safetensors (pickle is never loaded: convert it to safetensors)")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            kind, layout, prefix = identify(keys)
            fp8 = fp8_kind(f, keys) if kind == role else "none"
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise UserError(f"{what} {path}: not a readable safetensors file (truncated or damaged: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}); expected {EXPECTED[role]}"
                        ) from None
    if kind != role:
        found = kind if kind not in EXPECTED else EXPECTED[kind].split(" (")[0]
        raise UserError(f"{what} {path}: found {found}; expected {EXPECTED[role]}")
    size = path.stat().st_size
    return Source(role, str(path.resolve()), path.name, size, "", layout, prefix, fp8)


def _shapes(src: Source) -> dict[str, list[int]]:
    """The file's tensor shapes in its loader's layout (diffusers for the DiT, transformers for Qwen3)."""
    out = {}
    with safe_open(src.path, framework="pt") as f:
        for key in f.keys():
            if not key.startswith(src.prefix) or is_aux(key):
                continue
            shape, k = list(f.get_slice(key).get_shape()), key[len(src.prefix):]
            pairs = original_to_diffusers(k, shape) if src.layout == "zimage-original" else [(k, shape)]
            out.update(pairs)
    return out


def _match(src: Source, shapes: dict, model: torch.nn.Module, ignore=()) -> None:
    """The file's shapes against a model built (on the meta device) from the inferred config."""
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    shapes = {k: v for k, v in shapes.items() if not k.startswith(ignore)}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [f"{k} {shapes[k]} (expected {expected[k]})" for k in sorted(set(shapes) & set(expected))
             if shapes[k] != expected[k]]
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:4]}" if missing else "", f"unexpected {unexpected[:4]}" if unexpected else "",
                 f"shape mismatch {wrong[:3]}" if wrong else ""]
        raise UserError(f"{src.path}: found {EXPECTED[src.role].split(' (')[0]} whose weights do not fit the model "
                        f"its shapes describe: {'; '.join(p for p in parts if p)}")


# -- configs from shapes ---------------------------------------------------------------------------------------------
def dit_config(src: Source, shapes: dict, base_cfg: dict | None) -> dict:
    from diffusers import ZImageTransformer2DModel

    def count(prefix):
        return len({k.split(".")[1] for k in shapes if k.startswith(prefix)})

    x = shapes.get("all_x_embedder.2-1.weight")
    q_norm = shapes.get("layers.0.attention.norm_q.weight")
    if x is None or q_norm is None or "cap_embedder.1.weight" not in shapes:
        raise UserError(f"{src.path}: found a partial Z-Image transformer (no x_embedder / q_norm / cap_embedder); "
                        f"expected {EXPECTED['transformer']}")
    dim, head_dim = x[0], q_norm[0]
    cfg = {**DIT_FACTS, **{k: v for k, v in (base_cfg or {}).items() if not k.startswith("_")},
           "dim": dim, "in_channels": x[1] // 4, "n_layers": count("layers."),
           "n_refiner_layers": count("noise_refiner."), "n_heads": dim // head_dim, "n_kv_heads": dim // head_dim,
           "cap_feat_dim": shapes["cap_embedder.1.weight"][1],
           "siglip_feat_dim": (shapes.get("siglip_embedder.1.weight") or [None, None])[1],
           "axes_dims": [head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8]}
    if base_cfg and sum(base_cfg.get("axes_dims", [])) == head_dim:
        cfg["axes_dims"] = base_cfg["axes_dims"]
    with torch.device("meta"):
        model = ZImageTransformer2DModel(**cfg)
    _match(src, shapes, model, ignore=ORIGINAL_EXTRA)
    return dict(model.config)


def text_config(src: Source, shapes: dict, base_cfg: dict | None) -> dict:
    from transformers import Qwen3Config, Qwen3Model

    s = {k[len("model."):] if k.startswith("model.") else k: v for k, v in shapes.items()}
    vocab, hidden = s["embed_tokens.weight"]
    head_dim = s["layers.0.self_attn.q_norm.weight"][0]
    facts = {k: v for k, v in (base_cfg or QWEN3_FACTS).items() if k in QWEN3_FACTS}
    cfg = Qwen3Config(**{**QWEN3_FACTS, **facts}, vocab_size=vocab, hidden_size=hidden, head_dim=head_dim,
                      num_hidden_layers=len({k.split(".")[1] for k in s if k.startswith("layers.")}),
                      num_attention_heads=s["layers.0.self_attn.q_proj.weight"][0] // head_dim,
                      num_key_value_heads=s["layers.0.self_attn.k_proj.weight"][0] // head_dim,
                      intermediate_size=s["layers.0.mlp.gate_proj.weight"][0])
    with torch.device("meta"):
        model = Qwen3Model(cfg)
    _match(src, s, model, ignore=("lm_head.",))
    out = cfg.to_dict()
    out["architectures"] = ["Qwen3Model"]
    return out


def convert_vae(src: Source, tmp: Path) -> dict:
    """The Flux autoencoder file -> a diffusers AutoencoderKL folder at `tmp` (diffusers' own LDM converter)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    state = load_file(src.path)
    state = {k[len(src.prefix):]: v for k, v in state.items() if k.startswith(src.prefix)}
    if src.layout == "ldm":
        blocks = len({k.split(".")[2] for k in state if k.startswith("encoder.down.")})
        widths = [state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(blocks)]
        per_block = len({k.split(".")[4] for k in state if k.startswith("encoder.down.0.block.")})
        latent = state["decoder.conv_in.weight"].shape[1]
        quant = "quant_conv.weight" in state
    else:
        blocks = len({k.split(".")[2] for k in state if k.startswith("encoder.down_blocks.")})
        widths = [state[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0] for i in range(blocks)]
        per_block = len({k.split(".")[4] for k in state if k.startswith("encoder.down_blocks.0.resnets.")})
        latent = state["decoder.conv_in.weight"].shape[1]
        quant = "quant_conv.weight" in state
    if latent != 16:
        raise UserError(f"{src.path}: found an autoencoder with {latent} latent channels (an SD/SDXL VAE?); "
                        f"expected {EXPECTED['vae']}")
    # GroupNorm groups are not in the weights: the Flux VAE's 32; narrower (test) VAEs half their first width
    cfg = dict(**VAE_FACTS, latent_channels=latent, block_out_channels=widths, layers_per_block=per_block,
               norm_num_groups=min(32, widths[0] // 2), down_block_types=["DownEncoderBlock2D"] * blocks,
               up_block_types=["UpDecoderBlock2D"] * blocks, use_quant_conv=quant, use_post_quant_conv=quant)
    if src.layout == "ldm":
        state = convert_ldm_vae_checkpoint(state, cfg)
    with torch.device("meta"):
        vae = AutoencoderKL(**cfg)
    _match(src, {k: list(v.shape) for k, v in state.items()}, vae)
    vae = AutoencoderKL(**cfg)
    vae.load_state_dict({k: v.float() for k, v in state.items()})
    vae.save_pretrained(tmp, safe_serialization=True)
    return cfg


# -- the view --------------------------------------------------------------------------------------------------------
def _link_tree(src: Path, dst: Path) -> None:
    """`dst` mirrors `src` with a symlink per file (no copy of the base's weights)."""
    for p in sorted(src.rglob("*")):
        if p.is_file() and ".cache" not in p.relative_to(src).parts:
            target = dst / p.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(p.resolve(), target)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def _scheduler(tmp: Path, variant: str) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=get_variant(variant).scheduler_shift,
                                    use_dynamic_shifting=False).save_pretrained(tmp / "scheduler")


def _tokenizer(tmp: Path, variant: str, vocab: int, small: bool) -> None:
    """The embedded tokenizer for small (test) text encoders, Qwen3's from the hub (cache first) otherwise."""
    if small:
        from .tiny import build_tokenizer

        tok = build_tokenizer()
        if len(tok) != vocab:
            raise UserError(f"the text encoder's vocabulary has {vocab} tokens, the embedded test tokenizer "
                            f"{len(tok)}: pass --base DIR for its tokenizer")
        tok.save_pretrained(tmp / "tokenizer")
        return
    from huggingface_hub import snapshot_download

    hub = get_variant(variant).hub_id
    for local in (True, False):
        try:
            got = Path(snapshot_download(hub, allow_patterns=["tokenizer/*"], local_files_only=local))
            _link_tree(got / "tokenizer", tmp / "tokenizer")
            return
        except Exception:
            continue
    raise UserError(f"the tokenizer: {hub}'s tokenizer/ is neither cached nor reachable; pass --base DIR "
                    f"(a Z-Image diffusers folder) for the tokenizer and scheduler")


def _hashed(sources: list[Source]) -> list[Source]:
    sums = remembered_sha256([Path(s.path) for s in sources])
    for s in sources:
        s.sha256 = sums[Path(s.path)]
    return sources


def prepare(model: str | None = None, variant: str | None = None, base: str | None = None,
            transformer: str | None = None, text_encoder: str | None = None, vae: str | None = None, log=print
            ) -> tuple[Path, str]:
    """The view folder of a build from single files -> (its path, the variant). `model`: a transformer file (or,
    with `transformer`, a diffusers folder it replaces the DiT of); `base`: the diffusers folder the other parts
    come from; `text_encoder` / `vae`: files for those parts (they win over `base`'s)."""
    dit_file = transformer or model
    if transformer and model:
        if base is not None or Path(model).is_file():
            raise UserError("--transformer FILE replaces the DiT of --model DIR (a diffusers folder); "
                            "with a transformer file as --model, pass --base DIR instead")
        base = model  # --model DIR --transformer FILE
    if dit_file is None or Path(dit_file).expanduser().is_dir():
        raise UserError("--base / --text-encoder / --vae go with a transformer file: --model FILE.safetensors, or "
                        "--transformer FILE over --model DIR")
    if base is None and (text_encoder is None or vae is None):
        missing = [n for n, v in (("--text-encoder FILE", text_encoder), ("--vae FILE", vae)) if v is None]
        raise UserError(f"a transformer file needs the rest of the pipeline: pass --base DIR (a Z-Image diffusers "
                        f"folder) or {' and '.join(missing)}")
    sources = [open_file(Path(dit_file), "transformer", "--transformer" if transformer else "--model")]
    sources += [open_file(Path(f), r, w) for r, f, w in (("text_encoder", text_encoder, "--text-encoder"),
                                                         ("vae", vae, "--vae")) if f]
    base_path, base_variant = resolve(base, variant) if base else (None, None)
    dit_shapes = _shapes(sources[0])
    variant = _variant(sources[0], dit_shapes, variant, base, base_variant)
    _hashed(sources)
    base_configs = [(base_path / f / "config.json").read_text() if (base_path / f / "config.json").is_file() else ""
                    for f in ("transformer", "text_encoder")] if base_path else []
    key = hashlib.sha256(json.dumps({"v": VIEW_VERSION, "variant": variant, "base": str(base_path),
                                     "base_configs": base_configs,  # the facts the view's configs take from it
                                     "files": [[s.role, s.sha256, s.path] for s in sources]}).encode()).hexdigest()
    view = cache_dir() / "views" / f"{Path(dit_file).stem}-{key[:16]}"
    if not (view / SOURCES).is_file():
        log(f"[checkpoint] writing the diffusers-layout view of {', '.join(s.name for s in sources)} to {view}")
        with atomic_dir(view) as tmp:
            _write_view(tmp, sources, dit_shapes, variant, base_path)
    return view, variant


def _variant(src: Source, shapes: dict, asked: str | None, base: str | None, base_variant: str | None) -> str:
    edit = "siglip_embedder.1.weight" in shapes
    what = "an Edit/Omni transformer (with SigLIP parts)" if edit else "a Turbo/Base transformer (no SigLIP parts)"
    for name, v in (("--variant", asked), (f"--base {base}", base_variant)):
        if v is not None and (v == "edit") != edit:
            raise UserError(f"{name} says {v}, but {src.path} is {what}")
    variant = asked or base_variant or ("edit" if edit else "turbo")
    if variant == "edit" and base is None:
        raise UserError(f"{src.path} is {what}: the Edit build needs the SigLIP vision tower and its processor; "
                        f"pass --base DIR (a Z-Image-Edit diffusers folder)")
    return variant


def _write_view(tmp: Path, sources: list[Source], dit_shapes: dict, variant: str, base: Path | None) -> None:
    by_role = {s.role: s for s in sources}
    if base is not None:
        for p in sorted(base.iterdir()):
            if p.is_dir() and p.name not in by_role and not p.name.startswith("."):
                _link_tree(p, tmp / p.name)
    dit = by_role["transformer"]
    base_dit = read_config(base, "transformer") if base is not None else None
    _write_json(tmp / "transformer" / "config.json", dit_config(dit, dit_shapes, base_dit))
    _write_json(tmp / "transformer" / SOURCE, _source_record(dit))
    te = by_role.get("text_encoder")
    if te is not None:
        base_te = read_config(base, "text_encoder") if base is not None else None
        cfg = text_config(te, _shapes(te), base_te)
        _write_json(tmp / "text_encoder" / "config.json", cfg)
        _write_json(tmp / "text_encoder" / SOURCE, _source_record(te))
        if base is None:
            _tokenizer(tmp, variant, cfg["vocab_size"], small=cfg["hidden_size"] < 1024)
    if "vae" in by_role:
        convert_vae(by_role["vae"], tmp / "vae")
    if base is None:
        _scheduler(tmp, variant)
    cls = "ZImageOmniPipeline" if variant == "edit" else "ZImagePipeline"
    _write_json(tmp / "model_index.json", {"_class_name": cls, "_diffusers_version": _diffusers_version()})
    _write_json(tmp / SOURCES, {"sources": [_public(s) for s in sources],
                                "base": str(base) if base is not None else None})


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _source_record(s: Source) -> dict:
    return {"layout": s.layout, "prefix": s.prefix, "fp8": s.fp8,
            "files": [{"path": s.path, "name": s.name, "size": s.size, "sha256": s.sha256}]}


PUBLIC_FIELDS = ("role", "name", "size", "sha256", "layout", "fp8")  # `fp8`: the file's FP8 kind (plain / scaled)


def _public(s: Source) -> dict:
    return {k: v for k, v in asdict(s).items() if k in PUBLIC_FIELDS}


def sources(ckpt: Path) -> dict | None:
    """The view's source record (manifest `model.sources`), or None for a diffusers folder."""
    path = Path(ckpt) / SOURCES
    return json.loads(path.read_text()) if path.is_file() else None
