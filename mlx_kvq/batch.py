"""Batched generation with quantized KV caches.

Each prompt is prefilled alone, exactly as ``mlx_lm.stream_generate`` would do it
(fp16 caches: in left-padded batches through mlx-lm's ``BatchKVCache``), then the
per-prompt caches are merged into one batch cache and decoded together.

Why not prefill a left-padded batch into a quantized cache? The cache keeps its first
``sinks`` tokens unquantized: in a left-padded batch the sinks of a short row would be
padding and its real first tokens would be packed. And a single run's prefill attends to
the rotated, float16-rounded keys its own cache stores. Merged caches keep each row's
real sinks; the padding goes right after them (``QuantizedKVCache.left_padding``),
hidden by the mask. ``merge`` packs each row as its first decode step alone would, and
the cache packs its window on a schedule of decode steps (not of tokens held), so every
row packs the same tokens on the same steps as when it runs alone.

Positions: like mlx-lm's ``BatchKVCache``, the batch cache's ``offset`` is a (B,)
array (each row's own length), so RoPE (``mx.fast.rope`` takes an array offset)
rotates every row as if it ran alone. Outputs equal single runs up to the rounding of
batched matrix products (as with mlx-lm's own batched fp16 generation).
"""

import time
from dataclasses import dataclass, field
from typing import List

import mlx.core as mx

from .cache import QuantizedKVCache
from .integration import (
    empty_fp16_cache,
    extract_row,
    fp16_batch_cache,
    is_fp16_cache,
    make_prompt_cache,
    merge_mlx_lm_caches,
)


class BatchQuantizedKVCache:
    """``QuantizedKVCache`` rows decoded together; ``offset`` is per row (for RoPE)."""

    def __init__(self, cache):
        self.cache = cache

    @property
    def offset(self):
        return self.cache.offset - self.cache.left_padding

    @property
    def left_padding(self):
        return self.cache.left_padding

    def update_and_fetch(self, keys, values):
        return self.cache.update_and_fetch(keys, values)

    def make_mask(self, N, return_array=False, window_size=None):
        return self.cache.make_mask(N, return_array=return_array, window_size=window_size)

    def size(self):
        return self.cache.size()

    def empty(self):
        return self.cache.empty()

    def is_trimmable(self):
        return False

    @property
    def config(self):
        return self.cache.config

    @property
    def nbytes(self):
        return self.cache.nbytes

    def used_nbytes(self):
        return self.cache.used_nbytes()

    def dense_nbytes(self):
        return self.cache.dense_nbytes()

    @property
    def dtype(self):
        return self.cache.dtype

    @property
    def keys(self):
        return self.cache.keys

    @classmethod
    def merge(cls, caches):
        return cls(merge(caches))


def _rows(arrays, n, length, take):
    """Row arrays ``take(a)`` (1, H, n, ...) left-padded with zeros to ``length`` tokens."""
    out = []
    for a in arrays:
        a = take(a)
        if length > n:
            pad = mx.zeros(a.shape[:2] + (length - n,) + a.shape[3:], a.dtype)
            a = mx.concatenate([pad, a], axis=2) if n else pad
        out.append(a)
    return out


