"""QuantizedChunkedKVCache (llama4's chunked-attention layers) against mlx-lm's
``ChunkedKVCache``: the same tokens dropped at the same positions, the logits of a tiny
llama4 within quantization error of mlx-lm's fp16 caches, and saved states that load."""

import copy
import importlib

import mlx.core as mx
import pytest
from mlx.utils import tree_map
from mlx_lm.models import cache as lm_cache

import mlx_kvq
from benchmarks.architectures import CONFIGS, closeness, logits
from mlx_kvq.cache import QuantizedChunkedKVCache, QuantizedKVCache

CHUNK = 48


def llama4(chunk=CHUNK):
    config = copy.deepcopy(CONFIGS["llama4"])
    config["text_config"]["attention_chunk_size"] = chunk
    arch = importlib.import_module("mlx_lm.models.llama4")
    mx.random.seed(0)
    model = arch.Model(arch.ModelArgs.from_dict(config))
    model.update(tree_map(lambda p: p.astype(mx.float32), model.parameters()))
    mx.eval(model.parameters())
    return model


def test_llama4_chunked_layers_are_quantized_and_follow_mlx_lms():
    """96 prompt tokens in chunks of 32, then 20 decode steps: past the chunk of 48 tokens
    and past the 8-token window, so packed tokens are dropped too."""
    model = llama4()
    tokens = mx.random.randint(0, 1000, (96,), key=mx.random.key(3))
    ref_cache = lm_cache.make_prompt_cache(model)
    ref, fed = logits(model, ref_cache, tokens, [32] * 3, 20)
    cache = mlx_kvq.make_prompt_cache(model, kv_bits=8, kv_group_size=32, window=8, strict=True)
    assert [type(c) for c in cache[:4]] == [QuantizedChunkedKVCache] * 3 + [QuantizedKVCache]
    x, _ = logits(model, cache, tokens, [32] * 3, 20, fed)
    finite, agree, err = closeness(ref[32:], x[32:])
    assert finite and err < 0.01 and agree >= 0.95, (agree, err)
    c, r = cache[0], ref_cache[0]
    # the last step trimmed to 48 tokens (start 115 - 48), then stored its own
    assert (c.offset, c.start_position) == (r.offset, r.start_position) == (116, 67)
    assert c.n_packed > 0 and c.held() == 49
    k, _ = r.keys_and_values()
    assert k.shape[2] == c.held()


def test_quantized_chunked_state_round_trips_and_refuses_sinks(tmp_path):
    model = llama4()
    cache = mlx_kvq.make_prompt_cache(model, kv_bits=4, kv_group_size=32, window=8)
    tokens = mx.random.randint(0, 1000, (70,), key=mx.random.key(4))
    model(tokens[None, :40], cache=cache)  # the model trims the fronts itself
    model(tokens[None, 40:], cache=cache)  # packs the first chunk
    for c in cache:
        if hasattr(c, "maybe_trim_front"):
            c.maybe_trim_front()
    path = str(tmp_path / "c.safetensors")
    mlx_kvq.save_prompt_cache(path, cache)
    loaded = mlx_kvq.load_prompt_cache(path)
    a, b = cache[0], loaded[0]
    assert type(b) is QuantizedChunkedKVCache
    assert (b.offset, b.start_position, b.chunk_size, b.held()) == (a.offset, a.start_position, CHUNK, CHUNK)
    assert a.start_position == 70 - CHUNK and a.n_packed > 0
    nxt = mx.array([[5]])
    mx.eval(x := model(nxt, cache=cache), y := model(nxt, cache=loaded))
    assert mx.array_equal(x, y)
    assert not a.is_trimmable() and a.trim(1) == 0  # tokens were dropped at the front
    with pytest.raises(ValueError, match="sinks=4"):
        QuantizedChunkedKVCache(CHUNK, 4, sinks=4)
    with pytest.raises(ValueError, match="chunk_size"):
        QuantizedChunkedKVCache(0, 4)
