"""RowsKVCache: single-row quantized caches decoded together, for continuous batching
(mlx-lm's ``BatchGenerator``, which ``mlx_kvq.server`` runs) and ``batch_generate``.

Every row is its own ``QuantizedKVCache`` (or ``QuantizedRotatingKVCache``) and every
update goes to each row as that row's own update, so a row packs the same tokens on the
same steps as when it runs alone, whenever it joins or leaves the batch. Prefill chunks
are stored and attend row by row, each over its own view (``attention.rows_sdpa``).
Decode steps go to one ``RowsBuffer`` holding all rows, which keeps each row's schedule
(one window write and one attention call per layer), where the rows can share one; rows
that cannot (``RowsBuffer.gather``) decode row by row. Everything else in the model runs
batched.

It implements what ``BatchGenerator`` asks of a batch cache: ``merge`` (single-row
caches to a batch), ``prepare``/``finalize`` (a right-padded prefill: each row stores
only its own tokens), ``filter``, ``extend``, ``extract``, a per-row ``offset`` array
(RoPE positions) and ``nbytes``; and mlx-lm's pipeline contract (``keys``, which
``state`` depends on once assigned).
"""

import mlx.core as mx

from .rows_buffer import RowsBuffer
from .view import StandsForArray, padded


class RowsView(StandsForArray):
    """What ``RowsKVCache.update_and_fetch`` returns, for the keys and for the values
    (``part``): each row's view and how many of this update's queries are that row's own
    tokens (the rest are right padding). Used as an array (models that compute with what
    they fetched: MLA's RoPE keys, casts, their own attention) it is the rows' keys (or
    values) left-padded with zeros to the longest row, as mlx-lm's ``BatchKVCache`` returns
    them; ``RowsMask`` hides the padding."""

    def __init__(self, views, takes, part="keys"):
        self.views = views
        self.takes = takes
        self.part = part
        self._array = None

    def values_view(self):
        """The same step standing for the values."""
        return RowsView([v.values_view() for v in self.views], self.takes, "values")

    @property
    def array(self):
        if self._array is None:
            rows = [v.array for v in self.views]
            T = max(r.shape[2] for r in rows)
            self._array = mx.concatenate([padded(r, T) for r in rows], axis=0)
        return self._array


class RowsMask(StandsForArray):
    """Each row's own mask, as its cache alone would make it for its own queries. As an
    array (models that apply the mask themselves): (B, 1, N, T) bool, each row's own mask
    over its own keys, left-padded with hidden keys as ``RowsView`` pads them."""

    def __init__(self, masks, arrays, n):
        self.masks = masks
        self._arrays = arrays  # each row's ((N_b, T_b) bool mask or None: all visible, T_b)
        self._n = n
        self._array = None

    @property
    def dtype(self):
        return mx.bool_

    @property
    def array(self):
        if self._array is None:
            T = max(w for _, w in self._arrays)
            rows = []
            for m, width in self._arrays:
                m = mx.ones((self._n, width), mx.bool_) if not isinstance(m, mx.array) else m
                if m.shape[0] < self._n:  # right padding queries: they see what the last query sees
                    m = mx.concatenate([m, mx.repeat(m[-1:], self._n - m.shape[0], axis=0)])
                pad = mx.zeros((self._n, T - width), mx.bool_)
                rows.append(mx.concatenate([pad, m], axis=1) if T > width else m)
            self._array = mx.stack(rows)[:, None]
        return self._array


