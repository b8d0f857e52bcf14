import mlx.core as mx
import pytest

from mlx_kvq import QuantizedKVCache
from mlx_kvq.cache import default_options
from helpers import cache_contents, rel_err
from mlx_kvq.rotation import rotation

CONFIGS = [
    dict(bits=8, group_size=64),
    dict(bits=4, group_size=64, sinks=0, window=0, rotate=False),
    dict(bits=4, group_size=32, k_bits=8, v_bits=4, sinks=2, window=5),
    dict(bits=3, group_size=32, sinks=4, window=16, rotate="kv"),
    dict(bits=2, group_size=32),
    dict(bits=4, mode="mxfp4"),
    dict(bits=4, start=20, window=3),
]


def feed(cache, chunks, H=2, D=64, B=1):
    ks, vs = [], []
    for L in chunks:
        k = mx.random.normal((B, H, L, D)).astype(mx.float16)
        v = mx.random.normal((B, H, L, D)).astype(mx.float16)
        cache.update_and_fetch(k, v)
        ks.append(k)
        vs.append(v)
    return mx.concatenate(ks, axis=2), mx.concatenate(vs, axis=2)


def expected(cache, k, v):
    if cache.rotate:
        k = k.astype(mx.float32) @ rotation(k.shape[-1])
        if cache.rotate == "kv":
            v = v.astype(mx.float32) @ rotation(v.shape[-1])
    return k, v


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("chunks", [[1] * 40, [7, 1, 1, 300, 1, 1], [33, 64, 1]])
def test_update_holds_every_token_in_order(config, chunks):
    cache = QuantizedKVCache(**config)
    k, v = feed(cache, chunks, B=2)
    assert cache.offset == cache.size() == sum(chunks)
    held_k, held_v = cache_contents(cache)
    assert held_k.shape == k.shape
    ek, ev = expected(cache, k, v)
    bits = min(cache.k_bits, cache.v_bits)
    tol = {8: 0.02, 4: 0.15, 3: 0.3, 2: 0.6}[bits]
    assert rel_err(held_k, ek) < tol and rel_err(held_v, ev) < tol
    # unquantized runs are exact; the window never holds more than window + one chunk
    # (or, in decode, window + flush_block - 1 tokens)
    if cache.sink_keys is not None:
        s = cache.sink_keys.shape[2]
        assert s == min(cache.sinks, cache.offset)
        assert rel_err(cache.sink_keys, ek[:, :, :s]) < 2e-3
    w = cache.window_keys.shape[2]
    grow = chunks[-1] if chunks[-1] > 1 else cache.flush_block - 1  # decode packs in blocks
    assert w <= cache.window + grow or cache.offset < cache.start
    if w:
        assert rel_err(cache.window_keys, ek[:, :, cache.offset - w :]) < 2e-3


def test_buffers_grow_in_steps_not_per_token():
    cache = QuantizedKVCache(4, 64, sinks=0, window=0)
    F = QuantizedKVCache.flush_block
    feed(cache, [1])  # the first decode step packs the window (here: everything)
    assert cache.n_packed == 1 and cache.window_keys.shape[2] == 0
    feed(cache, [1] * (F - 1))  # then decoded tokens wait in the window for F steps
    assert cache.n_packed == 1 and cache.window_keys.shape[2] == F - 1
    feed(cache, [1])
    assert cache.n_packed == F + 1 and cache.window_keys.shape[2] == 0
    cap = cache.packed_keys[0].shape[2]
    assert cap == QuantizedKVCache.step
    feed(cache, [1] * (3 * F))
    assert cache.packed_keys[0].shape[2] == cap and cache.n_packed == 4 * F + 1
    feed(cache, [300])  # a prefill chunk stays unquantized for its own attention
    assert cache.n_packed == 4 * F + 1 and cache.window_keys.shape[2] == 300
    feed(cache, [1])  # ... and is packed at the next update (the first decode step)
    assert cache.n_packed == 4 * F + 302 and cache.window_keys.shape[2] == 0
    assert cache.packed_keys[0].shape[2] % QuantizedKVCache.step == 0 and cache.packed_keys[0].shape[2] >= 4 * F + 300


def test_decode_packs_on_a_schedule_of_steps_not_of_tokens_held():
    """Caches of different lengths pack on the same decode steps (what batching needs)."""
    F = QuantizedKVCache.flush_block
    caches = [QuantizedKVCache(4, 64, sinks=0, window=8) for _ in range(2)]
    for c, n in zip(caches, [40, 5]):
        feed(c, [n])
    for step in range(1, 2 * F + 2):
        for c in caches:
            feed(c, [1])
        packed = [c.n_packed for c in caches]
        if step == 1:
            assert packed == [33, 0]
        elif step == F + 1:
            assert packed == [33 + F, 5 + F + 1 - 8]
        elif step < F + 1:
            assert packed == [33, 0]
    assert [c.window_keys.shape[2] for c in caches] == [8, 8]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("n", [1, 3, 10, 45])
