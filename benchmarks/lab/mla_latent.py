"""Decode time of one MLA attention layer (DeepSeek-V3 shapes: 128 heads, a 512-wide latent
and 64 RoPE dims cached per token) over a long cache: mlx-lm's fp16 ``KVCache``; mlx-kvq's
cache as mlx-kvq runs it (``arrays``: MLA layers call ``sdpa(q, latent, latent)``, which the
bridge answers with ``attention/latent.py``: the latent dequantized as stored, a transient copy
per step, rotated queries); ``copy``: the latent dequantized and rotated back token by token
(the route before it); ``latent``: the packed latent itself routed to ``quantized_sdpa``
(``keys_as_values`` below, no copy), with the dispatch path it took; ``qmm``:
``mx.quantized_matmul`` over the packed latent, every head a row of one product; ``kernel``:
``arrays`` with the latent kernel (``kernels/latent.py``, Metal's route) run on this backend
too (on CUDA its ``simdgroup_matrix`` products are warp shuffles).

    python3 benchmarks/lab/mla_latent.py --context 4096,32768,131072 --bits 4,8 [--group 64]
        [--routes arrays,copy,latent,qmm,kernel] [--chain 8]

The cache is filled with random latents (no prefill through the layer), then ``--steps``
decode steps run through ``DeepseekV3Attention`` (random weights, the model's dtype:
float16 on a GPU, float32 on the CPU), each evaluated (``--chain N``: N steps per evaluation,
GPU-bound); the median step is reported. Results: ``results/mla_latent_h200.txt`` (H200, MLX
CUDA), ``results/mla_latent_cpu.txt``.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mlx_kvq  # noqa: E402  (OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402
from mlx_lm.models import cache as lm_cache  # noqa: E402
from mlx_lm.models import deepseek_v3  # noqa: E402

from mlx_kvq import bridge  # noqa: E402
from mlx_kvq.attention import dispatch, quantized_sdpa  # noqa: E402
from mlx_kvq.attention import latent as latent_attention  # noqa: E402
from mlx_kvq.kernels import latent as latent_kernel  # noqa: E402
from mlx_kvq.cache import KVView  # noqa: E402

DEEPSEEK_V3 = dict(model_type="deepseek_v3", hidden_size=7168, num_attention_heads=128,
                   num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64,
                   qk_nope_head_dim=128, v_head_dim=128)


def keys_as_values(view):
    """``view``'s keys standing for the values too (rotated keys are rotated values)."""
    other = KVView.__new__(KVView)
    f = view.format
    sk, wk, (k, _, n), (wb, _, nw, _) = view.sinks[0], view.window[0], view.packed, view.window_buffers
    other.__dict__.update(
        view.__dict__, _array=None, v_dim=view.k_dim, sinks=(sk, sk), packed=(k, k, n),
        window_buffers=(wb, wb, nw, nw), _window=(wk, wk),
        format=f._replace(v_bits=f.k_bits, rotate="kv" if f.rotate else None))
    return other


PATHS_TAKEN = {}


