import mlx.core as mx
import pytest

from mlx_kvq import QuantizedKVCache, quantized_sdpa
from mlx_kvq.attention import reference
from mlx_kvq.cache import causal_mask
from helpers import NO_LAUNCHES, plain_attention, reference_over_cache, rel_err


def filled(config, B, Hkv, D, past, Dv=None):
    cache = QuantizedKVCache(**config)
    Dv = Dv or D
    for L in past:
        cache.update_and_fetch(
            mx.random.normal((B, Hkv, L, D)).astype(mx.float16),
            mx.random.normal((B, Hkv, L, Dv)).astype(mx.float16),
        )
    return cache


CASES = [
    # (config, B, Hq, Hkv, D, past chunks, query length, mask kind)
    (dict(bits=4, group_size=64), 1, 8, 2, 64, [70, 1], 1, None),
    (dict(bits=8, group_size=32, sinks=4, window=8), 2, 6, 3, 80, [33, 5], 1, None),
    (dict(bits=3, group_size=32, rotate="kv", sinks=4, window=16), 1, 4, 4, 96, [130], 7, "causal"),
    (dict(bits=4, k_bits=8, v_bits=4, group_size=128), 1, 16, 2, 128, [257, 1], 33, "causal"),
    (dict(bits=2, group_size=64, window=32), 2, 4, 1, 256, [95], 12, "bool"),
    (dict(bits=4, mode="mxfp4", rotate="k"), 1, 4, 2, 64, [40], 5, "additive"),
    (dict(bits=6, group_size=64, sinks=0, window=0), 1, 2, 2, 64, [0], 50, "causal"),
]


def case_mask(kind, L, N):
    """(mask for quantized_sdpa, the same as an array for the reference)."""
    full = causal_mask(L, N - L)
    if kind == "causal":
        return "causal", full
    if kind == "bool":  # e.g. left padding: batch row 0 cannot see its first 10 keys
        pad = mx.arange(N)[None] >= mx.array([10, 0])[:, None]
        m = full[None, None] & pad[:, None, None, :]
        return m, m
    if kind == "additive":
        m = mx.where(full, 0.0, -1e9) + mx.random.normal((L, N)) * 0.5
        return m, m
    return None, None


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_matches_plain_fp32_attention_over_the_dequantized_cache(case):
    config, B, Hq, Hkv, D, past, L, mask_kind = case
    mx.random.seed(len(past) * 100 + L)
    cache = filled(config, B, Hkv, D, [p for p in past if p])
    k = mx.random.normal((B, Hkv, L, D)).astype(mx.float16)
    view, _ = cache.update_and_fetch(k, k)
    q = mx.random.normal((B, Hq, L, D)).astype(mx.float16)
    mask, ref_mask = case_mask(mask_kind, L, cache.offset)
    out = quantized_sdpa(q, view, scale=D**-0.5, mask=mask)
    ref = reference_over_cache(cache, q, D**-0.5, ref_mask)
    assert out.shape == (B, Hq, L, D) and out.dtype == q.dtype
    assert rel_err(out, ref) < 4e-3  # fp16 output rounding; quantization error is in both


PREFILL_CASES = [c for c in CASES if c[6] > 8]


@pytest.mark.parametrize("case", PREFILL_CASES, ids=[str(i) for i in range(len(PREFILL_CASES))])
def test_gpu_prefill_path_matches_plain_attention(run_kernels_on, monkeypatch, case):
    """The GPU prefill path (dequantize the layer, MLX's fused sdpa), run here on any backend."""
    from mlx_kvq import kernels

    config, B, Hq, Hkv, D, past, L, mask_kind = case
    mx.random.seed(L)
    cache = filled(config, B, Hkv, D, [p for p in past if p])
    k = mx.random.normal((B, Hkv, L, D)).astype(mx.float16)
    view, _ = cache.update_and_fetch(k, k)
    q = mx.random.normal((B, Hq, L, D)).astype(mx.float16)
    mask, ref_mask = case_mask(mask_kind if mask_kind == "bool" else "causal", L, cache.offset)
    run_kernels_on(NO_LAUNCHES)  # enabled(), and no kernel may run
    calls = []
    sdpa = mx.fast.scaled_dot_product_attention
    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    out = quantized_sdpa(q, view, scale=D**-0.5, mask=mask)
    assert calls, "the prefill path was not taken"
    ref = reference_over_cache(cache, q, D**-0.5, ref_mask)
    assert out.shape == (B, Hq, L, D) and out.dtype == q.dtype
    assert rel_err(out, ref) < 4e-3


