"""KVView: what a cache's ``update_and_fetch`` returns, and all attention reads of it.

Attention never reaches into the cache: the view carries the cache's format, the
positions of this step's queries and keys, and the three runs of tokens (unquantized
sinks, packed run, unquantized recent window).

A model that uses what it fetched as arrays (``keys.swapaxes``, ``q @ k``, ``keys.dtype``,
``keys[..., :d]``, ...) gets the keys (or values) the view stands for, dequantized on first
use and dropped with the view: ``KVView`` answers the array protocol by delegating to that
copy. ``mx.*`` functions take only real arrays: ``mx.array(view)`` (``__mlx_array__``) or
``view.array`` gives it, and caches with ``fetch_arrays`` set return arrays directly.
"""

import operator
from typing import NamedTuple, Optional

import mlx.core as mx

from ..rotation import rotate
from .. import format as fmt


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


class StandsForArray:
    """The array protocol of an object that stands for an array (its ``array`` property,
    built on first use): ``shape``, ``dtype``, indexing, operators, ``__mlx_array__`` for
    ``mx.*`` functions, and any other attribute of the array."""

    _LOCAL = ("_array", "part", "packed", "sinks", "window_buffers", "views", "takes", "holes")

    def __mlx_array__(self):
        return self.array

    @property
    def shape(self):
        return self.array.shape

    @property
    def dtype(self):
        return self.array.dtype

    @property
    def ndim(self):
        return 4

    def __len__(self):
        return self.shape[0]

    def __getattr__(self, name):
        if name.startswith("__") or name in StandsForArray._LOCAL:
            raise AttributeError(name)
        return getattr(self.array, name)

    def __getitem__(self, index):
        return self.array[index]

    def __iter__(self):
        return iter(self.array)


