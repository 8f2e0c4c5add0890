"""Real-size Z-Image-Turbo checkpoints with random weights (6.15B DiT, Qwen3-4B text encoder, Flux VAE) in
diffusers layout, written shard by shard: the model is built on the meta device (shapes only) and each tensor
is drawn, cast and written in turn, so memory holds one shard at most.

    python -m zimage_deploy.realsize --out /data/zimage-real-random [--dtype bf16] [--shard-gb 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from .cli import run_cli
from .fsutil import atomic_dir

REAL_DIT = dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
                n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0,
                t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
REAL_TEXT = dict(vocab_size=151936, hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, intermediate_size=9728, rms_norm_eps=1e-6,
                 rope_theta=1_000_000.0, max_position_embeddings=40960, tie_word_embeddings=True)
REAL_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
                layers_per_block=2, norm_num_groups=32, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def random_tensor(name: str, shape, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Fan-in scaled normals for matrices, gains around 1 for norms, unit-scale pad tokens, small biases."""
    if len(shape) >= 2:
        fan_in = int(torch.tensor(shape[1:]).prod())
        t = torch.randn(shape, generator=gen) * fan_in**-0.5
    elif "norm" in name and name.endswith("weight"):
        t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    elif "pad_token" in name:
        t = torch.randn(shape, generator=gen)
    else:
        t = 0.02 * torch.randn(shape, generator=gen)
    return t.to(dtype)


def write_sharded(shapes: dict[str, tuple], folder: Path, stem: str, dtype: torch.dtype, shard_bytes: int,
                  seed: int, desc: str) -> int:
    """Random tensors of the given shapes into `stem`-0000k-of-0000n.safetensors + index; returns bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    size = torch.tensor([], dtype=dtype).element_size()
    groups, current, current_bytes = [], [], 0
    for name, shape in shapes.items():
        n = int(torch.tensor(shape).prod()) * size
        if current and current_bytes + n > shard_bytes:
            groups.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += n
    if current:
        groups.append(current)
    weight_map, total = {}, 0
    with tqdm(total=len(shapes), desc=desc, unit="tensor") as bar:
        for k, names in enumerate(groups, 1):
            file = f"{stem}-{k:05d}-of-{len(groups):05d}.safetensors"
            shard = {}
            for name in names:
                shard[name] = random_tensor(name, shapes[name], gen, dtype)
                total += shard[name].numel() * size
                weight_map[name] = file
                bar.update()
            save_file(shard, str(folder / file), metadata={"format": "pt"})
            del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def write_real_size(out: Path, dtype: str = "bf16", shard_gb: float = 2.0, seed: int = 0,
                    dit: dict | None = None, text: dict | None = None, vae: dict | None = None) -> Path:
    """Write the checkpoint to `out` (a temp folder renamed when complete). `dit` / `text` / `vae` override
    config entries (the tests use a reduced depth)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from .tiny import _randomize, build_tokenizer

    torch_dtype, shard_bytes = DTYPES[dtype], int(shard_gb * 2**30)
    out = Path(out)
    with atomic_dir(out) as tmp:
        with torch.device("meta"):
            transformer = ZImageTransformer2DModel(**{**REAL_DIT, **(dit or {})})
            text_config = Qwen3Config(**{**REAL_TEXT, **(text or {})})
            text_encoder = Qwen3Model(text_config)
        transformer.save_config(tmp / "transformer")
        write_sharded({k: tuple(v.shape) for k, v in transformer.state_dict().items()}, tmp / "transformer",
                      "diffusion_pytorch_model", torch_dtype, shard_bytes, seed, "DiT weights")
        text_config.architectures = ["Qwen3Model"]
        text_config.torch_dtype = str(torch_dtype).replace("torch.", "")
        text_config.save_pretrained(tmp / "text_encoder")
        write_sharded({k: tuple(v.shape) for k, v in text_encoder.state_dict().items()}, tmp / "text_encoder",
                      "model", torch_dtype, shard_bytes, seed + 1, "text-encoder weights")
        autoencoder = AutoencoderKL(**{**REAL_VAE, **(vae or {})})
        _randomize(autoencoder, torch.Generator().manual_seed(seed + 2))
        autoencoder.to(torch_dtype).save_pretrained(tmp / "vae", safe_serialization=True)
        build_tokenizer().save_pretrained(tmp / "tokenizer")
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(tmp / "scheduler")
        import diffusers

        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": "ZImagePipeline", "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "Qwen3Model"],
            "tokenizer": ["transformers", "PreTrainedTokenizerFast"], "transformer": ["diffusers",
                                                                                     "ZImageTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zimage_deploy.realsize", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=None, help="DiT main layers (default: the real 30)")
    ap.add_argument("--text-layers", type=int, default=None, help="text-encoder layers (default: the real 36)")
    args = ap.parse_args(argv)
    dit = {"n_layers": args.layers} if args.layers else None
    text = {"num_hidden_layers": args.text_layers} if args.text_layers else None
    print(write_real_size(args.out, args.dtype, args.shard_gb, args.seed, dit=dit, text=text))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
