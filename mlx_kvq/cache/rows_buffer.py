"""RowsBuffer: the rows of a ``RowsKVCache`` in one set of buffers for its decode steps,
each row still packing on its own schedule.

Row b of a B-row ``QuantizedKVCache`` (``cache``) holds its sinks, then its ``n[b]``
packed tokens left-aligned in the shared packed buffers (the buffers hold ``max(n)``),
then its ``w[b]`` window tokens ending at the window's shared column ``c``:

    [0, s)                   sinks                       every row
    [s, s + n[b])            packed run                  hidden: [s + n[b], s + max(n))
    [.., s + max(n) + c)     window, its last w[b]       hidden: the columns before them

A decode step writes every row's token at column ``c`` (one write for all rows), then
packs, for each row whose own schedule packs on this step, that row's oldest window
tokens into its packed run (``QuantizedKVCache.update_and_fetch``'s schedule, counted per
row). Attention is one call over the B-row view with a (B, 1, 1, keys) mask of the
holes (``holes``, which ``make_mask`` returns and ``with_holes`` adds to any other mask).
Each row attends to the keys its cache alone holds, in the same order, with hidden
columns between them: equal to its run alone up to the rounding of longer sums (on the
CPU the tests see the same greedy tokens). The window is moved back to its first columns
when the hidden columns before the longest row's window reach ``flush_block``.

A float32 model's packed scales are float16 until a token to pack would overflow it
(``QuantizedKVCache._widen``); in one buffer they widen for every row at once, so rows
packed after a row's token of 65504 or more use float32 scales where alone they would not.
"""

import mlx.core as mx

from .. import format as fmt
from .defaults import init_kwargs
from .view import KVView


