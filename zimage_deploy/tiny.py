"""The embedded tiny Z-Image-Turbo checkpoint: written by the package itself, deterministically, in diffusers
layout with diffusers' and transformers' own classes and `save_pretrained` (safetensors).

Random weights, but never the zero inits that hide bugs: pad tokens, adaLN weights and norm gains are all
random and non-trivial. Tests call `write_checkpoint` with other configs to get several checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import __version__
from .fsutil import atomic_dir
from .paths import cache_dir

TINY_VERSION = 1  # bump when the tiny checkpoint's content changes

TINY_DIT = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2, n_refiner_layers=1,
    n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=32, rope_theta=256.0, t_scale=1000.0,
    axes_dims=[8, 12, 12], axes_lens=[1024, 128, 128],
)
TINY_TEXT = dict(
    hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    intermediate_size=64, rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=1024,
    tie_word_embeddings=False,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
    norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
)
TINY_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
TINY_SIGLIP = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_channels=3,
                   patch_size=16, num_patches=64)
TINY_SIGLIP_PROCESSOR = dict(patch_size=16, max_num_patches=64)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>",
                  "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]

# Qwen3's chat template, reduced to what Z-Image uses (plain messages, generation prompt, thinking switch).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

_CORPUS = [
    "a photo of a cat sitting on a red sofa, soft light, 35mm",
    "A watercolor painting of mountains at sunrise with mist over the lake",
    "一只在沙发上睡觉的橘猫，柔和的光线，电影感",
    "cyberpunk city street at night, neon signs, rain, reflections",
    "一幅中国山水画，远山，小桥，流水，人家",
    "portrait of an old fisherman, detailed wrinkles, dramatic lighting",
]


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer in Qwen's style, trained on a small fixed corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
        padding_side="right", model_max_length=131072, chat_template=CHAT_TEMPLATE,
    )


def _randomize(module: torch.nn.Module, gen: torch.Generator, std_scale: float = 1.0) -> None:
    """Fan-in scaled normal weights, random biases, norm gains around 1, unit-scale pad tokens."""
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            fan_in = p[0].numel()
            p.data = torch.randn(p.shape, generator=gen) * (std_scale / fan_in**0.5)
        elif "norm" in name and name.endswith("weight"):
            p.data = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
        else:
            p.data = 0.1 * torch.randn(p.shape, generator=gen)
    for name in ("x_pad_token", "cap_pad_token", "siglip_pad_token"):
        tensor = getattr(module, name, None)
        if isinstance(tensor, torch.nn.Parameter):
            tensor.data = torch.randn(tensor.shape, generator=gen)


def write_checkpoint(out: Path, dit: dict | None = None, text: dict | None = None, vae: dict | None = None,
                     scheduler: dict | None = None, seed: int = 0, edit: bool = False, init: str = "random",
                     siglip: dict | None = None, siglip_processor: dict | None = None, causal_lm: bool = False,
                     vocab_size: int = 512) -> Path:
    """Write a Z-Image checkpoint in diffusers layout to `out` (atomically): a `ZImagePipeline` (Turbo/Base), or
    with `edit` a `ZImageOmniPipeline` with a SigLIP2 vision tower and its processor.

    `init="random"`: every parameter random and distinct (see `_randomize`); `init="default"`: the libraries' own
    initialisation (norm gains of ones, zero pad tokens and biases: many parameters share values), seeded.
    `causal_lm`: the text encoder saved as `Qwen3ForCausalLM` (with an LM head, tied or not) instead of `Qwen3Model`;
    `vocab_size`: the tokenizer's target vocabulary."""
    if init not in ("random", "default"):
        raise ValueError(f"init must be 'random' or 'default', not {init!r}")
    dit = {**TINY_DIT, **(dit or {})}
    text = {**TINY_TEXT, **(text or {})}
    vae_cfg = {**TINY_VAE, **(vae or {})}
    dit["cap_feat_dim"] = text["hidden_size"]
    if edit:
        siglip_cfg = {**TINY_SIGLIP, **(siglip or {})}
        dit["siglip_feat_dim"] = siglip_cfg["hidden_size"]
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the libraries' own initialisation draws from the global generator
        torch.manual_seed(seed)
        pipe = _make_pipeline(text, dit, vae_cfg, scheduler, gen, init, edit, siglip_cfg if edit else None,
                              siglip_processor, causal_lm, vocab_size)
    out = Path(out)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out


def _make_pipeline(text, dit, vae_cfg, scheduler, gen, init, edit, siglip_cfg, siglip_processor, causal_lm,
                   vocab_size):
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageOmniPipeline, ZImagePipeline,
                           ZImageTransformer2DModel)
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    randomize = _randomize if init == "random" else (lambda module, gen: None)

    tokenizer = build_tokenizer(vocab_size)
    text_cls = Qwen3ForCausalLM if causal_lm else Qwen3Model
    text_encoder = text_cls(Qwen3Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **text))
    randomize(text_encoder, gen)
    transformer = ZImageTransformer2DModel(**dit)
    randomize(transformer, gen)
    autoencoder = AutoencoderKL(**vae_cfg)
    randomize(autoencoder, gen)
    parts = dict(scheduler=FlowMatchEulerDiscreteScheduler(**{**TINY_SCHEDULER, **(scheduler or {})}),
                 vae=autoencoder, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    if edit:
        from transformers import Siglip2VisionConfig, Siglip2VisionModel
        from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

        siglip = Siglip2VisionModel(Siglip2VisionConfig(**siglip_cfg))
        randomize(siglip, gen)
        pipe = ZImageOmniPipeline(**parts, siglip=siglip, siglip_processor=Siglip2ImageProcessorPil(
            **{**TINY_SIGLIP_PROCESSOR, **(siglip_processor or {})}))
    else:
        pipe = ZImagePipeline(**parts)
    return pipe


# The embedded tiny checkpoints: name -> (seed, scheduler config). Base differs from Turbo by its weights and
# its scheduler shift (the runtime takes the shift from the checkpoint), as the real checkpoints do.
TINY_MODELS = {
    "tiny": dict(seed=0, scheduler=None, variant="turbo"),
    "tiny-base": dict(seed=1, scheduler=dict(shift=6.0), variant="base"),
    "tiny-edit": dict(seed=2, scheduler=None, edit=True, variant="edit"),
}


def ensure_tiny(name: str = "tiny") -> Path:
    """An embedded tiny checkpoint, written to the cache on first use."""
    spec = TINY_MODELS[name]
    path = cache_dir() / f"{name}-v{TINY_VERSION}"
    if not (path / "model_index.json").is_file():
        print(f"writing the embedded {name} Z-Image checkpoint to {path} (zimage-deploy {__version__})")
        write_checkpoint(path, scheduler=spec["scheduler"], seed=spec["seed"], edit=spec.get("edit", False))
    return path.resolve()