@pytest.mark.parametrize("rotate", [False, "k", "kv"])
def test_decode_through_the_kernels_matches_plain_attention(run_kernels_on, monkeypatch, emu, rotate):
    """Decode steps on the kernel path (run by the CPU emulator): the decode kernel rotates
    the queries, its merge rotates the output back and writes the model's dtype."""
    from mlx_kvq import kernels

    run_kernels_on(emu)
    B, Hq, Hkv, D = 1, 8, 2, 64
    cache = filled(dict(bits=4, group_size=32, sinks=2, window=8, rotate=rotate), B, Hkv, D, [90])
    for step in range(3):
        k = mx.random.normal((B, Hkv, 1, D)).astype(mx.float16)
        view, _ = cache.update_and_fetch(k, k * 0.5)
        q = mx.random.normal((B, Hq, 1, D)).astype(mx.float16)
        emu.launches.clear()
        out = quantized_sdpa(q, view, scale=D**-0.5)
        assert [x[0] for x in emu.launches] == ["sdpa_decode", "sdpa_merge"]
        assert emu.launches[0][1]["ROTQ"] == bool(rotate) and emu.launches[1][1]["ROTO"] == (rotate == "kv")
        ref = reference_over_cache(cache, q, D**-0.5, None)
        assert out.shape == (B, Hq, 1, D) and out.dtype == q.dtype
        assert rel_err(out, ref) < 4e-3


@pytest.mark.parametrize("window", [8, 0])
def test_kernels_with_value_dims_unlike_the_keys(run_kernels_on, emu, window):
    """Keys of 64 dims and values of 32 (deepseek_v2, minicpm3): a chunk of 8 queries (a
    decode-kernel chunk) over the sinks and window alone, then decode steps, equal plain
    attention. The decode kernels read one head dim for both; given the values' 32-dim rows
    they read past them (NaN or wrong outputs on the H200 and here), so such views take the
    other paths."""
    run_kernels_on(emu)
    mx.random.seed(5)
    cache = QuantizedKVCache(4, group_size=32, window=window)
    for L in (8, 1, 1):
        k = mx.random.normal((1, 2, L, 64)).astype(mx.float16)
        view, values = cache.update_and_fetch(k, mx.random.normal((1, 2, L, 32)).astype(mx.float16))
        q = mx.random.normal((1, 4, L, 64)).astype(mx.float16)
        out = quantized_sdpa(q, view, scale=0.2, mask="causal" if L > 1 else None)
        T = cache.offset
        causal = mx.where(mx.arange(T)[None] <= mx.arange(T - L, T)[:, None], 0.0, -mx.inf)
        ref = plain_attention(q.astype(mx.float32), view.array.astype(mx.float32),
                              values.array.astype(mx.float32), 0.2, causal)
        assert out.shape == (1, 4, L, 32) and mx.all(mx.isfinite(out)).item()
        assert rel_err(out, ref) < 4e-3


def test_blocks_bound_memory_and_agree_with_one_block(monkeypatch):
    cache = filled(dict(bits=4, group_size=64, sinks=0, window=0), 1, 2, 64, [1000, 1])
    q = mx.random.normal((1, 4, 1, 64))
    view, _ = cache.update_and_fetch(mx.zeros((1, 2, 1, 64), mx.float16), mx.zeros((1, 2, 1, 64), mx.float16))
    one = quantized_sdpa(q, view, scale=0.125)
    monkeypatch.setattr(reference, "BLOCK_ELEMENTS", 64 * 300)  # forces blocks of 64 keys
    many = quantized_sdpa(q, view, scale=0.125)
    assert rel_err(many, one) < 1e-5


def test_prefill_chunk_against_long_cache_does_not_materialize_scores():
    """2048 queries x 16k keys x 4 heads would be 512 MiB of fp32 scores; blocks keep it far lower."""
    cache = filled(dict(bits=4, group_size=64, sinks=0, window=0), 1, 1, 64, [4096] * 4)
    L = 2048
    k = mx.random.normal((1, 1, L, 64)).astype(mx.float16)
    view, _ = cache.update_and_fetch(k, k)
    q = mx.random.normal((1, 4, L, 64)).astype(mx.float16)
    mx.eval(q, view.packed[0], view.window[0])
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(quantized_sdpa(q, view, scale=0.125, mask="causal"))
    extra = mx.get_peak_memory() - before
    assert extra < 320 * 2**20, f"{extra / 2**20:.0f} MiB"


