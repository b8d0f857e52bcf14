"""Exact trim: back to where the cache stood after one of its updates since the last that
packed tokens, a trimmed cache holds bit for bit what it held then, pack schedule
included, so replaying the same updates gives bit for bit the same attention outputs."""

import mlx.core as mx
import mlx_lm.models.cache as lm_cache
import pytest

from mlx_kvq import QuantizedKVCache, quantized_sdpa
from mlx_kvq.cache import QuantizedRotatingKVCache

D = 64


def updates(sizes, seed=0):
    mx.random.seed(seed)
    return [(mx.random.normal((1, 2, L, D)).astype(mx.float16), mx.random.normal((1, 2, L, D)).astype(mx.float16),
             mx.random.normal((1, 4, L, D)).astype(mx.float16)) for L in sizes]


def step(cache, k, v, q):
    view, _ = cache.update_and_fetch(k, v)
    return quantized_sdpa(q, view, D**-0.5, mask="causal" if q.shape[2] > 1 else None)


def snapshot(cache):
    """Everything that decides what the cache does next."""
    arrays = [a for x in cache.state[3:] for a in (x if isinstance(x, tuple) else (x,))
              if a is not None and a.size]  # an empty run is as good as none
    mx.eval(arrays)
    return (cache.offset, cache.n_packed, cache._steps, [(a.shape, a.dtype) for a in arrays], arrays)


def same(a, b):
    return a[:4] == b[:4] and all(mx.array_equal(x, y).item() for x, y in zip(a[4], b[4]))


CASES = [
    (QuantizedKVCache, dict(bits=4, window=8, sinks=2), [20] + [1] * 40),
    (QuantizedKVCache, dict(bits=3, window=4, sinks=0, rotate="kv"), [20, 1, 1, 8, 1, 17, 1, 1, 1]),
    (QuantizedKVCache, dict(bits=4, window=40, sinks=4), [1] * 50),
    (QuantizedRotatingKVCache, dict(bits=4, window=8, max_size=200, keep=2), [30] + [1] * 37),
]


@pytest.mark.parametrize("cls,config,sizes", CASES, ids=["decode", "mixed", "window", "rotating"])
@pytest.mark.parametrize("through_mlx_lm", [False, True])
def test_exact_trims_replay_bit_for_bit(cls, config, sizes, through_mlx_lm):
    data = updates(sizes)
    cache = cls(**config)
    seen, outs = {0: None}, []
    for k, v, q in data:
        outs.append(step(cache, k, v, q))
        seen[cache.offset] = snapshot(cache)
    mx.eval(outs)
    exact = cache.exact_trims()
    assert len(exact) > 2 and exact == sorted(exact), exact
    ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    for t in exact:
        c = cls.from_state(cache.state)
        assert (lm_cache.trim_prompt_cache([c], t) if through_mlx_lm else c.trim(t)) == t
        if c.offset:
            assert same(snapshot(c), seen[c.offset]), t
        i = ends.index(c.offset) + 1 if c.offset else 0
        for (k, v, q), out in zip(data[i:], outs[i:]):
            assert mx.array_equal(step(c, k, v, q), out).item(), t
        assert same(snapshot(c), snapshot(cache))


def test_other_trims_keep_packed_tokens_and_restart_the_schedule():
    """Trimmed back past the last packing, the tokens packed since stay packed: the window
    holds fewer than ``window`` tokens until the next decode step packs down to it."""
    data = updates([20] + [1] * 40)
    cache = QuantizedKVCache(4, window=8, sinks=2)
    for k, v, q in data:
        step(cache, k, v, q)
    # 60 tokens, packed down to 8 at offset 53 (decode step 33): the window holds 15
    assert cache.exact_trims() == list(range(8)) + [60] and cache.window_keys.shape[2] == 15
    packed, t = cache.n_packed, 20
    assert cache.trim(t) == t and cache.offset == 60 - t
    assert cache.n_packed == packed - 5 and cache.window_keys.shape[2] == 0 and cache._steps == 0
    assert cache.exact_trims() == [0, cache.offset]
    k, v, q = data[-1]
    for _ in range(9):
        step(cache, k, v, q)
    assert cache.offset == 60 - t + 9 and cache.window_keys.shape[2] == 9  # packed at step 1: none over 8
    assert cache.sink_keys.shape[2] + cache.n_packed + cache.window_keys.shape[2] == cache.offset
