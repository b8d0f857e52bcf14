"""Attention over a batch cache's rows (``rows_sdpa``): each row's queries see that row's
keys as the row alone would, against plain fp32 attention over what each row holds; the
right-padding queries of a padded prefill get zeros. On the CPU the GPU paths' MLX ops run
with the kernels on the emulator."""

import mlx.core as mx
import pytest

from mlx_kvq import QuantizedKVCache
from mlx_kvq.attention import rows, rows_sdpa
from mlx_kvq.cache import RowsKVCache
from helpers import reference_over_cache, rel_err

D, H, HQ, L = 64, 2, 4, 12
HELD = (0, 40, 30)  # each row's tokens before the chunk: none, a packed run, the window only
TAKES = (12, 10, 9)  # each row's own tokens in the chunk (the rest right padding)


def chunk(dtype, rotate, rows=HELD, takes=TAKES):
    """A batch cache of rows that held ``rows`` tokens, after a right-padded prefill chunk;
    its key view, the chunk's queries and the mask the model made for it."""
    mx.random.seed(0)
    caches = []
    for n in rows:
        c = QuantizedKVCache(4, rotate=rotate, window=16, sinks=2)
        if n:
            c.update_and_fetch(*(mx.random.normal((1, H, n, D)).astype(dtype) for _ in range(2)))
        caches.append(c)
    cache = RowsKVCache.merge(caches)
    cache.prepare(lengths=list(takes), right_padding=[L - t for t in takes])
    mask = cache.make_mask(L)
    k, v = (mx.random.normal((len(rows), H, L, D)).astype(dtype) for _ in range(2))
    view, _ = cache.update_and_fetch(k, v)
    return caches, view, mx.random.normal((len(rows), HQ, L, D)).astype(dtype), mask


CASES = [(dt, rot, HELD, TAKES) for dt in (mx.float32, mx.float16) for rot in ("kv", "k", None)]
CASES += [
    (mx.float32, "kv", HELD, (12, 3, 9)),  # a decode-sized take: that row takes the decode path, as alone
    (mx.float16, "kv", (0, 150, 0), TAKES),  # rows' lengths far apart
    (mx.float32, "kv", (0, 0, 0), TAKES),  # a prompt batch's first chunk: one attention call
    (mx.float16, None, (0, 0, 0), (12, 12, 12)),
]


@pytest.mark.parametrize("dtype,rotate,held,takes", CASES)
def test_a_prefill_chunk_attends_each_row_as_alone(run_kernels_on, emu, dtype, rotate, held, takes):
    run_kernels_on(emu)
    caches, view, q, mask = chunk(dtype, rotate, held, takes)
    out = rows_sdpa(q, view, D**-0.5, mask=mask)
    assert out.dtype == dtype and out.shape == q.shape
    for b, (c, n) in enumerate(zip(caches, takes)):
        T = c.offset
        causal = (mx.arange(T)[None] <= mx.arange(T - n, T)[:, None])[None, None]
        ref = reference_over_cache(c, q[b : b + 1, :, :n], D**-0.5, causal)
        assert rel_err(out[b : b + 1, :, :n], ref) < 2e-3, b  # float16 rows attend in float16
        assert not mx.any(out[b, :, n:]).item()


@pytest.mark.parametrize("dtype,rotate,takes", [(mx.float32, "kv", TAKES), (mx.float16, "kv", (12, 12, 12)),
                                                (mx.float32, None, (12, 11, 10)), (mx.float16, "k", (10, 12, 11))])
def test_fresh_rows_attend_in_one_call_as_row_by_row(run_kernels_on, emu, monkeypatch, dtype, rotate, takes):
    """A prompt batch's first chunk (no row holds keys from before) on a GPU path: one
    attention call over the rows' keys right-padded under one causal mask, each row's output
    the same as its own call's."""
    run_kernels_on(emu)
    caches, view, q, mask = chunk(dtype, rotate, (0, 0, 0), takes)
    fresh = []
    monkeypatch.setattr(rows, "fresh_rows", lambda *a, f=rows.fresh_rows: fresh.append(f(*a)) or fresh[-1])
    one = rows_sdpa(q, view, D**-0.5, mask=mask)
    assert len(fresh) == 1 and fresh[0] is not None and fresh[0].kv_heads == 3 * H
    monkeypatch.setattr(rows, "one_call_prefill", lambda L: False)
    apart = rows_sdpa(q, view, D**-0.5, mask=mask)
    assert one.dtype == apart.dtype == dtype
    assert mx.array_equal(one, apart)


def test_rows_holding_keys_attend_row_by_row(run_kernels_on, emu):
    """A chunk after keys the rows hold (a second chunk, a prompt-cache hit) is not fresh, nor
    one where a row takes a decode step's few tokens (alone it takes the decode path)."""
    run_kernels_on(emu)
    for held, takes in [((0, 40, 30), TAKES), ((0, 0, 5), TAKES), ((0, 0, 0), (12, 3, 12))]:
        caches, view, q, mask = chunk(mx.float16, "kv", held, takes)
        assert rows.fresh_rows(view, mask.masks, L) is None
