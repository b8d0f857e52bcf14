"""QuantizedKVCache: a KV cache packed group-wise with ``mx.quantize``.

The tokens of a cache sit in three runs, in order of position:

    [0, s)          attention sinks, kept in the model dtype      (``sinks``)
    [s, s + n)      packed keys and values, preallocated in steps  (``packed_keys``/``packed_values``)
    [s + n, offset) the recent window, kept in the model dtype     (``window``)

New tokens enter the recent window and the tokens that fall out of it are packed and
appended. A prefill chunk attends to its own keys unquantized (it is packed at the
next update, so the window never holds more than ``window`` + one chunk). In decode
the window is packed down to ``window`` tokens on the 1st, ``flush_block + 1``-th, ...
decode step after a prefill chunk, so the packing costs one launch per ``flush_block``
tokens and at least ``window`` recent tokens are always unquantized. The schedule
counts steps, not tokens held (rows decoded together keep one each: ``RowsKVCache``). The window
lives in a preallocated buffer that decoded tokens are written into in place.
Keys (and optionally values) can be rotated by a fixed orthogonal (Hadamard)
matrix before they are stored; attention rotates queries to match.

It implements mlx-lm's cache protocol, so ``generate``/``stream_generate`` and
``save_prompt_cache``/``load_prompt_cache`` work with it.
"""

import json

import mlx.core as mx

from .. import format as fmt
from .. import kernels
from ..kernels.backend import eval_now
from ..rotation import rotate, rotation
from . import state as saved
from .defaults import ROTATE, default_options, init_kwargs, whole
from .rows import RowsKVCache, own_copy
from .view import KVFormat, fetch, first_tokens


