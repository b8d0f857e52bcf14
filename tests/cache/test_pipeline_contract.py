"""mlx-lm's pipeline contract, without processes: a sending rank runs
``cache[-1].keys = mx.depends(cache[-1].keys, h)`` after its layers, and evaluating the
caches' state (all a prefill step evaluates) must then evaluate ``h`` (its send)."""

import io

import mlx.core as mx
import pytest

from mlx_kvq.cache import QuantizedKVCache, QuantizedRotatingKVCache, RowsKVCache


def graph(arrays):
    f = io.StringIO()
    mx.export_to_dot(f, *arrays)
    return f.getvalue()


def state_arrays(cache):
    """The arrays of ``cache.state`` (a batch of rows: of every row's)."""
    def arrays(x):
        if isinstance(x, mx.array):
            return [x]
        return [a for y in x for a in arrays(y)] if isinstance(x, (tuple, list)) else []

    return arrays(cache.state)


def fill(cache, n, seed=0, rows=1):
    k = mx.random.normal((rows, 2, n, 64), key=mx.random.key(seed))
    v = mx.random.normal((rows, 2, n, 64), key=mx.random.key(seed + 1))
    cache.update_and_fetch(k, v)
    mx.eval(state_arrays(cache))
    return cache


CACHES = {
    "plain": lambda: QuantizedKVCache(4),
    "rotating": lambda: QuantizedRotatingKVCache(4, max_size=48, keep=4),
    # the server's continuous batch: the rows are the single-row caches (in decode: in one buffer)
    "rows": lambda: RowsKVCache.merge([fill(QuantizedKVCache(4), 40, s) for s in (1, 3)]),
}


@pytest.mark.parametrize("kind", CACHES)
@pytest.mark.parametrize("tokens", [40, 1, 3])  # a prefill chunk; a first token that the sinks hold
def test_state_depends_on_what_keys_is_assigned(kind, tokens):
    cache = CACHES[kind]()
    if kind != "rows":
        fill(cache, tokens)
    for step in range(3):  # the first forward pass on, prefill and decode steps
        if step:
            fill(cache, 1, seed=10 + step, rows=2 if kind == "rows" else 1)
        keys = cache.keys
        assert isinstance(keys, mx.array)
        h = mx.erf(mx.arange(4.0))  # stands for the sent hidden state: Erf is nowhere else
        cache.keys = mx.depends(keys, h)
        assert "Erf" in graph(state_arrays(cache))
        mx.eval(state_arrays(cache))
        if kind == "rows" and step:  # decode steps: the rows stay in their buffer
            assert cache._buffer is not None


def test_the_tokens_and_the_saved_state_are_unchanged():
    a, b = fill(QuantizedKVCache(4), 50), fill(QuantizedKVCache(4), 50)
    b.keys = mx.depends(b.keys, mx.erf(mx.arange(4.0)))
    for x, y in zip(state_arrays(a), state_arrays(b)):
        assert mx.array_equal(x, y).item()
    assert a.state[:3] == b.state[:3] and a.nbytes == b.nbytes


def test_every_row_of_a_batch_depends_on_what_keys_is_assigned():
    """Evaluating any one row's state (mlx-lm's prompt cache extracts rows) sends ``h``;
    an empty batch has no array to depend on, as an empty single cache."""
    cache = RowsKVCache.merge([fill(QuantizedKVCache(4), 8, s) for s in (1, 3)])
    cache.keys = mx.depends(cache.keys, mx.erf(mx.arange(4.0)))
    for row in cache.rows:
        assert "Erf" in graph(state_arrays(row))
    fill(cache, 1, seed=7, rows=2)  # a decode step: the rows go into one buffer
    cache.keys = mx.depends(cache.keys, mx.erf(mx.arange(5.0)))
    assert cache._buffer is not None and "Erf" in graph(state_arrays(cache))
    row = cache._buffer.row(0)  # a row taken out before the state is evaluated
    assert "Erf" in graph(state_arrays(row))
    empty = RowsKVCache([QuantizedKVCache(4), QuantizedKVCache(4)])
    assert empty.keys is None
    with pytest.raises(ValueError, match="empty batch cache"):
        empty.keys = mx.zeros((1,))


def test_keys_of_an_empty_cache_and_bad_values():
    c = QuantizedKVCache(4)
    assert c.keys is None  # as mlx-lm's KVCache before its first update
    with pytest.raises(ValueError, match="update it first"):
        c.keys = mx.zeros((1,))
    fill(c, 8)
    with pytest.raises(ValueError, match="got tuple"):
        c.keys = (mx.zeros((1,)),)
