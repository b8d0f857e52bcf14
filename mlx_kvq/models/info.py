"""What the commands ask of a loaded model: its context length, a fingerprint that
identifies it in cache files, the dtype its activations take, and its weights in float32
(fast on the CPU)."""

import hashlib
import json
from collections import Counter

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path


def context_length(model):
    """The model's context length from its config, or None if it does not say."""
    args = getattr(model, "args", None)
    for key in ("max_position_embeddings", "context_length", "max_seq_len"):
        value = getattr(args, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


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
