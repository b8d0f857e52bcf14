"""mlx-lm's own generate loop, save/load and trim with mlx_kvq caches (tiny random llama)."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models import cache as lm_cache
from mlx_lm.models import llama

import mlx_kvq
from mlx_kvq import QuantizedKVCache
from mlx_kvq.bridge import patch
from helpers import rel_err, tiny


@pytest.fixture(scope="module")
def model():
    mx.random.seed(0)
    args = llama.ModelArgs(
        model_type="llama", hidden_size=256, num_hidden_layers=2, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=97,
        rope_traditional=True,
    )
    m = llama.Model(args)
    m.set_dtype(mx.float16)
    mx.eval(m.parameters())
    return m


PROMPT = mx.array([5, 17, 3, 88, 41, 2, 9, 60, 33, 12, 7, 71, 19, 4, 50, 23])


def logits_with(model, cache, chunks=(7, 9), steps=12):
    """Prefill in chunks, then greedy-decode; returns all the logits."""
    out, a = [], 0
    for c in chunks:
        out.append(model(PROMPT[None, a : a + c], cache=cache)[0])
        a += c
    tok = mx.argmax(out[-1][-1])
    for _ in range(steps):
        out.append(model(tok.reshape(1, 1), cache=cache)[0])
        tok = mx.argmax(out[-1][-1])
    return mx.concatenate(out).astype(mx.float32)


def test_make_prompt_cache_swaps_attention_caches(model):
    caches = mlx_kvq.make_prompt_cache(model, kv_bits=4)
    assert len(caches) == 2 and all(isinstance(c, QuantizedKVCache) for c in caches)
    fp16 = mlx_kvq.make_prompt_cache(model, kv_bits=None)
    assert all(type(c) is lm_cache.KVCache for c in fp16)
    with pytest.raises(ValueError, match="bits 7"):
        mlx_kvq.make_prompt_cache(model, kv_bits=7)


@pytest.mark.parametrize("bits,tol", [(8, 0.02), (4, 0.15)])
def test_logits_follow_the_fp16_cache(model, bits, tol):
    ref = logits_with(model, lm_cache.make_prompt_cache(model))
    got = logits_with(model, mlx_kvq.make_prompt_cache(model, kv_bits=bits))
    assert rel_err(got, ref) < tol


def test_patch_is_idempotent_and_leaves_other_caches_alone(model):
    patch(model)
    f = llama.scaled_dot_product_attention
    patch(model)
    assert llama.scaled_dot_product_attention is f and hasattr(f, "mlx_kvq_original")
    # mlx-lm's own caches still take mlx-lm's path
    a = logits_with(model, lm_cache.make_prompt_cache(model))
    b = logits_with(model, [lm_cache.KVCache() for _ in range(2)])
    assert mx.array_equal(a, b)


def test_generate_step_runs_unchanged(model):
    cache = mlx_kvq.make_prompt_cache(model, kv_bits=8)
    ref = [t for t, _ in zip(generate_step(PROMPT, model, prompt_cache=lm_cache.make_prompt_cache(model)), range(10))]
    got = [t for t, _ in zip(generate_step(PROMPT, model, prompt_cache=cache), range(10))]
    assert cache[0].offset >= len(PROMPT) + 9  # generate_step runs one step ahead
    assert [int(t) for t, _ in got] == [int(t) for t, _ in ref]


def test_save_load_with_mlx_lm_functions(model, tmp_path):
    cache = mlx_kvq.make_prompt_cache(model, kv_bits=4, window=3)
    model(PROMPT[None], cache=cache)
    model(PROMPT[None, :2], cache=cache)  # a second chunk packs the first
    model(PROMPT[None, :1], cache=cache)
    assert cache[0].n_packed > 0 and cache[0].window_keys.shape[2] > 0
    path = tmp_path / "c.safetensors"
    lm_cache.save_prompt_cache(str(path), cache, {"model": "tiny"})
    loaded, meta = lm_cache.load_prompt_cache(str(path), return_metadata=True)
    assert meta == {"model": "tiny"}
    assert all(type(c) is QuantizedKVCache for c in loaded)
    for a, b in zip(cache, loaded):
        assert a.config == b.config and a.offset == b.offset
        for x, y in zip(a.state[3] + a.state[4], b.state[3] + b.state[4]):
            assert mx.array_equal(x, y) and x.dtype == y.dtype
    # continuing from the loaded cache gives what continuing the original gives
    step = PROMPT[None, 2:3]
    assert mx.array_equal(model(step, cache=cache), model(step, cache=loaded))


def test_load_checks_config_and_layers(model, tmp_path):
    cache = mlx_kvq.make_prompt_cache(model, kv_bits=4)
    model(PROMPT[None], cache=cache)
    path = tmp_path / "c.safetensors"
    mlx_kvq.save_prompt_cache(path, cache)
    assert mlx_kvq.load_prompt_cache(path, model, expect=cache[0].config)[0].offset == len(PROMPT)
    with pytest.raises(ValueError, match="saved with KV cache config .*k_bits=4.* but .*k_bits=8"):
        mlx_kvq.load_prompt_cache(path, expect=QuantizedKVCache(8).config)
    with pytest.raises(ValueError, match="fp16"):
        mlx_kvq.load_prompt_cache(path, expect=None)
    with pytest.raises(FileNotFoundError, match="not found"):
        mlx_kvq.load_prompt_cache(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a cache")
    with pytest.raises(ValueError, match="not a readable prompt cache"):
        mlx_kvq.load_prompt_cache(tmp_path / "junk.safetensors")
    one_layer = tmp_path / "one.safetensors"
    mlx_kvq.save_prompt_cache(one_layer, cache[:1])
    with pytest.raises(ValueError, match="1 layers; this model has 2"):
        mlx_kvq.load_prompt_cache(one_layer, model)


def test_trim_through_mlx_lm(model):
    cache = mlx_kvq.make_prompt_cache(model, kv_bits=8)
    model(PROMPT[None], cache=cache)
    assert lm_cache.can_trim_prompt_cache(cache)
    assert lm_cache.trim_prompt_cache(cache, 5) == 5
    assert all(c.offset == len(PROMPT) - 5 for c in cache)
    # re-feeding the trimmed tokens gives the logits of the untrimmed run
    fresh = mlx_kvq.make_prompt_cache(model, kv_bits=8)
    full = model(PROMPT[None], cache=fresh)
    again = model(PROMPT[None, -5:], cache=cache)
    assert rel_err(again[0], full[0, -5:]) < 0.02


def test_fp16_batch_helpers(model):
    """The mlx-lm cache helpers mlx_kvq.batch uses: left-padded prefill, rows out, merged back."""
    from mlx_kvq.bridge import (
        empty_fp16_cache, extract_row, fp16_batch_cache, is_fp16_cache, merge_mlx_lm_caches,
    )

    a, b = PROMPT[:10], PROMPT[:6]
    cache = fp16_batch_cache(model, [0, 4])
    assert len(cache) == 2 and all(type(c) is lm_cache.BatchKVCache for c in cache)
    x = mx.concatenate([a[None], mx.concatenate([mx.zeros((4,), PROMPT.dtype), b])[None]])
    model(x, cache=cache)
    for i, p in enumerate([a, b]):
        rows = [extract_row(c, i) for c in cache]
        assert all(is_fp16_cache(r) and r.offset == len(p) for r in rows)
        alone = lm_cache.make_prompt_cache(model)
        model(p[None], cache=alone)
        for r, c in zip(rows, alone):
            assert rel_err(r.keys, c.keys[:, :, : len(p)]) < 1e-2
    empty = empty_fp16_cache()
    assert is_fp16_cache(empty) and empty.empty()
    assert not is_fp16_cache(cache[0]) and not is_fp16_cache(QuantizedKVCache(4))
    merged = merge_mlx_lm_caches([extract_row(cache[0], 0), extract_row(cache[0], 1)])
    assert type(merged) is lm_cache.BatchKVCache and merged.left_padding.tolist() == [0, 4]
    with pytest.raises(ValueError, match="object layers cannot be batched"):
        merge_mlx_lm_caches([object()])


# -- with the real SmolLM2-135M-Instruct weights (the embedded model) ---------------------

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue.",
]


def greedy(model, tokenizer, prompt, cache, n=32, margins=False):
    """Greedy tokens (and, if asked, the top-1 minus top-2 logprob at each step)."""
    from mlx_kvq.generation import encode_prompt

    tokens = mx.array(encode_prompt(tokenizer, prompt))
    steps = generate_step(tokens, model, prompt_cache=cache, prefill_step_size=16)
    out = [(int(t), lp) for (t, lp), _ in zip(steps, range(n))]
    if not margins:
        return [t for t, _ in out]
    top2 = lambda lp: mx.topk(lp, 2).tolist()
    return [t for t, _ in out], [abs(a - b) for a, b in (top2(lp) for _, lp in out)]


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_8bit_greedy_matches_the_unquantized_cache_for_32_tokens(fast_smollm, prompt):
    """On the float32 copy of the weights (5 s a prompt on a 2-core CPU; 16 s packed): the
    packed weights' float16 keys are covered by the 4-bit test below."""
    model, tokenizer = fast_smollm
    ref, margin = greedy(model, tokenizer, prompt, lm_cache.make_prompt_cache(model), margins=True)
    got = greedy(model, tokenizer, prompt, mlx_kvq.make_prompt_cache(model, kv_bits=8))
    first = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None)
    # identical, or the unquantized run itself was a near-tie (< 0.1 nats) where they part
    assert first is None or margin[first] < 0.1, (first, margin[first])


