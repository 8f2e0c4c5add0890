"""Warm-up before serving: run the shapes requests will have, so that later requests neither compile nor capture.

The compiled Torch backend (runtime/torch_fast.py) keys its compiled code and CUDA graphs by (size, caption bucket,
batch): for every size asked, one 1-step request per caption bucket (a prompt whose token count lies in it); the
variant's default guidance makes CFG variants run their batch-2 step; img2img where the build has a VAE encoder.
Without buckets (exact caption lengths) and on other backends: one request per size (engines' and sessions'
first-call work).
"""

from __future__ import annotations

import logging
import time

from PIL import Image

from ..variants import is_omni

log = logging.getLogger(__name__)


def prompt_of_length(tokenizer, tokens: int, at_least: int = 1) -> str | None:
    """A prompt of repeated words whose chat-template token count is the largest <= `tokens`, if >= `at_least`."""
    count = lambda k: int(tokenizer([" ".join(["cat"] * k)])[1].sum())  # noqa: E731
    lo, hi = 1, tokens
    while lo < hi:  # the most words with count <= tokens
        mid = (lo + hi + 1) // 2
        if count(mid) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(["cat"] * lo) if at_least <= count(lo) <= tokens else None


def bucket_prompts(tokenizer, buckets) -> list[str]:
    """One prompt per caption bucket (its token count within the bucket), for the buckets the tokenizer reaches."""
    prompts, previous = [], 0
    for b in sorted(buckets):
        if previous < tokenizer.max_length:
            prompt = prompt_of_length(tokenizer, min(b, tokenizer.max_length), previous + 1)
            if prompt is not None:
                prompts.append(prompt)
        previous = b
    return prompts


def warm_up(runtime, sizes: list[tuple[int, int]]) -> dict:
    from .torch_fast import TorchBackend, compile_counters

    pipeline, backend = runtime.pipeline, runtime.pipeline.backend
    t0 = time.perf_counter()
    compiled = isinstance(backend, TorchBackend) and backend.compiled
    prompts = ["a cat"]
    if compiled and backend.caption_buckets:
        prompts = bucket_prompts(pipeline.tokenizer, backend.caption_buckets)
    image_conditioned = is_omni(runtime.variant) or "vae_encoder" in runtime.manifest["components"]
    evicted = backend.graph_stats().get("evicted", 0) if compiled else 0
    requests, per_size = 0, {}
    for h, w in sizes:
        t_size = time.perf_counter()
        for prompt in prompts:
            images = [Image.new("RGB", (w, h), (127, 127, 127))] if is_omni(runtime.variant) else None
            runtime.generate(prompt, seed=0, steps=1, height=h, width=w, images=images)
            requests += 1
        if image_conditioned and not is_omni(runtime.variant):
            runtime.generate(prompts[0], seed=0, steps=1, images=[Image.new("RGB", (w, h), (127, 127, 127))],
                             strength=1.0)
            requests += 1
        per_size[f"{h}x{w}"] = time.perf_counter() - t_size
    result = {"sizes": [list(s) for s in sizes], "seconds_per_size": per_size, "requests": requests,
              "prompts": len(prompts),
              "seconds": time.perf_counter() - t0, "backend": backend.name,
              "torch_mode": getattr(backend, "torch_mode", None), "fallbacks": runtime.fallbacks()}
    if compiled:
        result["graphs"] = backend.graph_stats()
        if result["graphs"].get("evicted", 0) > evicted:
            result["warning"] = (f"the warm-up made more step graphs than max_graphs={backend.max_graphs} keeps: "
                                 "the first ones will be captured again when used; raise max_graphs")
            log.warning(result["warning"])
        result["compile"] = {k: v for k, v in compile_counters().items() if not k.endswith("reasons")}
    return result
