"""RowsBuffer: a RowsKVCache's rows in one buffer in decode steps, each row packing on its
own schedule: every row's visible keys are the ones its cache alone holds, in the same order,
and requests batch as alone (float16 models: a float32 model's rows stay apart)."""

import os

import mlx.core as mx
import numpy as np
import pytest
from test_rows_cache import assert_as_alone, batch_as_alone, joining_and_leaving, prompt, tiny_model

from mlx_kvq.bridge import serve_caches
from mlx_kvq.cache import QuantizedKVCache, RowsBuffer, RowsKVCache, with_holes
from mlx_kvq.cache.quantized import causal_mask


def kv(n, seed, H=2, D=64):
    k = mx.random.normal((1, H, n, D), key=mx.random.key(seed)).astype(mx.float16)
    return k, (k * 0.5 + 1).astype(mx.float16)


def stacked(step):
    """Each row's ``(keys, values)`` of one step as the batch's."""
    return tuple(mx.concatenate([s[i] for s in step]) for i in (0, 1))


def visible(view, part, b, mask):
    """Row ``b``'s keys (or values) the mask shows, in column order (numpy)."""
    x = (view if part == "keys" else view.values_view()).array
    return np.array(x[b].astype(mx.float32))[:, np.array(mask[b, 0, 0])]


def rows_and_alone(lengths, **config):
    rows, ref = [], []
    for i, n in enumerate(lengths):
        for out in (rows, ref):
            c = QuantizedKVCache(**config)
            c.update_and_fetch(*kv(n, i))
            out.append(c)
    return RowsKVCache.merge(rows), ref