class RowsKVCache:
    """Single-row caches decoded as one batch: in one ``RowsBuffer`` in decode steps where
    they can share one, else updated and attended to row by row."""

    def __init__(self, rows):
        self._rows = list(rows)
        self._buffer = None  # in decode: the rows in one ``RowsBuffer`` (None: in ``_rows``)
        self._apart = False  # the rows cannot share a buffer (asked again when they change)
        self._pending = None  # a right-padded prefill: each row's own tokens still to come
        self._last_takes = None  # each row's own tokens in the last update

    @property
    def rows(self):
        """The single-row caches (taken out of the shared buffer where they are in one)."""
        self._take_out()
        return self._rows

    def _take_out(self):
        """The rows out of the shared buffer, each its own cache again (none: nothing to do)."""
        if self._buffer is not None:
            self._rows, self._buffer = self._buffer.rows(), None

    @rows.setter
    def rows(self, rows):
        self._rows, self._buffer, self._apart = list(rows), None, False

    def _shared(self, n):
        """The rows' ``RowsBuffer`` for a decode step of ``n`` tokens per row, None where
        they stay apart (prefill, a padded prefill, rows that cannot share one)."""
        if n != 1 or self._pending is not None:
            self._take_out()  # a chunk after decode steps: the rows take it one by one
            return None
        if self._buffer is None and not self._apart:
            self._buffer = RowsBuffer.gather(self._rows)
            self._apart = self._buffer is None
        return self._buffer

    @classmethod
    def merge(cls, caches):
        """One batch cache from single-row caches (or batch caches, whose rows it takes)."""
        rows = []
        for c in caches:
            rows.extend(c.rows if isinstance(c, RowsKVCache) else [c])
        return cls(rows)

    def _takes(self, n):
        """How many of ``n`` new positions are each row's own tokens."""
        if self._pending is None:
            return [n] * len(self.rows)
        return [min(n, p) for p in self._pending]

    @property
    def offset(self):
        """Each row's position (a (B,) array, as mlx-lm's ``BatchKVCache``: RoPE takes it)."""
        if self._buffer is not None:
            return self._buffer.offset
        return mx.array([r.offset for r in self.rows])

    def update_and_fetch(self, keys, values):
        if keys.ndim != 4 or keys.shape[0] != len(self):
            raise ValueError(f"keys {keys.shape} do not have one row for each of the cache's {len(self)} rows.")
        shared = self._shared(keys.shape[2])
        if shared is not None:
            self._last_takes = [1] * len(shared)
            return shared.step(keys, values)
        takes = self._takes(keys.shape[2])
        if self._pending is not None:
            self._pending = [p - t for p, t in zip(self._pending, takes)]
        L = keys.shape[2]
        if all(n == L for n in takes):  # every row takes the whole update: one split op, not B slices
            ks, vs = mx.split(keys, len(self.rows), axis=0), mx.split(values, len(self.rows), axis=0)
        else:
            ks = [keys[b : b + 1, :, :n] for b, n in enumerate(takes)]
            vs = [values[b : b + 1, :, :n] for b, n in enumerate(takes)]
        fetched = [r.update_and_fetch(k, v) for r, k, v in zip(self.rows, ks, vs)]
        self._last_takes = takes
        return _batched(fetched, takes)

    def keys_and_values(self):
        """The rows' key and value views of everything held, for layers that reuse this
        layer's cache (their queries: this step's, as the last update took them)."""
        if self._buffer is not None:
            return self._buffer.view()
        return _batched([r.keys_and_values() for r in self.rows], self._last_takes)

    def make_mask(self, N, return_array=False, window_size=None):
        shared = self._shared(N)
        if shared is not None:  # an array over the rows' keys in the buffer
            return shared.mask_after(window_size)
        takes = self._takes(N)
        # for models that apply the mask themselves: each row's array mask (None: every key
        # visible) and how many keys the row returns once updated
        arrays = []
        for r, n in zip(self.rows, takes):
            m = r.make_mask(max(n, 1), return_array=True, window_size=window_size)
            arrays.append((m, m.shape[-1] if isinstance(m, mx.array) else r.keys_after(max(n, 1))))
        if return_array:  # the rows' own masks are those arrays
            masks = [m if n else None for (m, _), n in zip(arrays, takes)]
        else:
            masks = [r.make_mask(n, window_size=window_size) if n else None for r, n in zip(self.rows, takes)]
        return RowsMask(masks, arrays, N)

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None):
        """A prefill whose rows are right-padded to one length: row b stores only its
        first ``lengths[b]`` tokens. Left padding is for empty caches only and is never
        stored (rows hold only their own tokens)."""
        if left_padding is not None and any(left_padding) and not self.empty():
            raise ValueError("Left padding can only be added to an empty batch cache.")
        if right_padding is not None and max(right_padding, default=0) > 0:
            if lengths is None or len(lengths) != len(self.rows):
                raise ValueError(f"prepare needs one length per row ({len(self.rows)}), got {lengths!r}.")
            self._pending = list(lengths)

    def finalize(self):
        self._pending = None

    def filter(self, batch_indices):
        """Keep only the rows ``batch_indices`` (the others are freed)."""
        keep = [int(i) for i in batch_indices]
        if self._buffer is not None and len(keep) > 1:
            self._buffer.take(keep)
        else:
            self.rows = [self.rows[i] for i in keep]
        if self._pending is not None:
            self._pending = [self._pending[i] for i in keep]

    def extend(self, other):
        """Append the rows of ``other``: into this batch's buffer where they can share it
        (``RowsBuffer.join``), else all rows apart until the next decode step."""
        if self._pending is not None or other._pending is not None:
            raise ValueError("Batch caches cannot be joined in the middle of a padded prefill.")
        if self._buffer is not None:
            theirs = other._buffer if other._buffer is not None else RowsBuffer.gather(other._rows, least=1)
            if theirs is not None and self._buffer.join(theirs):
                return
        self.rows = self.rows + other.rows

    def extract(self, idx):
        """A copy of row ``idx`` holding only its tokens (for mlx-lm's prompt cache)."""
        if self._buffer is not None:
            r = self._buffer.row(idx)
            mx.eval(r.state)
            return r
        return own_copy(self.rows[idx])

    @property
    def keys(self):
        """An array of a row's state (None while every row is empty): mlx-lm's pipeline
        contract, as ``QuantizedKVCache.keys``."""
        if self._buffer is not None:
            return self._buffer.arrays()[0]
        return next((k for k in (r.keys for r in self.rows) if k is not None), None)

    @keys.setter
    def keys(self, x):
        """Every row that holds tokens depends on ``x`` (``mx.depends(cache.keys, h)``), so
        evaluating the batch's state evaluates ``x``."""
        if self._buffer is not None:
            self._buffer.after = x
            return
        held = [r for r in self.rows if r.keys is not None]
        if not held:
            raise ValueError("An empty batch cache's state holds no array to depend on: update it first.")
        for r in held:
            r.keys = x

    @property
    def state(self):
        """Each row's state; in decode, while the rows share a buffer, its arrays (what
        ``mx.eval(cache.state)`` evaluates, without taking the rows out of it)."""
        if self._buffer is not None:
            return self._buffer.arrays()
        return [r.state for r in self.rows]

    @property
    def nbytes(self):
        if self._buffer is not None:
            return self._buffer.nbytes
        return sum(r.nbytes for r in self.rows)

    def used_nbytes(self):
        """Bytes the rows' tokens take (no spare room)."""
        if self._buffer is not None:
            return self._buffer.used_nbytes()
        return sum(r.used_nbytes() for r in self.rows)

    def size(self):
        if self._buffer is not None:
            return max(self._buffer.offsets)
        return max((r.size() for r in self.rows), default=0)

    def empty(self):
        return self._buffer is None and all(r.empty() for r in self.rows)

    def is_trimmable(self):
        return False

    def __deepcopy__(self, memo):
        if self._buffer is not None:  # its rows come out as arrays of their own, tokens only (as ``extract``)
            return RowsKVCache(self._buffer.rows())
        return RowsKVCache([own_copy(r) for r in self._rows])

    def __len__(self):
        return len(self._buffer) if self._buffer is not None else len(self._rows)

    def __bool__(self):  # mlx-lm's ``if cache`` asks whether there is a cache, not whether it has rows
        return True


def _batched(fetched, takes):
    """Each row's ``(keys, values)`` as one batch: left-padded arrays where the rows'
    caches fetch arrays (``fetch_arrays``), else the key and value ``RowsView``."""
    if isinstance(fetched[0][0], mx.array):
        T = max(k.shape[2] for k, _ in fetched)
        return tuple(mx.concatenate([padded(f[i], T) for f in fetched], axis=0) for i in (0, 1))
    view = RowsView([k for k, _ in fetched], takes)
    return view, view.values_view()


def own_copy(cache):
    """A copy of a single-row quantized cache whose arrays hold its tokens only (no spare
    room) and are arrays of its own (an in-place write to one cache never reaches the other)."""
    def own(x):
        if isinstance(x, mx.array):
            return mx.contiguous(x)
        if isinstance(x, tuple):
            return tuple(own(a) for a in x)
        return x

    copy = type(cache).from_state(tuple(own(x) for x in cache.state))
    if getattr(cache, "fetch_arrays", False):  # a model that needs arrays (bridge.arrays_reason)
        copy.fetch_arrays = True
    mx.eval(copy.state)
    return copy