def test_fully_masked_rows_and_sinks_logits():
    cache = filled(dict(bits=8, group_size=64, sinks=0, window=0), 1, 2, 64, [20])
    k = mx.random.normal((1, 2, 1, 64)).astype(mx.float16)
    view, _ = cache.update_and_fetch(k, k)
    q = mx.random.normal((1, 2, 1, 64))
    sinks = mx.array([0.5, -1.0])
    out = quantized_sdpa(q, view, scale=0.125, sinks=sinks)
    ref = mx.fast.scaled_dot_product_attention(q, *[x[:, :, :21] for x in _dense(cache)], scale=0.125, sinks=sinks)
    assert rel_err(out, ref) < 1e-3  # mx.fast's CUDA kernel computes at about tf32 precision
    none = mx.zeros((1, 1, 1, 21), mx.bool_)
    assert mx.all(quantized_sdpa(q, view, scale=0.125, mask=none) == 0).item()


def _dense(cache):
    from helpers import cache_contents

    return cache_contents(cache)


def test_reference_is_forced_by_environment(monkeypatch):
    from mlx_kvq import kernels

    monkeypatch.setenv("MLX_KVQ_REFERENCE", "1")
    assert not kernels.enabled()


@pytest.mark.skipif(not (mx.metal.is_available() or mx.cuda.is_available()), reason="needs a GPU backend")
@pytest.mark.parametrize("config", [dict(bits=4), dict(bits=8, k_bits=8, v_bits=4, sinks=2, window=4)])
@pytest.mark.parametrize("L", [1, 4, 100])
def test_kernel_dispatch_agrees_with_reference(monkeypatch, config, L):
    cache = filled(config, 1, 8, 128, [3000, 1])
    k = mx.random.normal((1, 8, L, 128)).astype(mx.float16)
    view, _ = cache.update_and_fetch(k, k)
    q = mx.random.normal((1, 32, L, 128)).astype(mx.float16)
    mask = "causal" if L > 1 else None
    fused = quantized_sdpa(q, view, scale=128**-0.5, mask=mask)
    monkeypatch.setenv("MLX_KVQ_REFERENCE", "1")
    ref = quantized_sdpa(q, view, scale=128**-0.5, mask=mask)
    assert rel_err(fused, ref) < 2e-3


@pytest.mark.skipif(not (mx.metal.is_available() or mx.cuda.is_available()), reason="needs a GPU backend")
@pytest.mark.parametrize("config", [dict(bits=4), dict(bits=8, k_bits=8, v_bits=4, sinks=2, window=4)])
def test_gpu_prefill_over_the_copy_budget_agrees_with_reference(monkeypatch, config):
    """A layer over the copy budget on this GPU: its prefill kernel (Metal: sdpa_prefill;
    CUDA: sdpa_packed) against the reference path."""
    from mlx_kvq.attention import prefill

    cache = filled(config, 1, 8, 128, [3000])
    k = mx.random.normal((1, 8, 100, 128)).astype(mx.float16)
    view, _ = cache.update_and_fetch(k, k)
    q = mx.random.normal((1, 32, 100, 128)).astype(mx.float16)
    monkeypatch.setattr(prefill, "PREFILL_COPY_BYTES", {"metal": 1000, "cuda": 1000})
    out = quantized_sdpa(q, view, scale=128**-0.5, mask="causal")
    monkeypatch.setenv("MLX_KVQ_REFERENCE", "1")
    ref = quantized_sdpa(q, view, scale=128**-0.5, mask="causal")
    assert rel_err(out, ref) < 2e-3


def test_plain_reference_itself_matches_mlx_fast_sdpa():
    q, k, v = (mx.random.normal((1, 4, 9, 64)) for _ in range(3))
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal")
    assert rel_err(plain_attention(q, k, v, 0.125, causal_mask(9, 0)), ref) < 1e-5


