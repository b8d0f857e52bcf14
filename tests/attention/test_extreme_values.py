"""Finite in, finite out: keys and values at the edge of the float16 range, beyond it in a
float32 model, and non-finite channels, on the CPU paths (the one-pass decode and the
reference over a prefill chunk), and on the GPU paths: the decode kernels and the
window-append kernel run by the CPU emulator (the same kernel sources), the GPU prefill
path (dequantize, MLX's attention) with its MLX ops on the CPU.

Quantization commutes with scaling by a power of two (the same codes, the scales times
2^a), and so does attention (keys times 2^a with queries times 2^-a give the same scores;
values times 2^b give the output times 2^b). So the output at the edge of the range must
be exactly 2^b times the output at scale 1, which the other tests hold against fp32
attention; an overflow anywhere (float16 rotation, ``scale * q + bias`` in float16, a
float16 store of a float32 model's 1e5) breaks that."""

import mlx.core as mx
import pytest

from mlx_kvq import QuantizedKVCache, quantized_sdpa
from mlx_kvq import format as quant
from helpers import NO_LAUNCHES, cache_contents, plain_attention, reference_over_cache, rel_err

D = 64


def attend(dtype, k, v, q, rotate, L, cache_out=None):
    """quantized_sdpa of the last ``L`` queries after the cache took k/v in two updates."""
    cache = QuantizedKVCache(4, rotate=rotate, window=8, sinks=2)
    n = k.shape[2] - L
    cache.update_and_fetch(k[:, :, :n].astype(dtype), v[:, :, :n].astype(dtype))
    view, _ = cache.update_and_fetch(k[:, :, n:].astype(dtype), v[:, :, n:].astype(dtype))
    out = quantized_sdpa(q.astype(dtype), view, D**-0.5, mask="causal" if L > 1 else None)
    if cache_out is not None:
        cache_out.append(cache)
    return out


def data(T=90, L=1, seed=0):
    """Keys and values with |x| < 2 (so 2^15 x fits float16), queries."""
    mx.random.seed(seed)
    k, v = (mx.clip(mx.random.normal((1, 2, T, D)), -1.99, 1.99) for _ in range(2))
    return k, v, mx.random.normal((1, 4, L, D))


PATHS = [1, 5]  # decode (one pass) and a prefill chunk (partial results, dequantized)
SCALES = [
    (mx.float32, False, 17),  # 2^17 x ~ 1e5..2.6e5: overflows float16, not a float32 model's store
    (mx.float32, "kv", 17),
    (mx.float16, False, 15),  # up to 65208 (the largest float16 is 65504)
    (mx.float16, "k", 15),  # keys rotated (a Gaussian row's rotation stays < 8 sigma); values not
    (mx.float16, "kv", 12),  # rotated values too: |x R| <= sqrt(64) |x|
    (mx.bfloat16, "kv", 100),
]


@pytest.mark.parametrize("L", PATHS)
@pytest.mark.parametrize("dtype,rotate,a", SCALES, ids=lambda x: str(x))
def test_extreme_scales_give_the_scaled_output(dtype, rotate, a, L):
    k, v, q = data(L=L)
    one = attend(dtype, k, v, q, rotate, L)
    keys_scale = a if rotate != "k" else a - 3
    big = attend(dtype, k * 2.0**keys_scale, v * 2.0**a, q * 2.0**-keys_scale, rotate, L)
    assert mx.all(mx.isfinite(big)).item()
    # output rounding; a float32 model's cache at 2^17 stores float32, at 1 float16
    assert rel_err(big.astype(mx.float32) * 2.0**-a, one) < (2e-3 if dtype != mx.float32 else 2e-2)


@pytest.mark.parametrize("L", PATHS)
@pytest.mark.parametrize("dtype,rotate,a", SCALES[:3], ids=lambda x: str(x))
def test_extreme_scales_against_fp32_attention_over_the_cache(dtype, rotate, a, L):
    k, v, q = data(L=L, seed=1)
    caches = []
    out = attend(dtype, k * 2.0**a, v * 2.0**a, q * 2.0**-a, rotate, L, caches)
    mask = "causal" if L > 1 else None
    ref = reference_over_cache(caches[0], (q * 2.0**-a).astype(dtype), D**-0.5,
                               None if L == 1 else _causal(L, k.shape[2]))
    assert mx.all(mx.isfinite(ref)).item() and rel_err(out, ref) < 4e-3, mask


