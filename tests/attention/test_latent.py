"""attention/latent.py: attention over one cached part standing for keys and values (MLA
decode), against fp32 attention over the tokens that part stands for; and through the bridge, a
tiny DeepSeek-V3 against the same model over the part dequantized and rotated back."""

import mlx.core as mx
import pytest

import mlx_kvq
from helpers import plain_attention, rel_err, tiny
from mlx_kvq.attention import latent_sdpa


# relative error; float32 products on CUDA may run in TF32 (a float16-sized mantissa)
TOL = 1e-5 if mx.default_device() == mx.cpu else 2e-3


def mlx_attention(q, k, v, scale, mask=None, sinks=None):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)


def filled_view(bits, rotate, dim, tokens, dtype=mx.float32, part="keys"):
    mx.random.seed(3)
    c = mlx_kvq.QuantizedKVCache(bits, group_size=32, rotate=rotate, window=8, sinks=2)
    for n in (tokens - 1, 1):
        k, v = c.update_and_fetch(mx.random.normal((1, 1, n, dim)).astype(dtype),
                                  mx.random.normal((1, 1, n, 32)).astype(dtype))
    return k if part == "keys" else v


@pytest.mark.parametrize("bits,rotate", [(4, "kv"), (4, "k"), (8, None), (3, "kv")])
@pytest.mark.parametrize("dim", [64, 72])  # 72: zero-padded to the group size, 96
def test_matches_fp32_attention_over_the_part(bits, rotate, dim):
    view = filled_view(bits, rotate, dim, 100)
    assert view.packed[2] > 0  # most tokens packed, sinks and window too
    q = mx.random.normal((1, 8, 1, dim))
    mask = mx.random.normal((1, 8, 1, 100))  # MLA's RoPE scores
    scale = dim**-0.5
    out = latent_sdpa(q, view, mlx_attention, scale=scale, mask=mask)
    ref = plain_attention(q, view.array, view.array, scale, mask)
    assert out.shape == (1, 8, 1, dim) and out.dtype == q.dtype
    assert rel_err(out, ref) < TOL


def test_values_part_and_prefill_queries():
    view = filled_view(4, "kv", 64, 60, part="values").for_queries(5)
    q = mx.random.normal((1, 4, 5, 32))
    out = latent_sdpa(q, view, mlx_attention, scale=0.25, mask="causal")
    x = view.array.astype(mx.float32)
    causal = mx.where(mx.arange(60)[None] <= mx.arange(55, 60)[:, None], 0.0, -mx.inf)
    assert rel_err(out, plain_attention(q, x, x, 0.25, causal)) < TOL


def test_float16_stays_finite_near_the_float16_maximum():
    """Rotated queries beyond float16 saturate instead of becoming inf."""
    view = filled_view(4, "kv", 64, 50, dtype=mx.float16)
    q = mx.full((1, 2, 1, 64), 60000.0, mx.float16)  # q R has an entry of 60000 * 8
    out = latent_sdpa(q, view, mlx_attention, scale=1e-6, mask=None)
    assert out.dtype == mx.float16 and mx.all(mx.isfinite(out)).item()


def test_deepseek_v3_decode_takes_the_rotated_latent(monkeypatch):
    from mlx_kvq.attention import latent as latent_module

    model = tiny("deepseek_v3")
    prompt = mx.array([[1, 5, 9, 2, 7, 3] * 8])
    calls = []
    real = latent_module.rotated_part
    monkeypatch.setattr(latent_module, "rotated_part", lambda v: calls.append(1) or real(v))

    def run():
        cache = mlx_kvq.make_prompt_cache(model, kv_bits=4, kv_group_size=32, window=8)
        model(prompt, cache=cache)
        return model(mx.array([[4]]), cache=cache)

    out = run()
    assert calls, "decode did not take latent_sdpa"
    # the same model over the latent dequantized and rotated back for every token (view.array)
    monkeypatch.setattr(latent_module, "rotated_part", lambda v: False)
    ref = run()
    assert rel_err(out, ref) < 10 * TOL


