"""QuantizedRotatingKVCache against mlx-lm's own fp16 caches on sliding-window models."""

import mlx.core as mx
import mlx_lm.models.cache as lm_cache
import pytest
from mlx_lm.models import gemma3_text, llama

import mlx_kvq
from helpers import rel_err
from mlx_kvq.cache import QuantizedRotatingKVCache

WINDOW = 16
CHUNKS = [20, 8, 8] + [1] * 24  # a long prefill, chunks past the window, then decoding


def tiny_llama(layer_types=("sliding_attention", "full_attention", "sliding_attention"), window=WINDOW):
    mx.random.seed(0)
    args = llama.ModelArgs(
        model_type="llama", hidden_size=128, num_hidden_layers=len(layer_types),
        intermediate_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
        rms_norm_eps=1e-5, vocab_size=256, layer_types=list(layer_types),
        sliding_window=window, tie_word_embeddings=True,
    )
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def tiny_gemma3(window=WINDOW):
    mx.random.seed(1)
    args = gemma3_text.ModelArgs(
        model_type="gemma3_text", hidden_size=128, num_hidden_layers=3, intermediate_size=256,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, vocab_size=256,
        sliding_window=window, sliding_window_pattern=3,
    )
    model = gemma3_text.Model(args)
    mx.eval(model.parameters())
    return model


def run(model, cache, tokens, chunks=CHUNKS):
    out, i = [], 0
    for n in chunks:
        out.append(model(tokens[:, i : i + n], cache=cache))
        i += n
    return mx.concatenate(out, axis=1).astype(mx.float32)


@pytest.fixture(scope="module")
def tokens():
    mx.random.seed(2)
    return mx.random.randint(0, 256, (1, sum(CHUNKS)))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3], ids=["llama-swa", "gemma3"])
@pytest.mark.parametrize("bits,tol", [(8, 0.02), (4, 0.3)])  # random gemma3: 0.2 at 4 bits even without a window
def test_logits_match_mlx_lm_fp16(make, bits, tol, tokens):
    model = make()
    ref = run(model, lm_cache.make_prompt_cache(model), tokens)
    cache = mlx_kvq.make_prompt_cache(model, kv_bits=bits)
    assert any(isinstance(c, QuantizedRotatingKVCache) for c in cache)
    got = run(model, cache, tokens)
    assert rel_err(got, ref) < tol
    if bits == 8:
        assert (got.argmax(-1) == ref.argmax(-1)).mean().item() > 0.95
        # the window matters: the same weights attending to everything are much further off
        wide = make(window=1000)
        full = run(wide, lm_cache.make_prompt_cache(wide), tokens)
        assert rel_err(full, ref) > 3 * rel_err(got, ref)


def test_memory_is_bounded(tokens):
    model = tiny_llama(("sliding_attention", "full_attention"))
    cache = mlx_kvq.make_prompt_cache(model, kv_bits=4)
    run(model, cache, tokens)
    c = cache[0]
    assert c.offset == sum(CHUNKS) and c.size() == WINDOW
    assert c.held() == WINDOW  # after a decode step: the window, nothing more
    nbytes = c.nbytes
    run(model, cache, mx.concatenate([tokens] * 3, axis=1), [1] * 100)
    assert c.held() == WINDOW and c.nbytes <= nbytes + 2 * c.step * 64


def test_keep_tokens_stay(tokens):
    """Like ``RotatingKVCache(max_size, keep=4)`` (mlx-lm's ``max_kv_size``): first 4 tokens kept."""
    model = tiny_llama(("full_attention",))
    cache = [QuantizedRotatingKVCache(8, max_size=WINDOW, keep=4)]
    mlx_kvq.patch(model)
    c = cache[0]
    assert c.keep == 4 and c.sinks == 4
    ref_cache = [lm_cache.RotatingKVCache(max_size=WINDOW, keep=4)]
    chunks = [3] + [1] * 40
    ref = run(model, ref_cache, tokens, chunks)
    got = run(model, cache, tokens, chunks)
    assert c.held() == WINDOW and c.sink_keys.shape[2] == 4
    assert rel_err(got, ref) < 0.02  # decoding one token at a time: same tokens visible


