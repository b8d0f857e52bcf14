"""Host cost of building (not evaluating) each piece of one decode step's attention.

mlx-lm builds the next token's graph while the GPU runs the last one, so at long
context a decode step costs about max(host, GPU) per layer; this prints the host
side, piece by piece, median microseconds per call: building ``--calls`` graphs, then
dispatching them (``mx.async_eval``: kernel launches), the GPU's own time excluded:

    python3 benchmarks/lab/profile_host.py --context 32768
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models import cache as lm_cache

import mlx_kvq
from mlx_kvq import kernels
from mlx_kvq.attention import quantized_sdpa
from mlx_kvq.rotation import rotate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: bench_generate
from bench_generate import random_model


def per_call_us(fn, calls, reps=7):
    """(build, dispatch) microseconds per call: making the graph, then ``mx.async_eval``
    of it (on GPUs the kernels are launched there), the GPU's own time excluded."""
    build, dispatch = [], []
    for _ in range(reps + 2):
        mx.synchronize()
        t0 = time.perf_counter()
        keep = [fn() for _ in range(calls)]
        t1 = time.perf_counter()
        mx.async_eval(keep)
        t2 = time.perf_counter()
        mx.synchronize()
        build.append((t1 - t0) / calls * 1e6)
        dispatch.append((t2 - t1) / calls * 1e6)
    return statistics.median(build[2:]), statistics.median(dispatch[2:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--bits", type=int, default=4)
    args = p.parse_args(argv)
    B, Hq, Hkv, D, N = 1, 32, 8, 128, args.context
    mx.random.seed(0)
    k = mx.random.normal((B, Hkv, N, D)).astype(mx.float16)
    q = mx.random.normal((B, Hq, 1, D)).astype(mx.float16)
    one = k[:, :, :1]
    fp = lm_cache.KVCache()
    fp.update_and_fetch(k, k)
    c = mlx_kvq.QuantizedKVCache(bits=args.bits)
    c.update_and_fetch(k, k)
    view, _ = c.update_and_fetch(one, one)
    mx.eval(fp.state, c.state)
    kp, vp, n = view.packed
    fmt = dict(k_bits=args.bits, v_bits=args.bits, group_size=c.group_size)
    launch = kernels._launcher()
    o, l = kernels.decode_launch(launch, q, kp, vp, n, None, view.window, **fmt, scale=0.1,
                                 q_start=view.q_start, causal=False, merge=False)
    fk, fv = fp.keys[:, :, :N], fp.values[:, :, :N]

    def fp_update():
        fp.offset -= 1
        return fp.update_and_fetch(one, one)[0]

    def q_update():
        c.offset -= 1
        c._wn -= 1
        c._wvn -= 1
        c._steps = 2  # off the flush schedule
        c.update_and_fetch(one, one)
        return c._wk

    pieces = [
        ("mx.zeros (one trivial op)", lambda: mx.zeros((4,))),
        ("q @ R (rotation)", lambda: rotate(q)),
        ("fp16 sdpa (MLX)", lambda: mx.fast.scaled_dot_product_attention(q, fk, fv, scale=0.1)),
        ("fp16 KVCache.update_and_fetch", fp_update),
        ("kvq update_and_fetch", q_update),
        ("sdpa_merge launch", lambda: kernels.merge_launch(launch, o, l, q.shape)[0]),
        ("decode kernel alone", lambda: kernels.decode_launch(
            launch, q, kp, vp, n, None, view.window, **fmt, scale=0.1, q_start=view.q_start,
            causal=False, merge=False)[0]),
        ("decode_attention (kernel+merge)", lambda: kernels.decode_attention(
            q, kp, vp, n, None, view.window, **fmt, scale=0.1, q_start=view.q_start, causal=False)[0]),
        ("quantized_sdpa (whole)", lambda: quantized_sdpa(q, view, scale=0.1)),
    ]
    # one whole Llama-3-8B attention layer (4-bit weights), as mlx-lm runs it
    model = random_model(layers=1)
    mlx_kvq.integration.patch(model)
    attn = model.layers[0].self_attn
    x = mx.random.normal((B, 1, Hq * D)).astype(mx.float16)
    for name, cache in [("fp16", lm_cache.KVCache()), (f"kvq-{args.bits}", mlx_kvq.QuantizedKVCache(bits=args.bits))]:
        cache.update_and_fetch(k, k)
        mx.eval(cache.state)
        pieces.append((f"attention layer, {name} cache", lambda cache=cache: attn(x, mask=None, cache=cache)))
    print(f"device {mx.default_device()}  mlx {mx.__version__}  context {N}  {args.bits}-bit")
    print("attention layer step by step (build / dispatch us; then synchronized):")
    for name, cache in [("fp16", lm_cache.KVCache()), (f"kvq-{args.bits}", mlx_kvq.QuantizedKVCache(bits=args.bits))]:
        cache.update_and_fetch(k, k)
        mx.eval(cache.state)
        b, d = [], []
        for i in range(3 * 32 + 8):
            mx.synchronize()
            t0 = time.perf_counter()
            y = attn(x, mask=None, cache=cache)
            t1 = time.perf_counter()
            mx.async_eval(y)  # y reads the cache's new buffers (cache.state would add slices)
            t2 = time.perf_counter()
            mx.synchronize()
            if i >= 8:
                b.append((t1 - t0) * 1e6)
                d.append((t2 - t1) * 1e6)
        med, mean = statistics.median, statistics.fmean
        print(f"  {name:8s} build median {med(b):7.1f} mean {mean(b):7.1f} max {max(b):7.1f} | "
              f"dispatch median {med(d):7.1f} mean {mean(d):7.1f} max {max(d):7.1f}", flush=True)
    print(f"device {mx.default_device()}  mlx {mx.__version__}  context {N}  {args.bits}-bit")
    print(f"{'piece':34s} {'build us':>9s} {'dispatch us':>12s}")
    for name, fn in pieces:
        b, d = per_call_us(fn, args.calls)
        print(f"{name:34s} {b:9.1f} {d:12.1f}", flush=True)


if __name__ == "__main__":
    main()
