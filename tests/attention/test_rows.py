"""Attention over a batch cache's rows (``rows_sdpa``): each row's queries see that row's
keys as the row alone would, against plain fp32 attention over what each row holds. A
prefill chunk on a GPU path is one attention over all rows (``dispatch.rows_prefill``); here
its MLX ops run on the CPU with the kernels on the emulator."""

import mlx.core as mx
import pytest

from mlx_kvq import QuantizedKVCache
from mlx_kvq.attention import prefill, rows_sdpa
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


def as_alone(caches, q, out, takes, tol):
    """Each row's own queries against fp32 attention over what it holds; its padding zeros."""
    for b, (c, n) in enumerate(zip(caches, takes)):
        T = c.offset
        causal = (mx.arange(T)[None] <= mx.arange(T - n, T)[:, None])[None, None]
        ref = reference_over_cache(c, q[b : b + 1, :, :n], D**-0.5, causal)
        assert rel_err(out[b : b + 1, :, :n], ref) < tol, b
        assert not mx.any(out[b, :, n:]).item()


@pytest.mark.parametrize("rotate", ["kv", "k", None])
@pytest.mark.parametrize("dtype,tol", [(mx.float32, 2e-3), (mx.float16, 2e-3)])  # attends in the store dtype
def test_a_prefill_chunk_attends_all_rows_at_once_as_each_alone(run_kernels_on, emu, monkeypatch, dtype, tol,
                                                                 rotate):
    run_kernels_on(emu)
    caches, view, q, mask = chunk(dtype, rotate)
    calls = []
    batched = prefill.prefill_dequantized_rows
    monkeypatch.setattr(prefill, "prefill_dequantized_rows", lambda *a: calls.append(1) or batched(*a))
    monkeypatch.setattr("mlx_kvq.attention.dispatch.prefill_dequantized_rows", prefill.prefill_dequantized_rows)
    one = prefill.prefill_dequantized
    monkeypatch.setattr("mlx_kvq.attention.dispatch.prefill_dequantized",
                        lambda *a: pytest.fail("a row attended alone"))
    out = rows_sdpa(q, view, D**-0.5, mask=mask)
    assert calls == [1] and out.dtype == dtype and out.shape == q.shape
    as_alone(caches, q, out, TAKES, tol)
    # row by row (the path where the batched one does not apply) gives the same: on the CPU
    # bit for bit; GPUs may pick another attention kernel for a mask array than for "causal"
    monkeypatch.setattr("mlx_kvq.attention.dispatch.prefill_dequantized", one)
    monkeypatch.setattr("mlx_kvq.attention.dispatch.prefill_dequantized_rows", lambda *a: None)
    err = rel_err(rows_sdpa(q, view, D**-0.5, mask=mask), out)
    assert err == 0 if mx.default_device() == mx.cpu else err < tol


@pytest.mark.parametrize("held,takes", [(HELD, (12, 3, 9)), ((0, 400, 0), TAKES)],
                         ids=["a decode-sized take", "lengths far apart"])
def test_rows_attend_row_by_row_where_at_once_does_not_fit(run_kernels_on, emu, monkeypatch, held, takes):
    """A row taking a decode step's few queries takes the decode path, as it would alone; rows
    whose lengths lie far apart would pad most of the batch's keys."""
    run_kernels_on(emu)
    caches, view, q, mask = chunk(mx.float32, "kv", held, takes)
    got = []
    batched = prefill.prefill_dequantized_rows
    monkeypatch.setattr("mlx_kvq.attention.dispatch.prefill_dequantized_rows",
                        lambda *a: got.append(batched(*a)) or got[-1])
    out = rows_sdpa(q, view, D**-0.5, mask=mask)
    assert got == [None]
    as_alone(caches, q, out, takes, 2e-3)
