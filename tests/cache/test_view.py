"""What ``update_and_fetch`` returns, used as arrays: the keys and values the cache holds
(against the tokens stored, and against mlx-lm's fp16 cache holding the same tokens)."""

import mlx.core as mx
import mlx_lm.models.cache as lm_cache
import pytest

from helpers import rel_err
from mlx_kvq.cache import KVView, QuantizedKVCache, QuantizedRotatingKVCache


def filled(cache, chunks=(40, 24, 1, 1), kd=64, vd=32, seed=0):
    """``cache`` and mlx-lm's KVCache fed the same tokens; the last fetched pairs of both."""
    mx.random.seed(seed)
    ref = lm_cache.KVCache()
    for n in chunks:
        k, v = mx.random.normal((1, 2, n, kd)), mx.random.normal((1, 2, n, vd))
        got, want = cache.update_and_fetch(k, v), ref.update_and_fetch(k, v)
    return got, want


@pytest.mark.parametrize("rotate", [None, "k", "kv"])
def test_views_are_the_arrays_they_stand_for(rotate):
    (k, v), (rk, rv) = filled(QuantizedKVCache(8, 32, rotate=rotate, window=8, sinks=2))
    assert isinstance(k, KVView) and isinstance(v, KVView)
    assert k.shape == rk.shape and v.shape == rv.shape and k.dtype == rk.dtype and k.ndim == 4
    assert rel_err(mx.array(k), rk) < 1e-2 and rel_err(mx.array(v), rv) < 1e-2
    q = mx.random.normal((1, 2, 3, 64))
    assert rel_err(q @ k.swapaxes(-1, -2), q @ rk.swapaxes(-1, -2)) < 1e-2  # methods
    assert rel_err(k @ mx.ones((64, 5)), rk @ mx.ones((64, 5))) < 1e-2  # operators
    assert rel_err(k[..., 3:9, :16], rk[..., 3:9, :16]) < 1e-2  # indexing
    assert rel_err(k.astype(mx.float16).reshape(1, 2, -1), rk.reshape(1, 2, -1)) < 1e-2
    assert rel_err(2 * v - 1, 2 * rv - 1) < 1e-2 and rel_err(v.transpose(0, 2, 1, 3), rv.transpose(0, 2, 1, 3)) < 1e-2
    assert rel_err(mx.tile(k.array, (1, 2, 1, 1)), mx.tile(rk, (1, 2, 1, 1))) < 1e-2  # mx.* take view.array


def test_keys_and_values_and_arrays_on_request():
    cache = QuantizedRotatingKVCache(4, 32, max_size=24, keep=2, window=4)
    (k, v), _ = filled(cache, chunks=(30, 1, 1), kd=32, vd=32)
    kk, vv = cache.keys_and_values()
    assert mx.array_equal(mx.array(kk), mx.array(k)) and mx.array_equal(mx.array(vv), mx.array(v))
    assert k.shape[2] == cache.held() and kk.q_start is None
    cache.fetch_arrays = True
    k2, v2 = cache.update_and_fetch(mx.zeros((1, 2, 1, 32)), mx.ones((1, 2, 1, 32)))
    assert type(k2) is mx.array and type(v2) is mx.array and k2.shape == (1, 2, cache.held(), 32)
    assert mx.allclose(v2[:, :, -1], mx.ones((1, 2, 32)), atol=1e-3)  # rotated and stored in fp16


def test_key_and_value_dims_differ_float32_model():
    (k, v), (rk, rv) = filled(QuantizedKVCache(4, 32, window=8), kd=80, vd=32)  # 80: zero-padded to 96
    assert k.shape[-1] == 80 and v.shape[-1] == 32 and k.dtype == mx.float32
    assert rel_err(mx.array(k), rk) < 0.1 and rel_err(mx.array(v), rv) < 0.1
    assert bool(mx.all(mx.isfinite(mx.array(k))).item())


def test_segments_sinks_and_window_in_position_order():
    """The unquantized tokens as dense parts of the view: a first chunk, not yet packed, is one
    run of positions 0.. (no positions array); with a packed run between sinks and window,
    one part with their positions, or (``split``, for prefill chunks) two contiguous parts.
    Each part holds the tokens stored at its positions."""
    mx.random.seed(3)
    cache = QuantizedKVCache(8, 32, window=8, sinks=2)
    k, v = mx.random.normal((1, 2, 40, 32)), mx.random.normal((1, 2, 40, 32))
    (kind, pk, _, start, n, pos), = cache.update_and_fetch(k, v)[0].segments()
    assert (kind, start, n, pos) == ("dense", 0, 40, None) and mx.array_equal(pk, k).item()
    k2, v2 = mx.random.normal((1, 2, 24, 32)), mx.random.normal((1, 2, 24, 32))
    view = cache.update_and_fetch(k2, v2)[0]
    every = mx.concatenate([k, k2], axis=2)
    (packed, *_, n_packed, _), dense = view.segments()
    assert packed == "packed" and n_packed > 0 and dense[4] == 64 - n_packed
    assert mx.array_equal(dense[5], mx.concatenate([mx.arange(2), mx.arange(2 + n_packed, 64)])).item()
    assert mx.array_equal(dense[1], every[:, :, mx.array(dense[5])]).item()
    sinks, window = view.segments(split=True)[1:]
    assert (sinks[3], sinks[4], sinks[5]) == (0, 2, None) and (window[3], window[4], window[5]) == (2 + n_packed, 64 - 2 - n_packed, None)
    for _, keys, _, start, n, _ in (sinks, window):
        assert mx.array_equal(keys, every[:, :, start : start + n]).item()


def test_rows_of_a_view_are_those_rows():
    """``KVView.rows``: the keys and values of rows a..b (sinks, packed run, window)."""
    mx.random.seed(3)
    cache = QuantizedKVCache(4, 32, window=8, sinks=2)
    for n in (40, 1):
        view, values = cache.update_and_fetch(mx.random.normal((4, 2, n, 64)), mx.random.normal((4, 2, n, 32)))
    assert view.packed[2] and view.window[0].shape[2] and view.sinks[0].shape[2]
    for a, b in [(0, 2), (1, 4), (3, 4)]:
        part = view.rows(a, b)
        assert part.kv_heads == (b - a) * 2 and part.q_start == view.q_start and part.offset == view.offset
        assert mx.array_equal(part.stored("keys", mx.float32), view.stored("keys", mx.float32)[a:b]).item()
        assert mx.array_equal(part.values_view().stored("values", mx.float32),
                              values.stored("values", mx.float32)[a:b]).item()
