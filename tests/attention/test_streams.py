"""attention/streams.py: a prefill chunk's tiles and a decode step's rows spread over CPU
streams give what one stream gives and what plain attention gives; OpenBLAS is on one thread
only meanwhile; no streams inside ``mx.compile``."""

import importlib

import numpy as np
import pytest

import mlx.core as mx

from mlx_kvq import QuantizedKVCache, _blas
from mlx_kvq.attention import dispatch, one_pass, reference, streams
from mlx_kvq.attention.reference import dense_attention
from mlx_kvq.kernels import cpu
from helpers import reference_over_cache, rel_err
from helpers import check, numpy_attention


@pytest.fixture(autouse=True)
def on_the_cpu(monkeypatch):
    """Streams on the CPU of Linux, 3 of them whatever the machine's cores; the streams each
    piece of work took recorded, with OpenBLAS's threads at that moment. The prefill's tiles
    are those of the MLX ops: the CPU body (``kernels.cpu``) off."""
    monkeypatch.setattr(cpu, "applies", lambda *a, **k: False)
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    monkeypatch.setattr(streams, "MAX_STREAMS", 3)
    monkeypatch.setattr(streams.sys, "platform", "linux")
    used = []
    real = streams.on

    def on(s, i):
        if s:
            used.append((s[i % len(s)], _blas._LIB.openblas_get_num_threads() if _blas._LIB else None))
        return real(s, i)

    for module in (reference, one_pass):
        monkeypatch.setattr(module, "on", on)
    yield used
    mx.set_default_device(previous)


def one_stream(monkeypatch):
    monkeypatch.setattr(streams, "MAX_STREAMS", 1)


@pytest.mark.parametrize("q_start,k_start,used", [(64, 0, 3), (10, 40, 1)])  # (10, 40): one tile sees keys
def test_prefill_tiles_on_streams_match_float64_and_one_stream(monkeypatch, on_the_cpu, q_start, k_start, used):
    monkeypatch.setattr(reference, "BLOCK_ELEMENTS", 1 << 10)
    monkeypatch.setattr(reference, "BLOCK_KEYS", 8)
    mx.random.seed(0)
    B, Hq, Hkv, L, n, D = 2, 6, 2, 37, 101, 16
    q, k, v = mx.random.normal((B, Hq, L, D)), mx.random.normal((B, Hkv, n, D)), mx.random.normal((B, Hkv, n, D))
    args = dict(scale=0.3, q_start=q_start, k_start=k_start, causal=True, mask=None)
    threads = _blas._LIB.openblas_get_num_threads() if _blas._LIB else None
    got = dense_attention(q, k, v, **args)
    assert len({s for s, _ in on_the_cpu}) == used  # the tiles went to 3 streams
    assert {t for _, t in on_the_cpu} == {1 if _blas._LIB else None}  # OpenBLAS on one thread meanwhile
    assert (_blas._LIB.openblas_get_num_threads() if _blas._LIB else None) == threads  # and as before after
    visible = np.arange(k_start, k_start + n)[None] <= np.arange(q_start, q_start + L)[:, None]
    check(got, numpy_attention(q, k, v, 0.3, visible))
    one_stream(monkeypatch)
    want = dense_attention(q, k, v, **args)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=0, atol=1e-6)


def test_no_streams_inside_compile(monkeypatch, on_the_cpu):
    monkeypatch.setattr(reference, "BLOCK_ELEMENTS", 1 << 10)
    monkeypatch.setattr(reference, "BLOCK_KEYS", 8)
    mx.random.seed(1)
    q, k = mx.random.normal((1, 4, 30, 16)), mx.random.normal((1, 2, 30, 16))
    f = lambda q, k: dense_attention(q, k, k, scale=0.25, q_start=0, k_start=0, causal=True, mask=None)[0]
    got = mx.compile(f)(q, k)
    assert not on_the_cpu
    visible = np.arange(30)[None] <= np.arange(30)[:, None]
    assert np.abs(np.array(got) - numpy_attention(q, k, k, 0.25, visible)[0]).max() < 2e-5


def _decode(B, config, seed=0, past=300):
    mx.random.seed(seed)
    cache = QuantizedKVCache(**config)
    cache.update_and_fetch(*(mx.random.normal((B, 2, past, 64)) for _ in range(2)))
    k = mx.random.normal((B, 2, 1, 64))
    view, _ = cache.update_and_fetch(k, k)
    return cache, view, mx.random.normal((B, 8, 1, 64))


