"""Property-based tests (hypothesis) over configs, shapes, values, saved states and trims:
every input gives a clear error (``ValueError``/``TypeError`` naming the parameter) or a
correct result; never another exception, never a non-finite output from finite input.

Derandomized, so CI sees the same examples every run; example counts keep the file to
about 40 seconds on a 2-core CPU."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_kvq import QuantizedKVCache, quantized_sdpa
from mlx_kvq.cache import QuantizedRotatingKVCache
from mlx_kvq.cache import state as saved
from helpers import reference_over_cache, rel_err

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))

ODD = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.integers(min_value=2**30), st.floats(allow_nan=True),
    st.text(max_size=3), st.lists(st.integers(0, 8), max_size=2), st.integers(0, 130).map(np.int64),
)
# the words a clear error about each option uses
NAMES = {
    "bits": ("bits",), "k_bits": ("k_bits", "key bits"), "v_bits": ("v_bits", "value bits"),
    "group_size": ("group", "head_dim"), "mode": ("mode", "bits", "group"), "rotate": ("rotate",),
    "sinks": ("sinks",), "window": ("window",), "start": ("start",),
}
GOOD = {"bits": st.sampled_from([2, 3, 4, 8]), "group_size": st.sampled_from([None, 32, 64]),
        "mode": st.sampled_from(["affine", "affine", "mxfp4"]), "rotate": st.sampled_from([None, False, "k", "kv"]),
        "sinks": st.integers(0, 5), "window": st.integers(0, 40), "start": st.integers(0, 30)}


def finite(x):
    return bool(mx.all(mx.isfinite(x)).item())


def run_cache(cache, sizes, D=64, H=2, Hq=4, dtype=mx.float16, scale=1.0, seed=0):
    """Feed updates of ``sizes`` tokens, attend with the last one's queries; check the output
    against fp32 attention over what the cache holds."""
    mx.random.seed(seed)
    out = None
    for L in sizes:
        k = (mx.random.normal((1, H, L, D)) * scale).astype(dtype)
        v = (mx.random.normal((1, H, L, D)) * scale).astype(dtype)
        q = (mx.random.normal((1, Hq, L, D)) / scale).astype(dtype)
        view, _ = cache.update_and_fetch(k, v)
        mask = "causal" if L > 1 else None
        out = quantized_sdpa(q, view, D**-0.5, mask=mask)
    assert out.shape == (1, Hq, sizes[-1], D) and out.dtype == dtype
    assert finite(out)
    L = sizes[-1]
    causal = mx.arange(cache.offset)[None] <= mx.arange(cache.offset - L, cache.offset)[:, None]
    ref = reference_over_cache(cache, q, D**-0.5, causal if L > 1 else None)
    assert rel_err(out, ref) < 1e-2
    return out


@settings(max_examples=300, **SETTINGS)
@given(st.data())
def test_any_config_builds_a_working_cache_or_names_the_bad_option(data):
    kwargs = {}
    for name, good in GOOD.items():
        if data.draw(st.booleans()):
            kwargs[name] = data.draw(st.one_of(good, ODD), label=name)
    try:
        cache = QuantizedKVCache(**kwargs)
    except (ValueError, TypeError) as e:
        msg = str(e)
        bad = [n for n in kwargs if any(w in msg for w in NAMES[n])]
        assert bad, f"{kwargs}: {msg}"
        return
    c = cache.config
    for key in ("k_bits", "v_bits", "group_size", "sinks", "window", "start"):
        assert type(c[key]) is int
    json.dumps(c)  # a config is saved as JSON
    run_cache(cache, [9, 1])


@settings(max_examples=200, **SETTINGS)
@given(
    B=st.integers(1, 2), H=st.integers(1, 3), rep=st.sampled_from([1, 2, 3]),
    D=st.sampled_from([32, 48, 64, 80, 96, 128, 144]), Dv=st.sampled_from([None, 32, 64]),
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=4),
    bad=st.sampled_from([None, "values_len", "q_dim", "q_heads", "rank", "next_heads", "next_dim", "int"]),
    rotate=st.sampled_from([None, "k", "kv"]),
)
def test_any_shapes_give_the_attention_or_a_clear_error(B, H, rep, D, Dv, sizes, bad, rotate):
    Dv = Dv or D
    cache = QuantizedKVCache(4, group_size=32, window=6, sinks=2, rotate=rotate)
    mx.random.seed(1)
    out = None
    try:
        for i, L in enumerate(sizes):
            k = mx.random.normal((B, H, L, D)).astype(mx.float16)
            v = mx.random.normal((B, H, L + (bad == "values_len"), Dv)).astype(mx.float16)
            if i and bad == "next_heads":
                k, v = k[:, :1], v[:, :1]
            if i and bad == "next_dim":
                k = k[..., :32]
            if bad == "rank":
                k = k[0]
            if bad == "int":
                k = k.astype(mx.int32)
            view, _ = cache.update_and_fetch(k, v)
        Lq = max(1, sizes[-1])
        if bad == "q_heads" and H == 1:
            bad = None  # any number of query heads is a multiple of one KV head
        Hq = H * rep + (bad == "q_heads")
        q = mx.random.normal((B, Hq, Lq, D + 16 * (bad == "q_dim"))).astype(mx.float16)
        out = quantized_sdpa(q, view, D**-0.5, mask="causal" if Lq > 1 and sizes[-1] else None)
    except ValueError as e:
        assert bad or (rotate and D in (48, 80, 96, 144)), e  # group-padded dims MLX cannot rotate
        return
    if cache.kv_heads is None:  # nothing stored yet (updates of no tokens): no keys, zeros
        assert bad not in ("values_len", "rank", "int") and not mx.any(out).item()
        return
    assert bad in (None, "next_heads", "next_dim") and out is not None
    assert out.shape == (B, Hq, Lq, Dv) and finite(out)
    if cache.offset and sizes[-1]:
        causal = mx.arange(cache.offset)[None] <= mx.arange(cache.offset - Lq, cache.offset)[:, None]
        ref = reference_over_cache(cache, q, D**-0.5, causal if Lq > 1 else None)
        assert rel_err(out, ref) < 1e-2


@settings(max_examples=200, **SETTINGS)
@given(
    dtype=st.sampled_from([mx.float16, mx.bfloat16, mx.float32]),
    exponent=st.integers(-12, 40), rotate=st.sampled_from([None, "k", "kv"]),
    bits=st.sampled_from([2, 4, 8]), sizes=st.sampled_from([[20, 1], [30, 4], [5, 1, 1]]),
    bad=st.sampled_from([None, None, math.nan, math.inf, -math.inf]),
)
def test_finite_values_of_any_size_give_finite_outputs(dtype, exponent, rotate, bits, sizes, bad):
    big = mx.finfo(dtype).max
    scale = 2.0**exponent
    if scale * 4 > big:  # the inputs themselves would not be finite
        scale = 2.0 ** math.floor(math.log2(big / 4))
    if dtype == mx.float16 and rotate:
        scale = min(scale, 2.0**12)  # |x R| <= 8 |x| fits float16 (larger saturates: test_extreme_values)
    cache = QuantizedKVCache(bits, rotate=rotate, window=4, sinks=1)
    mx.random.seed(exponent + 100)
    for L in sizes:
        k = (mx.clip(mx.random.normal((1, 2, L, 64)), -3, 3) * scale).astype(dtype)
        v = (mx.clip(mx.random.normal((1, 2, L, 64)), -3, 3) * scale).astype(dtype)
        if bad is not None:
            v = v.at[:, :, 0, 3].add(bad)
            k = k.at[:, :, -1, 7].add(bad)
        q = (mx.random.normal((1, 2, L, 64)) / scale).astype(dtype)
        view, _ = cache.update_and_fetch(k, v)
        out = quantized_sdpa(q, view, 0.125, mask="causal" if L > 1 else None)
        assert finite(out), (dtype, scale, rotate, bad)


def _filled(rotating, sizes):
    cache = (QuantizedRotatingKVCache(4, max_size=24, keep=2, window=4) if rotating
             else QuantizedKVCache(4, window=4, sinks=2))
    mx.random.seed(2)
    for L in sizes:
        x = mx.random.normal((1, 2, L, 64)).astype(mx.float16)
        cache.update_and_fetch(x, x * 0.5)
    return cache


@settings(max_examples=300, **SETTINGS)
@given(
    rotating=st.booleans(), where=st.sampled_from(["config", "dims", "offset", "n_packed", "array", "drop"]),
    key=st.sampled_from(["k_bits", "v_bits", "group_size", "mode", "rotate", "sinks", "window", "start", "keep"]),
    value=ODD, index=st.integers(0, 8), sub=st.integers(0, 2), cut=st.integers(0, 3), redigest=st.booleans(),
)
def test_a_changed_state_is_refused_or_works(rotating, where, key, value, index, sub, cut, redigest):
    cache = _filled(rotating, [20, 1, 1])
    v = list(cache.state)
    head = json.loads(v[0])
    value = int(value) if isinstance(value, np.integer) else value
    changed = False
    if where == "config":
        changed = key not in head["config"] or head["config"][key] != value
        head["config"][key] = value
    elif where == "dims":
        changed = head["dims"][index % 4] != value
        head["dims"][index % 4] = value
    elif where in ("offset", "n_packed"):
        i = 1 if where == "offset" else 2
        changed = v[i] != value
        v[i] = value
        head[where] = value if redigest else head[where]
    else:
        i = 3 + index % 6
        a = list(v[i]) if isinstance(v[i], tuple) else [v[i]]
        j = sub % len(a)
        new = None if where == "drop" else _changed(a[j], cut)
        changed = (new is None) != (a[j] is None) or (new is not None and (
            new.shape != a[j].shape or new.dtype != a[j].dtype))
        a[j] = new
        v[i] = tuple(a) if isinstance(v[i], tuple) else a[0]
    if redigest:
        head["digest"] = saved.digest(head, dict(zip(saved.NAMES, v[3:])))
    v[0] = json.dumps(head)
    try:
        loaded = type(cache).from_state(v)
    except (ValueError, TypeError):
        assert changed
        return
    assert redigest or not changed  # without a fresh digest any change is refused
    # a consistent state loads into a working cache
    x = mx.random.normal((1, 2, 1, 64)).astype(mx.float16)
    view, _ = loaded.update_and_fetch(x, x)
    assert finite(quantized_sdpa(mx.random.normal((1, 2, 1, 64)).astype(mx.float16), view, 0.125))


def _changed(a, cut):
    if a is None:
        return a
    if cut == 0:
        return a.astype(mx.float32 if a.dtype != mx.float32 else mx.float16)
    if cut == 1:
        return a[:, :, 1:]
    if cut == 2:
        return a[..., : max(1, a.shape[-1] // 2)]
    return a[:, :1]


@settings(max_examples=200, **SETTINGS)
@given(
    sizes=st.lists(st.sampled_from([1, 1, 1, 2, 7, 30]), min_size=1, max_size=40),
    t=st.one_of(st.integers(0, 80), st.just(-1), st.just(2.5), st.just("3")),
    rotating=st.booleans(), replay=st.integers(1, 5),
)
def test_any_trim_is_exact_where_listed_and_always_consistent(sizes, t, rotating, replay):
    cache = _filled(rotating, sizes)
    if not isinstance(t, int) or t < 0:
        with pytest.raises(ValueError, match="trim"):
            cache.trim(t)
        return
    offset, exact = cache.offset, cache.exact_trims()
    if rotating and not cache.is_trimmable():
        assert cache.trim(t) == 0
        return
    twin = type(cache).from_state(cache.state)
    n = cache.trim(t)
    assert n == min(t, offset) and cache.offset == offset - n
    held = (0 if cache.sink_keys is None else cache.sink_keys.shape[2]) + cache.n_packed + (
        0 if cache.window_keys is None else cache.window_keys.shape[2])
    assert held == cache.offset
    if n in exact:  # the state after the update that ended there: replay equals a fresh run
        fresh = _filled(rotating, _prefix(sizes, cache.offset))
        assert (cache.n_packed, cache._steps) == (fresh.n_packed, fresh._steps)
        mx.random.seed(9)
        for _ in range(replay):
            x = mx.random.normal((1, 2, 1, 64)).astype(mx.float16)
            q = mx.random.normal((1, 4, 1, 64)).astype(mx.float16)
            outs = [quantized_sdpa(q, c.update_and_fetch(x, x)[0], 0.125) for c in (cache, fresh)]
            assert mx.array_equal(*outs).item()
    else:
        x = mx.random.normal((1, 2, 1, 64)).astype(mx.float16)
        assert finite(quantized_sdpa(x, cache.update_and_fetch(x, x)[0], 0.125))
    del twin


def _prefix(sizes, offset):
    """The update sizes that end at ``offset`` (it is the end of one of them)."""
    out, total = [], 0
    for L in sizes:
        if total == offset:
            break
        out.append(L)
        total += L
    assert total == offset
    return out
