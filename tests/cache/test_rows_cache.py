"""RowsKVCache under mlx-lm's BatchGenerator (continuous batching): requests that join
and leave a running batch get the greedy tokens they get alone with the same cache."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.generate import BatchGenerator, generate_step
from mlx_lm.models import llama
from mlx_lm.models.cache import LRUPromptCache

from mlx_kvq.bridge import make_prompt_cache, serve_caches
from mlx_kvq.cache import QuantizedKVCache, QuantizedRotatingKVCache, RowsKVCache

VOCAB = 96


def tiny_model(seed=0):
    """A random 2-layer float32 llama (head dim 64, 2 query heads on 1 KV head)."""
    mx.random.seed(seed)
    args = llama.ModelArgs(model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=192,
                           num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-5, vocab_size=VOCAB)
    model = llama.Model(args)
    # sharper logits than the default init, so greedy tokens vary with the context
    model.update(nn.utils.tree_map(lambda p: p * 3, model.parameters()))
    mx.eval(model.parameters())
    return model


def prompt(n, seed):
    return mx.random.randint(0, VOCAB, (n,), key=mx.random.key(seed)).tolist()


def alone(model, tokens, max_tokens, kv, step, logprobs=False):
    cache = make_prompt_cache(model, **kv)
    out = list(generate_step(mx.array(tokens), model, max_tokens=max_tokens, prompt_cache=cache,
                             prefill_step_size=step))
    toks = [t for t, _ in out]
    return (toks, [lp for _, lp in out]) if logprobs else toks


NEAR_TIE = 0.1  # top-1 minus top-2 log-prob


def assert_as_alone(got, model, tokens, max_tokens, kv, step):
    """``got`` equals the greedy tokens of ``tokens`` run alone, up to a step where the alone
    run's top two tokens are within ``NEAR_TIE``: there the batch's matmuls (M = rows, not 1)
    may round differently. With TF32 matmuls (MLX's default on CUDA and M5 GPUs) they do, and
    a 2-bit cache turns that into other tokens (``benchmarks/lab/rows_gpu_divergence.py`` on
    the H200: a gap of 2.1 at 2 bits, 0.042 with mlx-lm's fp16 caches); the tests run without
    TF32 (conftest), where the H200 gives every config's rows exactly. On the CPU OpenBLAS's
    FMA kernels do too (an AMD EPYC, its Haswell and Zen kernels: the 2-bit config leaves
    its run alone at a near tie; with ``OPENBLAS_CORETYPE=Sandybridge`` every config is exact)."""
    ref, lps = alone(model, tokens, max_tokens, kv, step, logprobs=True)
    if got == ref:
        return
    j = next(k for k, (a, b) in enumerate(zip(got, ref)) if a != b)
    top = mx.sort(lps[j].astype(mx.float32))[-2:].tolist()
    assert top[1] - top[0] < NEAR_TIE, (j, top)


KV = {
    "4bit": dict(kv_bits=4),
    "2bit-window16": dict(kv_bits=2, window=16),
    "4bit-rotating": dict(kv_bits=4, max_kv_size=40),
}


def joining_and_leaving(model, prompts, n_new, step):
    """A BatchGenerator run: the first two prompts start, the others join three steps later,
    the fourth is removed at step 12 (a client that goes away). Returns the generator and
    each prompt's greedy tokens (None for the removed one)."""
    gen = BatchGenerator(model, max_tokens=n_new, prefill_step_size=step, completion_batch_size=8,
                         prefill_batch_size=4)
    uids = gen.insert(prompts[:2])
    got = {u: [] for u in uids}
    for i in range(60 * n_new):
        if i == 3:
            new = gen.insert(prompts[2:])
            uids += new
            got.update({u: [] for u in new})
        if i == 12:
            gen.remove([uids[3]])
            del got[uids[3]]
        for r in gen.next_generated():
            if r.uid in got:
                got[r.uid].append(r.token)
        if all(len(t) == n_new for t in got.values()):
            break
    return gen, [got.get(u) for u in uids]


@pytest.mark.parametrize("kv", KV.values(), ids=KV.keys())
def test_requests_joining_and_leaving_match_alone(kv):
    """Two requests start, two join three steps later, one is removed midway: every
    finished request's tokens equal its run alone (prompts past the window, decodes past
    two flush blocks, a chunked and right-padded prefill)."""
    model = serve_caches(tiny_model(), **kv)
    n_new, step = QuantizedKVCache.flush_block + 10, 16
    prompts = [prompt(n, s) for s, n in enumerate([45, 9, 70, 33, 52])]
    gen, rows = joining_and_leaving(model, prompts, n_new, step)
    caches = gen._generation_batch.prompt_cache
    assert not caches or all(len(c) == 0 for c in caches)  # finished rows are gone
    for i, (toks, p) in enumerate(zip(rows, prompts)):
        if toks is not None:
            assert_as_alone(toks, model, p, n_new, kv, step)
    assert sum(t is not None for t in rows) == 4


def test_rows_hold_their_own_tokens_and_extract_compact_copies():
    model = serve_caches(tiny_model(), kv_bits=4)
    gen = BatchGenerator(model, max_tokens=3, prefill_step_size=64)
    gen.insert([prompt(50, 1), prompt(7, 2)])
    done = []
    while len(done) < 2:
        done += [r for r in gen.next_generated() if r.finish_reason]
    for r in done:
        layer = r.prompt_cache[0]
        assert type(layer) is QuantizedKVCache
        assert layer.offset == len(r.all_tokens)  # the prompt and what it generated
        assert layer.nbytes == layer.used_nbytes()  # no spare room in a prompt-cache entry
        assert layer.nbytes < layer.dense_nbytes() or layer.offset <= layer.window + layer.sinks


def test_prompt_cache_budget_counts_quantized_bytes():
    """mlx-lm's LRU prompt cache evicts by the entries' ``nbytes``: quantized entries are
    their packed size, so a byte budget holds more of them than of fp16 entries."""
    model = tiny_model()
    def entry(kv):
        c = make_prompt_cache(model, **kv)
        model(mx.array([prompt(300, 3)]), cache=c)
        for x in c:  # what generation.prefill does after a prompt: the last chunk packed
            if hasattr(x, "flush"):
                x.flush()
        return [RowsKVCache.merge([x]).extract(0) if hasattr(x, "config") else x for x in c]
    q, f = entry(dict(kv_bits=4)), entry(dict(kv_bits=None))
    qb, fb = sum(c.nbytes for c in q), sum(c.nbytes for c in f)
    assert qb < 0.45 * fb
    lru = LRUPromptCache(max_size=100, max_bytes=fb)
    for i in range(fb // qb + 2):
        lru.insert_cache("m", [i] * 5, entry(dict(kv_bits=4)))
    assert len(lru) == fb // qb and lru.nbytes <= fb


def test_rotating_rows_and_bad_updates():
    rows = RowsKVCache.merge([QuantizedRotatingKVCache(bits=4, max_size=20, keep=4) for _ in range(2)])
    with pytest.raises(ValueError, match="one row for each"):
        rows.update_and_fetch(mx.zeros((3, 1, 1, 64)), mx.zeros((3, 1, 1, 64)))
    rows.prepare(lengths=[5, 2], right_padding=[0, 3])
    view, _ = rows.update_and_fetch(mx.ones((2, 1, 5, 64)), mx.ones((2, 1, 5, 64)))
    rows.finalize()
    assert view.takes == [5, 2] and rows.offset.tolist() == [5, 2]
    rows.filter([1])
    assert len(rows) == 1 and rows.offset.tolist() == [2]


def test_prompt_cache_copies_are_independent():
    """mlx-lm's prompt cache hands out ``copy.deepcopy`` of its entries: the copy and the
    entry then decode on their own, neither writing into the other's arrays."""
    import copy

    mx.random.seed(5)
    kv = lambda n: (mx.random.normal((1, 2, n, 64)), mx.random.normal((1, 2, n, 64)))
    c = QuantizedKVCache(bits=4)
    c.update_and_fetch(*kv(50))
    c.update_and_fetch(*kv(1))  # a decode step: the window has spare room, written in place
    d = copy.deepcopy(c)
    held = [mx.array(a) for a in d.state[5:]]
    step = kv(1)
    c.update_and_fetch(*step)
    assert all(mx.array_equal(a, b) for a, b in zip(held, d.state[5:]))
    d.update_and_fetch(*step)
    for a, b in zip(c.state[3:], d.state[3:]):
        a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
        assert all(mx.array_equal(x, y) for x, y in zip(a, b))


# the architectures that use what they fetch as arrays and batch (``serving.rows_batchable``)
ARRAY_MODELS = ["bailing_hybrid", "bailing_moe_v3", "deepseek_v3", "gemma3n", "glm4_moe_lite", "kimi_k25",
                "kimi_k3", "kimi_linear", "kimi_vl", "longcat_flash", "mistral4", "phi", "phixtral", "plamo",
                "stablelm"]


@pytest.mark.parametrize("name", ARRAY_MODELS)
def test_models_that_compute_with_what_they_fetch_batch_as_alone(name):
    """Models that use the fetched keys and values as arrays (MLA's RoPE keys and latent,
    casts, ``mx.tile``, their own attention, another layer's cache) get the rows' arrays
    left-padded with the padding hidden by the batch mask, as mlx-lm's ``BatchKVCache``
    gives them: every request's tokens equal its run alone."""
    batch_as_alone(name)


@pytest.mark.parametrize("name", ["deepseek_v3", "mistral4", "stablelm"])
def test_rotating_rows_of_models_that_compute_with_what_they_fetch_batch_as_alone(name):
    """The same with sliding-window caches (``max_kv_size``): each row's array mask is as wide
    as the keys its cache returns (kept and visible tokens), not as its position."""
    batch_as_alone(name, max_kv_size=24)


def batch_run(name, dtype=None, **extra):
    """A tiny ``name`` model (in ``dtype``) serving requests that join and leave a batch:
    ``(model, kv, prompts, each prompt's greedy tokens or None)``; 12 new tokens, chunks of 16."""
    from helpers import tiny

    kv = dict(kv_bits=4, kv_group_size=32, window=8, **extra)
    m = tiny(name)
    if dtype is not None:
        m.set_dtype(dtype)
    model = serve_caches(m, **kv)
    prompts = [[t % 64 for t in prompt(n, s)] for s, n in enumerate([45, 9, 70, 33, 52])]
    _, rows = joining_and_leaving(model, prompts, 12, 16)
    return model, kv, prompts, rows


def batch_as_alone(name, dtype=None, **extra):
    model, kv, prompts, rows = batch_run(name, dtype, **extra)
    for toks, p in zip(rows, prompts):
        if toks is not None:
            assert_as_alone(toks, model, p, 12, kv, 16)
