"""What the commands ask of a loaded model: its context length (and what a request fits in
it), a fingerprint that identifies it in cache files, the dtype its activations take, and its
weights in float32 (fast on the CPU)."""

import hashlib
import json
from collections import Counter

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path


# RoPE scalings whose config already states the extended length as max_position_embeddings,
# and models whose configs do so whatever their scaling (Gemma 3's linear factor 8 over 131072)
EXTENDED_IN_CONFIG = ("llama3", "longrope", "su")
EXTENDED_MODELS = ("gemma3",)


def context_length(model):
    """The model's context length from its config, or None if it does not say: its
    positions (``max_position_embeddings``; yarn's ``original_max_position_embeddings``)
    times the ``rope_scaling`` factor where that scaling extends them (yarn, linear, dynamic;
    llama3 and longrope configs, and Gemma 3's, state the extended length already), as vLLM
    counts it."""
    args = getattr(model, "args", None)
    for key in ("max_position_embeddings", "context_length", "max_seq_len"):
        value = getattr(args, key, None)
        if isinstance(value, int) and value > 0:
            scaling = getattr(args, "rope_scaling", None)
            kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
            factor = scaling.get("factor") if isinstance(scaling, dict) else None
            extended = kind in EXTENDED_IN_CONFIG or str(getattr(args, "model_type", "")).startswith(EXTENDED_MODELS)
            if not extended and isinstance(factor, (int, float)) and factor > 1:
                if kind == "yarn":
                    value = scaling.get("original_max_position_embeddings") or value
                value = int(value * factor)
            return value
    return None


def fit_to_context(model, prompt_tokens, max_tokens):
    """``max_tokens`` cut to what the model's context holds after a prompt of ``prompt_tokens``
    (unchanged where the config states no context); a ``ValueError`` naming both lengths
    where the prompt alone fills it."""
    limit = context_length(model)
    if limit is None:
        return max_tokens
    if prompt_tokens >= limit:
        raise ValueError(f"The prompt takes {prompt_tokens} tokens; the model's context is {limit} tokens "
                         "(the prompt and the tokens it generates).")
    return min(max_tokens, limit - prompt_tokens)


def model_fingerprint(model):
    """A short hash of the model's config and a few embedding rows.

    It does not change when the weights are dequantized or cast (``--dtype float32``).
    """
    args = getattr(model, "args", None)
    config = vars(args) if args is not None and hasattr(args, "__dict__") else {}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if embed is not None:
        rows = embed(mx.arange(8)).astype(mx.float32)
        h.update(np.round(np.array(rows), 2).tobytes())
    else:
        h.update(str([(k, v.shape) for k, v in tree_flatten(model.parameters())][:8]).encode())
    return h.hexdigest()[:16]


def to_fp32(model):
    """Dequantize quantized layers and cast weights to float32 (fast on CPU, with OpenBLAS)."""
    def dequant(_, m):
        if isinstance(m, nn.QuantizedLinear):
            w = mx.dequantize(
                m.weight, m.scales, m.get("biases"), m.group_size, m.bits,
                mode=getattr(m, "mode", "affine"),
            )
            out = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
            out.weight = w.astype(mx.float32)
            if "bias" in m:
                out.bias = m.bias.astype(mx.float32)
            return out
        if isinstance(m, nn.QuantizedEmbedding):
            w = mx.dequantize(
                m.weight, m.scales, m.get("biases"), m.group_size, m.bits,
                mode=getattr(m, "mode", "affine"),
            )
            out = nn.Embedding(w.shape[0], w.shape[1])
            out.weight = w.astype(mx.float32)
            return out
        return m

    leaves = tree_map_with_path(dequant, model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(leaves)
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


def float_dtype(model):
    """The floating dtype most of ``model``'s parameter arrays have (what unquantized
    caches store: the activations' dtype); float16 where it has none."""
    counts = Counter(v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating))
    return counts.most_common(1)[0][0] if counts else mx.float16


def prepare_model(model, dtype="auto"):
    """Dequantize the weights to float32 when asked (or on the CPU for ``auto``)."""
    if dtype == "float32" or (dtype == "auto" and mx.default_device() == mx.cpu):
        to_fp32(model)
    return model
