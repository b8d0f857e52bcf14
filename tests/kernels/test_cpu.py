"""kernels/cpu.py: the CPU body of the prefill attention against float64 attention in NumPy
(GQA, head dims that are not a multiple of the vector width, chunks and runs that are not a
multiple of its blocks, queries that see no key, strided and float16 inputs, scores far from
0), the same on one thread as on several, through the cache against the MLX ops' path, and
its fallbacks (inside ``mx.compile``, no compiler)."""

import warnings

import numpy as np
import pytest

import mlx.core as mx

from mlx_kvq import QuantizedKVCache, format
from mlx_kvq.attention import quantized_sdpa
from mlx_kvq.attention.reference import dense_attention
from mlx_kvq.cache.view import KVFormat
from mlx_kvq.kernels import cpu

from helpers import check, numpy_attention

pytestmark = [pytest.mark.skipif(cpu.library() is None, reason="the CPU body is built on Linux with a C++ compiler"),
              pytest.mark.usefixtures("on_the_cpu_device")]


def visible(L, n, q_start, k_start, causal):
    if not causal:
        return np.ones((L, n), bool)
    return np.arange(k_start, k_start + n)[None] <= np.arange(q_start, q_start + L)[:, None]


@pytest.mark.parametrize("B,Hq,Hkv,L,n,D,Dv,q_start,k_start,causal", [
    (1, 9, 3, 300, 300, 64, 64, 0, 0, True),      # a first chunk, SmolLM2's heads
    (2, 6, 2, 37, 101, 16, 16, 64, 0, True),      # a later chunk over keys before it
    (2, 6, 2, 37, 101, 80, 48, 90, 30, True),     # head dims off the vector width, Dv != D
    (1, 4, 4, 70, 40, 128, 128, 10, 40, True),    # the first queries see no key
    (1, 2, 1, 130, 257, 8, 8, 0, 0, False),       # not causal, runs off the block sizes
    (3, 8, 2, 1, 333, 64, 64, 332, 0, True),      # one query (a decode step)
])
def test_matches_float64(B, Hq, Hkv, L, n, D, Dv, q_start, k_start, causal):
    mx.random.seed(L + n)
    q, k, v = mx.random.normal((B, Hq, L, D)), mx.random.normal((B, Hkv, n, D)), mx.random.normal((B, Hkv, n, Dv))
    got = cpu.attention(q, [cpu.dense(k, v, k_start)], scale=D**-0.5, q_start=q_start, causal=causal, threads=2)
    check(got, numpy_attention(q, k, v, D**-0.5, visible(L, n, q_start, k_start, causal)))


def test_strided_and_float16_inputs():
    """Queries transposed from (B, L, H, D), keys and values a slice of a longer run, in float16:
    read in place, as float32 copies of them give."""
    mx.random.seed(1)
    q = mx.random.normal((2, 50, 6, 32)).astype(mx.float16).transpose(0, 2, 1, 3)
    k, v = (mx.random.normal((2, 3, 90, 32)).astype(mx.float16)[:, :, 7:77] for _ in range(2))
    got = cpu.attention(q, [cpu.dense(k, v, 20)], scale=0.2, q_start=40, causal=True, threads=2)
    check(got, numpy_attention(q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), 0.2,
                               visible(50, 70, 40, 20, True)))


def test_large_scores_stay_finite():
    """Scores in the thousands (keys x 300): the online softmax shifts each block by its row
    maximum; the output matches float64 with no NaN or inf."""
    mx.random.seed(2)
    q, k, v = mx.random.normal((1, 2, 90, 64)), mx.random.normal((1, 2, 200, 64)) * 300, mx.random.normal((1, 2, 200, 64))
    out, lse = cpu.attention(q, [cpu.dense(k, v, 0)], scale=0.125, q_start=110, causal=True, threads=2)
    assert np.isfinite(np.array(out)).all() and np.isfinite(np.array(lse)).all()
    check((out, lse), numpy_attention(q, k, v, 0.125, visible(90, 200, 110, 0, True)), tol=1e-3)


def test_one_thread_gives_what_several_give():
    """A work item (a KV head's block of queries) is one thread's: the same bits on any count."""
    mx.random.seed(3)
    q, k, v = mx.random.normal((1, 6, 200, 64)), mx.random.normal((1, 2, 200, 64)), mx.random.normal((1, 2, 200, 64))
    args = dict(scale=0.125, q_start=0, causal=True)
    runs = [cpu.dense(k, v, 0)]
    one, four = cpu.attention(q, runs, threads=1, **args), cpu.attention(q, runs, threads=4, **args)
    assert all(mx.array_equal(a, b).item() for a, b in zip(one, four))


