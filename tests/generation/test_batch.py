"""Batched generation: each row's greedy output equals running its prompt alone."""

import pytest
from mlx_lm import stream_generate

import mlx_kvq
from mlx_kvq.generation import batch_generate
from mlx_kvq.cache import QuantizedKVCache, RowsKVCache
from mlx_kvq.generation import encode_prompt

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea and the wind in autumn, please.",
    "Hi",
    "List three colors.",
]
MAX_TOKENS = 6


def alone(model, tokenizer, prompt, max_tokens=MAX_TOKENS, **kw):
    step = kw.pop("prefill_step_size", 2048)
    cache = mlx_kvq.make_prompt_cache(model, **kw)
    tokens = encode_prompt(tokenizer, prompt)
    rs = stream_generate(model, tokenizer, tokens, max_tokens=max_tokens, prompt_cache=cache,
                         prefill_step_size=step)
    return "".join(r.text for r in rs)


@pytest.mark.parametrize(
    "kv", [dict(kv_bits=4), dict(kv_bits=None), dict(kv_bits=2), dict(kv_bits=4, prefill_step_size=8)],
    ids=["4bit", "fp16", "2bit-window", "4bit-chunked-prefill"],
)
def test_batch_matches_single(fast_smollm, kv):
    model, tokenizer = fast_smollm
    got = batch_generate(model, tokenizer, PROMPTS, max_tokens=MAX_TOKENS, **kv)
    assert len({len(encode_prompt(tokenizer, p)) for p in PROMPTS}) == len(PROMPTS)
    for prompt, text in zip(PROMPTS, got.texts):
        assert text == alone(model, tokenizer, prompt, **kv), prompt
    assert all(t for t in got.texts)


LONG = "The old lighthouse keeper wrote down every ship that passed the cape. "


@pytest.mark.parametrize("kv", [dict(kv_bits=4), dict(kv_bits=2, window=16)], ids=["4bit", "2bit"])
def test_batch_matches_single_on_prompts_that_pack(fast_smollm, kv):
    """Prompts past the window pack at the first decode step and every flush_block steps
    after; 40 new tokens cross two flushes, and rows of different lengths still match."""
    model, tokenizer = fast_smollm
    prompts = [f"Summarize: {LONG * n} Who wrote the ships down?" for n in (7, 4)]
    assert min(len(encode_prompt(tokenizer, p)) for p in prompts) > 60
    n = QuantizedKVCache.flush_block + 8
    got = batch_generate(model, tokenizer, prompts, max_tokens=n, **kv)
    for prompt, ids in zip(prompts, got.token_ids):
        assert len(ids) > QuantizedKVCache.flush_block  # crossed the second flush
        assert tokenizer.decode(ids) == alone(model, tokenizer, prompt, max_tokens=n, **kv)


def test_batch_positions_are_per_row(fast_smollm):
    model, tokenizer = fast_smollm
    got = batch_generate(model, tokenizer, PROMPTS[:2], max_tokens=1)
    layer = got.caches[0]
    assert isinstance(layer, RowsKVCache) and len(layer) == 2
    lengths = [len(encode_prompt(tokenizer, p)) for p in PROMPTS[:2]]
    assert layer.offset.tolist() == lengths  # each row's own position, for RoPE


@pytest.mark.parametrize("kv", [dict(kv_bits=4, quantized_kv_start=40, sinks=0), dict(kv_bits=4, max_kv_size=48),
                                dict(kv_bits=4, sinks=64)], ids=["start", "rotating", "sinks-past-a-prompt"])
def test_batch_matches_single_where_rows_pack_apart(fast_smollm, kv):
    """Prompts whose rows start packing on different steps (shorter than quantized_kv_start),
    sliding-window caches, a prompt shorter than the sinks: every row packs as alone."""
    model, tokenizer = fast_smollm
    prompts = ["Hi", f"Summarize: {LONG * 2} Who wrote the ships down?"]
    got = batch_generate(model, tokenizer, prompts, max_tokens=10, **kv)
    for prompt, ids in zip(prompts, got.token_ids):
        assert tokenizer.decode(ids) == alone(model, tokenizer, prompt, max_tokens=10, **kv)


def test_batch_generate_errors(fast_smollm):
    model, tokenizer = fast_smollm
    with pytest.raises(ValueError, match="No prompts"):
        batch_generate(model, tokenizer, [], max_tokens=2)
    with pytest.raises(ValueError, match="Empty"):
        batch_generate(model, tokenizer, [[]], max_tokens=2)