def test_4bit_cache_on_real_model_stays_close(smollm):
    model, tokenizer = smollm
    ref = greedy(model, tokenizer, PROMPTS[0], lm_cache.make_prompt_cache(model), n=12)
    got = greedy(model, tokenizer, PROMPTS[0], mlx_kvq.make_prompt_cache(model, kv_bits=4), n=12)
    assert tokenizer.decode(got).count("Paris") and sum(a == b for a, b in zip(got, ref)) >= 8


def test_save_trim_load_real_model(smollm, tmp_path):
    model, tokenizer = smollm
    tokens = mx.array(tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4))
    cache = mlx_kvq.make_prompt_cache(model, kv_bits=4)
    model(tokens[None], cache=cache)
    lm_cache.trim_prompt_cache(cache, 3)
    path = tmp_path / "doc.safetensors"
    lm_cache.save_prompt_cache(str(path), cache)
    loaded = mlx_kvq.load_prompt_cache(path, model, expect=cache[0].config)
    assert all(c.offset == len(tokens) - 3 for c in loaded)
    nxt = tokens[None, -3:]
    assert mx.array_equal(model(nxt, cache=cache), model(nxt, cache=loaded))


@pytest.mark.parametrize("size", [0, -8, 4.5, "64"])
def test_max_kv_size_must_be_a_positive_count(model, size):
    with pytest.raises(ValueError, match="max_kv_size"):
        mlx_kvq.make_prompt_cache(model, kv_bits=4, max_kv_size=size)