def test_a_prefill_chunk_through_the_cache_matches_the_mlx_ops(monkeypatch):
    """A 4-bit cache's second prefill chunk (packed keys before it, its own after): the CPU
    body gives what the MLX ops' blocked path gives over the same dequantized keys."""
    mx.random.seed(4)
    cache = QuantizedKVCache(bits=4)
    for L in (96, 80):
        k, v = mx.random.normal((1, 2, L, 64)), mx.random.normal((1, 2, L, 64))
        view, _ = cache.update_and_fetch(k, v)
    q = mx.random.normal((1, 6, 80, 64))
    got = quantized_sdpa(q, view, 0.125, mask="causal")
    monkeypatch.setattr(cpu, "applies", lambda *a, **kw: False)
    want = quantized_sdpa(q, view, 0.125, mask="causal")
    assert np.abs(np.array(got) - np.array(want)).max() < 2e-5


def test_inside_compile_it_steps_aside():
    """Nothing can be evaluated inside ``mx.compile``: the body returns None and the attention
    takes the MLX ops."""
    mx.random.seed(5)
    q, k, v = mx.random.normal((1, 2, 20, 16)), mx.random.normal((1, 2, 20, 16)), mx.random.normal((1, 2, 20, 16))
    args = dict(scale=0.25, q_start=0, causal=True)
    seen = []
    f = mx.compile(lambda q, k, v: (seen.append(cpu.attention(q, [cpu.dense(k, v, 0)], threads=2, **args)),
                                    dense_attention(q, k, v, mask=None, k_start=0, **args)[0])[1])
    check((f(q, k, v), mx.zeros((1, 2, 20))), (numpy_attention(q, k, v, 0.25, visible(20, 20, 0, 0, True))[0],
                                               np.zeros((1, 2, 20))))
    assert seen == [None]


