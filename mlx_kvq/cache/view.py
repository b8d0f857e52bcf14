"""KVView: what a cache's ``update_and_fetch`` returns, and all attention reads of it.

Attention never reaches into the cache: the view carries the cache's format, the
positions of this step's queries and keys, and the three runs of tokens (unquantized
sinks, packed run, unquantized recent window).
"""

from typing import NamedTuple, Optional

import mlx.core as mx


class KVFormat(NamedTuple):
    """How a cache stores its packed run (see ``QuantizedKVCache``)."""

    k_bits: int
    v_bits: int
    group_size: int
    mode: str
    rotate: Optional[str]

    def padded_dim(self, d):
        """Head dims that the group size does not divide are zero-padded up to a multiple."""
        return -(-d // self.group_size) * self.group_size


class KVView:
    """The cache's runs for this step's attention.

    Attributes: ``format`` (:class:`KVFormat`), ``k_dim``/``v_dim`` (the model's key and value
    head dims), ``kv_heads`` (batch x KV heads),
    ``dtype`` (the dtype of the unquantized runs and the scales), ``offset`` (keys
    visible, the queries included), ``q_start`` (position of the first query), ``sinks``
    ``(keys, values)`` or ``(None, None)``, ``packed`` ``(keys, values, n)`` (the
    preallocated packed buffers and the tokens in use), ``window_buffers`` ``(keys,
    values, n_keys, n_values)`` (the window's preallocated buffers and the rows in use).
    """

    def __init__(self, cache, query_len, offset):
        self.format = cache.format
        self.k_dim, self.v_dim, self.kv_heads = cache.k_dim, cache.v_dim, cache.kv_heads
        self.dtype = cache.store_dtype
        self.offset = offset
        self.q_start = offset - query_len
        self.sinks = (cache.sink_keys, cache.sink_values)
        self.packed = (cache.packed_keys, cache.packed_values, cache.n_packed)
        # the decode kernel reads the window buffers as they are: slicing costs an op per step
        self.window_buffers = cache.window_buffers()
        self._window = None

    @property
    def window(self):
        """``(keys, values)`` of the recent unquantized window (or ``(None, None)``)."""
        if self._window is None:
            wk, wv, n, nv = self.window_buffers
            self._window = (first_tokens(wk, n), first_tokens(wv, nv))
        return self._window

    def segments(self):
        """``(kind, keys, values, k_start, n, positions)`` for each non-empty part.

        The packed run holds the contiguous positions ``k_start .. k_start + n``
        (``positions`` None); the unquantized tokens, sinks and recent window
        together, are one ``"dense"`` part whose ``positions`` array says where each sits.
        """
        sk, sv = self.sinks
        k, v, n = self.packed
        wk, wv = self.window
        s = 0 if sk is None else sk.shape[2]
        w = 0 if wk is None else wk.shape[2]
        out = [("packed", k, v, s, n, None)] if n else []
        if s and w:
            pos = mx.concatenate([mx.arange(s), mx.arange(s + n, s + n + w)])
            out.append(("dense", mx.concatenate([sk, wk], axis=2), mx.concatenate([sv, wv], axis=2), 0, s + w, pos))
        elif s or w:
            k_start = 0 if s else s + n
            out.append(("dense", sk if s else wk, sv if s else wv, k_start, s + w, None))
        return out


def first_tokens(buf, n):
    """The first ``n`` tokens of a buffer (the buffer itself when it is exactly full)."""
    if buf is None:
        return None
    return buf if buf.shape[2] == n else buf[:, :, :n]