def _causal(L, T):
    return mx.arange(T)[None] <= mx.arange(T - L, T)[:, None]


@pytest.mark.parametrize("L", PATHS)
@pytest.mark.parametrize("rotate", [False, "k", "kv"])
def test_float16_tokens_at_the_maximum_stay_finite(L, rotate):
    """+-65504 in every channel: a rotation of such a token exceeds float16 by up to
    sqrt(head_dim); it saturates at 65504 instead of becoming inf (the one case where the
    stored token differs from the model's by more than the quantization)."""
    k, v, q = data(L=L, seed=2)
    k, v = (mx.where(x > 0, 65504.0, -65504.0) for x in (k, v))
    caches = []
    out = attend(mx.float16, k, v, q * 1e-5, rotate, L, caches)
    assert mx.all(mx.isfinite(out)).item()
    ref = reference_over_cache(caches[0], (q * 1e-5).astype(mx.float16), D**-0.5,
                               None if L == 1 else _causal(L, k.shape[2]))
    assert rel_err(out, ref) < 4e-3


@pytest.mark.parametrize("L", PATHS)
@pytest.mark.parametrize("rotate", [False, "kv"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_channel_is_stored_as_zero(L, rotate, bad):
    """fp16 attention gives NaN or inf in that channel of the output (a key's: in the
    whole row); the cache stores the channel as 0 before the rotation and the group
    scale see it, so the output is finite and every other channel and token is as it
    would be with a 0 there."""
    k, v, q = data(L=L, seed=3)
    T = k.shape[2]
    for t in (1, 40, T - 1):  # a sink, a packed token, a window token
        for which in ("k", "v"):
            kb = k.at[:, :, t, 5].add(bad) if which == "k" else k
            vb = v.at[:, :, t, 5].add(bad) if which == "v" else v
            out = attend(mx.float16, kb, vb, q, rotate, L)
            k0 = k.at[:, :, t, 5].multiply(0.0) if which == "k" else k
            v0 = v.at[:, :, t, 5].multiply(0.0) if which == "v" else v
            assert mx.array_equal(out, attend(mx.float16, k0, v0, q, rotate, L)).item(), (t, which)


def test_dequantize_of_float16_scales_near_the_maximum_is_finite_in_float32():
    """mx.dequantize computes scale * q + bias in the scales' dtype: -7500 * 15 + 60000
    overflows float16 although -52500 fits."""
    x = mx.array([[60000.0] * 31 + [-60000.0]], dtype=mx.float16)
    y = quant.dequantize(quant.quantize(x, 4, 32), 4, 32, dtype=mx.float32)
    assert mx.all(mx.isfinite(y)).item() and rel_err(y, x) < 0.1


def test_fit_saturates_and_zeroes_non_finite_values():
    x = mx.array([1e5, -1e5, float("inf"), -float("inf"), float("nan"), 3.0])
    y = quant.fit(x, mx.float16)
    assert y.dtype == mx.float16 and y.tolist() == [65504.0, -65504.0, 0.0, 0.0, 0.0, 3.0]


def test_a_float32_model_packs_float16_scales_until_a_value_would_overflow_them():
    """float16 scales keep the cache at ~0.29x of fp16; the unquantized runs keep the
    model's float32, so a value beyond float16 is stored as it is, and the first packing
    of such a value turns the scales held (exactly) into float32, which stay float32
    after a save and load."""
    k, v, q = data(T=60)
    cache = QuantizedKVCache(4, window=8, sinks=2)
    cache.update_and_fetch(k[:, :, :40], v[:, :, :40])
    cache.update_and_fetch(k[:, :, 40:41], v[:, :, 40:41])
    assert cache.store_dtype == mx.float16 and cache.packed_keys[1].dtype == mx.float16
    assert cache.sink_keys.dtype == cache.window_keys.dtype == mx.float32
    n = cache.n_packed
    before = [a[:, :, :n].astype(mx.float32) for a in cache.packed_keys[1:]]
    view, _ = cache.update_and_fetch(k[:, :, 41:42] * 1e5, v[:, :, 41:42])
    assert view.dtype == mx.float32 and cache.store_dtype == mx.float16  # not packed yet: no look
    assert cache.window_keys[:, :, -1].abs().max().item() > 1e5  # stored, not saturated
    out = quantized_sdpa(q, view, D**-0.5)
    assert rel_err(out, reference_over_cache(cache, q, D**-0.5)) < 4e-3
    cache.pack_all_but(0)
    assert cache.store_dtype == mx.float32 and cache.n_packed > n
    after = cache.packed_keys[1:]
    assert all(a.dtype == mx.float32 and mx.array_equal(a[:, :, :n], b).item() for a, b in zip(after, before))
    loaded = QuantizedKVCache.from_state(cache.state)
    assert loaded.store_dtype == mx.float32
    view, _ = loaded.update_and_fetch(k[:, :, 42:43], v[:, :, 42:43])
    out = quantized_sdpa(q, view, D**-0.5)
    assert mx.all(mx.isfinite(out)).item()
    assert rel_err(out, reference_over_cache(loaded, q, D**-0.5)) < 4e-3


# The GPU paths (the kernels enabled: run_kernels_on). Decode steps of up to 8 queries (L 1
# and 5 here) take the decode kernel, whose tensor-core body ("mma") computes with float16
# fragments: each case below overflowed it or lost its precision.
KERNEL_CASES = [
    (mx.float16, False, 15, 1),  # queries of ~2^-15: float16 subnormals in the fragments
    (mx.float32, False, 17, 1),  # a float32 store beyond float16: sinks, packed run, window
    (mx.bfloat16, "kv", 100, 5),  # bfloat16 scales and window of ~2^100, rotated in the kernel
]


@pytest.mark.parametrize("dtype,rotate,a,L", KERNEL_CASES, ids=str)
def test_extreme_scales_through_the_decode_kernel(run_kernels_on, emu, dtype, rotate, a, L):
    run_kernels_on(emu)
    k, v, q = data(L=L, seed=4)
    one = attend(dtype, k, v, q, rotate, L)
    caches = []
    emu.launches.clear()
    big = attend(dtype, k * 2.0**a, v * 2.0**a, q * 2.0**-a, rotate, L, caches)
    assert "sdpa_decode" in [x[0] for x in emu.launches]
    assert mx.all(mx.isfinite(big)).item()
    big = big.astype(mx.float32) * 2.0**-a  # (a norm of 2^100 overflows float32)
    assert rel_err(big, one) < (2e-3 if dtype != mx.float32 else 2e-2)
    ref = reference_over_cache(caches[0], (q * 2.0**-a).astype(dtype), D**-0.5,
                               None if L == 1 else _causal(L, k.shape[2]))
    assert rel_err(big, ref * 2.0**-a) < 4e-3


def test_float16_tokens_at_the_maximum_through_the_decode_kernel(run_kernels_on, emu):
    run_kernels_on(emu)
    k, v, q = data(seed=2)
    k, v = (mx.where(x > 0, 65504.0, -65504.0) for x in (k, v))
    caches = []
    out = attend(mx.float16, k, v, q * 1e-5, False, 1, caches)
    ref = reference_over_cache(caches[0], (q * 1e-5).astype(mx.float16), D**-0.5)
    assert mx.all(mx.isfinite(out)).item() and rel_err(out, ref) < 4e-3


@pytest.mark.parametrize("at_max", [False, True])
def test_gpu_prefill_path_near_the_float16_maximum(run_kernels_on, at_max):
    """A prefill chunk on a GPU dequantizes the layer and runs MLX's attention (its MLX ops
    run here on the CPU): in float16, ``scale * q`` of the dequantization overflows and
    the queries that meet such keys are subnormals, so such a layer takes float32."""
    L = 20
    k, v, q = data(L=L, seed=5)
    if at_max:
        k, v, q = mx.where(k > 0, 65504.0, -65504.0), mx.where(v > 0, 65504.0, -65504.0), q * 1e-5
    else:
        k, v, q = k * 2.0**15, v * 2.0**15, q * 2.0**-15
    run_kernels_on(NO_LAUNCHES)  # enabled(): the GPU prefill path, and no kernel may run
    caches = []
    out = attend(mx.float16, k, v, q, False, L, caches)
    ref = reference_over_cache(caches[0], q.astype(mx.float16), D**-0.5, _causal(L, k.shape[2]))
    assert mx.all(mx.isfinite(out)).item() and rel_err(out, ref) < 4e-3


@pytest.mark.parametrize("T", [10, 40])
def test_a_first_chunk_at_the_float16_maximum_is_mlx_lms_attention(run_kernels_on, T):
    """A float16 prefill chunk with nothing packed yet (its tokens all unquantized) at
    +-65504: the GPU prefill path gives MLX's float16 attention over those tokens, exactly
    what mlx-lm's fp16 cache gives, finite, and within float16 rounding of fp32 attention."""
    mx.random.seed(5)
    k, v, q = (mx.random.normal((1, h, T, D)) for h in (2, 2, 4))
    k, v = (mx.where(x > 0, 65504.0, -65504.0).astype(mx.float16) for x in (k, v))
    q = (q * 1e-5).astype(mx.float16)
    run_kernels_on(NO_LAUNCHES)
    cache = QuantizedKVCache(4, rotate=False, window=8, sinks=2)
    view, _ = cache.update_and_fetch(k, v)
    assert cache.n_packed == 0
    out = quantized_sdpa(q, view, D**-0.5, mask="causal")
    fp16 = mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask="causal")
    ref = plain_attention(*(x.astype(mx.float32) for x in (q, k, v)), D**-0.5, _causal(T, T))
    assert mx.all(mx.isfinite(out)).item() and mx.array_equal(out, fp16)
    assert rel_err(out, ref) < 2e-2  # the float16 queries are subnormals: MLX's float16 attention rounds them


def test_window_append_kernel_saturates_and_zeroes_as_the_host_path(run_kernels_on, emu):
    """Decode tokens written by the window-append kernel: a key at the float16 maximum,
    rotated (up to sqrt(64) times beyond it), saturates at 65504 and an inf or NaN channel
    is stored as 0, in rotated keys and unrotated values alike, as the host path stores them."""
    config = dict(bits=4, rotate="k", window=8, sinks=2)
    host, fused = QuantizedKVCache(**config), QuantizedKVCache(**config)
    k, v, _ = data(T=16, seed=6)
    k, v = k.astype(mx.float16), v.astype(mx.float16)
    k = k.at[:, :, 11:].multiply(0.0).at[:, :, 11:].add(mx.where(k[:, :, 11:] > 0, 65504.0, -65504.0))
    for t, c, bad in ((12, 5, float("nan")), (13, 9, float("inf")), (14, 3, -float("inf"))):
        k, v = k.at[:, :, t, c].add(bad), v.at[:, :, t, c + 1].add(bad)
    chunks = [(0, 10)] + [(t, t + 1) for t in range(10, 16)]
    for i, j in chunks:
        host.update_and_fetch(k[:, :, i:j], v[:, :, i:j])
    run_kernels_on(emu)
    emu.launches.clear()
    for i, j in chunks:
        fused.update_and_fetch(k[:, :, i:j], v[:, :, i:j])
    assert sum(x[0] == "window_append" for x in emu.launches) == 6  # every decode step
    (hk, hv), (fk, fv) = cache_contents(host), cache_contents(fused)
    assert mx.all(mx.isfinite(fk)).item() and mx.all(mx.isfinite(fv)).item()
    assert fk.abs().max().item() == 65504.0
    assert rel_err(fk, hk) < 1e-3 and mx.array_equal(fv, hv).item()