def test_trim_then_refill_matches_never_trimmed(config, n):
    mx.random.seed(3)
    a = QuantizedKVCache(**config)
    k, v = feed(a, [20, 1, 1, 8, 1, 17])
    assert a.is_trimmable()
    assert a.trim(n) == n
    assert a.offset == 48 - n
    ka, va = cache_contents(a)
    ek, ev = cache_contents(QuantizedKVCache.from_state(a.state))
    assert mx.array_equal(ka, ek) and ka.shape[2] == 48 - n
    # trimmed tokens are gone: the first 48-n tokens are still the ones fed
    ek, _ = expected(a, k, v)
    assert rel_err(ka, ek[:, :, : 48 - n]) < 0.6
    assert a.trim(1000) == 48 - n and a.empty()


@pytest.mark.parametrize("config", CONFIGS)
def test_state_round_trip_is_exact(config):
    cache = QuantizedKVCache(**config)
    feed(cache, [50, 1, 1])
    copy = QuantizedKVCache.from_state(cache.state)
    assert copy.config == cache.config and copy.offset == cache.offset
    for a, b in zip(cache_contents(cache), cache_contents(copy)):
        assert mx.array_equal(a, b)
    # both keep working identically
    k = mx.random.normal((1, 2, 1, 64)).astype(mx.float16)
    cache.update_and_fetch(k, k)
    copy.update_and_fetch(k, k)
    for a, b in zip(cache_contents(cache), cache_contents(copy)):
        assert mx.array_equal(a, b)


def test_from_state_rejects_foreign_state():
    with pytest.raises(ValueError, match="Not a mlx_kvq"):
        QuantizedKVCache.from_state((mx.zeros((1,)), mx.zeros((1,)), 3))


def test_nbytes_counts_packed_and_dense_parts():
    cache = QuantizedKVCache(4, 64, sinks=4, window=8, rotate=False)
    assert cache.nbytes == 0 and cache.empty()
    feed(cache, [100, 1])
    arrays = [cache.sink_keys, cache.sink_values, cache.window_keys, cache.window_values]
    arrays += list(cache.packed_keys) + list(cache.packed_values)
    assert cache.nbytes == sum(a.nbytes for a in arrays)
    # packed 4-bit group 64 at head_dim 64: 32 B words + 2+2 B scale/bias = 36 B/token/head vs 128 fp16
    fp16 = 2 * cache.offset * 2 * 64 * 2
    assert cache.used_nbytes() < 0.45 * fp16


def test_make_mask_follows_offset():
    cache = QuantizedKVCache(4)
    assert cache.make_mask(1) is None and cache.make_mask(5) == "causal"
    feed(cache, [3])
    m = cache.make_mask(2, return_array=True)
    assert m.shape == (2, 5) and m.tolist() == [[True] * 4 + [False], [True] * 5]
    w = cache.make_mask(2, window_size=2)
    assert w.tolist() == [[False, False, True, True, False], [False, False, False, True, True]]


def test_single_query_mask_as_mlx_lm():
    """One query and no window: no mask, also for return_array (as mlx-lm's KVCache; deepseek_v32
    gathers the columns of an array mask with its indexer's picks); a window still gives one."""
    from mlx_lm.models.cache import KVCache

    ours, ref = QuantizedKVCache(4), KVCache()
    feed(ours, [20])
    ref.update_and_fetch(*(mx.zeros((1, 2, 20, 64)),) * 2)
    for array in (False, True):
        assert ours.make_mask(1, return_array=array) is None
        assert ref.make_mask(1, return_array=array, window_size=None) is None
    w, w_ref = ours.make_mask(1, window_size=4), ref.make_mask(1, return_array=False, window_size=4)
    assert w.tolist() == w_ref.tolist() == [[False] * 17 + [True] * 4]


def test_from_cache_converts_a_filled_kv_cache():
    from mlx_lm.models.cache import KVCache

    kv = KVCache()
    k = mx.random.normal((1, 2, 300, 64)).astype(mx.float16)
    kv.update_and_fetch(k, k)
    q = QuantizedKVCache.from_cache(kv, bits=8, sinks=0, window=0)
    assert q.offset == 300 and q.n_packed == 300
    assert rel_err(cache_contents(q)[0], k) < 0.01