class QuantizedKVCache:
    """A quantized KV cache for mlx-lm models.

    Args:
        bits: bits for keys and values (2, 3, 4, 5, 6, 8 for ``affine``).
        group_size: elements sharing one scale (and bias): 32, 64 or 128.
        k_bits, v_bits: separate bits for keys and values (default: ``bits``).
        mode: ``affine`` or one of MLX's microscaling modes ``mxfp8``, ``mxfp4``, ``nvfp4``.
        rotate: ``None``, ``"k"`` (rotate keys) or ``"kv"`` (keys and values).
        sinks: how many first tokens stay unquantized.
        window: how many most recent tokens stay unquantized.
        start: keep everything unquantized until the cache holds this many
            tokens (mlx-lm's ``quantized_kv_start``).
    Options left as ``None`` take the defaults for the bit width (see ``default_options``).
    """

    step = 256
    flush_block = 32  # decode: the window is packed every flush_block steps
    max_log = 2 * flush_block  # updates an exact trim can go back (``trim``)
    one_buffer = True  # batch rows of this cache can share one buffer in decode (``RowsBuffer``)

    def __init__(
        self,
        bits=4,
        group_size=None,
        *,
        k_bits=None,
        v_bits=None,
        mode="affine",
        rotate=None,
        sinks=None,
        window=None,
        start=0,
    ):
        self.k_bits = whole("k_bits", bits if k_bits is None else k_bits, 1, 16)
        self.v_bits = whole("v_bits", bits if v_bits is None else v_bits, 1, 16)
        if not isinstance(mode, str):
            raise ValueError(f"mode must be a string such as 'affine', got {mode!r}.")
        self.mode = mode
        fmt.check(self.k_bits, fmt.default_group_size(mode), mode, what="key")
        fmt.check(self.v_bits, fmt.default_group_size(mode), mode, what="value")
        defaults = default_options(self.k_bits, self.v_bits, mode)
        if group_size is not None:
            group_size = whole("group_size", group_size, 1, 1024)
        self.group_size = group_size or defaults["group_size"] or fmt.default_group_size(mode)
        fmt.check(self.k_bits, self.group_size, mode, what="key")
        if rotate is not None and rotate is not False and rotate not in ROTATE:
            raise ValueError(f"rotate must be one of None, False, 'k', 'kv', got {rotate!r}.")
        self.rotate = defaults["rotate"] if rotate is None else (rotate or None)
        self.sinks = defaults["sinks"] if sinks is None else whole("sinks", sinks)
        self.window = defaults["window"] if window is None else whole("window", window)
        self.start = whole("start (quantized_kv_start)", start)
        self.format = KVFormat(self.k_bits, self.v_bits, self.group_size, self.mode, self.rotate)
        self.offset = 0
        self.n_packed = 0
        self.k_dim = self.v_dim = self.kv_heads = self.dtype = None
        self._wide = False  # a float32 model's cache stores float32 (``store_dtype``)
        self.packed_keys = self.packed_values = None
        self.sink_keys = self.sink_values = None
        self._wk = self._wv = None  # window buffers (B, H, capacity, D)
        self._wn = self._wvn = 0  # tokens in the window (keys, values: set one at a time)
        self._steps = 0  # decode steps since the last prefill chunk (the flush schedule)
        # (offset, steps) after each update since the last one that packed tokens: the
        # states an exact trim can return to (``trim``)
        self._log = []
        self._after = None  # what ``state`` depends on (see ``keys``)

    # -- configuration -------------------------------------------------------
    @property
    def config(self):
        """The settings that define the stored format (saved with the cache)."""
        return {
            "k_bits": self.k_bits,
            "v_bits": self.v_bits,
            "group_size": self.group_size,
            "mode": self.mode,
            "rotate": self.rotate,
            "sinks": self.sinks,
            "window": self.window,
            "start": self.start,
        }

    def _check_head_dims(self, keys, values):
        for what, x in (("key", keys), ("value", values)):
            if x.shape[-1] < self.group_size:
                raise ValueError(
                    f"head_dim {x.shape[-1]} of the {what}s is smaller than the group size "
                    f"{self.group_size}; choose a group size of at most {x.shape[-1]}."
                )
        if self.rotate:
            rotation(self.padded_dim(keys.shape[-1]))
            if self.rotate == "kv":
                rotation(self.padded_dim(values.shape[-1]))

    def _check_update(self, keys, values):
        """A clear error for keys/values that are not (B, H, L, D) arrays of one shape but
        the head dim, or that do not match what the cache holds."""
        for what, x in (("keys", keys), ("values", values)):
            if not isinstance(x, mx.array) or x.ndim != 4 or not mx.issubdtype(x.dtype, mx.floating):
                shape = getattr(x, "shape", type(x).__name__)
                raise ValueError(f"{what} must be a floating (B, H, L, D) array, got {shape}.")
        if keys.shape[:3] != values.shape[:3]:
            raise ValueError(f"keys {keys.shape} and values {values.shape} differ in batch, heads or length.")
        if self.kv_heads is not None:
            held = (self.kv_heads, self.k_dim, self.v_dim)
            new = (keys.shape[0] * keys.shape[1], keys.shape[-1], values.shape[-1])
            if new != held and keys.shape[2]:
                raise ValueError(
                    f"keys {keys.shape} / values {values.shape} do not match the cache's batch x heads "
                    f"{held[0]}, key dim {held[1]} and value dim {held[2]}.")

    def padded_dim(self, d):
        """Head dims that the group size does not divide are zero-padded up to a multiple."""
        return self.format.padded_dim(d)

    @property
    def store_dtype(self):
        """The dtype of the packed runs' scales (and biases): the model's, but float16 for a
        float32 model (a KV cache gains nothing from float32 scales: 0.33x instead of 0.29x
        of fp16 in BENCHMARKS.md's summary run) until a token to pack would overflow float16
        (``_widen``)."""
        wide = self._wide or self.dtype is None or self.dtype != mx.float32
        return self.dtype if wide else mx.float16

    @property
    def dense_dtype(self):
        """The dtype of the unquantized runs (sinks, window): the model's, as in mlx-lm's
        cache. A float32 model's few unquantized tokens stay float32, so that storing them
        needs no look at their values (a float16 store would first have to ask whether
        they overflow it: a sync per layer and decode step, ~1.5x slower decode on the CPU)."""
        return self.dtype

    def _rotated(self, x, rotated):
        """Zero-padded to the packed head dim and rotated, in float32 where rotated: ``x R``
        can exceed the largest float16 by up to ``sqrt(head_dim)`` where ``x`` does not (a
        token of values near 65504). Non-finite values are zeroed before the rotation, so
        they stay in their channel (``format.fit``)."""
        d = self.padded_dim(x.shape[-1])
        if d != x.shape[-1]:
            x = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, d - x.shape[-1])])
        return rotate(fmt.fit(x, mx.float32)) if rotated else x

    def _widen(self, keys, values):
        """A float32 model's packed scales are float32 from the first tokens to pack with a
        value that would overflow float16 (keys of 1e5) on: the scales held are cast (exactly)
        to float32. This asks for those tokens' largest value: one sync per packing of a
        float32 model while its scales are float16 (every ``flush_block`` decode steps)."""
        if self.store_dtype != mx.float16 or self.dtype != mx.float32 or self.mode != "affine":
            return
        if not fmt.overflows((keys, values), mx.float16):
            return
        self._wide = True
        if self.packed_keys is not None:  # words stay; scales and biases
            wide = lambda a: a.astype(mx.float32)
            self.packed_keys = self.packed_keys[:1] + tuple(wide(a) for a in self.packed_keys[1:])
            self.packed_values = self.packed_values[:1] + tuple(wide(a) for a in self.packed_values[1:])

    # -- the protocol --------------------------------------------------------
    def update_and_fetch(self, keys, values):
        """Store ``keys``/``values`` (B, H, L, D); return a view for attention. An update
        of no tokens stores nothing."""
        self._check_update(keys, values)
        L = keys.shape[2]
        if L == 0:
            return fetch(self, 0, self.offset)
        if self.empty():
            self._check_head_dims(keys, values)
            self.k_dim, self.v_dim = keys.shape[-1], values.shape[-1]
            self.kv_heads = keys.shape[0] * keys.shape[1]
            self.dtype = keys.dtype
        held = 0 if self.sink_keys is None else self.sink_keys.shape[2]
        take = min(self.sinks - held, L)
        if take > 0 or not self._window_append_kernel(keys, values):
            keys, values = self._rotated(keys, self.rotate), self._rotated(values, self.rotate == "kv")
            keys, values = fmt.fit(keys, self.dense_dtype), fmt.fit(values, self.dense_dtype)
            if take > 0:
                # copies: a slice would keep the whole first chunk alive for a few tokens
                self.sink_keys = _cat(self.sink_keys, mx.contiguous(keys[:, :, :take]))
                self.sink_values = _cat(self.sink_values, mx.contiguous(values[:, :, :take]))
                keys, values = keys[:, :, take:], values[:, :, take:]
            if keys.shape[2]:
                self._window_append(keys, values)
        self.offset += L
        # A prefill chunk attends to itself unquantized and is packed at the next update;
        # in decode the window is packed down to ``window`` tokens every flush_block steps.
        packed = self.n_packed
        if L > 1:
            self._steps = 0
            self.flush(max(self.window, L))
        else:
            self._steps += 1
            if (self._steps - 1) % self.flush_block == 0:
                self.flush()
        if self.n_packed != packed:
            self._log = []
        self._log.append((self.offset, self._steps))
        del self._log[: -self.max_log]
        return fetch(self, L, self.offset)

    def keys_and_values(self):
        """The key and value views of everything held (as mlx-lm's caches give them to
        layers that reuse another layer's cache); their queries' positions come from
        the queries (the last ones held)."""
        return fetch(self, None, self.offset)

    # the recent window: the first ``_wn`` tokens of the buffers ``_wk``/``_wv``
    def window_buffers(self):
        """``(keys, values, n_keys, n_values)``: the window's buffers and the rows in use."""
        return self._wk, self._wv, self._wn, self._wvn

    @property
    def window_keys(self):
        return first_tokens(self._wk, self._wn)

    @window_keys.setter
    def window_keys(self, x):
        self._wk = x
        self._wn = 0 if x is None else x.shape[2]

    @property
    def window_values(self):
        return first_tokens(self._wv, self._wvn)

    @window_values.setter
    def window_values(self, x):
        self._wv = x
        self._wvn = 0 if x is None else x.shape[2]

    def _window_append(self, keys, values):
        n, m = self._wn, keys.shape[2]
        if self._wk is not None and n + m <= self._wk.shape[2]:
            self._wk[:, :, n : n + m] = keys
            self._wv[:, :, n : n + m] = values
        else:
            spare = self._spare(n, m)
            self._wk = _cat_spare(self.window_keys, keys, spare)
            self._wv = _cat_spare(self.window_values, values, spare)
        self._wn = self._wvn = n + m

    def _spare(self, n, m):
        """Room past ``m`` new tokens when the window grows: a decode run's up to the next
        flush (none for a prefill chunk), at most ``step`` tokens at a time, so that a window
        larger than the tokens held is not allocated."""
        return min(max(0, self.window + self.flush_block - n - m), self.step) if m == 1 else 0

    def _window_append_kernel(self, keys, values):
        """Decode on GPUs: rotate and cast the new rows and write them into the window
        buffers in one launch (``kernels.window_append``); False where it does not apply."""
        if not kernels.is_decode(keys.shape[2]) or self._wn != self._wvn or not kernels.enabled():
            return False
        if self.padded_dim(keys.shape[-1]) != keys.shape[-1]:
            return False
        n, m = self._wn, keys.shape[2]
        if self._wk is not None and n + m > self._wk.shape[2]:
            # no room (after a prefill or a packing): the window grows as ``_window_append``
            # grows it, so that every decode token is rotated and cast by the kernel; the
            # reference's rotation rounds float32 differently (a batch's rows, always in
            # room, would otherwise differ from the same rows alone: tests/cache/test_rows_buffer.py)
            room = m + self._spare(n, m)
            self._wk = _cat_spare(self.window_keys, self._wk[:, :, :0], room)
            self._wv = _cat_spare(self.window_values, self._wv[:, :, :0], room)
        rk, rv = bool(self.rotate), self.rotate == "kv"
        if not kernels.window_append_supports(self._wk, self._wv, keys, values, self._wn, rk, rv):
            return False
        self._wk, self._wv = kernels.window_append(self._wk, self._wv, keys, values, self._wn, rk, rv)
        self._wn = self._wvn = self._wn + keys.shape[2]
        return True

    def flush(self, keep=None):
        """Pack all but the ``keep`` (default: ``window``) most recent unquantized tokens
        (nothing while the cache holds fewer than ``start`` tokens)."""
        if self.offset >= self.start:
            self.pack_all_but(self.window if keep is None else keep)

    def pack_all_but(self, keep):
        """Pack all but the ``keep`` most recent unquantized tokens."""
        if self.window_keys is None:
            return
        extra = self.window_keys.shape[2] - keep
        if extra <= 0:
            return
        self._append_packed(self.window_keys[:, :, :extra], self.window_values[:, :, :extra])
        # copies (at most ``keep`` tokens): a slice would keep the packed tokens' fp16 alive
        self.window_keys = mx.contiguous(self.window_keys[:, :, extra:])
        self.window_values = mx.contiguous(self.window_values[:, :, extra:])

    def _append_packed(self, keys, values):
        n, m = self.n_packed, keys.shape[2]
        self._widen(keys, values)
        # tokens in the scales' dtype: mx.quantize and the quantize-append kernel take one
        # dtype for both; a float32 model's tokens are packed from float16 while its scales
        # are (SmolLM2's keys: the same reconstruction error as float32 tokens, 0.0060 at 8 bits)
        keys, values = fmt.fit(keys, self.store_dtype), fmt.fit(values, self.store_dtype)
        if self.packed_keys is None or n + m > self.packed_keys[0].shape[2]:
            pk = fmt.quantize(keys, self.k_bits, self.group_size, self.mode)
            pv = fmt.quantize(values, self.v_bits, self.group_size, self.mode)
            grow = (n + m + self.step - 1) // self.step * self.step - n
            self.packed_keys = _grow(self.packed_keys, pk, n, grow)
            self.packed_values = _grow(self.packed_values, pv, n, grow)
            for buf, new in zip(self.packed_keys + self.packed_values, pk + pv):
                buf[:, :, n : n + m] = new
            # the copy now, so that the old buffers go now: left in the step's lazy
            # graph, every layer's old and new buffers are alive at once (32 layers,
            # 32k tokens, 4-bit: +1.1 GiB at the step that grows them)
            eval_now(self.packed_keys, self.packed_values)
        else:  # the quantize-append kernel on GPUs (bit-identical to mx.quantize)
            f = dict(group_size=self.group_size, mode=self.mode)
            self.packed_keys = kernels.quantize_append(keys, self.packed_keys, n, bits=self.k_bits, **f)
            self.packed_values = kernels.quantize_append(values, self.packed_values, n, bits=self.v_bits, **f)
        self.n_packed = n + m

    def size(self):
        return self.offset

    def keys_after(self, n):
        """How many keys the next update of ``n`` tokens returns (its mask's width)."""
        return self.offset + n

    def empty(self):
        return self.offset == 0

    def is_trimmable(self):
        return True

    def trim(self, n):
        """Drop the last ``n`` tokens; returns how many were dropped.

        Exact when the cache goes back to where it stood after one of its updates since
        the last that packed tokens, at most ``max_log`` back (or to empty): then it holds what it held then, the
        pack schedule included, so feeding the same updates again gives bit for bit what
        they gave the first time. Any other trim keeps the tokens already packed packed
        (their unquantized values are gone), so fewer than ``window`` recent tokens may
        stay unquantized; the schedule restarts as after a prefill chunk.
        """
        n = min(self.offset, whole("trim's token count", n, 0, 1 << 62))
        if not self.is_trimmable():  # a cache that dropped tokens (rotating, chunked)
            return 0
        left = n
        if self.window_keys is not None and left:
            w = min(left, self.window_keys.shape[2])
            keep = self.window_keys.shape[2] - w
            self.window_keys = self.window_keys[:, :, :keep]
            self.window_values = self.window_values[:, :, :keep]
            left -= w
        if left:
            p = min(left, self.n_packed)
            self.n_packed -= p
            left -= p
        if left:
            keep = self.sink_keys.shape[2] - left
            self.sink_keys = self.sink_keys[:, :, :keep]
            self.sink_values = self.sink_values[:, :, :keep]
        self.offset -= n
        if n:
            self._log = [e for e in self._log if e[0] <= self.offset]
            exact = self._log and self._log[-1][0] == self.offset
            self._steps = self._log[-1][1] if exact else 0
            if not exact:
                self._log = []
        return n

    def exact_trims(self):
        """The token counts ``trim`` takes back exactly (see ``trim``), smallest first."""
        return [0] + [self.offset - o for o, _ in reversed(self._log[:-1])] + (
            [self.offset] if self.offset else [])

    def make_mask(self, N, return_array=False, window_size=None):
        # as mlx-lm's caches: no mask for a single query without a window, even for
        # return_array (deepseek_v32 gathers the mask's columns when it is an array)
        if window_size is not None:
            return causal_mask(N, self.offset, window_size)
        if N == 1:
            return None
        return causal_mask(N, self.offset) if return_array else "causal"

    @property
    def nbytes(self):
        arrays = [self.sink_keys, self.sink_values, self._wk, self._wv]
        arrays += list(self.packed_keys or ()) + list(self.packed_values or ())
        return sum(a.nbytes for a in arrays if a is not None)

    def held(self):
        """Tokens held (a rotating or chunked cache drops some)."""
        return self.offset

    def dense_nbytes(self):
        """What the tokens held take unquantized, in the model's dtype (no step rounding)."""
        if self.empty():
            return 0
        return self.held() * self.kv_heads * (self.k_dim + self.v_dim) * self.dtype.size

    def used_nbytes(self):
        """Bytes actually used by the tokens held (packed part at its fill)."""
        used = lambda t: sum(a[:, :, : self.n_packed].nbytes for a in t or ())
        dense = [self.sink_keys, self.sink_values, self.window_keys, self.window_values]
        return used(self.packed_keys) + used(self.packed_values) + sum(a.nbytes for a in dense if a is not None)

    # -- mlx-lm's pipeline contract ---------------------------------------------
    @property
    def keys(self):
        """An array of the cache's state (None while empty; the tokens are held in
        ``sink_keys``, ``packed_keys`` and ``window_keys``).

        mlx-lm's pipeline-parallel models run ``cache[-1].keys = mx.depends(cache[-1].keys,
        h)`` on the ranks that send ``h`` on: assigning ``keys`` records the array, and
        ``state`` depends on it, so evaluating the state (as a prefill step does) sends ``h``.
        """
        return self._wk if self._wk is not None else self.sink_keys

    @keys.setter
    def keys(self, x):
        if not isinstance(x, mx.array):
            raise ValueError(
                "A quantized cache's keys take only an array for its state to depend on "
                f"(mlx-lm's mx.depends(cache.keys, h)), got {type(x).__name__}.")
        if self.keys is None:
            raise ValueError("An empty quantized cache's state holds no array to depend on: update it first.")
        self._after = x

    # -- saving and loading (mlx-lm's save_prompt_cache / load_prompt_cache) --
    @property
    def state(self):
        n = self.n_packed
        cut = lambda t: None if t is None else tuple(a[:, :, :n] for a in t)
        arrays = (cut(self.packed_keys), cut(self.packed_values), self.sink_keys, self.sink_values,
                  self.window_keys, self.window_values)
        head = saved.header(self.config, self._dims(), [self._steps, self._log], self.offset, n,
                            dict(zip(saved.NAMES, arrays)), wide=self._wide)
        state = (head, self.offset, n) + arrays
        return state if self._after is None else _depending(state, self._after)

    @state.setter
    def state(self, v):
        """Take a saved state, checked first (``cache.state``): a clear ``ValueError`` for a
        damaged or changed file, never a failure at the first use."""
        head = saved.read(v)
        try:
            kwargs = init_kwargs(head["config"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"The cache state's config {head['config']!r} lacks {e}: the file is damaged.") from None
        QuantizedKVCache.__init__(self, **kwargs)
        self.kv_heads, self.k_dim, self.v_dim, dtype = head["dims"]
        self._steps, self._log = saved.schedule(head, v[1])  # the decode flush schedule
        self.dtype = dtype and getattr(mx, dtype)
        self._wide = head.get("wide") is True
        saved.check_arrays(self, v, exact_offset=self._exact_offset(head["config"]))
        (_, self.offset, self.n_packed, keys, values) = v[:5]
        self.packed_keys = None if keys is None else tuple(keys)
        self.packed_values = None if values is None else tuple(values)
        dense = lambda a: a if a is None or a.dtype == self.dense_dtype else a.astype(self.dense_dtype)
        self.sink_keys, self.sink_values, self.window_keys, self.window_values = map(dense, v[5:])
        self._restore(head["config"])

    def _restore(self, config):
        """Take a subclass's own settings from a saved state's ``config`` (checked)."""

    @staticmethod
    def _exact_offset(config):
        """Whether the tokens held sum to the offset (a rotating cache drops tokens)."""
        return True

    @property
    def meta_state(self):
        return (json.dumps(self.config, sort_keys=True),)

    @meta_state.setter
    def meta_state(self, v):
        pass  # the config travels in ``state``

    def _dims(self):
        dtype = self.dtype and str(self.dtype).split(".")[-1]
        return [self.kv_heads, self.k_dim, self.v_dim, dtype]

    @classmethod
    def from_state(cls, state, meta_state=None):
        obj = cls.__new__(cls)
        obj.state = state
        return obj

    @classmethod
    def merge(cls, caches):
        """Single-row caches as one batch whose rows update as they would alone (mlx-lm's
        ``BatchGenerator`` merges caches so: see ``rows.RowsKVCache``)."""
        return RowsKVCache.merge(caches)

    def __deepcopy__(self, memo):
        """A copy holding only the tokens (mlx-lm's prompt cache hands out copies of its
        entries; ``copy.deepcopy`` cannot copy an ``mx.Dtype``)."""
        return own_copy(self)

    @classmethod
    def from_cache(cls, cache, **config):
        """A quantized copy of a filled mlx-lm ``KVCache`` (or anything with keys/values/offset)."""
        obj = cls(**config)
        if cache.offset:
            n = cache.offset
            obj.update_and_fetch(cache.keys[:, :, :n], cache.values[:, :, :n])
            obj.flush()
        return obj



def _depending(state, after):
    """``state`` with its first array (a run of tokens, or a packed run's first array)
    made to depend on ``after``."""
    out = list(state)
    for i, a in enumerate(out):
        if isinstance(a, mx.array):
            out[i] = mx.depends(a, after)
            return tuple(out)
        if isinstance(a, tuple) and a:
            out[i] = (mx.depends(a[0], after),) + a[1:]
            return tuple(out)
    return state


def _cat(a, b):
    return b if a is None or a.shape[2] == 0 else mx.concatenate([a, b], axis=2)


def _cat_spare(a, b, spare):
    """``a`` then ``b`` along the tokens, then ``spare`` zero tokens of room."""
    parts = [] if a is None or a.shape[2] == 0 else [a]
    parts.append(b)
    if spare:
        parts.append(mx.zeros(b.shape[:2] + (spare,) + b.shape[3:], b.dtype))
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)


def _grow(buffers, like, n, grow):
    """Buffers with room for ``grow`` more tokens after the first ``n``."""
    B, H = like[0].shape[:2]
    new = tuple(mx.zeros((B, H, grow, x.shape[-1]), x.dtype) for x in like)
    if buffers is None:
        return new
    return tuple(mx.concatenate([b[:, :, :n], z], axis=2) for b, z in zip(buffers, new))


def causal_mask(N, offset, window_size=None):
    """Boolean (N, offset + N) mask: query i sees key j iff j <= offset + i (and within the window)."""
    q = mx.arange(offset, offset + N)[:, None]
    k = mx.arange(offset + N)[None]
    mask = q >= k
    if window_size is not None:
        mask = mask & (q < k + window_size)
    return mask


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
