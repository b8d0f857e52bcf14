"""Every model architecture of the installed mlx-lm, tiny and with random weights, through
mlx-kvq's caches against mlx-lm's own: does it run, are the logits finite, how close are they.

For each architecture: a float32 model built from ``CONFIGS`` (after mlx-lm's own
``tests/test_models.py``, shrunk: hidden 128, 4 heads of 32, at most 4 layers, vocab 1000), a
random prompt prefilled in chunks, then greedy decode steps with the tokens the fp16 cache
chose. Each cache's logits from the second chunk on are compared with those of mlx-lm's
cache (``make_prompt_cache``: fp16 ``KVCache``, float32 here as the model is):
``agree`` (next-token top-1 agreement), ``err`` (RMS logit error / RMS centred logit).
Caches: ``kvq8``/``kvq4`` (``mlx_kvq.make_prompt_cache``, group 32, an 8-token window so most
tokens are packed), ``gw-4``/``gw-8`` (plain group-wise quantization, group 32: mlx-lm's own
caches over keys and values quantized and dequantized, which is what mlx-lm's
``QuantizedKVCache`` attends over, for every model and layer kind) and ``mlx-lm-4`` (mlx-lm's
``QuantizedKVCache`` itself on its ``KVCache`` layers; it fails where a model uses the
cache's arrays and leaves sliding-window layers fp16).

    python3 benchmarks/architectures.py                 # every architecture, a table
    python3 benchmarks/architectures.py llama gemma2    # some
    python3 benchmarks/architectures.py --prompt 80 --chunk 40 --steps 40 --json out.json
    python3 benchmarks/architectures.py qwen3 --caches kvq8,gw-8,kvq4,gw-4,mlx-lm-4

``tests/test_architectures.py`` runs the same on the architectures that take under a few
seconds on a 2-core CPU.
"""

import argparse
import copy
import importlib
import json
import sys
import time
import types
import warnings
from pathlib import Path

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx_kvq  # noqa: E402  (OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_map  # noqa: E402
from mlx_lm.models import cache as lm_cache  # noqa: E402

from mlx_kvq import bridge  # noqa: E402

GROUP = 32


def build(model_type):
    """The tiny float32 model of ``model_type`` (random weights, seed 0)."""
    config = copy.deepcopy(CONFIGS[model_type])  # ModelArgs may change nested dicts in place
    if model_type == "olmo":
        try:
            import hf_olmo  # noqa: F401
        except ImportError:  # mlx-lm's olmo imports hf_olmo (ai2-olmo) only to check that it is installed
            sys.modules["hf_olmo"] = types.ModuleType("hf_olmo")
    arch = importlib.import_module(f"mlx_lm.models.{model_type}")
    mx.random.seed(0)
    model = arch.Model(arch.ModelArgs.from_dict(config))
    if model_type == "talkie":  # its output projection starts as zeros (a checkpoint sets it): logits all 0
        model.lm_head = mx.random.normal(model.lm_head.shape) * 0.05
    model.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))
    mx.eval(model.parameters())
    return model


def logits(model, cache, tokens, chunks, steps, forced=None):
    """Logits of every position (chunked prefill, then ``steps`` single-token steps fed
    ``forced`` tokens or the greedy ones), and the decoded tokens."""
    out, i, fed = [], 0, []
    for c in chunks:
        out.append(model(tokens[None, i : i + c], cache=cache)[0])
        mx.eval(out[-1])
        i += c
    for s in range(steps):
        t = mx.argmax(out[-1][-1]) if forced is None else forced[s]
        fed.append(t)
        out.append(model(t.reshape(1, 1), cache=cache)[0])
        mx.eval(out[-1])
    return mx.concatenate(out, axis=0), fed


def closeness(ref, x):
    """``(finite, top-1 agreement, RMS error / RMS centred reference)`` of logits ``x``.
    Logits the reference sets to -inf (phi3small masks its tokenizer's dummy tokens) must be
    -inf in ``x`` too and are left out of the error."""
    keep = ~mx.isneginf(ref)
    finite = bool(mx.all(mx.where(keep, mx.isfinite(x), mx.isneginf(x))).item())
    agree = float(mx.mean(mx.argmax(ref, -1) == mx.argmax(x, -1)).item())
    n = keep.sum(-1, keepdims=True)
    r, x = mx.where(keep, ref, 0), mx.where(keep, x, 0)
    centred = mx.where(keep, r - r.sum(-1, keepdims=True) / n, 0)
    spread = mx.sqrt((centred**2).sum() / n.sum())
    err = float((mx.sqrt(((r - x) ** 2).sum() / n.sum()) / spread).item())
    return finite, agree, err


def mlx_lm_quantized(model, bits):
    """mlx-lm's QuantizedKVCache in place of each plain KVCache (also inside a CacheList)."""
    def swap(c):
        if type(c) is lm_cache.KVCache:
            return lm_cache.QuantizedKVCache(group_size=GROUP, bits=bits)
        if type(c) is lm_cache.CacheList:
            return lm_cache.CacheList(*(swap(m) for m in c.caches))
        return c
    return [swap(c) for c in lm_cache.make_prompt_cache(model)]


class _RoundTrip:
    """An mlx-lm cache whose updates are quantized and dequantized first (``mx.quantize``,
    group ``GROUP``): the keys and values mlx-lm's ``QuantizedKVCache`` attends over."""

    round_trip_bits = 4  # not ``bits``: mlx-lm takes a cache with ``bits`` for its QuantizedKVCache

    def update_and_fetch(self, keys, values):
        b = self.round_trip_bits
        r = lambda x: mx.dequantize(*mx.quantize(x, GROUP, b), GROUP, b).astype(x.dtype)
        return super().update_and_fetch(r(keys), r(values))


def group_wise(model, bits):
    """mlx-lm's own caches holding plain group-wise quantized keys and values (``_RoundTrip``):
    the baseline of mlx-lm's ``QuantizedKVCache`` for every model and layer kind, also where
    mlx-lm's quantized cache cannot run (models that use the cache's arrays, sliding windows)."""
    def swap(c):
        if type(c) is lm_cache.CacheList:
            for m in c.caches:
                swap(m)
        elif type(c) in (lm_cache.KVCache, lm_cache.RotatingKVCache):
            c.__class__ = type(f"RoundTrip{type(c).__name__}", (_RoundTrip, type(c)), {"round_trip_bits": bits})
    cache = lm_cache.make_prompt_cache(model)
    for c in cache:
        swap(c)
    return cache


CACHES = {
    "kvq8": lambda model, window: bridge.make_prompt_cache(model, 8, kv_group_size=GROUP, window=window),
    "kvq4": lambda model, window: bridge.make_prompt_cache(model, 4, kv_group_size=GROUP, window=window),
    "gw-4": lambda model, window: group_wise(model, 4),
    "gw-8": lambda model, window: group_wise(model, 8),
    "mlx-lm-4": lambda model, window: mlx_lm_quantized(model, 4),
}
TABLE = ("kvq8", "kvq4", "gw-4")  # the table's columns (--caches)