def test_defaults_get_stronger_as_bits_drop():
    eight, four, three, two = (default_options(b, b) for b in (8, 4, 3, 2))
    assert eight == {"group_size": 64, "rotate": None, "sinks": 0, "window": 32}
    assert four["rotate"] == "kv" and four["group_size"] == 64 and three["group_size"] == 32
    assert two["window"] > three["window"] > four["window"]
    assert QuantizedKVCache(4).config["window"] == 32 and QuantizedKVCache(4, 32).group_size == 32


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=1), "bits 1"),
        (dict(bits=4, group_size=100), "group size 100"),
        (dict(bits=4, v_bits=7), "value bits 7"),
        (dict(bits=4, mode="fp8"), "mode 'fp8'"),
        (dict(bits=4, rotate="q"), "rotate must be"),
        (dict(bits=4, window=-1), "window must be"),
    ],
)
def test_bad_config_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizedKVCache(**kwargs)


def test_head_dim_smaller_than_group_is_a_clear_error():
    cache = QuantizedKVCache(4, 128)
    x = mx.zeros((1, 1, 1, 64), mx.float16)
    with pytest.raises(ValueError, match="head_dim 64 .* smaller than the group size 128"):
        cache.update_and_fetch(x, x)


def test_head_dim_not_divisible_by_group_is_padded():
    cache = QuantizedKVCache(4, 64, rotate="kv", sinks=1, window=2)
    k = mx.random.normal((1, 2, 9, 80)).astype(mx.float16)
    cache.update_and_fetch(k, k)
    cache.update_and_fetch(k[:, :, :1], k[:, :, :1])
    held, _ = cache_contents(cache)
    assert held.shape[-1] == 128 and cache.v_dim == 80
    back = held @ rotation(128).T
    assert rel_err(back[..., :80], mx.concatenate([k, k[:, :, :1]], axis=2)) < 0.15
    assert mx.abs(back[..., 80:]).mean().item() < 0.05  # quantization noise only


def test_sinks_do_not_keep_the_first_chunk_alive():
    def fill():
        cache = QuantizedKVCache(4, 64, sinks=4, window=0)
        k = mx.random.normal((1, 1, 20000, 64)).astype(mx.float16)
        cache.update_and_fetch(k, k)
        cache.update_and_fetch(k[:, :, :1], k[:, :, :1])
        mx.eval(cache.state[3:])
        return cache

    fill()  # once first: a GPU's first decode step makes kernel constants that stay (not the cache's)
    mx.clear_cache()
    before = mx.get_active_memory()  # other tests' arrays (the model fixtures) stay out of it
    cache = fill()
    mx.clear_cache()
    held = mx.get_active_memory() - before
    assert held < 20000 * 64 * 2, held  # one fp16 copy of the chunk is 2.4 MiB; packed K+V 1.4 MiB


@pytest.mark.parametrize("config", [
    dict(bits=4, group_size=32, sinks=2, window=5, rotate="kv"),
    dict(bits=8, group_size=64, sinks=0, window=3, rotate=False),
    dict(bits=4, group_size=64, sinks=1, window=4, rotate="k"),
])
def test_window_append_kernel_stores_what_the_host_path_stores(run_kernels_on, monkeypatch, emu, config):
    """Decode steps on GPUs write the window with one kernel (rotation in fp32 by a fast
    Walsh-Hadamard transform, run here by the CPU emulator); the host path rotates with a
    matmul. Both caches must hold the same tokens. Every decode step goes through the kernel,
    also the first after a prefill chunk or a packing (the window has no room then, and grows
    first): the two rotations round float32 differently, so a cache whose path depended on its
    buffers' room would store a token one way alone and another in a batch buffer."""
    from mlx_kvq import kernels

    host, fused = QuantizedKVCache(**config), QuantizedKVCache(**config)
    mx.random.seed(5)
    chunks = [7] + [1] * 12 + [33] + [1] * 5
    data = [(mx.random.normal((1, 2, L, 64)).astype(mx.float16), mx.random.normal((1, 2, L, 64)).astype(mx.float16))
            for L in chunks]
    for k, v in data:
        host.update_and_fetch(k, v)
    k_all = mx.concatenate([k for k, _ in data], axis=2)
    v_all = mx.concatenate([v for _, v in data], axis=2)
    run_kernels_on(emu)
    emu.launches.clear()
    for k, v in data:
        fused.update_and_fetch(k, v)
        assert fused._wn == fused._wvn and fused.offset <= k_all.shape[2]
    assert sum(x[0] == "window_append" for x in emu.launches) == sum(L == 1 for L in chunks)
    hk, hv = cache_contents(host)
    fk, fv = cache_contents(fused)
    ek, ev = expected(fused, k_all, v_all)
    assert fk.shape == hk.shape == ek.shape
    # the unquantized tail (window) agrees closely; packed tokens within quantization error
    w = fused._wn
    assert rel_err(fk[:, :, -w:], hk[:, :, -w:]) < 1e-3 and rel_err(fv[:, :, -w:], hv[:, :, -w:]) < 1e-3
    assert rel_err(fk[:, :, -w:], ek[:, :, -w:]) < 1e-3 and rel_err(fv[:, :, -w:], ev[:, :, -w:]) < 1e-3
    tol = 0.1 if config["bits"] == 4 else 0.01
    assert rel_err(fk, ek) < tol and rel_err(fv, ev) < tol


