"""Batched generation with quantized KV caches.

Each prompt is prefilled alone, exactly as ``mlx_lm.stream_generate`` would do it
(fp16 caches: in left-padded batches through mlx-lm's ``BatchKVCache``), then the
per-prompt caches are merged into one batch cache (``mlx_kvq.cache.RowsKVCache``) and
decoded together. Outputs equal single runs up to the rounding of batched matrix products (as
with mlx-lm's own batched fp16 generation).
"""

import time
from dataclasses import dataclass, field
from typing import List

import mlx.core as mx

from ..bridge import (
    empty_fp16_cache,
    extract_row,
    fp16_batch_cache,
    is_fp16_cache,
    make_prompt_cache,
    merge_mlx_lm_caches,
)
from ..cache import QuantizedKVCache, RowsKVCache
from .prefill import prefill
from .prompts import encode_prompt


def merge_caches(layer_caches):
    """Per-prompt prompt caches (lists over layers) -> one batch prompt cache: our layers'
    rows in a ``RowsKVCache`` (each row packing as alone; decoded in one buffer where the
    rows can share one), mlx-lm's through its own ``merge``."""
    merged = []
    for rows in zip(*layer_caches):
        if isinstance(rows[0], QuantizedKVCache):
            merged.append(RowsKVCache.merge(list(rows)))
        else:
            merged.append(merge_mlx_lm_caches(list(rows)))
    return merged


@dataclass
class BatchResponse:
    """Texts and token ids per prompt, the batch caches and timing/memory figures."""

    texts: List[str]
    token_ids: List[List[int]]
    caches: list = field(repr=False)
    prompt_time: float = 0.0
    generation_time: float = 0.0
    peak_memory: float = 0.0  # GB


def batched_prefill(model, prompts, batch_size=32):
    """Per-prompt fp16 caches after feeding all but the last token of each prompt.

    The prompts run ``batch_size`` at a time through mlx-lm's ``BatchKVCache`` (left
    padding, per-row positions), which is how mlx-lm batches fp16 generation.
    """
    rows = []
    for a in range(0, len(prompts), batch_size):
        group = [p[:-1] for p in prompts[a : a + batch_size]]
        L = max(len(p) for p in group)
        pads = [L - len(p) for p in group]
        x = mx.array([[0] * n + list(p) for n, p in zip(pads, group)])
        cache = fp16_batch_cache(model, pads)
        if L:
            model(x, cache=cache)
            mx.eval([c.state for c in cache])
        for i in range(len(group)):
            rows.append([extract_row(c, i) if L else empty_fp16_cache() for c in cache])
        del cache
    return rows


def batch_generate(
    model,
    tokenizer,
    prompts,
    max_tokens=256,
    *,
    sampler=None,
    prefill_step_size=2048,
    prefill_batch_size=32,
    verbose=False,
    **kv_kwargs,
):
    """Generate for several prompts at once with quantized KV caches.

    ``prompts``: strings (run through the chat template) or lists of token ids.
    ``kv_kwargs``: ``make_prompt_cache`` options (``kv_bits=None`` for fp16 caches).
    Greedy by default (``sampler``: mlx-lm sampler applied to the (B, vocab) logprobs).
    Each prompt's output is the one it would get alone with the same cache config.
    Prompts are prefilled one by one into quantized caches (fp16 caches:
    ``prefill_batch_size`` at a time when they all fit in one prefill step), then
    decoded together.
    """
    if not prompts:
        raise ValueError("No prompts given.")
    prompts = [encode_prompt(tokenizer, p) if isinstance(p, str) else list(p) for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("Empty prompt.")
    kv_kwargs.setdefault("kv_bits", 4)
    tic = time.perf_counter()
    template = make_prompt_cache(model, **kv_kwargs)
    fp16 = all(is_fp16_cache(c) for c in template)
    one_step = max(len(p) for p in prompts) - 1 <= prefill_step_size
    if one_step and template and fp16:
        rows = batched_prefill(model, prompts, prefill_batch_size)
    else:
        rows = []
        for p in prompts:
            rows.append(make_prompt_cache(model, **kv_kwargs))
            prefill(model, p, rows[-1], prefill_step_size, hold_last=True)
    caches = merge_caches(rows)
    del rows
    prompt_time = time.perf_counter() - tic

    tic = time.perf_counter()
    eos = set(tokenizer.eos_token_ids)
    y = mx.array([[p[-1]] for p in prompts])
    out = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_tokens):
        logits = model(y, cache=caches)[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        y = (sampler(logprobs) if sampler else mx.argmax(logprobs, axis=-1))[:, None]
        for i, t in enumerate(y[:, 0].tolist()):
            done[i] = done[i] or t in eos
            if not done[i]:
                out[i].append(t)
        if all(done):
            break
    texts = [tokenizer.decode(t) for t in out]
    if verbose:
        print(f"{len(prompts)} prompts: prefill {prompt_time:.2f} s, "
              f"generation {time.perf_counter() - tic:.2f} s, peak memory "
              f"{mx.get_peak_memory() / 1e9:.3f} GB")
    return BatchResponse(
        texts, out, caches, prompt_time, time.perf_counter() - tic, mx.get_peak_memory() / 1e9
    )