def latent_qmm(queries, view, scale, mask, dtype):
    """Decode over the packed latent as keys and values with ``mx.quantized_matmul`` in
    ``dtype`` (every head a row of one product), the window and sinks dense; no copy."""
    from mlx_kvq.rotation import rotate
    f = view.format
    k, _, n = view.packed
    sk, wk = view.sinks[0], view.window[0]
    B, Hq, L, D = queries.shape
    q = rotate(queries.astype(mx.float32)) if f.rotate else queries.astype(mx.float32)
    qc = (q * scale).astype(dtype).reshape(B, 1, Hq * L, D)
    qmm = lambda x, t: mx.quantized_matmul(x, *(a[:, :, :n] for a in k), transpose=t,
                                          group_size=f.group_size, bits=f.k_bits, mode=f.mode)
    parts = []
    if sk is not None and sk.shape[2]:
        parts.append(qc @ sk.astype(dtype).swapaxes(-1, -2))
    if n:
        parts.append(qmm(qc, True))
    if wk is not None and wk.shape[2]:
        parts.append(qc @ wk.astype(dtype).swapaxes(-1, -2))
    scores = mx.concatenate(parts, axis=-1).astype(mx.float32).reshape(B, Hq, L, -1)
    if mask is not None and not isinstance(mask, str):
        scores = scores + mask.astype(mx.float32)
    p = mx.softmax(scores, axis=-1, precise=True).astype(dtype).reshape(B, 1, Hq * L, -1)
    s = 0 if sk is None else sk.shape[2]
    out = 0
    if s:
        out = p[..., :s] @ sk.astype(dtype)
    if n:
        out = out + qmm(p[..., s:s + n], False)
    if wk is not None and wk.shape[2]:
        out = out + p[..., s + n:] @ wk.astype(dtype)
    out = out.reshape(B, Hq, L, -1)
    if f.rotate:
        out = rotate(out.astype(mx.float32), inverse=True)
    return out[..., :view.k_dim].astype(dtype)


def copy_route(original):
    """Before ``attention/latent.py``: the latent dequantized and rotated back, every token."""
    def sdpa(queries, keys, values, cache=None, scale=1.0, mask=None, sinks=None):
        if values is keys and getattr(keys, "part", None) == "keys":
            PATHS_TAKEN["copy"] = PATHS_TAKEN.get("copy", 0) + 1
            k = keys.array
            return original.mlx_kvq_original(queries, k, k, cache=cache, scale=scale, mask=mask, sinks=sinks)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
    return sdpa


def qmm_route(original):
    def sdpa(queries, keys, values, cache=None, scale=1.0, mask=None, sinks=None):
        if values is keys and getattr(keys, "part", None) == "keys" and queries.shape[2] == 1:
            PATHS_TAKEN["qmm"] = PATHS_TAKEN.get("qmm", 0) + 1
            return latent_qmm(queries, keys, scale, mask, queries.dtype)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
    return sdpa


def latent_route(original):
    """The bridge's route, plus ``sdpa(q, latent, latent)`` over the packed latent."""
    def sdpa(queries, keys, values, cache=None, scale=1.0, mask=None, sinks=None):
        if values is keys and getattr(keys, "part", None) == "keys":
            return quantized_sdpa(queries, keys_as_values(keys), scale=scale, mask=mask, sinks=sinks)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
    return sdpa


def _traced(path):
    def run(*a, **k):
        out = path(*a, **k)
        if out is not None:
            PATHS_TAKEN[path.__name__] = PATHS_TAKEN.get(path.__name__, 0) + 1
        return out
    return run


dispatch.PATHS = tuple(_traced(p) for p in dispatch.PATHS)
latent_attention.latent_kernel = _traced(latent_attention.latent_kernel)


def layer(dtype, heads):
    args = deepseek_v3.ModelArgs.from_dict({**DEEPSEEK_V3, "num_attention_heads": heads})
    mx.random.seed(0)
    attn = deepseek_v3.DeepseekV3Attention(args)
    attn.set_dtype(dtype)
    mx.eval(attn.parameters())
    bridge.patch(attn)
    return attn, args


def filled(cache, n, args, dtype, chunk=4096):
    for i in range(0, n, chunk):
        c = min(chunk, n - i)
        latent = mx.random.normal((1, 1, c, args.kv_lora_rank)).astype(dtype)
        k_pe = mx.random.normal((1, 1, c, args.qk_rope_head_dim)).astype(dtype)
        mx.eval(cache.update_and_fetch(latent, k_pe))
    return cache


CHAIN = 1


