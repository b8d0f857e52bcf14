"""Attention over a batch cache's rows (``rows_sdpa``): each row's queries see that row's
keys as the row alone would, against plain fp32 attention over what each row holds; the
right-padding queries of a padded prefill get zeros. On the CPU the GPU paths' MLX ops run
with the kernels on the emulator."""

import mlx.core as mx
import pytest

from mlx_kvq import QuantizedKVCache
from mlx_kvq.attention import rows_sdpa
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