def compare(model_type, prompt=48, chunk=32, steps=4, window=8, caches=TABLE):
    """``{cache: (finite, agree, err) or an error string, "fp16_reason": warnings, "seconds": t}``."""
    t0 = time.perf_counter()
    model = build(model_type)
    vocab = min(CONFIGS[model_type].get("vocab_size") or 1000, 1000)
    tokens = mx.random.randint(0, vocab, (prompt,), key=mx.random.key(1))
    chunks = [chunk] * (prompt // chunk) + ([prompt % chunk] if prompt % chunk else [])
    ref, fed = logits(model, lm_cache.make_prompt_cache(model), tokens, chunks, steps)
    first = chunks[0]
    result = {"fp16_reason": []}
    for name in caches:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                cache = CACHES[name](model, window)
            if name.startswith("kvq"):
                result["fp16_reason"] = sorted({str(w.message) for w in caught})
            x, _ = logits(model, cache, tokens, chunks, steps, fed)
            result[name] = closeness(ref[first:], x[first:])
        except Exception as e:  # a cache that fails is reported
            result[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    result["seconds"] = time.perf_counter() - t0
    return result


# tiny configs: mlx-lm's tests/test_models.py configs where it has one, shrunk (hidden 128, 4 heads
# of 32, at most 4 layers unless per-layer lists fix more, MLA ranks 32, vocab 1000)
# what configs without their own sizes start from
TINY = {'hidden_size': 128, 'num_hidden_layers': 2, 'intermediate_size': 256, 'num_attention_heads': 4,
     'num_key_value_heads': 2, 'vocab_size': 1000, 'rms_norm_eps': 1e-05, 'layer_norm_eps': 1e-05,
     'norm_eps': 1e-05, 'rope_theta': 10000.0, 'max_position_embeddings': 1000,
     'tie_word_embeddings': False}

_DEEPSEEK_V3 = {'vocab_size': 1000, 'hidden_size': 128, 'intermediate_size': 256,
    'moe_intermediate_size': 64, 'num_hidden_layers': 4, 'num_attention_heads': 4,
    'num_key_value_heads': 2, 'n_routed_experts': 4, 'n_group': 2, 'topk_group': 1,
    'num_experts_per_tok': 2, 'n_shared_experts': 1, 'kv_lora_rank': 32, 'q_lora_rank': 32,
    'qk_rope_head_dim': 32, 'v_head_dim': 32, 'qk_nope_head_dim': 32,
    'rope_scaling': {'beta_fast': 32, 'beta_slow': 1, 'factor': 40, 'mscale': 1.0, 'mscale_all_dim': 1.0, 'original_max_position_embeddings': 4096, 'type': 'yarn'}}  # deepseek_v3 and deepseek_v32

_LONGCAT_FLASH = {'attention_method': 'MLA', 'zero_expert_type': 'identity',
    'hidden_size': 128, 'ffn_hidden_size': 128, 'moe_topk': 2, 'expert_ffn_hidden_size': 128,
    'n_routed_experts': 2, 'zero_expert_num': 2, 'num_layers': 4, 'num_hidden_layers': 4,
    'vocab_size': 1000, 'max_position_embeddings': 1000, 'num_attention_heads': 4, 'kv_lora_rank': 32,
    'q_lora_rank': 32, 'qk_rope_head_dim': 32, 'qk_nope_head_dim': 32, 'v_head_dim': 32,
    'routed_scaling_factor': 1.0, 'rms_norm_eps': 1e-05, 'rope_theta': 1000, 'mla_scale_q_lora': True,
    'mla_scale_kv_lora': True, 'attention_bias': False}  # longcat_flash and longcat_flash_ngram

CONFIGS = {
    'Klear': {'model_type': 'Klear', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 128,
     'num_attention_heads': 4, 'attention_bias': False, 'mlp_only_layers': [0], 'num_experts': 4,
     'num_experts_per_tok': 2, 'decoder_sparse_step': 2, 'n_shared_experts': 1,
     'moe_intermediate_size': 64, 'rms_norm_eps': 1e-05, 'vocab_size': 1000, 'num_key_value_heads': 2,
     'rope_theta': 1000.0, 'max_position_embeddings': 1000, 'norm_topk_prob': True},
    'afm7': {'model_type': 'afm7', 'vocab_size': 1000, 'hidden_dim': 128, 'num_layers': 4, 'num_hidden_layers': 4,
     'num_kv_reuse_layers': 2, 'num_heads': 4, 'num_kv_heads': 2},
    'afmoe': {'model_type': 'afmoe', 'vocab_size': 1000, 'hidden_size': 128, 'num_hidden_layers': 4,
     'num_attention_heads': 4, 'num_key_value_heads': 2, 'intermediate_size': 128, 'head_dim': 32,
     'rope_theta': 100.0,
     'layer_types': ['full_attention', 'sliding_attention', 'sliding_attention', 'full_attention'],
     'num_experts': 4, 'num_experts_per_tok': 2, 'moe_intermediate_size': 64},
    'apertus': {'model_type': 'apertus', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 256,
     'mlp_bias': True, 'num_attention_heads': 4, 'attention_bias': False, 'rms_norm_eps': 1e-05,
     'vocab_size': 1000, 'num_key_value_heads': 2, 'max_position_embeddings': 1000, 'rope_theta': 1000,
     'post_norm': True, 'qk_norm': True, 'tie_word_embeddings': False},
    'baichuan_m1': {'model_type': 'baichuan_m1', 'vocab_size': 1000, 'hidden_size': 128, 'intermediate_size': 256,
     'num_hidden_layers': 4, 'num_attention_heads': 4, 'num_key_value_heads': 2, 'rope_theta': 1000,
     'sliding_window': 48, 'sliding_window_layers': [0, 2], 'conv_window': 2, 'rms_norm_eps': 1e-05},
    'bailing_hybrid': {'model_type': 'bailing_hybrid', 'hidden_size': 128, 'intermediate_size': 256,
     'moe_intermediate_size': 64, 'num_hidden_layers': 4, 'num_attention_heads': 4, 'num_key_value_heads': 4,
     'num_experts': 4, 'num_experts_per_tok': 2, 'num_shared_experts': 1, 'n_group': 1, 'topk_group': 1,
     'first_k_dense_replace': 1, 'layer_group_size': 2, 'group_norm_size': 1, 'vocab_size': 1000,
     'rms_norm_eps': 1e-05, 'rope_theta': 10000.0, 'max_position_embeddings': 1000,
     'routed_scaling_factor': 1.0, 'head_dim': 32, 'kv_lora_rank': 32, 'q_lora_rank': 32, 'qk_rope_head_dim': 32, 'qk_nope_head_dim': 32, 'v_head_dim': 32},
    'bailing_moe': {'model_type': 'bailing_moe', 'hidden_size': 128, 'intermediate_size': 128,
     'max_position_embeddings': 1000, 'moe_intermediate_size': 64, 'num_experts': 4,
     'num_shared_experts': 1, 'norm_topk_prob': True, 'num_attention_heads': 4,
     'num_experts_per_tok': 2, 'num_hidden_layers': 4, 'num_key_value_heads': 2, 'rms_norm_eps': 1e-05,
     'rope_theta': 1000, 'vocab_size': 1000, 'first_k_dense_replace': 2},
    'bailing_moe_linear': {'model_type': 'bailing_moe_linear', 'hidden_size': 128, 'num_hidden_layers': 4,
     'intermediate_size': 256, 'moe_intermediate_size': 64, 'num_experts_per_tok': 2, 'num_experts': 4,
     'norm_topk_prob': True, 'num_shared_experts': 2, 'num_attention_heads': 4,
     'num_key_value_heads': 2, 'rms_norm_eps': 1e-05, 'vocab_size': 1000, 'rope_theta': 1000,
     'first_k_dense_replace': 0, 'layer_group_size': 2, 'group_norm_size': 1,
     'max_position_embeddings': 1000},
    'bailing_moe_v3': {**TINY, 'model_type': 'bailing_moe_v3'},
    'bitnet': {'model_type': 'bitnet', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 256,
     'num_attention_heads': 4, 'num_key_value_heads': 2, 'rms_norm_eps': 1e-05, 'vocab_size': 1000},
    'cohere': {**TINY, 'model_type': 'cohere'},
    'cohere2': {'model_type': 'cohere2', 'hidden_size': 128, 'head_dim': 32, 'num_hidden_layers': 4,
     'intermediate_size': 256, 'num_attention_heads': 4, 'num_key_value_heads': 2, 'vocab_size': 1000,
     'sliding_window': 16, 'sliding_window_pattern': 2},
    'dbrx': {'model_type': 'dbrx', 'd_model': 128,
     'ffn_config': {'ffn_hidden_size': 256, 'moe_num_experts': 4, 'moe_top_k': 2},
     'attn_config': {'kv_n_heads': 2, 'clip_qkv': True, 'rope_theta': 10000}, 'n_layers': 4,
     'n_heads': 4, 'vocab_size': 1000},
    'deepseek': {'model_type': 'deepseek', 'vocab_size': 1000, 'hidden_size': 128, 'intermediate_size': 256,
     'moe_intermediate_size': 64, 'num_hidden_layers': 4, 'num_attention_heads': 4,
     'num_key_value_heads': 2},
    'deepseek_v2': {'model_type': 'deepseek_v2', 'vocab_size': 1000, 'hidden_size': 128, 'intermediate_size': 256,
     'moe_intermediate_size': 64, 'num_hidden_layers': 4, 'num_attention_heads': 4,
     'num_key_value_heads': 2, 'kv_lora_rank': 32, 'q_lora_rank': 32, 'qk_rope_head_dim': 32,
     'v_head_dim': 32, 'qk_nope_head_dim': 32,
     'rope_scaling': {'beta_fast': 32, 'beta_slow': 1, 'factor': 40, 'mscale': 1.0, 'mscale_all_dim': 1.0, 'original_max_position_embeddings': 4096, 'type': 'yarn'}},
    'deepseek_v3': {'model_type': 'deepseek_v3', **_DEEPSEEK_V3},
    # sparse attention: the indexer keeps 32 of the 48-52 tokens of a default run (glm_moe_dsa: 40,
    # minimax_m3_vl: 4 blocks of 8); keeping fewer flips more picks under 8-bit keys, gw-8 as kvq8
    'deepseek_v32': {'model_type': 'deepseek_v32', **_DEEPSEEK_V3, 'index_head_dim': 32, 'index_n_heads': 4,
     'index_topk': 32},
    'deepseek_v41': {'hidden_size': 128, 'num_hidden_layers': 2, 'intermediate_size': 256, 'num_attention_heads': 4,
     'num_key_value_heads': 2, 'rms_norm_eps': 1e-05, 'vocab_size': 1000,
     'max_position_embeddings': 1000, 'rope_theta': 10000.0, 'tie_word_embeddings': False,
     'model_type': 'deepseek_v41'},
    'dots1': {'model_type': 'dots1', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 128,
     'num_attention_heads': 4, 'rms_norm_eps': 1e-05, 'vocab_size': 1000,
     'max_position_embeddings': None, 'num_key_value_heads': 2, 'first_k_dense_replace': 1,
     'moe_intermediate_size': 64, 'n_routed_experts': 4, 'n_shared_experts': 1, 'norm_topk_prob': True,
     'num_experts_per_tok': 1, 'rope_theta': 1000, 'routed_scaling_factor': 1.0},
    'ernie4_5': {'hidden_size': 128, 'intermediate_size': 128, 'model_type': 'ernie4_5',
     'max_position_embeddings': 1000, 'num_attention_heads': 4, 'num_key_value_heads': 2,
     'head_dim': None, 'num_hidden_layers': 4, 'rms_norm_eps': 1e-05, 'vocab_size': 1000,
     'rope_theta': 10000, 'use_bias': False, 'tie_word_embeddings': True},
    'ernie4_5_moe': {'hidden_size': 128, 'intermediate_size': 128, 'model_type': 'ernie4_5_moe',
     'max_position_embeddings': 1000, 'num_attention_heads': 4, 'num_key_value_heads': 2,
     'num_hidden_layers': 4, 'rms_norm_eps': 1e-05, 'vocab_size': 1000, 'rope_theta': 1000,
     'use_bias': False, 'tie_word_embeddings': False, 'moe_num_experts': 4},
    'exaone': {'model_type': 'exaone', 'hidden_size': 128, 'num_layers': 4, 'intermediate_size': 256,
     'num_attention_heads': 4, 'num_key_value_heads': 2, 'vocab_size': 1000,
     'layer_norm_epsilon': 0.0001, 'rope_theta': 10000},
    'exaone4': {'model_type': 'exaone4', 'hidden_size': 128, 'intermediate_size': 128, 'num_attention_heads': 4,
     'vocab_size': 1000, 'rms_norm_eps': 1e-05, 'num_hidden_layers': 4,
     'max_position_embeddings': 1000, 'rope_theta': 10000, 'layer_norm_epsilon': 1e-05,
     'num_key_value_heads': 2, 'head_dim': 32, 'tie_word_embeddings': False, 'rope_scaling': None,
     'sliding_window': 8, 'sliding_window_pattern': 'LLGL'},
    'exaone_moe': {'model_type': 'exaone_moe', 'vocab_size': 1000, 'hidden_size': 128, 'intermediate_size': 256,
     'moe_intermediate_size': 64, 'num_hidden_layers': 4, 'num_attention_heads': 4,
     'num_key_value_heads': 2, 'head_dim': 32, 'num_experts': 4, 'num_experts_per_tok': 2,
     'num_shared_experts': 1, 'n_group': 1, 'topk_group': 1, 'routed_scaling_factor': 2.5,
     'norm_topk_prob': True, 'sliding_window': 32, 'max_position_embeddings': 1000,
     'rms_norm_eps': 1e-05, 'rope_theta': 1000.0,
     'layer_types': ['sliding_attention', 'sliding_attention', 'sliding_attention', 'full_attention'],
     'is_moe_layer': [False, True, True, True], 'tie_word_embeddings': False},
    'falcon_h1': {'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 256, 'num_attention_heads': 4,
     'num_key_value_heads': 2, 'vocab_size': 1000, 'rms_norm_eps': 1e-05, 'layer_norm_eps': 1e-05,
     'norm_eps': 1e-05, 'rope_theta': 10000.0, 'max_position_embeddings': 1000,
     'tie_word_embeddings': False, 'model_type': 'falcon_h1'},
    'gear': {'hidden_size': 128, 'num_hidden_layers': 2, 'intermediate_size': 256, 'num_attention_heads': 4,
     'num_key_value_heads': 2, 'rms_norm_eps': 1e-05, 'vocab_size': 1000,
     'max_position_embeddings': 1000, 'rope_theta': 10000.0, 'tie_word_embeddings': False,
     'model_type': 'gear', 'head_dim': 32, 'layer_types': ['full_attention', 'sliding_attention'],
     'sliding_window': 16},
    'gemma': {'model_type': 'gemma', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 256,
     'num_attention_heads': 4, 'head_dim': 32, 'rms_norm_eps': 1e-05, 'vocab_size': 1000,
     'num_key_value_heads': 2},
    'gemma2': {'model_type': 'gemma2', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 256,
     'num_attention_heads': 4, 'head_dim': 32, 'rms_norm_eps': 0.0001, 'vocab_size': 1000,
     'num_key_value_heads': 2},
    'gemma3': {'model_type': 'gemma3', 'vocab_size': 1000,
     'text_config': {'model_type': 'gemma3_text', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 256, 'num_attention_heads': 4, 'head_dim': 32, 'num_key_value_heads': 1, 'sliding_window': 16, 'sliding_window_pattern': 2, 'vocab_size': 1000}},
    'gemma3_text': {'model_type': 'gemma3_text', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 256,
     'num_attention_heads': 4, 'head_dim': 32, 'num_key_value_heads': 1, 'sliding_window': 16,
     'sliding_window_pattern': 2, 'vocab_size': 1000},
    'gemma3n': {'model_type': 'gemma3n', 'num_hidden_layers': 4, 'vocab_size': 1000,
     'text_config': {'model_type': 'gemma3n', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 128, 'num_attention_heads': 4, 'head_dim': 32, 'rms_norm_eps': 1e-05, 'vocab_size': 1000, 'num_key_value_heads': 2, 'num_kv_shared_layers': 2, 'vocab_size_per_layer_input': 1000, 'sliding_window': 8, 'max_position_embeddings': 1000, 'rope_local_base_freq': 1.0, 'rope_theta': 1000.0, 'final_logit_softcapping': 1.0, 'layer_types': ['sliding_attention', 'full_attention', 'sliding_attention', 'full_attention'], 'activation_sparsity_pattern': [0.5, 0.5, 0.5, 0.5], 'hidden_size_per_layer_input': 256, 'altup_num_inputs': 4, 'altup_coef_clip': 1.0, 'altup_correct_scale': True, 'altup_active_idx': 0, 'laurel_rank': 8}},
    'gemma4': {'model_type': 'gemma4', 'vocab_size': 32,
     'text_config': {'model_type': 'gemma4_text', 'hidden_size': 128, 'num_hidden_layers': 1, 'intermediate_size': 16, 'num_attention_heads': 4, 'num_key_value_heads': 1, 'num_global_key_value_heads': 1, 'head_dim': 32, 'global_head_dim': 32, 'sliding_window': 8, 'sliding_window_pattern': 1, 'layer_types': ['full_attention'], 'hidden_size_per_layer_input': 0, 'num_kv_shared_layers': 0, 'tie_word_embeddings': True}},
    'gemma4_text': {'model_type': 'gemma4_text', 'hidden_size': 128, 'num_hidden_layers': 10, 'intermediate_size': 256,
     'num_attention_heads': 4, 'head_dim': 32, 'global_head_dim': 64, 'rms_norm_eps': 1e-06,
     'vocab_size': 1000, 'vocab_size_per_layer_input': 1000, 'num_key_value_heads': 1,
     'num_kv_shared_layers': 4, 'hidden_size_per_layer_input': 32, 'sliding_window': 8,
     'sliding_window_pattern': 5, 'final_logit_softcapping': 30.0,
     'layer_types': ['sliding_attention', 'sliding_attention', 'sliding_attention', 'sliding_attention', 'full_attention', 'sliding_attention', 'sliding_attention', 'sliding_attention', 'sliding_attention', 'full_attention'],
     'rope_parameters': {'full_attention': {'partial_rotary_factor': 0.25, 'rope_theta': 1000000.0}, 'sliding_attention': {'rope_theta': 10000.0}}},
    'glm': {'model_type': 'glm', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 128,
     'num_attention_heads': 4, 'rms_norm_eps': 1e-05, 'vocab_size': 1000, 'head_dim': 32,
     'num_key_value_heads': 2},
    'glm4': {'model_type': 'glm4', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 128,
     'num_attention_heads': 4, 'attention_bias': False, 'head_dim': 64, 'rms_norm_eps': 1e-05,
     'vocab_size': 1000, 'num_key_value_heads': 2, 'partial_rotary_factor': 0.5, 'rope_theta': 1000},
    'glm4_moe': {'model_type': 'glm4_moe', 'vocab_size': 1000, 'hidden_size': 128, 'intermediate_size': 128,
     'max_position_embeddings': 1000, 'moe_intermediate_size': 64, 'norm_topk_prob': True,
     'num_attention_heads': 4, 'n_group': 2, 'head_dim': 32, 'topk_group': 1, 'n_shared_experts': 1,
     'n_routed_experts': 4, 'routed_scaling_factor': 1.0, 'num_experts_per_tok': 2,
     'first_k_dense_replace': 1, 'num_hidden_layers': 4, 'num_key_value_heads': 2,
     'rms_norm_eps': 1e-05, 'rope_theta': 1000, 'rope_scaling': None, 'use_qk_norm': True,
     'tie_word_embeddings': False, 'attention_bias': False, 'partial_rotary_factor': 0.5},
    'glm4_moe_lite': {'model_type': 'glm4_moe_lite', 'vocab_size': 1000, 'hidden_size': 128, 'intermediate_size': 128,
     'moe_intermediate_size': 32, 'num_hidden_layers': 4, 'num_attention_heads': 4,
     'num_key_value_heads': 2, 'n_shared_experts': 1, 'n_routed_experts': 4,
     'routed_scaling_factor': 1.0, 'kv_lora_rank': 32, 'q_lora_rank': 32, 'qk_rope_head_dim': 32,
     'qk_nope_head_dim': 32, 'v_head_dim': 32, 'topk_method': 'noaux_tc', 'scoring_func': 'sigmoid',
     'norm_topk_prob': True, 'n_group': 1, 'topk_group': 1, 'num_experts_per_tok': 2,
     'moe_layer_freq': 1, 'first_k_dense_replace': 1, 'max_position_embeddings': 256,
     'rms_norm_eps': 1e-05, 'rope_theta': 1000, 'rope_scaling': None, 'attention_bias': False,
     'partial_rotary_factor': 1.0, 'tie_word_embeddings': False, 'num_nextn_predict_layers': 1},
    'glm_moe_dsa': {'model_type': 'glm_moe_dsa', 'vocab_size': 1000, 'hidden_size': 128, 'index_head_dim': 32,
     'index_n_heads': 4, 'index_topk': 40, 'intermediate_size': 256, 'moe_intermediate_size': 64,
     'num_hidden_layers': 4, 'num_attention_heads': 4, 'num_key_value_heads': 4, 'n_shared_experts': 1,
     'n_routed_experts': 4, 'routed_scaling_factor': 1.0, 'kv_lora_rank': 32, 'q_lora_rank': 32, 'qk_rope_head_dim': 32, 'qk_nope_head_dim': 32, 'v_head_dim': 32,
     'topk_method': 'noaux_tc', 'scoring_func': 'sigmoid', 'norm_topk_prob': True, 'n_group': 1,
     'topk_group': 1, 'num_experts_per_tok': 2, 'moe_layer_freq': 1, 'first_k_dense_replace': 1,
     'max_position_embeddings': 1000, 'rms_norm_eps': 1e-05, 'attention_bias': False,
     'rope_parameters': {'rope_theta': 10000.0, 'rope_type': 'default'}},
    'gpt2': {'model_type': 'gpt2', 'n_ctx': 1024, 'n_embd': 128, 'n_head': 4, 'n_layer': 4, 'n_positions': 1024,
     'layer_norm_epsilon': 1e-05, 'vocab_size': 1000},
    'gpt_bigcode': {'model_type': 'gpt_bigcode', 'n_embd': 128, 'n_layer': 4, 'n_inner': 256, 'n_head': 4,
     'n_positions': 1000, 'layer_norm_epsilon': 1e-05, 'vocab_size': 1000},
    'gpt_neox': {'model_type': 'gpt_neox', 'max_position_embeddings': 2048, 'hidden_size': 128,
     'num_attention_heads': 4, 'num_hidden_layers': 4, 'layer_norm_eps': 1e-05, 'vocab_size': 1000,
     'rotary_emb_base': 10000, 'rotary_pct': 0.25},
    'gpt_oss': {'model_type': 'gpt_oss', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 256,
     'num_attention_heads': 4, 'num_key_value_heads': 2, 'num_local_experts': 4,
     'num_experts_per_tok': 2, 'sliding_window': 48, 'rope_theta': 10000, 'vocab_size': 1000,
     'layer_types': ['sliding_attention', 'full_attention', 'sliding_attention', 'full_attention']},
    'gptj': {'hidden_size': 128, 'num_hidden_layers': 2, 'intermediate_size': 256, 'num_attention_heads': 4,
     'num_key_value_heads': 2, 'rms_norm_eps': 1e-05, 'vocab_size': 1000,
     'max_position_embeddings': 1000, 'rope_theta': 10000.0, 'tie_word_embeddings': False,
     'model_type': 'gptj', 'n_embd': 128, 'n_head': 4, 'n_layer': 2, 'rotary_dim': 16,
     'n_positions': 1000},
    'granite': {'model_type': 'granite', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 128,
     'num_attention_heads': 4, 'rms_norm_eps': 1e-05, 'vocab_size': 1000, 'logits_scaling': 1.0,
     'attention_multiplier': 1.0, 'embedding_multiplier': 1.0, 'residual_multiplier': 1.0,
     'max_position_embeddings': 1000, 'num_key_value_heads': 2, 'attention_bias': False,
     'mlp_bias': False, 'rope_theta': 1000},
    'granitemoe': {'model_type': 'granitemoe', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 128,
     'num_attention_heads': 4, 'rms_norm_eps': 1e-05, 'vocab_size': 1000, 'logits_scaling': 1.0,
     'attention_multiplier': 1.0, 'embedding_multiplier': 1.0, 'residual_multiplier': 1.0,
     'max_position_embeddings': 1000, 'num_key_value_heads': 2, 'attention_bias': False,
     'rope_theta': 1000, 'num_local_experts': 4, 'num_experts_per_tok': 2},
    'granitemoehybrid': {'model_type': 'granitemoehybrid', 'vocab_size': 1000, 'hidden_size': 128, 'intermediate_size': 128,
     'num_hidden_layers': 4, 'max_position_embeddings': 1000, 'num_attention_heads': 4,
     'num_key_value_heads': 2, 'attention_bias': False, 'embedding_multiplier': 1.0,
     'attention_multiplier': 1.0, 'logits_scaling': 1.0, 'residual_multiplier': 1.0,
     'num_local_experts': 4, 'num_experts_per_tok': 2, 'shared_intermediate_size': 128,
     'mamba_n_heads': 8, 'mamba_d_head': 16, 'mamba_proj_bias': False, 'mamba_d_state': 128,
     'mamba_d_conv': 4, 'mamba_n_groups': 1, 'mamba_conv_bias': False,
     'layer_types': ['mamba', 'attention', 'mamba', 'attention'], 'rms_norm_eps': 1e-05,
     'rope_theta': 1000.0},
    'helium': {'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 256, 'num_attention_heads': 4,
     'num_key_value_heads': 2, 'rms_norm_eps': 1e-05, 'vocab_size': 1000, 'attention_bias': False,
     'head_dim': 64, 'max_position_embeddings': 1000, 'mlp_bias': False, 'model_type': 'helium',
     'rope_theta': 1000, 'tie_word_embeddings': False},
    'hunyuan': {'model_type': 'hunyuan', 'hidden_size': 128, 'attention_bias': False, 'intermediate_size': 256,
     'num_attention_heads': 4, 'num_hidden_layers': 4, 'num_key_value_heads': 2,
     'rms_norm_eps': 0.0001, 'rope_theta': 1000, 'vocab_size': 1000, 'moe_topk': 2, 'num_experts': 2,
     'num_shared_expert': 1, 'use_mixed_mlp_moe': True, 'use_qk_norm': True,
     'rope_scaling': {'alpha': 1000.0, 'factor': 1.0, 'type': 'dynamic'}, 'use_cla': True,
     'cla_share_factor': 2},
    'hunyuan_v1_dense': {'model_type': 'hunyuan_v1_dense', 'hidden_size': 128, 'attention_bias': False,
     'intermediate_size': 256, 'num_attention_heads': 4, 'num_hidden_layers': 4,
     'num_key_value_heads': 2, 'rms_norm_eps': 0.0001, 'rope_theta': 1000, 'vocab_size': 1000,
     'use_qk_norm': True,
     'rope_scaling': {'alpha': 1000.0, 'factor': 1.0, 'type': 'dynamic', 'beta_fast': 32, 'beta_slow': 1, 'mscale': 1.0, 'mscale_all_dim': 0.0, 'original_max_position_embeddings': 8192},
     'max_position_embeddings': 32768},
    'internlm2': {'model_type': 'internlm2', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 256,
     'num_attention_heads': 4, 'rms_norm_eps': 1e-05, 'vocab_size': 1000},
    'internlm3': {'model_type': 'internlm3', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 256,
     'num_attention_heads': 4, 'rms_norm_eps': 1e-05, 'vocab_size': 1000},
    'iquestloopcoder': {'model_type': 'iquestloopcoder', 'hidden_size': 128, 'num_hidden_layers': 2, 'intermediate_size': 256,
     'num_attention_heads': 4, 'num_key_value_heads': 2, 'rms_norm_eps': 1e-05, 'head_dim': 32,
     'vocab_size': 1000, 'rope_theta': 500000.0, 'tie_word_embeddings': False, 'loop_num': 2,
     'loop_window_size': 32},
    'jamba': {'model_type': 'jamba', 'hidden_size': 128, 'intermediate_size': 128, 'num_hidden_layers': 4,
     'num_attention_heads': 4, 'num_key_value_heads': 2, 'attn_layer_offset': 1,
     'attn_layer_period': 2, 'expert_layer_offset': 1, 'expert_layer_period': 2, 'mamba_d_conv': 4,
     'mamba_d_state': 128, 'mamba_expand': 128, 'num_experts': 4, 'num_experts_per_tok': 2,
     'rms_norm_eps': 1e-05, 'max_position_embeddings': 1000, 'vocab_size': 1000},
    'kimi_k25': {'model_type': 'kimi_k25',
     'text_config': {'hidden_size': 128, 'num_hidden_layers': 2, 'intermediate_size': 256, 'num_attention_heads': 4, 'num_key_value_heads': 2, 'rms_norm_eps': 1e-05, 'vocab_size': 1000, 'max_position_embeddings': 1000, 'rope_theta': 10000.0, 'tie_word_embeddings': False, 'model_type': 'deepseek_v3', 'kv_lora_rank': 32, 'q_lora_rank': 32, 'qk_rope_head_dim': 32, 'qk_nope_head_dim': 32, 'v_head_dim': 32, 'moe_intermediate_size': 64, 'n_shared_experts': 1, 'n_routed_experts': 4, 'routed_scaling_factor': 1.0, 'num_experts_per_tok': 2, 'norm_topk_prob': True, 'topk_group': 1, 'n_group': 1, 'first_k_dense_replace': 1}},
    'kimi_k3': {'model_type': 'kimi_k3',
     'text_config': {'vocab_size': 1000, 'hidden_size': 128, 'num_hidden_layers': 4, 'num_attention_heads': 4, 'num_key_value_heads': 4, 'intermediate_size': 256, 'max_position_embeddings': 1000, 'linear_attn_config': {'kda_layers': [1, 3], 'num_heads': 4, 'head_dim': 32, 'short_conv_kernel_size': 4}, 'kv_lora_rank': 32, 'q_lora_rank': 32, 'qk_rope_head_dim': 32, 'qk_nope_head_dim': 32, 'v_head_dim': 32, 'num_experts': 4, 'num_experts_per_token': 2, 'num_shared_experts': 1, 'moe_intermediate_size': 64, 'first_k_dense_replace': 1, 'attn_res_block_size': 2}},
    'kimi_linear': {'model_type': 'kimi_linear', 'vocab_size': 1000, 'hidden_size': 128, 'num_hidden_layers': 4,
     'num_attention_heads': 4, 'num_key_value_heads': 2, 'intermediate_size': 128, 'head_dim': 32,
     'rope_theta': 100.0, 'rms_norm_eps': 1e-06,
     'linear_attn_config': {'num_heads': 4, 'head_dim': 32, 'kda_layers': [1]},
     'model_max_length': 1000, 'num_experts': 2, 'moe_intermediate_size': 64, 'kv_lora_rank': 32,
     'qk_nope_head_dim': 32, 'qk_rope_head_dim': 32, 'v_head_dim': 32},
    'kimi_vl': {'text_config': {'vocab_size': 1000, 'hidden_size': 128, 'intermediate_size': 128, 'moe_intermediate_size': 64, 'num_hidden_layers': 4, 'num_attention_heads': 4, 'num_key_value_heads': 2, 'n_shared_experts': 1, 'n_routed_experts': 4, 'kv_lora_rank': 32, 'q_lora_rank': 32, 'qk_rope_head_dim': 32, 'v_head_dim': 32, 'qk_nope_head_dim': 32},
     'model_type': 'kimi_vl', 'num_hidden_layers': 4, 'vocab_size': 1000},
    'laguna': {'model_type': 'laguna', 'vocab_size': 1000, 'hidden_size': 128, 'intermediate_size': 256,
     'num_hidden_layers': 4, 'num_attention_heads': 4, 'num_key_value_heads': 2, 'head_dim': 32,
     'rms_norm_eps': 1e-06, 'sliding_window': 4, 'partial_rotary_factor': 0.5, 'num_experts': 4,
     'num_experts_per_tok': 2, 'moe_intermediate_size': 64, 'shared_expert_intermediate_size': 128,
     'moe_routed_scaling_factor': 2.5, 'moe_router_score_func': 'sqrtsoftplus',
     'layer_types': ['full_attention', 'sliding_attention', 'sliding_attention', 'sliding_attention'],
     'mlp_layer_types': ['dense', 'sparse', 'sparse', 'sparse'],
     'num_attention_heads_per_layer': [4, 4, 4, 4],
     'rope_parameters': {'full_attention': {'rope_type': 'yarn', 'rope_theta': 500000.0, 'factor': 8.0, 'original_max_position_embeddings': 4096, 'beta_slow': 1.0, 'beta_fast': 32.0, 'partial_rotary_factor': 0.5}, 'sliding_attention': {'rope_type': 'default', 'rope_theta': 10000.0, 'partial_rotary_factor': 1.0}}},
    'lfm2': {'model_type': 'lfm2', 'hidden_size': 128, 'num_hidden_layers': 4, 'num_attention_heads': 4,
     'num_key_value_heads': 2, 'norm_eps': 1e-05, 'vocab_size': 1000, 'full_attn_idxs': [0, 1, 2],
     'rope_theta': 10000, 'block_dim': 128, 'block_ffn_dim_multiplier': 1.5,
     'block_auto_adjust_ff_dim': True, 'block_ff_dim': 256, 'block_multiple_of': 256,
     'max_position_embeddings': 1000, 'conv_bias': True, 'conv_L_cache': 3},
    'lfm2-vl': {'model_type': 'lfm2-vl', 'vocab_size': 1000, 'num_hidden_layers': 4,
     'text_config': {'model_type': 'lfm2', 'vocab_size': 1000, 'hidden_size': 128, 'num_hidden_layers': 4, 'num_attention_heads': 4, 'num_key_value_heads': 2, 'max_position_embeddings': 1000, 'norm_eps': 1e-05, 'conv_bias': False, 'conv_L_cache': 3, 'block_dim': 128, 'block_ff_dim': 128, 'block_multiple_of': 4, 'block_ffn_dim_multiplier': 2, 'block_auto_adjust_ff_dim': True, 'layer_types': ['full_attention', '', 'full_attention', ''], 'rope_theta': 1000}},
    'lfm2_moe': {'model_type': 'lfm2_moe', 'hidden_size': 128, 'intermediate_size': 256, 'num_hidden_layers': 4,
     'num_attention_heads': 4, 'num_key_value_heads': 2, 'norm_eps': 1e-05, 'vocab_size': 1000,
     'full_attn_idxs': [0, 1, 2], 'rope_theta': 10000, 'max_position_embeddings': 1000,
     'conv_bias': True, 'conv_L_cache': 3, 'moe_intermediate_size': 64, 'num_dense_layers': 2,
     'num_experts': 4, 'num_experts_per_tok': 2, 'norm_topk_prob': True, 'use_expert_bias': True},
    'lille-130m': {'model_type': 'lille-130m', 'block_size': 128, 'num_hidden_layers': 4, 'n_layer': 4, 'n_head': 4,
     'n_kv_heads': 2, 'n_embd': 128, 'vocab_size': 1000, 'rope_theta': 1000, 'layer_norm_eps': 1e-05},
    'llama': {'model_type': 'llama', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 256,
     'num_attention_heads': 4, 'num_key_value_heads': 2, 'rms_norm_eps': 1e-05, 'vocab_size': 128,
     'sliding_window': 4,
     'layer_types': ['full_attention', 'sliding_attention', 'sliding_attention', 'full_attention'],
     'tie_word_embeddings': False, 'rope_theta': 10000.0},
    'llama4': {'model_type': 'llama4', 'vocab_size': 1000, 'num_hidden_layers': 4,
     'text_config': {'attention_bias': False, 'attention_chunk_size': 4, 'head_dim': 32, 'hidden_size': 128, 'interleave_moe_layer_step': 2, 'intermediate_size': 128, 'intermediate_size_mlp': 128, 'max_position_embeddings': 1000, 'model_type': 'llama4', 'num_attention_heads': 4, 'num_experts_per_tok': 1, 'num_hidden_layers': 4, 'num_key_value_heads': 2, 'num_local_experts': 2, 'rms_norm_eps': 0.0001, 'rope_scaling': None, 'rope_theta': 1000, 'use_qk_norm': True, 'vocab_size': 1000}},
    'llama4_text': {'model_type': 'llama4_text', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 128,
     'num_attention_heads': 4, 'rms_norm_eps': 1e-05, 'vocab_size': 1000, 'head_dim': 32,
     'num_key_value_heads': 2, 'intermediate_size_mlp': 128, 'rope_theta': 1000.0,
     'tie_word_embeddings': False, 'no_rope_layers': [0, 0, 1, 1], 'use_qk_norm': True},
    'longcat_flash': {'model_type': 'longcat_flash', **_LONGCAT_FLASH},
    'longcat_flash_ngram': {'model_type': 'longcat_flash_ngram', **_LONGCAT_FLASH},
    'mamba': {'model_type': 'mamba', 'vocab_size': 1000, 'use_bias': False, 'use_conv_bias': True, 'conv_kernel': 4,
     'hidden_size': 128, 'num_hidden_layers': 4, 'state_size': 16, 'intermediate_size': 256,
     'time_step_rank': 48},
    'mamba2': {'model_type': 'mamba2', 'num_heads': 4, 'head_dim': 32, 'vocab_size': 1000, 'hidden_size': 128,
     'intermediate_size': 128, 'state_size': 32, 'num_hidden_layers': 4, 'layer_norm_epsilon': 0.0001,
     'conv_kernel': 3, 'n_groups': 4, 'use_bias': False, 'use_conv_bias': False,
     'tie_word_embeddings': True, 'time_step_limit': [0.01, 10], 'time_step_rank': 'auto'},
    'mellum': {'hidden_size': 128, 'num_hidden_layers': 2, 'intermediate_size': 256, 'num_attention_heads': 4,
     'num_key_value_heads': 2, 'rms_norm_eps': 1e-05, 'vocab_size': 1000,
     'max_position_embeddings': 1000, 'rope_theta': 10000.0, 'tie_word_embeddings': False,
     'model_type': 'mellum', 'head_dim': 32, 'num_experts': 4, 'num_experts_per_tok': 2,
     'moe_intermediate_size': 64, 'norm_topk_prob': True, 'sliding_window': 16,
     'layer_types': ['full_attention', 'sliding_attention'],
     'rope_parameters': {'full_attention': {'rope_theta': 10000.0}, 'sliding_attention': {'rope_theta': 10000.0}}},
    'mimo': {'model_type': 'mimo', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 128,
     'num_attention_heads': 4, 'rms_norm_eps': 1e-05, 'vocab_size': 1000, 'num_key_value_heads': 2},
    'mimo_v2_flash': {'model_type': 'mimo_v2_flash', 'num_experts_per_tok': 2, 'hybrid_layer_pattern': [0, 1, 0, 1],
     'moe_layer_freq': [0, 1, 0, 1], 'add_swa_attention_sink_bias': True,
     'add_full_attention_sink_bias': False, 'sliding_window_size': 32, 'vocab_size': 1000,
     'hidden_size': 128, 'intermediate_size': 256, 'moe_intermediate_size': 64, 'num_hidden_layers': 4,
     'num_attention_heads': 4, 'num_key_value_heads': 2, 'n_shared_experts': 1, 'n_routed_experts': 4,
     'routed_scaling_factor': None, 'topk_method': 'noaux_tc', 'scoring_func': 'sigmoid',
     'norm_topk_prob': True, 'n_group': 2, 'topk_group': 1, 'max_position_embeddings': 1000,
     'layernorm_epsilon': 1e-05, 'rope_theta': 1000.0, 'swa_rope_theta': 1000.0,
     'swa_num_attention_heads': 4, 'swa_num_key_value_heads': 2, 'head_dim': 32, 'v_head_dim': 32,
     'swa_head_dim': 128, 'swa_v_head_dim': 64, 'partial_rotary_factor': 0.5},
    'minicpm': {'model_type': 'minicpm', 'hidden_size': 128, 'dim_model_base': 1024, 'num_hidden_layers': 4,
     'intermediate_size': 256, 'num_attention_heads': 4, 'rms_norm_eps': 0.0001, 'vocab_size': 1000,
     'num_key_value_heads': 2, 'scale_depth': 1.0, 'scale_emb': 1.0},
    'minicpm3': {'hidden_size': 128, 'num_hidden_layers': 2, 'intermediate_size': 256, 'num_attention_heads': 4,
     'num_key_value_heads': 2, 'rms_norm_eps': 1e-05, 'vocab_size': 1000,
     'max_position_embeddings': 1000, 'rope_theta': 10000.0, 'tie_word_embeddings': False,
     'model_type': 'minicpm3', 'dim_model_base': 128, 'scale_depth': 1.0, 'scale_emb': 1.0,
     'kv_lora_rank': 32, 'q_lora_rank': 32, 'qk_rope_head_dim': 32, 'qk_nope_head_dim': 32,
     'v_head_dim': 32,
     'rope_scaling': {'type': 'longrope', 'long_factor': [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], 'short_factor': [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], 'original_max_position_embeddings': 1000}},
    'minimax': {'model_type': 'minimax', 'hidden_size': 128, 'intermediate_size': 128, 'num_attention_heads': 4,
     'num_key_value_heads': 2, 'max_position_embeddings': 1000, 'num_experts_per_tok': 2,
     'num_local_experts': 4, 'shared_intermediate_size': 128, 'num_hidden_layers': 4,
     'rms_norm_eps': 0.0001, 'rope_theta': 1000, 'rotary_dim': 16, 'vocab_size': 1000},
    'minimax_m3_vl': {'model_type': 'minimax_m3_vl',
     'text_config': {'hidden_size': 128, 'intermediate_size': 64, 'dense_intermediate_size': 256, 'shared_intermediate_size': 64, 'num_attention_heads': 4, 'num_key_value_heads': 2, 'num_hidden_layers': 4, 'num_local_experts': 4, 'num_experts_per_tok': 2, 'max_position_embeddings': 1000, 'rope_theta': 10000.0, 'head_dim': 32, 'vocab_size': 1000, 'moe_layer_freq': [0, 1, 1, 1], 'sparse_attention_freq': [0, 1, 0, 1], 'index_n_heads': 2, 'index_head_dim': 32, 'index_block_size': 8, 'index_topk_blocks': 4}},
    'ministral3': {'hidden_size': 128, 'num_hidden_layers': 2, 'intermediate_size': 256, 'num_attention_heads': 4,
     'num_key_value_heads': 2, 'rms_norm_eps': 1e-05, 'vocab_size': 1000,
     'max_position_embeddings': 1000, 'tie_word_embeddings': False, 'model_type': 'ministral3',
     'head_dim': 32, 'sliding_window': 16, 'layer_types': ['sliding_attention', 'full_attention'],
     'rope_parameters': {'rope_type': 'yarn', 'rope_theta': 10000.0, 'factor': 16.0, 'original_max_position_embeddings': 16, 'beta_fast': 32.0, 'beta_slow': 1.0, 'llama_4_scaling_beta': 0.1}},
    'mistral3': {'model_type': 'mistral3',
     'text_config': {'hidden_size': 128, 'num_hidden_layers': 2, 'intermediate_size': 256, 'num_attention_heads': 4, 'num_key_value_heads': 2, 'rms_norm_eps': 1e-05, 'vocab_size': 1000, 'max_position_embeddings': 1000, 'tie_word_embeddings': False, 'model_type': 'ministral3', 'head_dim': 32, 'rope_parameters': {'rope_type': 'yarn', 'rope_theta': 10000.0, 'factor': 16.0, 'original_max_position_embeddings': 16, 'beta_fast': 32.0, 'beta_slow': 1.0, 'llama_4_scaling_beta': 0.1}}},
    'mistral4': {'hidden_size': 128, 'num_hidden_layers': 2, 'intermediate_size': 256, 'num_attention_heads': 4,
     'num_key_value_heads': 2, 'rms_norm_eps': 1e-05, 'vocab_size': 1000,
     'max_position_embeddings': 1000, 'rope_theta': 10000.0, 'tie_word_embeddings': False,
     'model_type': 'mistral4', 'kv_lora_rank': 32, 'q_lora_rank': 32, 'qk_rope_head_dim': 32,
     'qk_nope_head_dim': 32, 'v_head_dim': 32, 'moe_intermediate_size': 64, 'n_shared_experts': 1,
     'n_routed_experts': 4, 'routed_scaling_factor': 1.0, 'num_experts_per_tok': 2,
     'norm_topk_prob': True, 'topk_group': 1, 'n_group': 1, 'first_k_dense_replace': 1,
     'rope_scaling': {'beta_fast': 32, 'beta_slow': 1, 'factor': 40, 'mscale': 1.0, 'mscale_all_dim': 1.0, 'original_max_position_embeddings': 4096, 'type': 'yarn'},
     'rope_parameters': {'beta_fast': 32, 'beta_slow': 1, 'factor': 40, 'mscale': 1.0, 'mscale_all_dim': 1.0, 'original_max_position_embeddings': 4096, 'type': 'yarn', 'rope_theta': 10000.0, 'llama_4_scaling_beta': 0.1}},
    'mixtral': {'model_type': 'mixtral', 'vocab_size': 100, 'hidden_size': 128, 'intermediate_size': 128,
     'num_hidden_layers': 2, 'num_attention_heads': 4, 'num_experts_per_tok': 2,
     'num_key_value_heads': 2, 'num_local_experts': 4},
    'muse_glimmer': {**TINY, 'model_type': 'muse_glimmer'},
    'muse_spark': {'model_type': 'muse_spark',
     'text_config': {'hidden_size': 128, 'num_attention_heads': 4, 'num_key_value_heads': 2, 'head_dim': 32, 'num_hidden_layers': 2, 'vocab_size': 1000, 'rms_norm_eps': 1e-05, 'post_norm_eps': 1e-05, 'rope_parameters': {'rope_theta': 10000.0}, 'layer_rope_theta': [10000.0, 0], 'layer_types': ['sliding_attention', 'full_attention'], 'sliding_window': 16, 'final_logit_softcapping': 30.0, 'output_multiplier': 1.0, 'num_local_experts': 4, 'num_experts_per_tok': 2, 'moe_hidden_size': 64, 'moe_intermediate_size': 64}},
    'nanbeige': {'hidden_size': 128, 'num_hidden_layers': 2, 'intermediate_size': 256, 'num_attention_heads': 4,
     'num_key_value_heads': 2, 'rms_norm_eps': 1e-05, 'vocab_size': 1000,
     'max_position_embeddings': 1000, 'rope_theta': 10000.0, 'tie_word_embeddings': False,
     'model_type': 'nanbeige'},
    'nanochat': {'model_type': 'nanochat', 'hidden_size': 128, 'num_hidden_layers': 4, 'num_attention_heads': 4,
     'num_key_value_heads': 2, 'vocab_size': 32, 'intermediate_size': 128},
    'nemotron': {'model_type': 'nemotron', 'hidden_size': 128, 'hidden_act': 'gelu', 'num_hidden_layers': 4,
     'intermediate_size': 256, 'num_attention_heads': 4, 'norm_eps': 1e-05, 'vocab_size': 1000,
     'num_key_value_heads': 2},
    'nemotron-nas': {'model_type': 'nemotron-nas', 'hidden_size': 128, 'num_hidden_layers': 4, 'num_attention_heads': 4,
     'rms_norm_eps': 1e-05, 'vocab_size': 1000,
     'block_configs': [{'attention': {'n_heads_in_group': 2, 'no_op': False, 'replace_with_linear': False}, 'ffn': {'ffn_mult': 1.3125, 'no_op': False, 'replace_with_linear': False}}, {'attention': {'n_heads_in_group': 2, 'no_op': False, 'replace_with_linear': False}, 'ffn': {'ffn_mult': 1.3125, 'no_op': False, 'replace_with_linear': False}}, {'attention': {'n_heads_in_group': 2, 'no_op': False, 'replace_with_linear': False}, 'ffn': {'ffn_mult': 1.3125, 'no_op': False, 'replace_with_linear': False}}, {'attention': {'n_heads_in_group': 2, 'no_op': False, 'replace_with_linear': False}, 'ffn': {'ffn_mult': 1.3125, 'no_op': False, 'replace_with_linear': False}}]},
    'nemotron_h': {'model_type': 'nemotron_h', 'vocab_size': 1000, 'hidden_size': 128, 'intermediate_size': 128,
     'num_hidden_layers': 4, 'max_position_embeddings': 1000, 'num_attention_heads': 4,
     'num_key_value_heads': 2, 'attention_bias': False, 'mamba_num_heads': 8, 'mamba_head_dim': 64,
     'mamba_proj_bias': False, 'ssm_state_size': 128, 'conv_kernel': 3, 'n_groups': 4,
     'time_step_limit': [1.0, 2.0], 'mlp_bias': False, 'layer_norm_epsilon': 0.0001,
     'rms_norm_eps': 1e-05, 'use_bias': True, 'use_conv_bias': True, 'residual_in_fp32': True,
     'hybrid_override_pattern': ['*', 'M', '*', 'M']},
    'olmo': {'model_type': 'olmo', 'd_model': 128, 'n_layers': 4, 'mlp_hidden_size': 256, 'n_heads': 4,
     'vocab_size': 1000, 'embedding_size': 1000},
    'olmo2': {'model_type': 'olmo2', 'hidden_size': 128, 'attention_bias': False, 'intermediate_size': 256,
     'num_attention_heads': 4, 'num_hidden_layers': 4, 'num_key_value_heads': 2,
     'rms_norm_eps': 0.0001, 'rope_theta': 1000, 'vocab_size': 1000},
    'olmo3': {'model_type': 'olmo3', 'num_heads': 4, 'head_dim': 32, 'vocab_size': 1000, 'hidden_size': 128,
     'intermediate_size': 128, 'num_attention_heads': 4, 'rope_theta': 1000, 'num_hidden_layers': 4,
     'rms_norm_eps': 0.0001, 'sliding_window': 48, 'tie_word_embeddings': True,
     'max_position_embeddings': 1000},
    'olmo_hybrid': {**TINY, 'model_type': 'olmo_hybrid', 'num_hidden_layers': 4, 'linear_num_key_heads': 4,
     'linear_num_value_heads': 4, 'linear_key_head_dim': 32, 'linear_value_head_dim': 32,
     'linear_conv_kernel_dim': 4, 'linear_allow_neg_eigval': True, 'attention_bias': False},
    'olmoe': {'model_type': 'olmoe', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 128,
     'num_attention_heads': 4, 'rms_norm_eps': 1e-05, 'vocab_size': 1000, 'num_experts': 4,
     'num_experts_per_tok': 2},
    'openelm': {**TINY, 'model_type': 'openelm', 'ffn_dim_divisor': 256,
     'ffn_multipliers': [0.5, 0.73, 0.97, 1.2, 1.43, 1.67, 1.9, 2.13, 2.37, 2.6, 2.83, 3.07, 3.3, 3.53, 3.77, 4.0],
     'head_dim': 64, 'model_dim': 1280, 'normalize_qk_projections': True,
     'num_kv_heads': [3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5],
     'num_query_heads': [12, 12, 12, 12, 12, 16, 16, 16, 16, 16, 16, 16, 20, 20, 20, 20],
     'num_transformer_layers': 16},
    'phi': {**TINY, 'model_type': 'phi'},
    'phi3': {'model_type': 'phi3', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 256,
     'num_attention_heads': 4, 'rms_norm_eps': 1e-05, 'vocab_size': 1000},
    'phi3small': {'model_type': 'phi3small', 'hidden_size': 128, 'dense_attention_every_n_layers': 2,
     'ff_intermediate_size': 256, 'gegelu_limit': 1.0, 'num_hidden_layers': 4,
     'num_attention_heads': 4, 'num_key_value_heads': 2, 'layer_norm_epsilon': 0.0001,
     'vocab_size': 100352},  # mlx-lm's phi3small indexes past a vocab below 100352 (the process aborts)
    'phimoe': {'model_type': 'phimoe', 'vocab_size': 320, 'hidden_size': 128, 'intermediate_size': 256,
     'num_hidden_layers': 4, 'num_attention_heads': 4, 'num_key_value_heads': 2, 'rope_scaling': None},
    'phixtral': {'model_type': 'phixtral', 'num_vocab': 1000, 'model_dim': 128, 'num_heads': 4, 'num_layers': 4,
     'rotary_dim': 16, 'num_experts_per_tok': 2, 'num_local_experts': 4},
    'pixtral': {'model_type': 'pixtral',
     'text_config': {'model_type': 'llama', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 256, 'num_attention_heads': 4, 'rms_norm_eps': 1e-05, 'vocab_size': 1000},
     'num_hidden_layers': 4, 'vocab_size': 1000},
    'plamo': {'model_type': 'plamo', 'n_shared_head': 2, 'hidden_size': 128, 'num_hidden_layers': 4,
     'intermediate_size': 256, 'num_attention_heads': 4, 'rms_norm_eps': 1e-05, 'vocab_size': 1000},
    'plamo2': {'model_type': 'plamo2', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 256,
     'num_attention_heads': 4, 'rms_norm_eps': 1e-05, 'vocab_size': 1000},
    'plamo3': {'hidden_size': 128, 'num_hidden_layers': 2, 'intermediate_size': 256, 'num_attention_heads': 4,
     'num_key_value_heads': 2, 'rms_norm_eps': 1e-05, 'vocab_size': 1000,
     'max_position_embeddings': 1000, 'rope_theta': 10000.0, 'tie_word_embeddings': False,
     'model_type': 'plamo3', 'head_dim': 32, 'sliding_window': 16, 'sliding_window_pattern': 2},
    # qwen3_5 with one 2-bit packed linear (the last MLP's down_proj; its packed weights are zeros)
    'prism_hadamard_qwen35': {'model_type': 'prism_hadamard_qwen35',
     'text_config': {'model_type': 'qwen3_5', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 128, 'num_attention_heads': 4, 'num_key_value_heads': 2, 'vocab_size': 1000, 'linear_num_value_heads': 4, 'linear_num_key_heads': 4, 'linear_key_head_dim': 32, 'linear_value_head_dim': 32, 'linear_conv_kernel_dim': 3, 'rms_norm_eps': 1e-05, 'head_dim': 64, 'rope_theta': 1000.0, 'partial_rotary_factor': 0.5, 'max_position_embeddings': 1000},
     'schema_version': 1, 'tensor_namespace': 'mlx-lm-text',
     'quantization': {'bits': 2, 'group_size': 128, 'mode': 'affine'},
     'modules': [{'path': 'model.layers.3.mlp.down_proj', 'block': 0, 'embedding': False, 'dtype': 'float16'}]},
    'qwen': {**TINY, 'model_type': 'qwen', 'kv_channels': 32},
    'qwen2': {'model_type': 'qwen2', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 256,
     'num_attention_heads': 4, 'num_key_value_heads': 2, 'rms_norm_eps': 1e-05, 'vocab_size': 1000},
    'qwen2_moe': {'model_type': 'qwen2_moe', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 256,
     'num_attention_heads': 4, 'rms_norm_eps': 1e-05, 'vocab_size': 1000, 'num_experts_per_tok': 4,
     'num_experts': 4, 'moe_intermediate_size': 64, 'shared_expert_intermediate_size': 2048},
    'qwen2_vl': {**TINY, 'model_type': 'qwen2_vl'},
    'qwen3': {'model_type': 'qwen3', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 256,
     'num_attention_heads': 4, 'num_key_value_heads': 2, 'rms_norm_eps': 1e-05, 'vocab_size': 1000,
     'head_dim': 32, 'max_position_embeddings': 4096, 'tie_word_embeddings': False, 'rope_theta': 1000},
    'qwen3_5': {'model_type': 'qwen3_5', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 128,
     'num_attention_heads': 4, 'num_key_value_heads': 2, 'vocab_size': 1000,
     'linear_num_value_heads': 4, 'linear_num_key_heads': 4, 'linear_key_head_dim': 32,
     'linear_value_head_dim': 32, 'linear_conv_kernel_dim': 3, 'rms_norm_eps': 1e-05, 'head_dim': 64,
     'rope_theta': 1000.0, 'partial_rotary_factor': 0.5, 'max_position_embeddings': 1000},
    'qwen3_5_moe': {'model_type': 'qwen3_5_moe', 'hidden_size': 128, 'num_hidden_layers': 4, 'num_attention_heads': 4,
     'num_key_value_heads': 2, 'vocab_size': 1000, 'linear_num_value_heads': 4,
     'linear_num_key_heads': 4, 'linear_key_head_dim': 32, 'linear_value_head_dim': 32,
     'linear_conv_kernel_dim': 3, 'num_experts': 4, 'num_experts_per_tok': 2,
     'shared_expert_intermediate_size': 128, 'moe_intermediate_size': 64, 'rms_norm_eps': 1e-05,
     'head_dim': 64, 'rope_theta': 1000.0, 'partial_rotary_factor': 0.5,
     'max_position_embeddings': 1000},
    'qwen3_moe': {'model_type': 'qwen3_moe', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 256,
     'num_attention_heads': 4, 'num_key_value_heads': 2, 'rms_norm_eps': 1e-05, 'head_dim': 32,
     'vocab_size': 1000, 'decoder_sparse_step': 1, 'mlp_only_layers': [], 'num_experts_per_tok': 4,
     'num_experts': 4, 'moe_intermediate_size': 64, 'rope_theta': 1000,
     'max_position_embeddings': 4096, 'tie_word_embeddings': False, 'norm_topk_prob': True},
    'qwen3_next': {'model_type': 'qwen3_next', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 128,
     'num_attention_heads': 4, 'num_key_value_heads': 2, 'vocab_size': 1000,
     'linear_num_value_heads': 4, 'linear_num_key_heads': 4, 'linear_key_head_dim': 32,
     'linear_value_head_dim': 32, 'linear_conv_kernel_dim': 3, 'num_experts': 4,
     'num_experts_per_tok': 2, 'decoder_sparse_step': 1, 'shared_expert_intermediate_size': 128,
     'mlp_only_layers': [0], 'moe_intermediate_size': 64, 'rms_norm_eps': 1e-05, 'head_dim': 64,
     'rope_theta': 1000.0, 'partial_rotary_factor': 0.5, 'max_position_embeddings': 1000},
    'qwen3_vl': {'model_type': 'qwen3_vl',
     'text_config': {'model_type': 'qwen3', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 256, 'num_attention_heads': 4, 'num_key_value_heads': 2, 'rms_norm_eps': 1e-05, 'vocab_size': 1000, 'head_dim': 32, 'max_position_embeddings': 1000, 'tie_word_embeddings': False, 'rope_theta': 1000},
     'num_hidden_layers': 4, 'vocab_size': 1000},
    'qwen3_vl_moe': {'model_type': 'qwen3_vl_moe',
     'text_config': {'model_type': 'qwen3_moe', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 256, 'num_attention_heads': 4, 'num_key_value_heads': 2, 'rms_norm_eps': 1e-05, 'head_dim': 32, 'vocab_size': 1000, 'decoder_sparse_step': 1, 'mlp_only_layers': [], 'num_experts_per_tok': 2, 'num_experts': 4, 'moe_intermediate_size': 64, 'rope_theta': 1000, 'max_position_embeddings': 1000, 'tie_word_embeddings': False, 'norm_topk_prob': True},
     'num_hidden_layers': 4, 'vocab_size': 1000},
    'recurrent_gemma': {'model_type': 'recurrent_gemma', 'hidden_size': 128, 'attention_bias': False, 'conv1d_width': 3,
     'intermediate_size': 256, 'logits_soft_cap': 1.0, 'num_attention_heads': 4,
     'num_hidden_layers': 4, 'num_key_value_heads': 2, 'rms_norm_eps': 0.0001, 'rope_theta': 1000,
     'attention_window_size': 1024, 'vocab_size': 1000,
     'block_types': ['recurrent', 'recurrent', 'attention']},
    'rwkv7': {'model_type': 'rwkv7', 'vocab_size': 1000, 'hidden_size': 128, 'intermediate_size': 128,
     'norm_eps': 1e-05, 'head_dim': 32, 'num_hidden_layers': 4, 'a_low_rank_dim': 16,
     'v_low_rank_dim': 16, 'gate_low_rank_dim': 16, 'decay_low_rank_dim': 16},
    'seed_oss': {'model_type': 'seed_oss', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 128,
     'num_attention_heads': 4, 'rms_norm_eps': 1e-05, 'vocab_size': 1000, 'num_key_value_heads': 2,
     'head_dim': 64},
    'smollm3': {'model_type': 'smollm3', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 256,
     'num_attention_heads': 4, 'rms_norm_eps': 1e-05, 'vocab_size': 1000},
    'solar_open': {**TINY, 'model_type': 'solar_open', 'num_hidden_layers': 4, 'moe_intermediate_size': 64,
     'head_dim': 32, 'n_shared_experts': 1, 'n_routed_experts': 4, 'routed_scaling_factor': 1.0,
     'num_experts_per_tok': 2, 'first_k_dense_replace': 1, 'norm_topk_prob': True,
     'partial_rotary_factor': 1.0},
    'spark2_5': {'hidden_size': 128, 'num_hidden_layers': 2, 'intermediate_size': 256, 'num_attention_heads': 4,
     'num_key_value_heads': 2, 'rms_norm_eps': 1e-05, 'vocab_size': 1000,
     'max_position_embeddings': 1000, 'rope_theta': 10000.0, 'tie_word_embeddings': False,
     'model_type': 'spark2_5', 'head_dim': 32, 'sliding_window': 16,
     'layer_types': ['sliding_attention', 'full_attention'],
     'rope_parameters': {'full_attention': {'rope_theta': 10000.0}, 'sliding_attention': {'rope_theta': 10000.0}}},
    'stablelm': {'model_type': 'stablelm', 'vocab_size': 1000, 'hidden_size': 128, 'num_attention_heads': 4,
     'num_hidden_layers': 4, 'num_key_value_heads': 2, 'partial_rotary_factor': 1.0,
     'intermediate_size': 256, 'layer_norm_eps': 0.01, 'rope_theta': 10000, 'use_qkv_bias': False},
    'starcoder2': {'model_type': 'starcoder2', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 256,
     'num_attention_heads': 4, 'num_key_value_heads': 2},
    'step3p5': {'model_type': 'step3p5', 'hidden_size': 128, 'num_hidden_layers': 4, 'vocab_size': 1000,
     'num_attention_heads': 4, 'num_attention_groups': 2, 'head_dim': 64, 'intermediate_size': 256,
     'rms_norm_eps': 1e-05, 'rope_theta': [10000.0, 10000.0, 10000.0, 10000.0], 'sliding_window': 48,
     'layer_types': ['full_attention', 'sliding_attention', 'sliding_attention', 'full_attention'],
     'partial_rotary_factors': [0.5, 1.0, 1.0, 0.5],
     'attention_other_setting': {'num_attention_heads': 8, 'num_attention_groups': 2},
     'use_head_wise_attn_gate': True, 'moe_num_experts': 4, 'moe_top_k': 2,
     'moe_intermediate_size': 64, 'share_expert_dim': 256, 'moe_layers_enum': '1,2,3'},
    'talkie': {**TINY, 'model_type': 'talkie'},
    'telechat3': {'model_type': 'telechat3', 'hidden_size': 128, 'num_hidden_layers': 4, 'intermediate_size': 256,
     'num_attention_heads': 4, 'num_key_value_heads': 2, 'rms_norm_eps': 1e-05, 'vocab_size': 128,
     'rope_theta': 10000.0, 'max_position_embeddings': 1000},
    'youtu_llm': {'model_type': 'youtu_llm', 'vocab_size': 1000, 'hidden_size': 128, 'intermediate_size': 128,
     'num_hidden_layers': 4, 'kv_lora_rank': 32, 'q_lora_rank': 32},
}

# built and compared in tests/test_architectures.py (a second or less each on a 2-core CPU;
# phi3small, with its vocab of 100352, a few). Not deepseek_v32: its indexer's top-k picks flip
# under 8-bit key errors (kvq8 0.950 / 0.0181, plain group-wise gw-8 0.900 / 0.0325 at 48 tokens);
# glm_moe_dsa runs the same model code
CI = ['Klear', 'afm7', 'apertus', 'baichuan_m1', 'bailing_hybrid', 'bailing_moe', 'cohere2', 'dbrx',
      'deepseek', 'deepseek_v2', 'deepseek_v3', 'dots1', 'ernie4_5', 'exaone',
      'exaone4', 'gemma2', 'gemma3', 'gemma3n', 'gemma4', 'glm', 'glm4', 'glm4_moe',
      'glm4_moe_lite', 'glm_moe_dsa', 'gpt2', 'gpt_oss', 'granite', 'granitemoehybrid', 'helium',
      'hunyuan', 'internlm2', 'internlm3', 'iquestloopcoder', 'kimi_k25', 'kimi_k3', 'kimi_linear',
      'laguna', 'lfm2', 'llama', 'llama4', 'longcat_flash', 'mellum', 'mimo', 'mimo_v2_flash',
      'minicpm', 'minicpm3', 'minimax', 'minimax_m3_vl', 'ministral3', 'mistral3', 'mistral4',
      'mixtral', 'nanbeige', 'nanochat', 'nemotron-nas', 'olmo2', 'olmo_hybrid', 'olmoe', 'phi',
      'phi3', 'phi3small', 'phixtral', 'pixtral', 'plamo', 'plamo3', 'prism_hadamard_qwen35',
      'qwen', 'qwen2', 'qwen3', 'seed_oss', 'smollm3', 'solar_open', 'spark2_5', 'stablelm',
      'telechat3']


def describe(r):
    """One table cell per cache: ``agree/err`` or the error."""
    cell = lambda x: f"{x[1]:.3f} / {x[2]:.4f}" + ("" if x[0] else " NON-FINITE") if isinstance(x, tuple) else x
    return {k: cell(r[k]) for k in CACHES if k in r}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_types", nargs="*", help="architectures (default: every one in CONFIGS)")
    p.add_argument("--prompt", type=int, default=48)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--caches", default=",".join(TABLE), help=f"columns, of {', '.join(CACHES)}")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    caches = a.caches.split(",")
    if not set(caches) <= set(CACHES):
        p.error(f"--caches {a.caches}: choose from {', '.join(CACHES)}")
    rows = {}
    print("| architecture | " + " | ".join(f"{c} agree / err" for c in caches) + " | fp16 layers (warning) | s |")
    print("|---" * (len(caches) + 3) + "|")
    for m in a.model_types or sorted(CONFIGS):
        try:
            r = compare(m, a.prompt, a.chunk, a.steps, a.window, caches)
        except (Exception, SystemExit) as e:  # mlx-lm's olmo exits when ai2-olmo is missing
            r = {"error": f"{type(e).__name__}: {e}"}
            print(f"| {m} | {r['error'][:120]} |" + " |" * (len(caches) + 1), flush=True)
        else:
            d = describe(r)
            fp16 = "; ".join(r["fp16_reason"]) or "-"
            print(f"| {m} | " + " | ".join(d[c] for c in caches) + f" | {fp16} | {r['seconds']:.1f} |", flush=True)
        rows[m] = r
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
