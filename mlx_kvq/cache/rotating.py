"""QuantizedRotatingKVCache: a sliding-window KV cache in the packed format.

mlx-lm's ``RotatingKVCache`` (Gemma 3, Mistral, llama ``sliding_attention`` layers,
``max_kv_size``) keeps the first ``keep`` tokens and the last ``max_size - keep``
ones; mlx-lm cannot quantize it. This subclass of ``QuantizedKVCache`` stores the
``keep`` tokens as unquantized sinks and, before each update, drops the oldest
packed (then recent-window) tokens that no new query can see: a query at position
``t`` sees the ``keep`` tokens and the keys ``j`` with ``t - j < max_size - keep``.

Tokens are held in order, without a ring buffer, so attention goes through
``quantized_sdpa`` unchanged: the view it gets counts positions over the tokens held,
and ``make_mask`` builds the window mask over the same tokens.
"""

import mlx.core as mx

from .defaults import whole
from .quantized import QuantizedKVCache
from .view import fetch


class QuantizedRotatingKVCache(QuantizedKVCache):
    """A quantized ``RotatingKVCache``: ``max_size`` tokens at most per query, first ``keep`` kept.

    Other arguments are ``QuantizedKVCache``'s; its ``sinks`` are the ``keep`` tokens.
    """

    one_buffer = False  # rows drop tokens on their own: each keeps its own buffers

    def __init__(self, bits=4, group_size=None, *, max_size=None, keep=None, sinks=None, **kwargs):
        if keep is not None and sinks is not None and sinks != keep:
            raise ValueError(f"A rotating cache keeps its first keep={keep} tokens as sinks, not {sinks}.")
        keep = whole("keep", keep if keep is not None else sinks or 0)
        if max_size is not None and whole("max_size", max_size, 1) <= keep:
            raise ValueError(f"max_size ({max_size}) must be larger than keep ({keep}).")
        super().__init__(bits, group_size, sinks=keep, **kwargs)
        self.max_size, self.keep = max_size, keep

    @property
    def config(self):
        return {**super().config, "max_size": self.max_size, "keep": self.keep}

    @property
    def span(self):
        """How far back (in positions) a query sees the tokens after ``keep``."""
        return self.max_size - self.keep

    def held(self):
        """Tokens held: kept ones, packed ones and the recent window."""
        sinks = 0 if self.sink_keys is None else self.sink_keys.shape[2]
        return sinks + self.n_packed + self._recent()

    def _recent(self):
        return 0 if self.window_keys is None else self.window_keys.shape[2]

    def _first_visible(self, offset):
        """Position of the oldest non-kept token a query at ``offset`` can see."""
        return max(self.keep, offset - (self.span - 1))

    def _to_drop(self):
        """How many of the oldest non-kept tokens no query from ``offset`` on can see (<= 0: none)."""
        held = self.n_packed + self._recent()
        return min(held, self._first_visible(self.offset) - (self.offset - held))

    def _drop(self):
        """Drop the oldest non-kept tokens that no query from ``offset`` on can see."""
        drop_front(self, self._to_drop())

    def update_and_fetch(self, keys, values):
        if not self.empty():
            self._drop()
        super().update_and_fetch(keys, values)
        return fetch(self, keys.shape[2], self.held())  # positions count the tokens held

    def keys_after(self, n):
        """How many keys the next update of ``n`` tokens returns: those held that a query
        from ``offset`` on can see (what ``_drop`` leaves), and the new ones."""
        return self.held() - max(0, self._to_drop()) + n

    def make_mask(self, N, return_array=False, window_size=None):
        """The mask over the tokens held after the next update of ``N`` tokens. A
        ``window_size`` wider than the cache's window widens it over the tokens held, as
        mlx-lm's ``RotatingKVCache`` does (plamo3 asks for one token more than it keeps)."""
        span = self.span if window_size is None else window_size
        if N == 1 and span == self.span:
            return None  # a single query sees every token held (return_array too, as in mlx-lm)
        end = self.offset + N
        kept = mx.arange(min(self.keep, end))
        k = mx.concatenate([kept, mx.arange(self._first_visible(self.offset), end)])[None]
        q = mx.arange(self.offset, end)[:, None]
        return (k <= q) & ((k < self.keep) | (q - k < span))

    def size(self):
        return min(self.offset, self.max_size)

    def is_trimmable(self):
        return self.held() == self.offset  # nothing dropped yet

    def _restore(self, config):
        keep = whole("the cache state's keep", config.get("keep"))
        max_size = whole("the cache state's max_size", config.get("max_size"), keep + 1)
        if keep != self.sinks:
            raise ValueError(f"The cache state keeps {keep} tokens but has {self.sinks} sinks: the file is damaged.")
        self.max_size, self.keep = max_size, keep

    @staticmethod
    def _exact_offset(config):
        return False  # tokens no query can see are dropped

    @classmethod
    def from_cache(cls, cache, **config):
        raise NotImplementedError("Build a QuantizedRotatingKVCache empty and fill it with the model.")


def drop_front(cache, n):
    """Drop the ``n`` oldest tokens after the sinks of a quantized cache: packed ones first,
    then the oldest of the recent window."""
    if n <= 0:
        return
    p = min(n, cache.n_packed)
    if p:
        cache.packed_keys = tuple(a[:, :, p:] for a in cache.packed_keys)
        cache.packed_values = tuple(a[:, :, p:] for a in cache.packed_values)
        cache.n_packed -= p
    w = n - p
    if w:
        cache.window_keys = cache.window_keys[:, :, w:]
        cache.window_values = cache.window_values[:, :, w:]