@pytest.mark.parametrize("kwargs, named", [
    (dict(bits=4.0), "k_bits"),
    (dict(bits="4"), "k_bits"),
    (dict(bits=True), "k_bits"),
    (dict(bits=4, v_bits=2.5), "v_bits"),
    (dict(bits=4, group_size=0), "group_size"),
    (dict(bits=4, group_size=64.0), "group_size"),
    (dict(bits=4, window="x"), "window"),
    (dict(bits=4, window=float("inf")), "window"),
    (dict(bits=4, window=-1), "window"),
    (dict(bits=4, window=10**12), "window"),
    (dict(bits=4, sinks=[4]), "sinks"),
    (dict(bits=4, start="x"), "quantized_kv_start"),
    (dict(bits=4, rotate=True), "rotate"),
    (dict(bits=4, rotate="q"), "rotate"),
    (dict(bits=4, mode=4), "mode"),
])
def test_bad_options_are_named_at_construction(kwargs, named):
    with pytest.raises(ValueError, match=named):
        QuantizedKVCache(**kwargs)


def test_numpy_integers_are_plain_ints():
    import json

    import numpy as np

    c = QuantizedKVCache(np.int64(4), np.int32(64), window=np.int64(8), sinks=np.uint8(2))
    assert c.config["k_bits"] == 4 and type(c.config["k_bits"]) is int and c.window == 8
    json.dumps(c.config)  # what save_prompt_cache writes


def test_a_huge_window_allocates_only_what_it_holds():
    """window=10**9 kept every token unquantized, but the first decode step allocated
    window + 32 tokens of buffer at once."""
    c = QuantizedKVCache(bits=4, window=10**9)
    k = mx.random.normal((1, 2, 40, 64)).astype(mx.float16)
    c.update_and_fetch(k, k)
    for _ in range(3):
        c.update_and_fetch(k[:, :, :1], k[:, :, :1])
    assert c.n_packed == 0 and c.offset == 43
    assert c._wk.shape[2] <= 43 + QuantizedKVCache.step


@pytest.mark.parametrize("n", [-5, 1.5, "2"])
def test_trim_takes_a_count_of_tokens(n):
    from mlx_kvq import QuantizedRotatingKVCache

    for c in (QuantizedKVCache(bits=4), QuantizedRotatingKVCache(bits=4, max_size=64)):
        k = mx.random.normal((1, 2, 10, 64)).astype(mx.float16)
        c.update_and_fetch(k, k)
        with pytest.raises(ValueError, match="trim"):
            c.trim(n)
        assert c.offset == 10


def test_updates_that_do_not_fit_are_named():
    c = QuantizedKVCache(bits=4)
    k = mx.random.normal((1, 2, 5, 64)).astype(mx.float16)
    with pytest.raises(ValueError, match="differ"):
        c.update_and_fetch(k, k[:, :, :4])  # values dropped before
    with pytest.raises(ValueError, match="floating"):
        c.update_and_fetch(k[0], k[0])
    c.update_and_fetch(k, k)
    for bad in (mx.zeros((2, 2, 1, 64), mx.float16), mx.zeros((1, 3, 1, 64), mx.float16),
                mx.zeros((1, 2, 1, 32), mx.float16)):
        with pytest.raises(ValueError, match="do not match"):
            c.update_and_fetch(bad, bad)
    view, _ = c.update_and_fetch(k[:, :, :0], k[:, :, :0])  # no tokens: nothing stored
    assert c.offset == 5 and view.offset == 5


def test_queries_that_do_not_fit_are_named():
    from mlx_kvq import quantized_sdpa

    c = QuantizedKVCache(bits=4)
    k = mx.random.normal((1, 2, 5, 64)).astype(mx.float16)
    view, _ = c.update_and_fetch(k, k)
    with pytest.raises(ValueError, match="head dim 32"):
        quantized_sdpa(mx.zeros((1, 4, 5, 32), mx.float16), view, scale=0.1)
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        quantized_sdpa(mx.zeros((1, 3, 5, 64), mx.float16), view, scale=0.1)
