"""The softmax of the MLX-op attention paths against float64 NumPy."""

import numpy as np

import mlx.core as mx

from mlx_kvq.attention import softmax as softmax_module
from mlx_kvq.attention.softmax import exp, softmax


def test_exp_matches_float64_over_the_shifted_range():
    """Softmax's shifted scores: every float32 step from -100 to 0 (and beyond, to -inf), in
    pieces the polynomial takes: as close to float64 as ``mx.exp``, exactly 1 at 0, 0 at -inf."""
    x = np.concatenate([np.linspace(-100, 0, 1_000_001, dtype=np.float32), [-1e30, -np.inf, 0.0, -88.5]])
    with mx.stream(mx.cpu):
        got = np.concatenate([np.array(exp(mx.array(x[i : i + 500_000])), dtype=np.float64)
                              for i in range(0, len(x), 500_000)])
    want = np.exp(x.astype(np.float64))
    normal = want > np.finfo(np.float32).tiny
    err = np.abs(got[normal] - want[normal]) / want[normal]
    assert err.max() < 5e-6 and err[x[normal] > -20].max() < 1.5e-6  # mx.exp: 3.9e-6, 1.0e-6
    assert np.all(got[~normal] <= np.finfo(np.float32).tiny) and got[-3] == 0.0
    assert got[-2] == 1.0


def test_exp_of_arrays_beyond_the_polynomials_size_is_mx_exp(monkeypatch):
    """Above ``EXP_ELEMENTS`` the CPU takes ``mx.exp`` (faster there); up to it the polynomial."""
    monkeypatch.setattr(softmax_module, "EXP_ELEMENTS", 1000)
    x = mx.array(np.linspace(-30, 0, 1001, dtype=np.float32))
    with mx.stream(mx.cpu):
        assert mx.array_equal(exp(x), mx.exp(x)).item()
        assert not mx.array_equal(exp(x[:1000]), mx.exp(x[:1000])).item()  # the polynomial rounds otherwise


def test_exp_keeps_nan_and_other_dtypes():
    with mx.stream(mx.cpu):
        assert np.isnan(np.array(exp(mx.array([np.nan, -1.0])))[0])
        h = exp(mx.array([-1.0, 0.0], mx.float16))
    assert h.dtype == mx.float16 and np.allclose(np.array(h), np.exp([-1.0, 0.0]), rtol=1e-3)


def test_softmax_rows_that_see_no_key_and_sinks():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(1, 2, 3, 7)).astype(np.float32) * 5
    s[0, 0, 1] = -np.inf  # a row that sees no key
    sinks = np.array([0.5, -2.0], np.float32)
    for with_sinks in (False, True):
        got = np.array(softmax(mx.array(s), mx.array(sinks) if with_sinks else None))
        x = s.astype(np.float64)
        m = np.max(x, axis=-1, keepdims=True)
        if with_sinks:
            m = np.maximum(m, sinks.reshape(1, -1, 1, 1))
        m = np.where(np.isfinite(m), m, 0.0)
        p = np.exp(x - m)
        l = p.sum(axis=-1, keepdims=True) + (np.exp(sinks.reshape(1, -1, 1, 1) - m) if with_sinks else 0)
        want = p / np.where(l > 0, l, 1.0)
        assert np.abs(got - want).max() < 1e-6
        assert np.all(got[0, 0, 1] == 0)


def test_exp_takes_the_shift_per_row():
    """``exp(x, m)`` is ``e**(x - m)`` with ``m`` broadcast over a row (softmax's maximum), the
    same as shifting first; a row of -inf stays 0."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 5, 40)).astype(np.float32) * 6
    x[0, 1, 2] = -np.inf
    m = np.where(np.isfinite(x.max(-1, keepdims=True)), x.max(-1, keepdims=True), 0.0).astype(np.float32)
    with mx.stream(mx.cpu):
        got = np.array(exp(mx.array(x), mx.array(m)), dtype=np.float64)
        assert mx.array_equal(exp(mx.array(x), mx.array(m)), exp(mx.array(x - m))).item()
    want = np.exp(x.astype(np.float64) - m)
    assert np.abs(got - want).max() < 5e-6 and np.all(got[0, 1, 2] == 0)
