"""Model facts: the numbers of a checkpoint every stage and the runtime use (the manifest's `model.facts`), and
the one rule for small test checkpoints."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import read_config
from .errors import UserError

# A DiT narrower than this is a test checkpoint (the embedded tiny ones): smaller images (sides 64..512, 256 by
# default, instead of the variant's range and 1024) and INT4 blocks of 32 (its widths are under 128).
SMALL_DIM = 1024
SMALL_SIDES = (64, 512)
SMALL_SIDE, FULL_SIDE = 256, 1024  # the default image side / the engines' optimum


def small_model(dim: int) -> bool:
    return dim < SMALL_DIM


def default_side(facts: dict) -> int:
    return SMALL_SIDE if small_model(facts["dim"]) else FULL_SIDE


def model_facts(ckpt: Path) -> dict:
    dit, te, vae = (read_config(ckpt, f) for f in ("transformer", "text_encoder", "vae"))
    if dit["cap_feat_dim"] != te["hidden_size"]:
        raise UserError(f"transformer cap_feat_dim {dit['cap_feat_dim']} != text encoder hidden {te['hidden_size']}")
    patch = (dit.get("all_patch_size") or [2])[0]
    edit = {}
    if dit.get("siglip_feat_dim"):
        sig = read_config(ckpt, "siglip")
        sig = sig.get("vision_config", sig)
        edit = {"siglip_feat_dim": dit["siglip_feat_dim"], "vision_patch": sig["patch_size"],
                "vision_patch_dim": sig.get("num_channels", 3) * sig["patch_size"] ** 2,
                "vision_max_patches": read_config(ckpt, "siglip_processor",
                                                  "preprocessor_config.json").get("max_num_patches", 256)}
        if sig["hidden_size"] != dit["siglip_feat_dim"]:
            raise UserError(f"siglip hidden {sig['hidden_size']} != transformer siglip_feat_dim")
    return {**edit,
        "vocab_size": te["vocab_size"], "text_hidden": te["hidden_size"], "cap_feat_dim": dit["cap_feat_dim"],
        "dim": dit["dim"], "n_layers": dit["n_layers"], "latent_channels": vae["latent_channels"],
        "in_channels": dit["in_channels"], "vae_scale_factor": 2 ** (len(vae["block_out_channels"]) - 1),
        "patch_size": patch, "patch_dim": patch * patch * vae["latent_channels"],
        "vae_scaling": vae["scaling_factor"], "vae_shift": vae.get("shift_factor") or 0.0,
    }