class RowsBuffer:
    """Single-row caches' tokens in one B-row cache (``gather``), decoded a step at a time."""

    # the most a buffer may hold for its rows, as a multiple of their tokens (plus a packed
    # step each): every row takes the longest row's packed run (``mlx_kvq.server`` sets 1.0
    # under ``--max-kv-memory``, which sizes each request alone)
    spread = 1.5

    def __init__(self, cache, row_type, n, w, offsets, steps, logs, early=None):
        self.cache = cache  # B rows; n_packed: max(n); window buffers in use: the first c columns
        self.row_type = row_type  # the class of the single-row caches (``row``)
        self.n, self.w = n, w
        self.offsets, self.steps, self.logs = offsets, steps, logs
        self.early = early or [False] * len(n)  # rows whose next step's packing ``gather`` did
        self._offset_array = None
        self.after = None  # what the state depends on (mlx-lm's pipeline: ``RowsKVCache.keys``)

    # -- in and out ------------------------------------------------------------
    @classmethod
    def gather(cls, rows, least=2):
        """The rows in one buffer, or None where they cannot share one: fewer than ``least``
        rows, caches of another kind (sliding-window, chunked, returning arrays), of different
        configs or models (or float32 models' whose scales did not widen alike), rows that do
        not hold more than their sinks, or rows so unequal that one buffer would hold more than
        ``spread`` times their tokens (its packed run holds the longest row's for every row).
        The rows themselves are left as they are."""
        first = rows[0] if rows else None
        if len(rows) < least or not all(_shareable(r, first) for r in rows):
            return None
        held = [r.offset for r in rows]  # what each row's packed run grows to
        if not cls._within_spread(held, first.step):
            return None
        # what each row's next step packs is packed here (less the token that step adds), so
        # that the buffer takes each row's window, not its last prefill chunk
        early = [max(r._wn - max(r.window - 1, 0), 0) if _packs(r._steps, r.offset, r.flush_block, r.start) else 0
                 for r in rows]
        new = [x[:, :, :e] for r, e in zip(rows, early) if e for x in (r.window_keys, r.window_values)]
        if new and first.store_dtype != first.dense_dtype and fmt.overflows(new, mx.float16):
            return None  # a float32 model's row whose scales widen on this step: it does so alone
        out = type(first)(**init_kwargs(first.config))
        out.k_dim, out.v_dim, out.dtype, out._wide = first.k_dim, first.v_dim, first.dtype, first._wide
        out.kv_heads = first.kv_heads * len(rows)
        n = [r.n_packed + e for r, e in zip(rows, early)]
        w = [r._wn - e for r, e in zip(rows, early)]
        P, c, step = max(n), max(w), first.step
        cat = lambda xs: mx.concatenate(xs, axis=0)
        if first.sinks:
            out.sink_keys = cat([r.sink_keys for r in rows])
            out.sink_values = cat([r.sink_values for r in rows])
        if P:
            cap = -(-P // step) * step
            for name, window, bits in (("packed_keys", "window_keys", out.k_bits),
                                       ("packed_values", "window_values", out.v_bits)):
                parts = [_packed_row(r, getattr(r, name), getattr(r, window), e, bits, cap) for r, e in zip(rows, early)]
                setattr(out, name, tuple(cat(list(p)) for p in zip(*parts)))
        out.n_packed = P
        room = c + first.flush_block + 1
        dims = (out.padded_dim(first.k_dim), out.padded_dim(first.v_dim))
        for name, d in zip(("window_keys", "window_values"), dims):
            parts = [_window_row(getattr(r, name), wb, c, room, (1, first.kv_heads, d), first.dense_dtype)
                     for r, wb in zip(rows, w)]
            setattr(out, name, cat(parts))
        out._wn = out._wvn = c
        out.offset = out.sinks + P + c
        return cls(out, type(first), n, w, held, [r._steps for r in rows], [list(r._log) for r in rows],
                   [e > 0 for e in early])

    @classmethod
    def _within_spread(cls, held, step):
        """Whether rows holding ``held`` tokens may share a buffer (``spread``)."""
        return len(held) * max(held) <= cls.spread * sum(held) + len(held) * step

    def join(self, other):
        """Buffer ``other``'s rows after this one's, in place (a request joining a running
        batch: no row is taken out): True, or False where the rows of both cannot share one
        buffer (``gather``'s conditions), leaving both as they were. Packed runs stay
        left-aligned (the shorter buffer padded to the longer's capacity); windows stay
        right-aligned at one column (the buffer whose window ends earlier gets hidden
        columns before it)."""
        a, b = self.cache, other.cache
        if (type(a) is not type(b) or self.row_type is not other.row_type or a.config != b.config
                or _model(a, len(self)) != _model(b, len(other))):
            return False
        if not self._within_spread(self.offsets + other.offsets, a.step):
            return False
        cat = lambda x, y: mx.concatenate([x, y], axis=0)
        if a.sink_keys is not None:
            a.sink_keys, a.sink_values = cat(a.sink_keys, b.sink_keys), cat(a.sink_values, b.sink_values)
        if a.packed_keys is not None or b.packed_keys is not None:
            cap = max(c.packed_keys[0].shape[2] for c in (a, b) if c.packed_keys is not None)
            for name, window, bits in (("packed_keys", "_wk", a.k_bits), ("packed_values", "_wv", a.v_bits)):
                runs = [getattr(c, name) or _packed(getattr(c, window)[:, :, :0], bits, c) for c in (a, b)]
                setattr(a, name, tuple(cat(x, y) for x, y in zip(*(_to(r, cap) for r in runs))))
        col = max(a._wn, b._wn)
        room = max(c._wk.shape[2] - c._wn for c in (a, b))  # free columns after the window
        moved = lambda c, buf: mx.pad(buf, [(0, 0), (0, 0), (col - c._wn, room - (buf.shape[2] - c._wn)), (0, 0)])
        a._wk, a._wv = cat(moved(a, a._wk), moved(b, b._wk)), cat(moved(a, a._wv), moved(b, b._wv))
        a._wn = a._wvn = col
        a.kv_heads += b.kv_heads
        a.n_packed = max(a.n_packed, b.n_packed)
        a.offset = a.sinks + a.n_packed + col
        a._decode_setups = {}
        for name in ("n", "w", "offsets", "steps", "logs", "early"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self._offset_array = None
        return True

    @property
    def offset(self):
        """Each row's position, a (B,) array (RoPE: asked by every layer)."""
        if self._offset_array is None:
            self._offset_array = mx.array(self.offsets)
        return self._offset_array

    def row(self, b):
        """Row ``b`` as the single-row cache it would be alone (arrays of its own)."""
        src = self.cache
        r = self.row_type(**init_kwargs(src.config))
        r.k_dim, r.v_dim, r.dtype, r._wide = src.k_dim, src.v_dim, src.dtype, src._wide
        r.kv_heads = src.kv_heads // len(self.n)
        own = lambda a: mx.contiguous(a[b : b + 1])
        if src.sink_keys is not None:
            r.sink_keys, r.sink_values = own(src.sink_keys), own(src.sink_values)
        n, w, c = self.n[b], self.w[b], src._wn
        if n:
            r.packed_keys = tuple(own(a[:, :, :n]) for a in src.packed_keys)
            r.packed_values = tuple(own(a[:, :, :n]) for a in src.packed_values)
        r.n_packed = n
        if w:
            r.window_keys, r.window_values = own(src._wk[:, :, c - w : c]), own(src._wv[:, :, c - w : c])
        r.offset, r._steps, r._log = self.offsets[b], self.steps[b], list(self.logs[b])
        if self.after is not None and r.keys is not None:  # as ``RowsKVCache.keys`` sets each row's
            r.keys = self.after
        return r

    def rows(self):
        out = [self.row(b) for b in range(len(self.n))]
        mx.eval([r.state for r in out])
        return out

    def take(self, keep):
        """Only the rows ``keep`` (indices)."""
        idx = mx.array(keep)
        c = self.cache
        pick = lambda a: None if a is None else mx.take(a, idx, axis=0)
        c.sink_keys, c.sink_values = pick(c.sink_keys), pick(c.sink_values)
        c._wk, c._wv = pick(c._wk), pick(c._wv)
        if c.packed_keys is not None:
            c.packed_keys = tuple(pick(a) for a in c.packed_keys)
            c.packed_values = tuple(pick(a) for a in c.packed_values)
        c.kv_heads = c.kv_heads // len(self.n) * len(keep)
        for name in ("n", "w", "offsets", "steps", "logs", "early"):
            setattr(self, name, [getattr(self, name)[i] for i in keep])
        self._offset_array = None
        c.n_packed = max(self.n)
        c._decode_setups = {}

    # -- a decode step -----------------------------------------------------------
    def _plan(self):
        """This step's plan from the rows' schedules: whether the window moves back first,
        the column written, each row's tokens to pack, and ``n``, ``w`` after the step."""
        c, W = self.cache._wn, max(self.w)
        fb, cfg = self.cache.flush_block, self.cache.config
        move = c == self.cache._wk.shape[2] or c - W >= fb
        col = W if move else c
        packs, n, w = [], [], []
        for nb, wb, o, st in zip(self.n, self.w, self.offsets, self.steps):
            wb += 1
            extra = max(wb - cfg["window"], 0) if _packs(st, o, fb, cfg["start"]) else 0
            packs.append(extra)
            n.append(nb + extra)
            w.append(wb - extra)
        return move, col, packs, n, w

    def mask_after(self, window_size=None):
        """The (B, 1, 1, keys) bool mask of the view the next step returns: each row's own
        keys (``holes``), within the last ``window_size`` positions where given."""
        _, col, _, n, w = self._plan()
        m = holes(self.cache.sinks, n, w, col + 1)
        if window_size is None:
            return m
        # key positions: the sinks' and packed columns' are their columns; the window's
        # last column is the row's new token
        s, P = self.cache.sinks, max(n)
        j = mx.arange(s + P + col + 1)
        q = mx.array(self.offsets)[:, None]
        pos = mx.where(j < s + P, j, j - (s + P + col) + q)
        return m & (q - pos < window_size).reshape(m.shape)

    def step(self, keys, values):
        """Store one token per row (``keys``/``values`` (B, H, 1, D)); the step's views."""
        move, col, packs, n, w = self._plan()
        c = self.cache
        if move:  # the longest row's window (``col`` tokens) back to the first columns
            room = col + c.flush_block + 1
            moved = lambda buf: mx.pad(buf[:, :, c._wn - col : c._wn], [(0, 0), (0, 0), (0, room - col), (0, 0)])
            c._wk, c._wv = moved(c._wk), moved(c._wv)
            c._wn = c._wvn = col
        if not c._window_append_kernel(keys, values):
            k = fmt.fit(c._rotated(keys, c.rotate), c.dense_dtype)
            v = fmt.fit(c._rotated(values, c.rotate == "kv"), c.dense_dtype)
            c._window_append(k, v)
        end = c._wn
        runs = [(b, end - (w[b] + extra), extra) for b, extra in enumerate(packs) if extra]
        tokens = [(b, c._wk[b : b + 1, :, lo : lo + e], c._wv[b : b + 1, :, lo : lo + e]) for b, lo, e in runs]
        if tokens:  # a float32 model's scales widen for all rows at once (one check per step that packs)
            c._widen(*(mx.concatenate([t[i] for t in tokens], axis=2) for i in (1, 2)))
        for b, k, v in tokens:
            self._pack(b, k, v)
        self.n, self.w, self.early = n, w, [False] * len(n)
        self.offsets = [o + 1 for o in self.offsets]
        self._offset_array = None
        self.steps = [s + 1 for s in self.steps]
        for b, log in enumerate(self.logs):
            if packs[b] or self.early[b]:
                log.clear()
            log.append((self.offsets[b], self.steps[b]))
            del log[: -c.max_log]
        c.n_packed = max(n)
        c.offset = c.sinks + c.n_packed + end
        return self.view()

    def view(self):
        """The key and value views of what the rows hold (``holes`` hides the others)."""
        c = self.cache
        view = KVView(c, 1, c.offset)
        view.holes = holes(c.sinks, self.n, self.w, c._wn)
        return view, view.values_view()

    def _pack(self, b, keys, values):
        """Row ``b``'s ``keys``/``values`` (its oldest window tokens) packed after its run."""
        c, nb, m = self.cache, self.n[b], keys.shape[2]
        need = nb + m
        if c.packed_keys is None or need > c.packed_keys[0].shape[2]:
            cap = -(-need // c.step) * c.step
            B = len(self.n)
            none = lambda x, bits: _packed(mx.zeros((B,) + x.shape[1:2] + (0,) + x.shape[3:], x.dtype), bits, c)
            c.packed_keys = _to(c.packed_keys or none(keys, c.k_bits), cap)
            c.packed_values = _to(c.packed_values or none(values, c.v_bits), cap)
        for name, x, bits in (("packed_keys", keys, c.k_bits), ("packed_values", values, c.v_bits)):
            new = _packed(x, bits, c)
            bufs = getattr(c, name)
            for buf, part in zip(bufs, new):
                buf[b : b + 1, :, nb:need] = part
            setattr(c, name, bufs)

    def arrays(self):
        """The buffer's arrays (the first depending on ``after`` where it is set)."""
        c = self.cache
        out = [c.sink_keys, c.sink_values, c._wk, c._wv, *(c.packed_keys or ()), *(c.packed_values or ())]
        out = [a for a in out if a is not None]
        if self.after is not None:
            out[0] = mx.depends(out[0], self.after)
        return out

    @property
    def nbytes(self):
        return self.cache.nbytes

    def used_nbytes(self):
        """Bytes the rows' tokens take (``QuantizedKVCache.used_nbytes`` of each row, summed)."""
        c, B = self.cache, len(self.n)
        per_token = lambda a: a.nbytes // (B * a.shape[2])  # one row's token
        used = sum(a.nbytes for a in (c.sink_keys, c.sink_values) if a is not None)
        used += sum(per_token(a) * sum(self.n) for a in (c.packed_keys or ()) + (c.packed_values or ()))
        return used + sum(per_token(a) * sum(self.w) for a in (c._wk, c._wv))

    def __len__(self):
        return len(self.n)


def holes(sinks, n, w, c):
    """(B, 1, 1, sinks + max(n) + c) bool: row b sees its sinks, its first ``n[b]`` packed
    columns and the last ``w[b]`` of the ``c`` window columns. Kept for the last few
    layouts: every layer of a step has the same one, so they share one array."""
    key = (sinks, tuple(n), tuple(w), c)
    m = _HOLES.get(key)
    if m is None:
        P = max(n)
        j = mx.arange(sinks + P + c)
        nb = mx.array([sinks + x for x in n])[:, None]
        lo = mx.array([sinks + P + c - x for x in w])[:, None]
        m = ((j < nb) | (j >= lo)).reshape(len(n), 1, 1, -1)
        if len(_HOLES) >= 4:
            _HOLES.pop(next(iter(_HOLES)))
        _HOLES[key] = m
    return m


_HOLES = {}


def with_holes(mask, view):
    """``mask`` (None, ``"causal"`` or an array a model made) with ``view``'s holes hidden
    too (a view from ``RowsBuffer``; others: ``mask`` itself)."""
    h = getattr(view, "holes", None)
    if h is None or mask is h:
        return mask
    if mask is None or isinstance(mask, str):  # one query per row: causal hides nothing
        return h
    if mask.dtype == mx.bool_:
        return mask & h
    return mx.where(h, mask, mx.array(mx.finfo(mask.dtype).min, mask.dtype))


def _packs(steps, offset, flush_block, start):
    """Whether a row's next decode step packs its window (``QuantizedKVCache.update_and_fetch``'s
    schedule), given its decode steps since its last prefill chunk and its tokens."""
    return steps % flush_block == 0 and offset + 1 >= start


def _model(c, rows=1):
    """What a cache of ``rows`` rows takes from its model: one row's KV heads, head dims, dtype,
    and whether its scales widened (rows must agree on it to share a buffer)."""
    return c.kv_heads // rows, c.k_dim, c.v_dim, c.dtype, c._wide


def _shareable(r, first):
    return (
        getattr(type(r), "one_buffer", False) and type(r) is type(first)
        and not getattr(r, "fetch_arrays", False)
        and r.config == first.config and r.kv_heads is not None
        and _model(r) == _model(first)
        and r._wn == r._wvn
        and (0 if r.sink_keys is None else r.sink_keys.shape[2]) == r.sinks and r.offset > r.sinks
    )


def _packed_row(r, parts, window, e, bits, cap):
    """Row ``r``'s packed run (``parts``, its ``n_packed`` tokens), then the first ``e``
    tokens of its ``window`` packed, then zeros up to ``cap`` tokens."""
    n = r.n_packed
    runs = [tuple(a[:, :, :n] for a in parts)] if n else []
    if e or not runs:  # a row with nothing packed still gives the arrays' shapes
        runs.append(_packed(window[:, :, :e], bits, r))
    return _to(tuple(mx.concatenate(p, axis=2) if len(p) > 1 else p[0] for p in zip(*runs)), cap)


def _window_row(x, w, c, room, shape, dtype):
    """``x`` (its ``w`` tokens; None: none) right-aligned at column ``c`` of ``room`` columns
    (``shape``: (1, heads, dim) and ``dtype`` of a row that has none)."""
    if x is None or not w:
        return mx.zeros(shape[:2] + (room,) + shape[2:], dtype)
    return mx.pad(x[:, :, x.shape[2] - w :], [(0, 0), (0, 0), (c - w, room - c), (0, 0)])


def _packed(x, bits, c):
    """``x`` (B, H, L, D) packed in cache ``c``'s format, scales in its ``store_dtype``; for
    L = 0 arrays of no tokens in that format."""
    z = x if x.shape[2] else mx.zeros(x.shape[:2] + (1,) + x.shape[3:], x.dtype)
    q = fmt.quantize(fmt.fit(z, c.store_dtype), bits, c.group_size, c.mode)
    return tuple(q) if x.shape[2] else tuple(a[:, :, :0] for a in q)


def _to(bufs, cap):
    """Packed buffers padded with zeros to ``cap`` tokens."""
    return tuple(mx.pad(a, [(0, 0), (0, 0), (0, cap - a.shape[2]), (0, 0)]) for a in bufs)