def step_ms(attn, cache, steps, hidden, dtype):
    """Median ms per step; with ``CHAIN`` > 1, that many steps in one evaluation (GPU-bound)."""
    times = []
    for _ in range(steps):
        xs = [mx.random.normal((1, 1, hidden)).astype(dtype) for _ in range(CHAIN)]
        mx.eval(xs)
        t = time.perf_counter()
        mx.eval([attn(x, cache=cache) for x in xs])
        times.append((time.perf_counter() - t) / CHAIN)
    return 1e3 * statistics.median(times[2:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", default="4096,32768", help="comma list of cached tokens")
    p.add_argument("--bits", default="4,8")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--heads", type=int, default=128)
    p.add_argument("--group", type=int, default=None, help="kvq's group size (default: its own)")
    p.add_argument("--chain", type=int, default=1, help="steps per evaluation (GPU-bound timing)")
    p.add_argument("--routes", default="arrays,latent,qmm")
    p.add_argument("--check", action="store_true", help="the latent route against fp32 attention first")
    a = p.parse_args(argv)
    global CHAIN
    CHAIN = a.chain
    dtype = mx.float32 if mx.default_device() == mx.cpu else mx.float16
    attn, args = layer(dtype, a.heads)
    print(f"# {mx.default_device()}, {a.heads} heads, {dtype}, median of {a.steps - 2} decode steps (ms)"
          + (f", {a.chain} steps per evaluation" if a.chain > 1 else ""))
    routed = deepseek_v3.scaled_dot_product_attention
    routes = {"arrays": routed, "latent": latent_route(routed), "qmm": qmm_route(routed),
              "copy": copy_route(routed), "kernel": routed}
    names = a.routes.split(",")
    latent = routes["latent"]
    if a.check:
        for r in names[1:]:
            print(f"# route {r}")
            latent_kernel.NATIVE = ("metal", "cuda") if r == "kernel" else ("metal",)
            check(attn, args, dtype, [int(x) for x in a.bits.split(",")], a.group, routes[r])
        latent_kernel.NATIVE = ("metal",)
    print("| tokens | fp16 | " + " | ".join(f"kvq-{b} {r}" for b in a.bits.split(",") for r in names) + " |")
    for n in (int(x) for x in a.context.split(",")):
        row = [f"{step_ms(attn, filled(lm_cache.KVCache(), n, args, dtype), a.steps, args.hidden_size, dtype):.2f}"]
        for b in (int(x) for x in a.bits.split(",")):
            for r in names:
                route = routes[r]
                deepseek_v3.scaled_dot_product_attention = route
                latent_kernel.NATIVE = ("metal", "cuda") if r == "kernel" else ("metal",)
                PATHS_TAKEN.clear()
                kw = {} if a.group is None else {"group_size": a.group}
                t = step_ms(attn, filled(mlx_kvq.QuantizedKVCache(b, **kw), n, args, dtype), a.steps,
                            args.hidden_size, dtype)
                row.append(f"{t:.2f}" + (f" ({', '.join(PATHS_TAKEN)})" if PATHS_TAKEN else ""))
            deepseek_v3.scaled_dot_product_attention = routed
        print(f"| {n} | " + " | ".join(row) + " |", flush=True)


def check(attn, args, dtype, bits, group, latent):
    """The latent route's layer output against the same layer over mlx-lm's fp16 cache."""
    routed = deepseek_v3.scaled_dot_product_attention
    x = mx.random.normal((1, 1, args.hidden_size)).astype(dtype)
    mx.random.seed(1)
    ref = attn(x, cache=filled(lm_cache.KVCache(), 1000, args, dtype)).astype(mx.float32)
    for b in bits:
        mx.random.seed(1)
        cache = filled(mlx_kvq.QuantizedKVCache(b, **({} if group is None else {"group_size": group})), 1000, args, dtype)
        deepseek_v3.scaled_dot_product_attention = latent
        out = attn(x, cache=cache).astype(mx.float32)
        deepseek_v3.scaled_dot_product_attention = routed
        err = (mx.sqrt(mx.mean((out - ref) ** 2)) / mx.sqrt(mx.mean(ref**2))).item()
        print(f"# check kvq-{b}: route vs fp16 cache, relative RMS error {err:.4f}")


if __name__ == "__main__":
    main()