def test_trim_rules_and_state_roundtrip(tmp_path, tokens):
    model = tiny_llama()
    cache = mlx_kvq.make_prompt_cache(model, kv_bits=4)
    run(model, cache, tokens, [10])
    assert lm_cache.can_trim_prompt_cache(cache) and lm_cache.trim_prompt_cache(cache, 3) == 3
    run(model, cache, tokens[:, 7:], [20, 1])
    assert not cache[0].is_trimmable() and cache[0].trim(2) == 0
    assert cache[1].is_trimmable()  # the full-attention layer
    path = str(tmp_path / "c.safetensors")
    mlx_kvq.save_prompt_cache(path, cache)
    loaded = mlx_kvq.load_prompt_cache(path, model, expect=cache[0].config)
    assert type(loaded[0]) is QuantizedRotatingKVCache and loaded[0].max_size == WINDOW
    rest = tokens[:, 28:40]
    a = run(model, cache, rest, [1] * 12)
    b = run(model, loaded, rest, [1] * 12)
    assert mx.array_equal(a, b)


def test_bad_arguments():
    with pytest.raises(ValueError, match="larger than keep"):
        QuantizedRotatingKVCache(4, max_size=4, keep=4)
    with pytest.raises(ValueError, match="sinks"):
        QuantizedRotatingKVCache(4, max_size=16, keep=4, sinks=2)
    for bad, name in ((dict(max_size="x"), "max_size"), (dict(max_size=0), "max_size"),
                      (dict(max_size=8, keep=2.0), "keep")):
        with pytest.raises(ValueError, match=name):
            QuantizedRotatingKVCache(4, **bad)


def test_single_query_mask_as_mlx_lm():
    """One query within the cache's own window: no mask, also for return_array, as mlx-lm's
    RotatingKVCache."""
    ref, ours = lm_cache.RotatingKVCache(max_size=8), QuantizedRotatingKVCache(4, 32, max_size=8)
    k = mx.random.normal((1, 2, 12, 32))
    ref.update_and_fetch(k, k)
    ours.update_and_fetch(k, k)
    for kw in ({}, {"return_array": True}):
        assert ours.make_mask(1, **kw) is None and ref.make_mask(1, **kw) is None


@pytest.mark.parametrize("chunks", [[12, 8, 8, 1, 1, 1], [5, 1, 1, 9, 1]])
def test_mask_wider_than_the_window_as_mlx_lm(chunks):
    """A mask one token wider than the window (plamo3 asks for it): mlx-lm's RotatingKVCache
    lets each query see what it holds within that width; ours gives the same attention."""
    max_size, wide = 8, 9
    ref, ours = lm_cache.RotatingKVCache(max_size=max_size), QuantizedRotatingKVCache(
        8, 32, max_size=max_size, window=64)  # nothing packed: the masks alone differ
    mx.random.seed(3)
    for n in chunks:
        q, k, v = (mx.random.normal((1, 2, n, 32)) for _ in range(3))
        mask_ref, mask = ref.make_mask(n, window_size=wide), ours.make_mask(n, window_size=wide)
        kr, vr = ref.update_and_fetch(k, v)
        kq, vq = ours.update_and_fetch(k, v)
        want = mx.fast.scaled_dot_product_attention(q, kr, vr, scale=0.2, mask=mask_ref)
        got = mlx_kvq.quantized_sdpa(q, kq, scale=0.2, mask=mask)
        assert rel_err(got, want) < 2e-3, (n, rel_err(got, want))


@pytest.mark.parametrize("chunks", [[30, 1, 1, 1], [5, 3, 1, 20, 1, 1], [1] * 30, [3, 30, 2], [2, 1, 12, 1]])
@pytest.mark.parametrize("keep", [0, 4])
def test_keys_after_is_what_the_update_returns(chunks, keep):
    """``keys_after(n)`` (the width of a batch row's mask, asked before the update) is the
    number of keys the update of ``n`` tokens then returns."""
    mx.random.seed(3)
    c = QuantizedRotatingKVCache(bits=4, group_size=32, max_size=24, keep=keep, window=8)
    for n in chunks:
        want = c.keys_after(n)
        k, _ = c.update_and_fetch(mx.random.normal((1, 2, n, 64)), mx.random.normal((1, 2, n, 64)))
        assert k.array.shape[2] == want