def test_without_a_compiler_it_warns_once_and_the_mlx_ops_serve(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("MLX_KVQ_HOME", str(tmp_path))
    monkeypatch.setattr(cpu.shutil, "which", lambda name: None)
    cpu.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
            assert not cpu.applies()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not cpu.applies()
        mx.random.seed(6)
        q, k, v = mx.random.normal((1, 2, 20, 16)), mx.random.normal((1, 2, 20, 16)), mx.random.normal((1, 2, 20, 16))
        got = dense_attention(q, k, v, scale=0.25, q_start=0, k_start=0, causal=True, mask=None)
        check(got, numpy_attention(q, k, v, 0.25, visible(20, 20, 0, 0, True)))
    finally:
        cpu.library.cache_clear()


def test_built_once_per_source_into_mlx_kvq_home(monkeypatch, tmp_path):
    """The library lands in ``$MLX_KVQ_HOME/cpu``; a second load finds it there, not rebuilt."""
    monkeypatch.setenv("MLX_KVQ_HOME", str(tmp_path))
    cpu.library.cache_clear()
    try:
        assert cpu.library() is not None
        built = list((tmp_path / "cpu").glob("attention-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        cpu.library.cache_clear()
        assert cpu.library() is not None and built[0].stat().st_mtime_ns == stamp
    finally:
        cpu.library.cache_clear()


def test_a_nan_query_gives_its_own_rows_nan():
    """NaN stays NaN (as the MLX ops give it) in the rows it reaches, and no further."""
    mx.random.seed(7)
    q, k, v = mx.random.normal((1, 2, 40, 16)), mx.random.normal((1, 1, 40, 16)), mx.random.normal((1, 1, 40, 16))
    q = mx.where((mx.arange(40) == 17)[None, None, :, None], mx.nan, q)
    out, _ = cpu.attention(q, [cpu.dense(k, v, 0)], scale=0.25, q_start=0, causal=True, threads=2)
    bad = np.isnan(np.array(out)).any(axis=-1)
    assert bad[:, :, 17].all() and bad.sum() == 2


def packed_run(x, bits, group):
    """``x`` (float16) packed as the cache packs it, and its float32 dequantized values."""
    p = format.quantize(x, bits, group)
    return p, format.dequantize(p, bits, group, "affine", mx.float32)


@pytest.mark.parametrize("k_bits,v_bits,group", [(4, 4, 64), (4, 4, 32), (2, 2, 32), (8, 8, 64), (8, 4, 32)])
def test_packed_runs_match_float64(k_bits, v_bits, group):
    """The codes read in place (words, float16 scales and biases, a run longer than ``n``):
    what float64 attention over the dequantized keys gives."""
    mx.random.seed(k_bits * 10 + group)
    B, Hq, Hkv, L, D = 2, 6, 2, 45, 64
    k, v = (mx.random.normal((B, Hkv, 140, D)).astype(mx.float16) for _ in range(2))
    (pk, kd), (pv, vd) = packed_run(k, k_bits, group), packed_run(v, v_bits, group)
    fmt = KVFormat(k_bits, v_bits, group, "affine", None)
    q = mx.random.normal((B, Hq, L, D))
    n = 120  # of the 140 tokens the buffers hold
    got = cpu.attention(q, [cpu.packed(pk, pv, n, fmt, 10)], scale=0.125, q_start=85, causal=True, threads=2)
    check(got, numpy_attention(q, kd[:, :, :n], vd[:, :, :n], 0.125, visible(L, n, 85, 10, True)))


def test_a_decode_step_over_sinks_packed_and_window_with_a_mask_and_sink_logits():
    """Three runs in one softmax (sinks at 0..3, the packed run, the window after it), a bool
    mask per row (rows in one buffer hide each other's keys) and attention-sink logits: the
    output of float64 softmax over the columns in that order, the logits in each denominator."""
    mx.random.seed(9)
    B, Hq, Hkv, D, s, n, w = 3, 8, 2, 32, 4, 150, 20
    q = mx.random.normal((B, Hq, 1, D))
    sk, sv, wk, wv = (mx.random.normal((B, Hkv, m, D)) for m in (s, s, w, w))
    (pk, kd), (pv, vd) = (packed_run(mx.random.normal((B, Hkv, n, D)).astype(mx.float16), 4, 32) for _ in range(2))
    fmt = KVFormat(4, 4, 32, "affine", None)
    total = s + n + w
    keep = mx.random.uniform(shape=(B, 1, 1, total)) > 0.3
    logits = mx.random.normal((Hq,))
    runs = [cpu.dense(sk, sv, 0, 0), cpu.packed(pk, pv, n, fmt, s, s), cpu.dense(wk, wv, s + n, s + n)]
    out, _ = cpu.attention(q, runs, scale=0.2, q_start=total - 1, causal=True, threads=2, mask=keep, sinks=logits)
    K = np.concatenate([np.array(x, np.float64) for x in (sk, kd, wk)], axis=2).repeat(Hq // Hkv, axis=1)
    V = np.concatenate([np.array(x, np.float64) for x in (sv, vd, wv)], axis=2).repeat(Hq // Hkv, axis=1)
    scores = np.where(np.array(keep), np.einsum("bhld,bhnd->bhln", np.array(q, np.float64) * 0.2, K), -np.inf)
    top = np.maximum(scores.max(-1, keepdims=True), np.array(logits, np.float64)[None, :, None, None])
    p = np.exp(scores - top)
    want = (p @ V) / (p.sum(-1, keepdims=True) + np.exp(np.array(logits, np.float64)[None, :, None, None] - top))
    assert np.abs(np.array(out) - want).max() < 2e-5


def test_an_additive_mask_broadcast_over_heads():
    """A float mask (B, 1, L, n) adds to each head's scores, as in float64."""
    mx.random.seed(10)
    q, k, v = mx.random.normal((2, 4, 30, 16)), mx.random.normal((2, 2, 50, 16)), mx.random.normal((2, 2, 50, 16))
    bias = mx.random.normal((2, 1, 30, 50)) * 2
    out, lse = cpu.attention(q, [cpu.dense(k, v, 0)], scale=0.25, q_start=0, causal=False, threads=2, mask=bias)
    K, V = (np.array(x, np.float64).repeat(2, axis=1) for x in (k, v))
    sc = np.einsum("bhld,bhnd->bhln", np.array(q, np.float64) * 0.25, K) + np.array(bias, np.float64)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    assert np.abs(np.array(out) - (p @ V) / p.sum(-1, keepdims=True)).max() < 2e-5


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_a_decode_step_on_more_cores_than_heads_splits_its_keys(threads):
    """One row, one KV head: the keys' blocks split over the threads (every nsplit-th block) and
    the splits merged give float64 attention, also where the mask hides whole splits."""
    mx.random.seed(11)
    q, k, v = mx.random.normal((1, 4, 1, 64)), mx.random.normal((1, 1, 700, 64)), mx.random.normal((1, 1, 700, 64))
    keep = mx.arange(700) < 150  # only the first blocks are seen
    for mask, seen in ((None, np.ones((1, 700), bool)), (keep, np.array(keep)[None])):
        got = cpu.attention(q, [cpu.dense(k, v, 0)], scale=0.125, q_start=699, causal=True, threads=threads, mask=mask)
        check(got, numpy_attention(q, k, v, 0.125, seen))