def test_batch_rows_take_the_rotated_latent_row_by_row(monkeypatch):
    """In a batch (``RowsKVCache``, the server's), each row's latent goes through
    ``latent_sdpa`` with its own slice of the model's RoPE-score mask, and each row's logits
    are its logits alone."""
    from mlx_kvq.attention import latent as latent_module
    from mlx_kvq.bridge import serve_caches

    model = serve_caches(tiny("deepseek_v3"), kv_bits=4, kv_group_size=32, window=8)
    prompts = ([1, 5, 9, 2, 7, 3] * 4, [4, 2, 8])  # the first past its window: packed tokens
    alone, rows = [], []
    for p in prompts:
        for keep in (alone, rows):
            keep.append(model.make_cache())
            model(mx.array([p]), cache=keep[-1])
    ref = mx.concatenate([model(mx.array([[6]]), cache=c) for c in alone])
    calls = []
    real = latent_module.rotated_part
    monkeypatch.setattr(latent_module, "rotated_part", lambda v: calls.append(1) or real(v))
    batch = [type(a).merge([a, b]) for a, b in zip(*rows)]
    got = model(mx.array([[6], [6]]), cache=batch)
    assert len(calls) == 2 * len(model.layers)  # every layer, row by row
    assert rel_err(got, ref) < 10 * TOL


@pytest.mark.parametrize("bits,rotate,dim", [(4, "kv", 64), (8, None, 64), (4, "k", 72), (2, "kv", 64)])
def test_latent_kernel_matches_fp32_attention_over_the_part(emu, run_kernels_on, bits, rotate, dim):
    """The packed run read by the latent kernel (run by the emulator), the sinks and window by
    the reference, merged; 72 dims: zero-padded to 96."""
    run_kernels_on(emu)
    view = filled_view(bits, rotate, dim, 100)
    q = mx.random.normal((1, 20, 1, dim))
    mask = mx.random.normal((1, 20, 1, 100))
    emu.launches.clear()
    out = latent_sdpa(q, view, mlx_attention, scale=dim**-0.5, mask=mask)
    assert [name for name, *_ in emu.launches] == ["sdpa_latent"]
    ref = plain_attention(q, view.array, view.array, dim**-0.5, mask)
    assert out.shape == (1, 20, 1, dim) and out.dtype == q.dtype
    assert rel_err(out, ref) < TOL


def test_latent_kernel_float16_batch_rows_and_causal_queries(emu, run_kernels_on):
    """float16 queries and cache, two batch rows with a bool mask each, then prefill queries
    with the causal mask string: the kernel's output equals the copy route's."""
    run_kernels_on(emu)
    view = filled_view(4, "kv", 64, 70, dtype=mx.float16)
    q = mx.random.normal((1, 16, 1, 64)).astype(mx.float16)
    keep = mx.arange(70).reshape(1, 1, 1, 70) % 3 != 1
    emu.launches.clear()
    out = latent_sdpa(q, view, mlx_attention, scale=0.125, mask=keep)
    assert emu.launches and emu.launches[0][0] == "sdpa_latent"
    x = view.array.astype(mx.float32)
    assert rel_err(out, plain_attention(q.astype(mx.float32), x, x, 0.125, keep)) < 2e-3  # a float16 output
    view = view.for_queries(4)
    q = mx.random.normal((1, 4, 4, 64)).astype(mx.float16)
    out = latent_sdpa(q, view, mlx_attention, scale=0.125, mask="causal")
    causal = mx.where(mx.arange(70)[None] <= mx.arange(66, 70)[:, None], 0.0, -mx.inf)
    assert rel_err(out, plain_attention(q.astype(mx.float32), x, x, 0.125, causal)) < 2e-3


def test_deepseek_v3_decode_with_the_latent_kernel(emu, run_kernels_on):
    """A tiny DeepSeek-V3's decode logits with the latent kernel (emulator) equal those over
    the dequantized latent (the CPU's route)."""
    model = tiny("deepseek_v3")
    prompt = mx.array([[1, 5, 9, 2, 7, 3] * 8])

    def run():
        cache = mlx_kvq.make_prompt_cache(model, kv_bits=4, kv_group_size=32, window=8)
        model(prompt, cache=cache)
        return [model(mx.array([[t]]), cache=cache) for t in (4, 8, 1)]

    ref = run()
    run_kernels_on(emu)
    emu.launches.clear()
    got = run()
    assert sum(name == "sdpa_latent" for name, *_ in emu.launches) >= 3 * len(model.model.layers)
    for g, r in zip(got, ref):
        assert rel_err(g, r) < 10 * TOL