@pytest.mark.parametrize("config", [dict(bits=4, group_size=64), dict(bits=8, k_bits=8, v_bits=4, sinks=2, window=4)])
def test_gpu_prefill_over_the_copy_budget_takes_the_prefill_kernel(run_kernels_on, emu, over_copy_budget, config):
    """A layer whose unquantized copy exceeds the backend's budget never makes that copy:
    the simdgroup_matrix prefill kernel (run by the emulator) attends over the packed run."""
    run_kernels_on(emu)
    cache = filled(config, 1, 2, 64, [300])
    k = mx.random.normal((1, 2, 16, 64)).astype(mx.float16)
    view, _ = cache.update_and_fetch(k, k)
    q = mx.random.normal((1, 4, 16, 64)).astype(mx.float16)
    emu.launches.clear()
    out = quantized_sdpa(q, view, scale=0.125, mask="causal")
    assert [x[0] for x in emu.launches] == ["sdpa_prefill"]
    ref = reference_over_cache(cache, q, 0.125, causal_mask(16, cache.offset - 16))
    assert rel_err(out, ref) < 4e-3


def test_gpu_prefill_the_kernels_lack_takes_the_blocked_reference(run_kernels_on, over_copy_budget, monkeypatch):
    """A 3-bit layer of head dim 32 over the copy budget: no kernel takes it, the blocked
    reference (memory bounded by a block of keys) computes the chunk, no copy made."""
    run_kernels_on(NO_LAUNCHES)
    cache = filled(dict(bits=3, group_size=32), 1, 2, 32, [300])
    k = mx.random.normal((1, 2, 16, 32)).astype(mx.float16)
    view, _ = cache.update_and_fetch(k, k)
    q = mx.random.normal((1, 4, 16, 32)).astype(mx.float16)
    calls = []
    sdpa = mx.fast.scaled_dot_product_attention
    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    out = quantized_sdpa(q, view, scale=0.125, mask="causal")
    assert not calls
    ref = reference_over_cache(cache, q, 0.125, causal_mask(16, cache.offset - 16))
    assert rel_err(out, ref) < 4e-3


@pytest.mark.parametrize("bad, match", [
    (dict(scale=float("nan")), "scale must be a finite number, got nan"),
    (dict(scale=float("inf")), "scale must be a finite number, got inf"),
    (dict(scale="0.125"), "scale must be a finite number, got '0.125'"),
    (dict(scale=mx.ones((2,))), r"scale must be a number, got an array of shape \(2,\)"),
    (dict(mask="full"), "Unsupported mask 'full'"),
    (dict(mask=mx.ones((3, 3), mx.bool_)), r"mask must be .* = \(1, 4, 8, 'keys'\), got \(3, 3\)"),
    (dict(mask=mx.ones((2, 1, 8, 8), mx.bool_)), r"got \(2, 1, 8, 8\)"),
    (dict(mask=[[True]]), "mask must be .* got list"),
    (dict(sinks=mx.zeros((3,))), r"sinks must be one logit per query head, shape \(4,\), got \(3,\)"),
    (dict(sinks=[0.0] * 4), "sinks must be .* got list"),
])
def test_a_bad_scale_mask_or_sinks_is_named(bad, match):
    """MLX's own errors for these come from deep inside (a broadcast of shapes that names
    neither argument) or not at all (a NaN scale gives a NaN output)."""
    cache = QuantizedKVCache(4)
    view, _ = cache.update_and_fetch(mx.random.normal((1, 2, 8, 64)), mx.random.normal((1, 2, 8, 64)))
    args = dict(scale=0.125, mask="causal") | bad
    with pytest.raises(ValueError, match=match):
        quantized_sdpa(mx.random.normal((1, 4, 8, 64)), view, **args)


def test_good_masks_and_scales_of_every_kind_are_taken():
    """What the checks let through: masks over the keys of any rank up to 4, broadcasting over
    batch and heads, numpy and MLX scalars as scales; each gives plain attention's output."""
    import numpy as np

    mx.random.seed(3)
    cache = QuantizedKVCache(8, window=0, sinks=0, rotate=False)
    k, v, q = mx.random.normal((1, 2, 8, 64)), mx.random.normal((1, 2, 8, 64)), mx.random.normal((1, 4, 8, 64))
    view, _ = cache.update_and_fetch(k, v)
    causal = causal_mask(8, 0)
    ref = plain_attention(q, k, v, 0.125, causal)
    for mask in (causal, causal[None], causal[None, None], mx.broadcast_to(causal, (1, 4, 8, 8))):
        for scale in (0.125, np.float32(0.125), mx.array(0.125)):
            assert rel_err(quantized_sdpa(q, view, scale=scale, mask=mask), ref) < 2e-2
