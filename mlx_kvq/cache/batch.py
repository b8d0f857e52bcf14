"""Batch caches: single-row ``QuantizedKVCache`` prompts merged into one cache decoded
together (``mlx_kvq.generation.batch`` drives it).

Each prompt is prefilled alone into its own cache. The cache keeps its first ``sinks``
tokens unquantized: in a left-padded batch the sinks of a short row would be padding
and its real first tokens would be packed, and a single run's prefill attends to the
rotated, float16-rounded keys its own cache stores. So merged caches keep each row's
real sinks; the padding goes right after them (``QuantizedKVCache.left_padding``),
hidden by the mask. ``merge`` packs each row as its first decode step alone would, and
the cache packs its window on a schedule of decode steps (not of tokens held), so every
row packs the same tokens on the same steps as when it runs alone.

Positions: like mlx-lm's ``BatchKVCache``, the batch cache's ``offset`` is a (B,)
array (each row's own length), so RoPE (``mx.fast.rope`` takes an array offset)
rotates every row as if it ran alone.
"""


import mlx.core as mx

from .. import format as fmt
from .defaults import init_kwargs
from .quantized import QuantizedKVCache
from .rows import left_padded


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

    @keys.setter
    def keys(self, x):
        self.cache.keys = x  # mlx-lm's pipeline contract (see ``QuantizedKVCache.keys``)

    @property
    def state(self):
        return self.cache.state

    @classmethod
    def merge(cls, caches):
        return cls(merge(caches))


def _rows(arrays, n, length, take):
    """Row arrays ``take(a)`` (1, H, n, ...) left-padded with zeros to ``length`` tokens
    (``take(a)`` of a row with ``n == 0`` may stand in for its shape only)."""
    return [left_padded(take(a) if n else take(a)[:, :, :0], length) for a in arrays]


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
    out = QuantizedKVCache(**init_kwargs(config))
    first = caches[0]
    out.k_dim, out.v_dim, out.dtype = first.k_dim, first.v_dim, first.dtype
    out.kv_heads = first.kv_heads * len(caches)
    cat = lambda xs: mx.concatenate(xs, axis=0)
    if s:
        out.sink_keys = cat([c.sink_keys for c in caches])
        out.sink_values = cat([c.sink_values for c in caches])
    if P:
        for name in ("packed_keys", "packed_values"):
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


def _like(caches, name):
    """A zero-token window array (for rows with an empty window)."""
    ref = next(getattr(c, name) for c in caches if getattr(c, name) is not None)
    return ref[:, :, :0]


def _empty_packed(c, name):
    """Zero-token packed arrays for a row that packed nothing yet."""
    d = c.padded_dim(c.k_dim if name == "packed_keys" else c.v_dim)
    bits = c.k_bits if name == "packed_keys" else c.v_bits
    x = mx.zeros((1, c.kv_heads, 1, d), c.store_dtype)
    return tuple(a[:, :, :0] for a in fmt.quantize(x, bits, c.group_size, c.mode))
