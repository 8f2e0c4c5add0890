"""Prompt encoding: Qwen chat template, tokenization, and the caption padding the DiT graphs expect."""

from __future__ import annotations

import warnings

import torch

from ..models.dit import SEQ_MULTIPLE

MAX_SEQUENCE_LENGTH = 512


def pad_captions(caps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length caption features -> (B, S, C) zero-padded to a multiple of 32, and lengths (B,)."""
    lens = torch.tensor([c.shape[0] for c in caps], dtype=torch.int64)
    seq = -(-int(lens.max()) // SEQ_MULTIPLE) * SEQ_MULTIPLE
    out = caps[0].new_zeros(len(caps), seq, caps[0].shape[1])
    for i, c in enumerate(caps):
        out[i, : c.shape[0]] = c
    return out, lens


class PromptTokenizer:
    """The checkpoint's tokenizer with diffusers' prompt rules: chat template with add_generation_prompt and
    enable_thinking, truncation to `max_length` tokens (with a warning), no padding to max_length."""

    def __init__(self, path, max_length: int = MAX_SEQUENCE_LENGTH):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.max_length = max_length

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts through the chat template -> input_ids (B, L) int64 right-padded, attention_mask (B, L)."""
        return self.tokenize([
            self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=True)
            for p in prompts
        ])

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts as they are (no template) -> input_ids (B, L) int64 right-padded, attention_mask (B, L)."""
        ids = []
        for text in texts:
            tokens = self.tokenizer(text, add_special_tokens=True)["input_ids"]
            if len(tokens) > self.max_length:
                warnings.warn(
                    f"prompt is {len(tokens)} tokens with the chat template; truncated to {self.max_length}",
                    stacklevel=2,
                )
                tokens = tokens[: self.max_length]
            ids.append(tokens)
        length = max(len(t) for t in ids)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(ids), length), pad, dtype=torch.int64)
        mask = torch.zeros((len(ids), length), dtype=torch.int64)
        for i, t in enumerate(ids):
            input_ids[i, : len(t)] = torch.tensor(t)
            mask[i, : len(t)] = 1
        return input_ids, mask
