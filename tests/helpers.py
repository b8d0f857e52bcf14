"""Shared test helpers: a plain fp32 attention reference and a float64 one in NumPy, a cache's
contents, free ports, a tiny mlx-lm model directory, a tiny model of any mlx-lm architecture."""

import json
import socket

import numpy as np

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from mlx_kvq import format as quant
from mlx_kvq.rotation import rotation


def rel_err(a, b):
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.linalg.norm(a - b) / mx.linalg.norm(b)).item()


def plain_attention(q, k, v, scale, mask=None):
    """fp32 softmax(q k^T * scale + mask) v with GQA, every score materialized."""
    q, k, v = (x.astype(mx.float32) for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = mx.repeat(k, rep, axis=1), mx.repeat(v, rep, axis=1)
    s = (q * scale) @ k.swapaxes(-1, -2)
    if mask is not None:
        s = mx.where(mask, s, -mx.inf) if mask.dtype == mx.bool_ else s + mask
    return mx.softmax(s, axis=-1) @ v


def cache_contents(cache):
    """The keys and values a QuantizedKVCache holds, dequantized to fp32 (rotated space)."""
    parts_k, parts_v = [], []
    if cache.sink_keys is not None:
        parts_k.append(cache.sink_keys)
        parts_v.append(cache.sink_values)
    if cache.n_packed:
        n = cache.n_packed
        cut = lambda t: tuple(a[:, :, :n] for a in t)
        parts_k.append(quant.dequantize(cut(cache.packed_keys), cache.k_bits, cache.group_size, cache.mode, mx.float32))
        parts_v.append(quant.dequantize(cut(cache.packed_values), cache.v_bits, cache.group_size, cache.mode, mx.float32))
    if cache.window_keys is not None:
        parts_k.append(cache.window_keys)
        parts_v.append(cache.window_values)
    cat = lambda xs: mx.concatenate([x.astype(mx.float32) for x in xs], axis=2)
    return cat(parts_k), cat(parts_v)


def reference_over_cache(cache, q, scale, mask=None):
    """Plain fp32 attention over what the cache holds, rotations applied as the cache defines."""
    k, v = cache_contents(cache)
    q = mx.pad(q.astype(mx.float32), [(0, 0)] * 3 + [(0, k.shape[-1] - q.shape[-1])])
    if cache.rotate:
        q = q @ rotation(q.shape[-1])
    out = plain_attention(q, k, v, scale, mask)
    if cache.rotate == "kv":
        out = out @ rotation(out.shape[-1]).T
    return out[..., : cache.v_dim]


def NO_LAUNCHES(name, *args):
    """A launcher for tests in which no kernel may run."""
    raise AssertionError(f"kernel {name} launched")


class Faulty:
    """A launcher wrapping another: ``broken(name, template)`` raises as a Metal compile
    error would, ``wrong(name, template)`` returns perturbed outputs."""

    def __init__(self, launch, broken=None, wrong=None):
        self.launch, self.broken, self.wrong = launch, broken, wrong
        self.calls = []

    def __call__(self, name, inputs, template, *rest):
        t = dict(template)
        self.calls.append((name, t))
        if self.broken and self.broken(name, t):
            raise RuntimeError(f"[metal::Device] Unable to build metal library from source\nkvq_{name}: error")
        outs = self.launch(name, inputs, template, *rest)
        if self.wrong and self.wrong(name, t):
            outs = [o * 1.5 + 0.25 if o.dtype in (mx.float16, mx.bfloat16, mx.float32) else o ^ 1 for o in outs]
        return outs

    def count(self, name):
        return sum(c[0] == name for c in self.calls)


def free_ports(n):
    """A first port of ``n`` consecutive free ones (the ring backend listens on port + rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + n > 65535:
            continue
        try:
            held = []
            for p in range(first, first + n):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no free ports")


def tiny_qwen2_dir(path, tokenizer):
    """A 4-layer float32 qwen2 (2 heads and 2 KV heads of dim 64) with random weights from a
    fixed seed, scaled so that greedy tokens vary, and ``tokenizer`` (the embedded model's)."""
    config = dict(model_type="qwen2", hidden_size=128, num_hidden_layers=4, intermediate_size=256,
                  num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-5,
                  vocab_size=len(tokenizer._tokenizer), tie_word_embeddings=True)
    mx.random.seed(0)
    from mlx_lm.models import qwen2

    model = qwen2.Model(qwen2.ModelArgs(**config))
    model.update(tree_map(lambda p: p * 3 if p.ndim == 2 else p, model.parameters()))
    weights = dict(tree_flatten(model.parameters()))
    path.mkdir()
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    # mlx-lm's pipeline split reads which file holds each layer from the index
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "model.safetensors" for k in weights}}))
    (path / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(path)
    return path


def tiny(module, **config):
    """A tiny float32 model of an mlx-lm architecture (``benchmarks/architectures.py`` sizes)."""
    import importlib

    from benchmarks.architectures import CONFIGS
    from mlx_lm.models import cache as _  # noqa: F401

    arch = importlib.import_module(f"mlx_lm.models.{module}")
    mx.random.seed(0)
    model = arch.Model(arch.ModelArgs.from_dict({**CONFIGS[module], **config}))
    mx.eval(model.parameters())
    return model


def numpy_attention(q, k, v, scale, visible):
    """float64 ``(out, lse)`` of (B, Hq, L, D) queries over (B, Hkv, n, D) keys, ``visible``
    (B|1, Hq|1, L, n) booleans; rows that see no key: out 0, lse -inf."""
    q, k, v = (np.array(x, dtype=np.float64) for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = np.where(visible, np.einsum("bhld,bhnd->bhln", q * scale, k), -np.inf)
    m = s.max(axis=-1, keepdims=True)
    seen = np.isfinite(m)
    p = np.exp(s - np.where(seen, m, 0.0))
    l = p.sum(axis=-1, keepdims=True)
    out = np.where(seen, (p @ v) / np.where(seen, l, 1.0), 0.0)
    lse = np.where(seen, m + np.log(np.where(seen, l, 1.0)), -np.inf)[..., 0]
    return out, lse


def check(got, want, tol=2e-5):
    out, lse = (np.array(x) for x in got)
    assert np.array_equal(np.isinf(lse), np.isinf(want[1]))
    assert np.abs(out - want[0]).max() < tol
    finite = np.isfinite(want[1])
    assert np.abs(lse[finite] - want[1][finite]).max() < tol