CONFIGS = [dict(bits=4), dict(bits=2, window=16), dict(bits=4, sinks=0, start=60), dict(bits=8, rotate=False),
           dict(bits=4, window=0)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_each_row_sees_what_its_cache_alone_holds(config):
    """40 decode steps (a flush block and more; rows whose windows pack on different steps):
    at each step, each row's keys and values that the step's mask shows are exactly the
    ones its cache alone returns, in the same order; the mask ``make_mask`` gives is the
    view's; the rows taken out (``extract``) hold the same state as alone."""
    rows, ref = rows_and_alone([45, 9, 70], **config)
    ref[1].update_and_fetch(*kv(1, 99))  # row 1 packs one step later than the others
    rows.rows[1].update_and_fetch(*kv(1, 99))
    for t in range(40):
        mask = rows.make_mask(1)
        step = [kv(1, 1000 + 10 * t + b) for b in range(3)]
        view, values = rows.update_and_fetch(*stacked(step))
        assert rows._buffer is not None and view.holes is mask
        for b, (c, s) in enumerate(zip(ref, step)):
            alone_view, _ = c.update_and_fetch(*s)
            for part in ("keys", "values"):
                want = np.array((alone_view if part == "keys" else alone_view.values_view()).array[0].astype(mx.float32))
                np.testing.assert_array_equal(visible(view, part, b, mask), want)
        assert rows.offset.tolist() == [c.offset for c in ref]
    assert rows._buffer.n != [rows._buffer.n[0]] * 3 or rows._buffer.w != [rows._buffer.w[0]] * 3
    assert rows.used_nbytes() == sum(c.used_nbytes() for c in ref) < rows.nbytes
    for b, c in enumerate(ref):
        got = rows.extract(b)
        assert (got.offset, got.n_packed, got._steps, got._log) == (c.offset, c.n_packed, c._steps, c._log)
        for a, e in zip(got.state[3:], c.state[3:]):
            a, e = (a, e) if isinstance(a, tuple) else ((a,), (e,))
            assert all(x is y is None or mx.array_equal(x, y) for x, y in zip(a, e))


def test_rows_leave_and_join_the_buffer():
    """``filter`` keeps the buffer (its rows' keys as before); ``extend`` joins the newcomer
    into it."""
    rows, ref = rows_and_alone([40, 50, 60], bits=4)
    for t in range(3):
        step = [kv(1, 50 + 10 * t + b) for b in range(3)]
        rows.update_and_fetch(*stacked(step))
        for c, s in zip(ref, step):
            c.update_and_fetch(*s)
    rows.filter([2, 0])
    assert rows._buffer is not None and len(rows) == 2
    new, new_ref = rows_and_alone([30], bits=4)
    new._rows[0].update_and_fetch(*kv(1, 7))
    new_ref[0].update_and_fetch(*kv(1, 7))
    buffer = rows._buffer
    rows.extend(new)
    assert rows._buffer is buffer and len(buffer) == 3
    ref = [ref[2], ref[0], new_ref[0]]
    mask = rows.make_mask(1)
    step = [kv(1, 300 + b) for b in range(3)]
    view, _ = rows.update_and_fetch(*stacked(step))
    assert rows._buffer is not None and rows.offset.tolist() == [c.offset + 1 for c in ref]
    for b, (c, s) in enumerate(zip(ref, step)):
        want = np.array(c.update_and_fetch(*s)[0].array[0].astype(mx.float32))
        np.testing.assert_array_equal(visible(view, "keys", b, mask), want)


def decode(rows, ref, steps, seed):
    """``steps`` decode steps of the batch ``rows`` and of each row's cache alone (``ref``):
    at each, each row's keys and values the mask shows equal its cache's alone."""
    for t in range(steps):
        mask = rows.make_mask(1)
        step = [kv(1, seed + 10 * t + b) for b in range(len(ref))]
        view, _ = rows.update_and_fetch(*stacked(step))
        for b, (c, s) in enumerate(zip(ref, step)):
            alone, _ = c.update_and_fetch(*s)
            for part in ("keys", "values"):
                want = np.array((alone if part == "keys" else alone.values_view()).array[0].astype(mx.float32))
                np.testing.assert_array_equal(visible(view, part, b, mask), want)


@pytest.mark.parametrize("config", [dict(bits=4), dict(bits=2, window=16), dict(bits=4, window=0)],
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_requests_join_the_buffer_directly(config):
    """``extend`` puts newcomers into the running buffer without taking its rows out: a
    request just prefilled, then two that decoded in a buffer of their own (another window
    column, another packed capacity, one whose window ends later than the batch's); every
    row's keys and values stay its cache's alone through 40 steps."""
    rows, ref = rows_and_alone([45, 70], **config)
    decode(rows, ref, 5, 1000)
    buffer = rows._buffer
    new, new_ref = rows_and_alone([9], **config)
    rows.extend(new)
    assert rows._buffer is buffer and len(buffer) == 3
    ref += new_ref
    decode(rows, ref, 7, 2000)
    new, new_ref = rows_and_alone([150, 30], **config)
    decode(new, new_ref, 20, 3000)
    assert new._buffer.cache._wn != buffer.cache._wn
    rows.extend(new)
    assert rows._buffer is buffer and len(buffer) == 5
    ref += new_ref
    decode(rows, ref, 40, 4000)
    assert [c.offset for c in ref] == rows.offset.tolist()
    for b, c in enumerate(ref):
        got = rows.extract(b)
        assert (got.offset, got.n_packed, got._steps, got._log) == (c.offset, c.n_packed, c._steps, c._log)


def test_a_newcomer_that_cannot_share_the_buffer_takes_the_rows_apart(monkeypatch):
    """A join beyond ``spread`` (1.0: the server's under ``--max-kv-memory``) or of another
    config leaves every row apart, each as its cache alone."""
    monkeypatch.setattr(RowsBuffer, "spread", 1.0)
    rows, ref = rows_and_alone([1000, 1010], bits=4)
    decode(rows, ref, 2, 1000)
    new, new_ref = rows_and_alone([10], bits=4)
    rows.extend(new)
    assert rows._buffer is None and len(rows.rows) == 3
    decode(rows, ref + new_ref, 2, 2000)
    other, other_ref = rows_and_alone([320], bits=8)
    rows.extend(other)
    assert rows._buffer is None and len(rows) == 4
    decode(rows, ref + new_ref + other_ref, 2, 3000)


def test_a_chunk_after_decode_steps_takes_the_rows_apart():
    """Updates of more than one token per row after decode steps (a chunk, speculative
    tokens) go row by row, each as its cache alone takes them."""
    rows, ref = rows_and_alone([40, 50], bits=4)
    decode(rows, ref, 3, 1000)
    assert rows._buffer is not None
    chunk = [kv(5, 77 + b) for b in range(2)]
    view, _ = rows.update_and_fetch(*stacked(chunk))
    assert rows._buffer is None
    for b, (c, s) in enumerate(zip(ref, chunk)):
        want = np.array(c.update_and_fetch(*s)[0].array[0].astype(mx.float32))
        got = np.array(view.views[b].array[0].astype(mx.float32))
        np.testing.assert_array_equal(got, want)


def test_sliding_window_mask_is_each_rows_own():
    """``make_mask(1, window_size=w)`` shows each row the keys its cache alone shows."""
    rows, ref = rows_and_alone([45, 9, 70], bits=4)
    for t in range(5):
        mask = rows.make_mask(1, window_size=20)
        step = [kv(1, 70 + 10 * t + b) for b in range(3)]
        rows.update_and_fetch(*stacked(step))
        holes = rows._buffer.view()[0].holes
        for b, (c, s) in enumerate(zip(ref, step)):
            want = causal_mask(1, c.offset, 20)[0]  # over the row's own keys, in order
            c.update_and_fetch(*s)
            assert np.array(mask[b, 0, 0])[np.array(holes[b, 0, 0])].tolist() == want.tolist()


def test_other_masks_get_the_holes():
    rows, _ = rows_and_alone([20, 40], bits=4)
    rows.update_and_fetch(*stacked([kv(1, b) for b in range(2)]))
    view, _ = rows._buffer.view()
    h = view.holes
    assert with_holes(None, view) is h and with_holes("causal", view) is h and with_holes(h, view) is h
    ones = mx.ones(h.shape, mx.bool_)
    assert mx.array_equal(with_holes(ones, view), h)
    additive = with_holes(mx.zeros(h.shape, mx.float16), view)
    assert mx.array_equal(additive == 0, h) and bool(mx.all(mx.isfinite(additive)))


def test_rows_that_cannot_share_stay_apart():
    """Float32 rows whose scales widened and rows whose did not (or would on the next step),
    unequal lengths, rows that hold no more than their sinks."""
    f32 = [QuantizedKVCache(bits=4) for _ in range(2)]
    for i, c in enumerate(f32):
        c.update_and_fetch(*(x.astype(mx.float32) * (1e5 if i else 1) for x in kv(40, i)))
        c.update_and_fetch(*(x.astype(mx.float32) for x in kv(1, i)))
    assert [c._wide for c in f32] == [False, True] and RowsBuffer.gather(f32) is None
    fresh = [QuantizedKVCache(bits=4) for _ in range(2)]  # row 1's first step would widen its scales
    for i, c in enumerate(fresh):
        c.update_and_fetch(*(x.astype(mx.float32) * (1e5 if i else 1) for x in kv(40, i)))
    assert RowsBuffer.gather(fresh) is None and RowsBuffer.gather(fresh[:1] * 2) is not None
    long_short, _ = rows_and_alone([3000, 40], bits=4)
    assert RowsBuffer.gather(long_short.rows) is None
    for short in (2, 4):  # fewer tokens than the sinks asked for, or only those
        few, _ = rows_and_alone([short, 40], bits=4, sinks=4)
        assert RowsBuffer.gather(few.rows) is None
    ok, _ = rows_and_alone([300, 200], bits=4)
    assert RowsBuffer.gather(ok.rows) is not None


def test_spread_bounds_what_a_buffer_holds(monkeypatch):
    """Rows of 1000 and 400 tokens share a buffer holding 2x their 1400 tokens' packed run at
    the default spread (1.5x and a step of 256 each) but not at 1.0 (a server's KV budget)."""
    rows, _ = rows_and_alone([1000, 400], bits=4)
    assert RowsBuffer.gather(rows.rows) is not None
    monkeypatch.setattr(RowsBuffer, "spread", 1.0)
    rows, _ = rows_and_alone([1000, 400], bits=4)
    assert RowsBuffer.gather(rows.rows) is None


KV = {
    "4bit": dict(kv_bits=4),
    "2bit-window16": dict(kv_bits=2, window=16),
    "4bit-start40": dict(kv_bits=4, quantized_kv_start=40, sinks=0),
}


@pytest.fixture
def buffer_steps(monkeypatch):
    """The rows in each ``RowsBuffer.step`` of the test, one entry per step and layer."""
    steps = []
    step = RowsBuffer.step
    monkeypatch.setattr(RowsBuffer, "step", lambda self, k, v: steps.append(len(self)) or step(self, k, v))
    return steps


@pytest.mark.parametrize("kv_", KV.values(), ids=KV.keys())
def test_requests_joining_and_leaving_a_buffer_match_alone(kv_, buffer_steps):
    """mlx-lm's BatchGenerator with a float16 model: the rows decode in one buffer, requests
    join and leave it, and every request's greedy tokens equal its run alone."""
    steps = buffer_steps
    m = tiny_model()
    m.set_dtype(mx.float16)
    model = serve_caches(m, **kv_)
    n_new, chunk = QuantizedKVCache.flush_block + 10, 16
    prompts = [prompt(n, s) for s, n in enumerate([45, 9, 70, 33, 52])]
    _, got = joining_and_leaving(model, prompts, n_new, chunk)
    assert max(steps) >= 3 and len(steps) > 40
    for toks, p in zip(got, prompts):
        if toks is not None:
            assert_as_alone(toks, model, p, n_new, kv_, chunk)


@pytest.mark.parametrize("name", ["deepseek_v2", "minicpm3", "phi", "stablelm", "gemma3n"])
def test_models_that_compute_with_what_they_fetch_in_one_buffer(name, buffer_steps):
    """MLA (key and value head dims that differ), casts, another layer's cache: the rows'
    arrays include the buffer's holes, which the step's mask hides."""
    batch_as_alone(name, mx.float16)
    assert buffer_steps


def test_float32_rows_widen_together():
    """A float32 model's row packs a token past float16's range: the buffer's scales widen
    for every row; that row's keys equal its run alone (where BLAS rounds batches as single
    rows: with OpenBLAS's FMA kernels on an AMD EPYC they differ as the others'), the others'
    differ from theirs only where a value rounds to the next level, and nothing is non-finite."""
    rows, ref = [], []
    for i, n in enumerate([40, 50]):
        for out in (rows, ref):
            c = QuantizedKVCache(bits=4)
            c.update_and_fetch(*(x.astype(mx.float32) for x in kv(n, i)))
            out.append(c)
    rows = RowsKVCache.merge(rows)
    for t in range(40):
        step = [tuple(x.astype(mx.float32) * (1e5 if (t, b) == (0, 0) else 1) for x in kv(1, 500 + 10 * t + b))
                for b in range(2)]
        mask = rows.make_mask(1)
        view, _ = rows.update_and_fetch(*stacked(step))
        alone_views = [c.update_and_fetch(*s)[0] for c, s in zip(ref, step)]
    assert rows._buffer.cache._wide and [c._wide for c in ref] == [True, False]
    for b, a in enumerate(alone_views):
        want = np.array(a.array[0])
        got = visible(view, "keys", b, mask)
        assert np.isfinite(got).all()
        if b == 0 and os.environ.get("OPENBLAS_CORETYPE") == "Sandybridge":
            np.testing.assert_array_equal(got, want)
        else:  # a value at a rounding boundary may take the next level: one 4-bit step at most
            diff = np.abs(got - want)
            assert diff.max() < 0.5 and diff.mean() < 1e-3, (diff.max(), diff.mean())