class KVView(StandsForArray):
    """The cache's runs for this step's attention.

    Attributes: ``format`` (:class:`KVFormat`), ``k_dim``/``v_dim`` (the model's key and value
    head dims), ``kv_heads`` (batch x KV heads), ``part`` (``"keys"`` or ``"values"``: what
    the view stands for as an array), ``store_dtype`` (the dtype of the unquantized runs and
    the scales), ``model_dtype`` (the dtype the model gave the cache), ``offset`` (keys
    visible, the queries included), ``q_start`` (position of the first query), ``sinks``
    ``(keys, values)`` or ``(None, None)``, ``packed`` ``(keys, values, n)`` (the
    preallocated packed buffers and the tokens in use), ``window_buffers`` ``(keys,
    values, n_keys, n_values)`` (the window's preallocated buffers and the rows in use).
    """

    holes = None  # rows in one buffer: the (B, 1, 1, keys) mask of each row's own keys (``RowsBuffer``)

    def __init__(self, cache, query_len, offset, part="keys"):
        self.format = cache.format
        self.k_dim, self.v_dim, self.kv_heads = cache.k_dim, cache.v_dim, cache.kv_heads
        self.store_dtype = cache.store_dtype
        self.model_dtype = cache.dtype
        self.part = part
        self._array = None
        self.offset = offset
        self.q_start = None if query_len is None else offset - query_len
        self.sinks = (cache.sink_keys, cache.sink_values)
        self.packed = (cache.packed_keys, cache.packed_values, cache.n_packed)
        # the decode kernel reads the window buffers as they are: slicing costs an op per step
        self.window_buffers = cache.window_buffers()
        self._window = None
        # the decode kernel's setups per step shapes (attention.dispatch), kept by the cache
        self.decode_setups = cache.__dict__.setdefault("_decode_setups", {})

    @property
    def window(self):
        """``(keys, values)`` of the recent unquantized window (or ``(None, None)``)."""
        if self._window is None:
            wk, wv, n, nv = self.window_buffers
            self._window = (first_tokens(wk, n), first_tokens(wv, nv))
        return self._window

    def segments(self, split=False):
        """``(kind, keys, values, k_start, n, positions)`` for each non-empty part.

        The packed run holds the contiguous positions ``k_start .. k_start + n``
        (``positions`` None); the unquantized tokens, sinks and recent window
        together, are one ``"dense"`` part, whose ``positions`` array says where each
        sits when a packed run lies between them. With ``split`` they are two parts in
        that case, each contiguous, so that a causal prefill chunk skips the keys after
        its queries (``attention.reference``); decode steps keep one part, fewer ops.
        """
        sk, sv = self.sinks
        k, v, n = self.packed
        wk, wv = self.window
        s = 0 if sk is None else sk.shape[2]
        w = 0 if wk is None else wk.shape[2]
        out = [("packed", k, v, s, n, None)] if n else []
        if s and w and n and split:
            out += [("dense", sk, sv, 0, s, None), ("dense", wk, wv, s + n, w, None)]
        elif s and w:
            pos = mx.concatenate([mx.arange(s), mx.arange(s + n, s + n + w)]) if n else None
            out.append(("dense", mx.concatenate([sk, wk], axis=2), mx.concatenate([sv, wv], axis=2), 0, s + w, pos))
        elif s or w:
            k_start = 0 if s else s + n
            out.append(("dense", sk if s else wk, sv if s else wv, k_start, s + w, None))
        return out


    def for_queries(self, n):
        """This view for ``n`` queries at the last positions held (a view from
        ``keys_and_values``, made before the queries were known)."""
        other = KVView.__new__(KVView)
        other.__dict__.update(self.__dict__, q_start=self.offset - n)
        return other

    def rows(self, a, b):
        """This view over batch rows ``a .. b`` only (each row's keys as they are)."""
        B = self._batch_heads()[0]
        cut = lambda x: x if x is None else tuple(y[a:b] for y in x) if isinstance(x, tuple) else x[a:b]
        k, v, n = self.packed
        wk, wv, nk, nv = self.window_buffers
        other = KVView.__new__(KVView)
        other.__dict__.update(
            self.__dict__, _array=None, _window=None, sinks=tuple(cut(x) for x in self.sinks),
            packed=(cut(k), cut(v), n), window_buffers=(cut(wk), cut(wv), nk, nv),
            kv_heads=None if self.kv_heads is None else self.kv_heads // B * (b - a))
        if self.holes is not None:
            other.holes = self.holes[a:b]
        return other

    @classmethod
    def stacked(cls, views, T):
        """Single-row views that hold only unquantized tokens from position 0 (nothing packed),
        as one view of their rows, each row's tokens right-padded with zeros to ``T``, the
        sinks and window one run (float32 where a row holds float32, so nothing is rounded)."""
        runs = [x for v in views for x in (*v.sinks, *v.window) if x is not None]
        dt = mx.float32 if any(x.dtype == mx.float32 for x in runs) else views[0].store_dtype
        k, v = (mx.concatenate([padded(x.stored(part, dt), T, before=False) for x in views], axis=0)
                for part in ("keys", "values"))
        other = cls.__new__(cls)
        other.__dict__.update(
            views[0].__dict__, _array=None, _window=None, offset=T, q_start=0, sinks=(None, None),
            packed=(None, None, 0), window_buffers=(k, v, T, T), kv_heads=k.shape[0] * k.shape[1])
        return other

    def values_view(self):
        """The same step's view standing for the values (``part="values"``)."""
        other = KVView.__new__(KVView)
        other.__dict__.update(self.__dict__, part="values", _array=None)
        return other

    def stored(self, part, dtype):
        """All ``part`` (``"keys"``/``"values"``) tokens in position order, as stored
        (rotated, head dim zero-padded), the packed run dequantized to ``dtype``: (B, H, T, D)
        or None for an empty view."""
        i = 0 if part == "keys" else 1
        f = self.format
        bits = f.k_bits if i == 0 else f.v_bits
        k, v, n = self.packed
        parts = [self.sinks[i], None, self.window[i]]
        if n:
            p = (k, v)[i]
            parts[1] = fmt.dequantize(tuple(x[:, :, :n] for x in p), bits, f.group_size, f.mode, dtype)
        parts = [x if x.dtype == dtype else x.astype(dtype) for x in parts if x is not None and x.shape[2]]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)

    @property
    def array(self):
        """The keys (or values) this view stands for: (B, H, tokens, head dim) in the model's
        dtype, as an fp16 cache would return them (up to quantization error)."""
        if self._array is None:
            keys = self.part == "keys"
            d = self.k_dim if keys else self.v_dim
            # in the model's dtype: a float32 model rotates in float32 (CPU half-precision
            # matmuls are slow)
            x = self.stored(self.part, self.model_dtype or self.store_dtype)
            if x is None:
                x = mx.zeros((self._batch_heads() + (0, d or 0)), self.model_dtype or mx.float16)
            else:
                if self.format.rotate == "kv" or (keys and self.format.rotate):
                    x = rotate(x, inverse=True)
                if x.shape[-1] != d:
                    x = x[..., :d]
                if x.dtype != self.model_dtype:
                    x = x.astype(self.model_dtype)
            self._array = x
        return self._array

    @property
    def dtype(self):
        return self.model_dtype

    def _batch_heads(self):
        for x in (self.sinks[0], self.window_buffers[0], self.packed[0] and self.packed[0][0]):
            if x is not None:
                return tuple(x.shape[:2])
        return (1, 1)


def _delegate(name):
    op = getattr(operator, name)
    return lambda self, *other: op(self.array, *(plain(o) for o in other))


def _rdelegate(name):
    op = getattr(operator, name)
    return lambda self, other: op(plain(other), self.array)


def plain(x):
    """``x``, or the array a view stands for."""
    return x.array if isinstance(x, StandsForArray) else x


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul",
              "lt", "le", "gt", "ge", "eq", "ne", "neg", "abs"):
    setattr(StandsForArray, f"__{_name}__", _delegate(_name))
for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul"):
    setattr(StandsForArray, f"__r{_name}__", _rdelegate(_name))
StandsForArray.__hash__ = object.__hash__


def fetch(cache, query_len, offset):
    """What ``update_and_fetch`` returns: the key and value views of this step, or, for a
    cache with ``fetch_arrays`` set (models that hand them to ``mx.*`` functions), the
    dequantized arrays."""
    view = KVView(cache, query_len, offset)
    values = view.values_view()
    if getattr(cache, "fetch_arrays", False):
        return view.array, values.array
    return view, values


def padded(x, T, before=True):
    """``x`` (B, H, n, D) with ``T - n`` tokens of zeros before its ``n`` (or after them)."""
    n = x.shape[2]
    if n == T:
        return x
    zeros = mx.zeros(x.shape[:2] + (T - n,) + x.shape[3:], x.dtype)
    return mx.concatenate([zeros, x] if before else [x, zeros], axis=2)


def first_tokens(buf, n):
    """The first ``n`` tokens of a buffer (the buffer itself when it is exactly full)."""
    if buf is None:
        return None
    return buf if buf.shape[2] == n else buf[:, :, :n]