def test_served_model_reads_its_modules_once(monkeypatch):
    """``serve_caches``: a server builds caches for every request; the model's modules are read
    (and the options checked) once, and each request gets caches of its own, as configured."""
    from mlx_kvq import bridge

    walks = []
    real = bridge.module_names
    monkeypatch.setattr(bridge, "module_names", lambda m: walks.append(1) or real(m))
    model = bridge.serve_caches(tiny("gemma2"), kv_bits=3, kv_group_size=32, window=8)
    assert len(walks) == 1
    a, b = model.make_cache(), model.make_cache()
    assert len(walks) == 1
    assert all(isinstance(c, QuantizedKVCache) and c.config["k_bits"] == 3 and c.config["window"] == 8 for c in a)
    assert all(c.fetch_arrays for c in a)  # gemma2 computes attention itself (arrays_reason)
    assert not any(x is y for x, y in zip(a, b))
    with pytest.raises(ValueError, match="bits 7"):
        bridge.serve_caches(tiny("llama"), kv_bits=7)


def test_cache_list_members_are_quantized():
    caches = mlx_kvq.make_prompt_cache(tiny("falcon_h1"), kv_bits=8)
    members = [type(m) for c in caches for m in c.caches]
    assert lm_cache.ArraysCache in members and QuantizedKVCache in members
    assert lm_cache.KVCache not in members


def test_a_cache_left_fp16_warns_once_and_strict_refuses():
    model = tiny("deepseek_v41")  # its own LayerCache
    with pytest.warns(UserWarning, match=r"layers \[.*\] stay fp16: .*LayerCache") as caught:
        caches = mlx_kvq.make_prompt_cache(model, kv_bits=4)
    assert len(caught) == 1
    assert any(type(c).__name__ == "LayerCache" for c in caches)
    with pytest.raises(ValueError, match="LayerCache.*strict=True"):
        mlx_kvq.make_prompt_cache(model, kv_bits=4, strict=True)


def test_models_computing_attention_themselves_get_arrays():
    from mlx_kvq.bridge import arrays_reason

    assert "computes attention itself" in arrays_reason(tiny("gemma2"))
    assert "mx.fast.scaled_dot_product_attention" in arrays_reason(tiny("plamo2"))
    assert arrays_reason(tiny("llama")) is None
    caches = mlx_kvq.make_prompt_cache(tiny("gemma2"), kv_bits=8, kv_group_size=32)
    k, v = caches[0].update_and_fetch(mx.zeros((1, 2, 3, 32)), mx.zeros((1, 2, 3, 32)))
    assert type(k) is mx.array and k.shape == (1, 2, 3, 32)


@pytest.mark.parametrize("bad", [None, "model", nn.Linear(2, 2)])
def test_make_prompt_cache_names_what_is_not_a_model(bad):
    with pytest.raises(ValueError, match=f"model must be an mlx-lm model .* got {type(bad).__name__}"):
        mlx_kvq.make_prompt_cache(bad)
    with pytest.raises(ValueError, match="model must be an mlx-lm model"):
        mlx_kvq.patch(bad)
