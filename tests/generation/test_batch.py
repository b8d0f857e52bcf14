"""Batched generation: each row's greedy output equals running its prompt alone."""

import mlx.core as mx
import pytest
from mlx_lm import stream_generate

import mlx_kvq
from helpers import rel_err
from mlx_kvq.attention import quantized_sdpa
from mlx_kvq.cache import BatchQuantizedKVCache, merge
from mlx_kvq.generation import batch_generate
from mlx_kvq.cache import QuantizedKVCache
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
    prompts = [f"Summarize: {LONG * n} Who wrote the ships down?" for n in (7, 4, 10)]
    assert min(len(encode_prompt(tokenizer, p)) for p in prompts) > 60
    n = QuantizedKVCache.flush_block + 8
    got = batch_generate(model, tokenizer, prompts, max_tokens=n, **kv)
    for prompt, ids in zip(prompts, got.token_ids):
        assert len(ids) > QuantizedKVCache.flush_block  # crossed the second flush
        assert tokenizer.decode(ids) == alone(model, tokenizer, prompt, max_tokens=n, **kv)


def _prefilled(n, seed, config, H=2, D=64):
    """A cache right after a one-chunk prefill of ``n`` random tokens."""
    mx.random.seed(seed)
    c = QuantizedKVCache(**config)
    c.update_and_fetch(mx.random.normal((1, H, n, D)), mx.random.normal((1, H, n, D)))
    return c


@pytest.mark.parametrize("config", [dict(bits=4, window=8), dict(bits=4, sinks=0, window=8)])
def test_merged_rows_pack_and_attend_as_alone(config):
    """Decode a merged batch and each row alone for 2 * flush_block + 2 steps: the same
    tokens are packed on the same steps, so attention agrees to rounding every step."""
    lengths = [70, 23, 9]
    alone_rows = [_prefilled(n, s, config) for s, n in enumerate(lengths)]
    batch = merge([_prefilled(n, s, config) for s, n in enumerate(lengths)])
    for step in range(2 * QuantizedKVCache.flush_block + 2):
        mx.random.seed(100 + step)
        q, k, v = (mx.random.normal((3, 2, 1, 64)) for _ in range(3))
        mask = batch.make_mask(1)
        view, _ = batch.update_and_fetch(k, v)
        out = quantized_sdpa(q, view, scale=0.125, mask=mask)
        for i, row in enumerate(alone_rows):
            rview, _ = row.update_and_fetch(k[i : i + 1], v[i : i + 1])
            ref = quantized_sdpa(q[i : i + 1], rview, scale=0.125)
            assert rel_err(out[i : i + 1], ref) < 1e-5, (step, i)
            # the batch's packed run holds the row's padding, then its packed tokens
            assert row.n_packed == max(0, batch.n_packed - batch.left_padding[i].item())


def test_batch_positions_are_per_row(fast_smollm):
    model, tokenizer = fast_smollm
    got = batch_generate(model, tokenizer, PROMPTS[:2], max_tokens=1)
    layer = got.caches[0]
    assert isinstance(layer, BatchQuantizedKVCache)
    lengths = [len(encode_prompt(tokenizer, p)) for p in PROMPTS[:2]]
    assert layer.offset.tolist() == lengths  # each row's own position, for RoPE
    assert layer.left_padding.tolist() == [max(lengths) - n for n in lengths]


def _filled(n, seed, config, H=2, D=64):
    mx.random.seed(seed)
    c = QuantizedKVCache(**config)
    k, v = mx.random.normal((1, H, n, D)), mx.random.normal((1, H, n, D))
    c.update_and_fetch(k, v)
    c.flush()
    return c


@pytest.mark.parametrize("config", [dict(bits=4), dict(bits=4, sinks=0), dict(bits=2, window=8)])
@pytest.mark.parametrize("N", [1, 3])
def test_left_padding_mask_hides_padding(config, N):
    """Attention of a merged (padded) batch equals each row's attention alone, N == 1 too."""
    rows = [_filled(n, s, config) for s, n in enumerate([20, 13, 7])]
    batch = merge(rows)
    assert batch.left_padding.tolist() == [0, 7, 13]
    mx.random.seed(5)
    q, k, v = (mx.random.normal((3, 2, N, 64)) for _ in range(3))
    mask = batch.make_mask(N)
    assert mask.shape == (3, 1, N, batch.offset + N)
    view, _ = batch.update_and_fetch(k, v)
    out = quantized_sdpa(q, view, scale=0.125, mask=mask)
    for i, row in enumerate(rows):
        m = row.make_mask(N, return_array=True)
        rview, _ = row.update_and_fetch(k[i : i + 1], v[i : i + 1])
        ref = quantized_sdpa(q[i : i + 1], rview, scale=0.125, mask=m)
        assert rel_err(out[i : i + 1], ref) < 1e-5


def test_left_padding_none_keeps_masks():
    c = _filled(10, 0, dict(bits=4))
    assert c.left_padding is None
    assert c.make_mask(1) is None and c.make_mask(4) == "causal"
    assert c.make_mask(2, return_array=True).shape == (2, 12)


def test_merge_rejects_short_prompts_and_mixed_configs():
    with pytest.raises(ValueError, match="too short"):
        merge([_filled(10, 0, dict(bits=4)), _filled(3, 1, dict(bits=4))])
    with pytest.raises(ValueError, match="one config"):
        merge([_filled(10, 0, dict(bits=4)), _filled(10, 1, dict(bits=8))])
    with pytest.raises(ValueError, match="quantized_kv_start"):
        merge([_prefilled(20, 0, dict(bits=4, start=64)), _prefilled(12, 1, dict(bits=4, start=64))])


def test_batch_generate_errors(fast_smollm):
    model, tokenizer = fast_smollm
    with pytest.raises(ValueError, match="No prompts"):
        batch_generate(model, tokenizer, [], max_tokens=2)
    with pytest.raises(ValueError, match="Empty"):
        batch_generate(model, tokenizer, [[]], max_tokens=2)