@pytest.mark.parametrize("config", [dict(bits=4), dict(bits=2, group_size=32, sinks=4, window=16, rotate="kv")],
                         ids=str)
@pytest.mark.parametrize("B", [2, 5])
def test_decode_rows_on_streams_match_fp32_and_one_stream(monkeypatch, on_the_cpu, config, B):
    cache, view, q = _decode(B, config, seed=B)
    mask = mx.random.uniform(shape=(B, 1, 1, cache.offset)) > 0.3  # each row its own keys (as RowsBuffer's holes)
    got = dispatch.quantized_sdpa(q, view, scale=0.125, mask=mask)
    assert len({s for s, _ in on_the_cpu}) == min(B, 3)
    ref = reference_over_cache(cache, q, 0.125, mask)
    assert rel_err(got, ref) < 4e-3
    one_stream(monkeypatch)
    want = dispatch.quantized_sdpa(q, view, scale=0.125, mask=mask)
    assert rel_err(got, want) < 1e-5  # the same ops over fewer rows: BLAS may round them otherwise


def test_a_thread_after_another_gets_streams_of_its_own(on_the_cpu):
    """MLX 0.32's streams belong to the thread that made them ("There is no Stream(cpu, 3) in
    current thread" once another thread uses them): attention in the main thread, then in a
    worker thread (a server's generation thread after its warm-up, a web app's worker), then in
    the main thread again, each on streams of its own thread, each with the same output."""
    import threading

    cache, view, q = _decode(3, dict(bits=4), seed=4)  # a row a stream
    outs, errors = [], []

    def attend():
        try:
            outs.append(dispatch.quantized_sdpa(q, view, scale=0.125))
            mx.eval(outs[-1])
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)
        finally:
            if threading.current_thread() is not threading.main_thread():
                mx.clear_streams()

    attend()
    worker = threading.Thread(target=attend)
    worker.start()
    worker.join()
    attend()
    assert not errors, errors
    assert len({s for s, _ in on_the_cpu}) == 6  # the main thread's 3 streams, and the worker's
    assert all(mx.array_equal(o, outs[0]) for o in outs[1:])


def test_decode_one_row_takes_one_stream(on_the_cpu):
    cache, view, q = _decode(1, dict(bits=4))
    got = dispatch.quantized_sdpa(q, view, scale=0.125)
    assert not on_the_cpu
    assert rel_err(got, reference_over_cache(cache, q, 0.125)) < 4e-3


def test_at_most_most_streams_whatever_the_cores(monkeypatch):
    """MLX's CPU streams stop scaling at 3-4 (``cpu_streams_xeon.txt``): a 64-core machine
    takes ``MOST_STREAMS``, a 2-core one 2."""
    for cores, want in ((64, streams.MOST_STREAMS), (2, 2), (1, 1)):
        monkeypatch.setattr(streams.os, "sched_getaffinity", lambda _: set(range(cores)))
        fresh = importlib.reload(streams)
        assert fresh.MAX_STREAMS == want
        got = fresh.streams_for(16, mx.zeros(1))
        assert (len(got) if got else 1) == want
    monkeypatch.undo()
    importlib.reload(streams)


@pytest.mark.parametrize("caller", ["blocked attention", "key planes"])
def test_keep_cpu_buffers_raises_only_mlxs_default_limit(monkeypatch, caller):
    """MLX's CPU-only build: its buffer cache's default limit goes up to ``CPU_CACHE_BYTES``
    at the first blocked attention or decode over key planes; a limit the user set stays.
    GPU builds keep theirs."""
    before = mx.set_cache_limit(streams.MLX_CPU_CACHE_BYTES)
    monkeypatch.setattr(streams, "_cache_checked", [])
    cpu_only = not (mx.metal.is_available() or mx.cuda.is_available())
    try:
        if caller == "blocked attention":
            mx.eval(dense_attention(mx.ones((1, 1, 4, 8)), mx.ones((1, 1, 4, 8)), mx.ones((1, 1, 4, 8)),
                                    scale=1.0, q_start=0, k_start=0, causal=True, mask=None))
        else:
            _, view, q = _decode(1, dict(bits=4), past=one_pass.UNPACK_MIN_KEYS + 64)
            mx.eval(one_pass.one_pass_attention(q, view, 0.125, None, None, q.dtype))
        raised = streams.CPU_CACHE_BYTES if cpu_only else streams.MLX_CPU_CACHE_BYTES
        assert mx.set_cache_limit(100 << 20) == raised
        streams.keep_cpu_buffers()
        assert mx.set_cache_limit(before) == 100 << 20
    finally:
        mx.set_cache_limit(before)
