"""attention/one_pass.py: decode over the whole view in one softmax (the CPU's decode path)."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_kvq import QuantizedKVCache, format, quantized_sdpa
from mlx_kvq.attention import dispatch, one_pass
from helpers import reference_over_cache, rel_err

pytestmark = pytest.mark.usefixtures("on_the_cpu_device")  # the CPU's decode path


CONFIGS = [
    dict(bits=4),
    dict(bits=2, group_size=32, sinks=4, window=16),
    dict(bits=8, k_bits=8, v_bits=4, rotate="kv", sinks=2, window=8),
    dict(bits=4, mode="mxfp4", rotate="k"),
    dict(bits=3, group_size=32, sinks=0, window=0),
]


def _decode_view(config, B=1, Hq=8, Hkv=2, D=64, past=300, L=1, seed=0):
    mx.random.seed(seed)
    cache = QuantizedKVCache(**config)
    cache.update_and_fetch(*(mx.random.normal((B, Hkv, past, D)).astype(mx.float16) for _ in range(2)))
    k = mx.random.normal((B, Hkv, L, D)).astype(mx.float16)
    view, _ = cache.update_and_fetch(k, k)
    return cache, view, mx.random.normal((B, Hq, L, D)).astype(mx.float16)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("L", [1, 4])
@pytest.mark.parametrize("past", [200, 700])  # 700: scores by planes_scores (2, 4, 8 bits)
def test_matches_fp32_attention_and_the_partials(config, L, past):
    cache, view, q = _decode_view(config, L=L, seed=L, past=past)
    mask = "causal" if L > 1 else None
    ref_mask = None if mask is None else mx.arange(cache.offset)[None] <= mx.arange(cache.offset - L, cache.offset)[:, None]
    got = one_pass.one_pass_attention(q, view, 0.125, mask, None, q.dtype)
    assert got is not None
    parts = dispatch.partials(q, view, 0.125, mask, None, q.dtype)
    ref = reference_over_cache(cache, q, 0.125, ref_mask)
    # the packed products skip mx.dequantize's fp16 rounding of each element: 1e-3 of a score
    assert rel_err(got, ref) < 4e-3 and rel_err(got, parts) < 4e-3


def test_attention_sinks_and_a_masked_out_row():
    cache, view, q = _decode_view(dict(bits=4, sinks=2, window=4), Hq=4, Hkv=2, L=2, seed=3)
    sinks = mx.array([0.5, -1.0, 2.0, 0.0])
    mask = mx.ones((1, 1, 2, cache.offset), mx.bool_)
    mask[..., 1, :] = False  # the second query sees nothing: zeros, as the partials give
    got = one_pass.one_pass_attention(q, view, 0.125, mask, sinks, q.dtype)
    parts = dispatch.partials(q, view, 0.125, mask, sinks, q.dtype)
    assert mx.all(mx.isfinite(got)).item()
    assert rel_err(got, parts) < 4e-3


def test_the_cpu_decode_takes_it_and_long_views_do_not(monkeypatch):
    calls = []
    real = one_pass.decode_one_pass
    monkeypatch.setattr(dispatch, "PATHS", tuple(
        (lambda *a, f=f: calls.append(1) or f(*a)) if f is real else f for f in dispatch.PATHS))
    _, view, q = _decode_view(dict(bits=4))
    quantized_sdpa(q, view, scale=0.125)
    assert calls
    monkeypatch.setattr(one_pass, "ONE_PASS_ELEMENTS", 100)  # the MLX ops' scores over the budget: the partials
    monkeypatch.setattr(one_pass.cpu, "applies", lambda *a, **k: False)  # (the CPU body has no such budget)
    assert one_pass.decode_one_pass(q, view, 0.125, None, None, q.dtype) is None


@pytest.mark.skipif(one_pass.cpu.library() is None, reason="the CPU body is built on Linux with a C++ compiler")
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("B,L", [(1, 1), (3, 4)])
def test_the_cpu_body_gives_what_the_mlx_ops_give(config, B, L):
    """A decode step by the CPU body (``kernels.cpu``): fp32 attention over the cache and the
    MLX ops' one pass (sinks, window, rotations, 2/4/8-bit codes); formats it does not read
    (mxfp4, 3 bits) stay with the MLX ops."""
    cache, view, q = _decode_view(config, B=B, L=L, seed=B + L)
    mask = "causal" if L > 1 else None
    got = one_pass.cpu_one_pass(q, view, 0.125, mask, None)
    if config.get("mode") == "mxfp4" or config["bits"] == 3:
        assert got is None
        return
    ref_mask = None if mask is None else mx.arange(cache.offset)[None] <= mx.arange(cache.offset - L, cache.offset)[:, None]
    assert rel_err(got, reference_over_cache(cache, q, 0.125, ref_mask)) < 4e-3
    assert rel_err(got, one_pass.one_pass_attention(q, view, 0.125, mask, None, q.dtype)) < 4e-3


@pytest.mark.parametrize("bits,group_size", [(2, 32), (4, 64), (4, 128), (8, 32), (8, 64)])
def test_planes_scores_are_float64_scores_over_the_dequantized_keys(bits, group_size):
    """Scales and biases applied to the scores, per group, give the scores over the keys
    ``mx.dequantize`` gives (the cache's float16 scales)."""
    x = mx.random.normal((2, 3, 40, 128), key=mx.random.key(bits)) * 3
    p = format.quantize(x, bits, group_size)
    p = (p[0],) + tuple(a.astype(mx.float16) for a in p[1:])
    q = mx.random.normal((2, 3, 5, 128), key=mx.random.key(7))
    keys = np.asarray(format.dequantize(tuple(a[:, :, :33] for a in p), bits, group_size, dtype=mx.float32))
    want = np.asarray(q).astype(np.float64) @ keys.astype(np.float64).swapaxes(-1, -2)
    got = one_pass.planes_scores(q, tuple(a[:, :, :33] for a in p), bits)
    assert got.dtype == mx.float32 and got.shape == want.shape == (2, 3, 5, 33)
    assert np.abs(np.asarray(got) - want).max() < 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("bits,group_size", [(2, 32), (4, 64), (4, 128), (8, 32), (8, 64)])
def test_planes_values_are_float64_weighted_dequantized_values(bits, group_size):
    """Scales and biases applied to the weights, per group, give the weighted sum of the
    values ``mx.dequantize`` gives (the cache's float16 scales)."""
    x = mx.random.normal((2, 3, 40, 128), key=mx.random.key(bits)) * 3
    p = format.quantize(x, bits, group_size)
    p = (p[0],) + tuple(a.astype(mx.float16) for a in p[1:])
    w = mx.softmax(mx.random.normal((2, 3, 5, 33), key=mx.random.key(7)) * 2, axis=-1)
    values = np.asarray(format.dequantize(tuple(a[:, :, :33] for a in p), bits, group_size, dtype=mx.float32))
    want = np.asarray(w).astype(np.float64) @ values.astype(np.float64)
    got = one_pass.planes_values(w, tuple(a[:, :, :33] for a in p), bits)
    assert got.dtype == mx.float32 and got.shape == want.shape == (2, 3, 5, 128)
    assert np.abs(np.asarray(got) - want).max() < 1e-5 * np.abs(values).max()


def test_products_take_the_planes_from_unpack_min_keys_in_pieces_of_the_budget(monkeypatch):
    """From ``UNPACK_MIN_KEYS`` keys over the rows the scores and the weighted values take
    the code planes, in pieces of at most ``UNPACK_ELEMENTS`` elements; the output stays
    fp32 attention's."""
    calls = dict(planes_scores=[], planes_values=[])
    for name, seen in calls.items():
        real = getattr(one_pass, name)
        monkeypatch.setattr(one_pass, name, lambda x, p, bits, real=real, seen=seen: seen.append(p[0].shape[2])
                            or real(x, p, bits))
    for past, B, budget, pieces in ((200, 1, 1 << 22, 0), (200, 4, 1 << 22, 1), (700, 1, 1 << 22, 1),
                                    (700, 1, 2 * 64 * 200, 4)):
        monkeypatch.setattr(one_pass, "UNPACK_ELEMENTS", budget)
        for seen in calls.values():
            seen.clear()
        cache, view, q = _decode_view(dict(bits=4), B=B, past=past)
        got = one_pass.one_pass_attention(q, view, 0.125, None, None, q.dtype)
        n = view.packed[2]
        for seen in calls.values():
            assert len(seen) == pieces and sum(seen) == (n if pieces else 0), (past, B, budget)
            assert max(seen, default=0) * B * 2 * 64 <= budget
        assert rel_err(got, reference_over_cache(cache, q, 0.125)) < 4e-3