def merge(caches):
    """One batch ``QuantizedKVCache`` from single-row ones of the same config.

    Row b keeps its sinks, then ``left_padding[b]`` hidden positions, then its packed
    tokens and its recent window; every row ends at the same position. The rows are
    caches right after a prefill (the next update is the first decode step).
    """
    config = caches[0].config
    offsets = {c.offset for c in caches}
    if config["start"] and len(offsets) > 1 and min(offsets) + 1 < config["start"]:
        raise ValueError(
            "Prompts of different lengths shorter than quantized_kv_start would start "
            "packing on different steps alone; use quantized_kv_start=0 to batch them."
        )
    for c in caches:
        if c.config != config or c.kv_heads is None or c.kv_heads != caches[0].kv_heads:
            raise ValueError("Only filled single-row caches of one config and model can be merged.")
        held = 0 if c.sink_keys is None else c.sink_keys.shape[2]
        if held < c.sinks or c.offset <= c.sinks:
            raise ValueError(
                f"A prompt of {c.offset} tokens is too short to batch with sinks={c.sinks}; "
                "use longer prompts or sinks=0."
            )
        # what the row's first decode step alone packs, less the token that step adds
        if c.offset + 1 >= c.start:
            c.pack_all_but(max(c.window - 1, 0))
    s = config["sinks"]
    windows = [0 if c.window_keys is None else c.window_keys.shape[2] for c in caches]
    T, W = max(offsets), max(windows)
    P = T - s - W
    for c, w in zip(caches, windows):
        if c.n_packed and w < W:
            raise ValueError(
                "These prompts cannot share a batch cache (some are past quantized_kv_start "
                "and some are not); use quantized_kv_start=0."
            )
    out = QuantizedKVCache(**_init_args(config))
    first = caches[0]
    out.k_dim, out.v_dim, out.dtype = first.k_dim, first.v_dim, first.dtype
    out.kv_heads = first.kv_heads * len(caches)
    cat = lambda xs: mx.concatenate(xs, axis=0)
    if s:
        out.sink_keys = cat([c.sink_keys for c in caches])
        out.sink_values = cat([c.sink_values for c in caches])
    if P:
        for name in ("keys", "values"):
            parts = [
                _rows(getattr(c, name) or _empty_packed(c, name), c.n_packed, P,
                      lambda a, n=c.n_packed: a[:, :, :n])
                for c in caches
            ]
            setattr(out, name, tuple(cat(list(p)) for p in zip(*parts)))
        out.n_packed = P
    if W:
        for name in ("window_keys", "window_values"):
            rows = [
                _rows([getattr(c, name) if w else _like(caches, name)], w, W, lambda a: a)[0]
                for c, w in zip(caches, windows)
            ]
            setattr(out, name, cat(rows))
    out.offset = T
    out.left_padding = mx.array([T - c.offset for c in caches])
    return out


def _init_args(config):
    args = dict(config, rotate=config["rotate"] or False)
    return dict(bits=args.pop("k_bits"), k_bits=config["k_bits"], **args)


def _like(caches, name):
    """A zero-token window array (for rows with an empty window)."""
    ref = next(getattr(c, name) for c in caches if getattr(c, name) is not None)
    return ref[:, :, :0]


def _empty_packed(c, name):
    """Zero-token packed arrays for a row that packed nothing yet."""
    from . import quant

    d = c.padded_dim(c.k_dim if name == "keys" else c.v_dim)
    bits = c.k_bits if name == "keys" else c.v_bits
    x = mx.zeros((1, c.kv_heads, 1, d), c.store_dtype)
    return tuple(a[:, :, :0] for a in quant.quantize(x, bits, c.group_size, c.mode))


def compact(caches):
    """Copy our caches' sink and recent-window slices out of the prefill buffers.

    A slice shares its parent's buffer: without this, the few sink tokens would keep a
    whole unquantized prefill chunk alive.
    """
    for c in caches:
        for name in ("sink_keys", "sink_values", "window_keys", "window_values"):
            a = getattr(c, name, None)
            if a is not None:
                setattr(c, name, mx.contiguous(a) if a.shape[2] else None)
    return caches


def merge_caches(layer_caches):
    """Per-prompt prompt caches (lists over layers) -> one batch prompt cache."""
    merged = []
    for rows in zip(*layer_caches):
        if isinstance(rows[0], QuantizedKVCache):
            if type(rows[0]) is not QuantizedKVCache:
                raise ValueError(f"{type(rows[0]).__name__} layers cannot be batched yet.")
            merged.append(BatchQuantizedKVCache.merge(list(rows)))
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


def prefill(model, tokens, cache, prefill_step_size=2048):
    """Feed all but the last prompt token, in steps, as ``mlx_lm.generate_step`` does."""
    tokens = mx.array(tokens)
    done = 0
    while len(tokens) - done > 1:
        n = min(prefill_step_size, len(tokens) - done - 1)
        model(tokens[done : done + n][None], cache=cache)
        mx.eval([getattr(c, "state", ()) for c in cache])
        done += n


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
    from .generate import encode_prompt

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
            prefill(model, p, rows[-1], prefill_step_size)
            compact(rows[-1])
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
