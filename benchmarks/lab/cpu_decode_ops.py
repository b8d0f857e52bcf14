"""What a decode step's cache and attention cost per layer on the CPU, where the count of
small ops decides: SmolLM2-135M's attention shape (9 query heads, 3 KV heads, head dim 64,
float32) over a cache of ``--keys`` tokens, 30 layers per step.

For mlx-lm's ``KVCache`` (+ ``mx.fast.scaled_dot_product_attention``) and mlx-kvq's caches
(+ ``quantized_sdpa``) it prints the graph nodes one layer's step adds (``mx.export_to_dot``)
and the median host time to build the 30 layers' graph and to evaluate it. ``--products``
times one layer's two products over the packed run (``mx.quantized_matmul``, 4-bit, group 64 or
``--group-size``; the scores and values also by ``one_pass.planes_scores`` and ``planes_values``) against float32 matmuls over as
many keys, for ``--rows`` batch rows:

    python3 benchmarks/lab/cpu_decode_ops.py --keys 100
    python3 benchmarks/lab/cpu_decode_ops.py --products 64,256,540,1024,2048 [--rows 8] [--group-size 32]
"""

import argparse
import io
import re
import statistics
import time
from collections import Counter

import mlx_kvq  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx
from mlx_lm.models import cache as lm_cache

from mlx_kvq.attention import quantized_sdpa
from mlx_kvq.attention.streams import keep_cpu_buffers
from mlx_kvq.cache.quantized import QuantizedKVCache
from mlx_kvq.attention.one_pass import planes_scores, planes_values
from mlx_kvq.kernels import cpu

cpu.applies = lambda *a, **k: False  # the MLX ops' paths this measures (not the CPU body)

B, HQ, HKV, D, LAYERS = 1, 9, 3, 64, 30
CONFIGS = {
    "mlx-lm": lm_cache.KVCache,
    "kvq-4": lambda: QuantizedKVCache(4),
    "kvq-4-norot": lambda: QuantizedKVCache(4, rotate=False),
    "kvq-8": lambda: QuantizedKVCache(8),
}


def attend(cache, q, k):
    keys, values = cache.update_and_fetch(k, k)
    if isinstance(cache, lm_cache.KVCache):
        return mx.fast.scaled_dot_product_attention(q, keys, values, scale=0.125)
    return quantized_sdpa(q, keys, 0.125)


def filled(make, keys):
    cache = make()
    x = mx.random.normal((B, HKV, keys, D))
    cache.update_and_fetch(x, x)
    return cache


def nodes(make, keys):
    cache = filled(make, keys)
    q, k = mx.random.normal((B, HQ, 1, D)), mx.random.normal((B, HKV, 1, D))
    for _ in range(3):  # past the first steps' window growth
        mx.eval(attend(cache, q, k))
    f = io.StringIO()
    out = attend(cache, q, k)
    held = [a for a in (getattr(cache, n, None) for n in ("_wk", "_wv", "keys", "values")) if isinstance(a, mx.array)]
    mx.export_to_dot(f, out, *held)
    return Counter(re.findall(r'label ="([A-Za-z]+)', f.getvalue()))


def timed(make, keys, steps):
    caches = [filled(make, keys) for _ in range(LAYERS)]
    q, k = mx.random.normal((B, HQ, 1, D)), mx.random.normal((B, HKV, 1, D))
    mx.eval(q, k, [c.state for c in caches])
    build, run = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        x = q
        for c in caches:
            x = x + attend(c, x, k) * 1e-3
        t1 = time.perf_counter()
        mx.eval(x)
        build.append(t1 - t0)
        run.append(time.perf_counter() - t1)
    med = lambda a: statistics.median(a[5:]) * 1e3
    return med(build), med(run)


def products(n, rows_b=1, group_size=64, reps=20, calls=10):
    """Median microseconds of one layer's scores and weighted values over ``n`` keys, with MLX's
    CPU buffer cache as the package sets it (``streams.keep_cpu_buffers``: ten calls' planes
    alive at once overflow MLX's default 32 MiB and fault their pages in)."""
    keep_cpu_buffers()
    rows = HQ // HKV
    q, p = mx.random.normal((rows_b, HKV, rows, D)), mx.softmax(mx.random.normal((rows_b, HKV, rows, n)), axis=-1)
    x = mx.random.normal((rows_b, HKV, n, D))
    w, s, b = (a if a.dtype == mx.uint32 else a.astype(mx.float16)
               for a in mx.quantize(x, group_size=group_size, bits=4))
    mx.eval(q, p, x, w, s, b)
    qmm = lambda a, t: mx.quantized_matmul(a, w, s, b, transpose=t, group_size=group_size, bits=4)
    cases = {"quantized_matmul scores": lambda: qmm(q, True),
             "planes scores": lambda: planes_scores(q, (w, s, b), 4),
             "quantized_matmul values": lambda: qmm(p, False),
             "planes values": lambda: planes_values(p, (w, s, b), 4),
             "float32 scores": lambda: q @ x.swapaxes(-1, -2), "float32 values": lambda: p @ x}
    out = {}
    for name, f in cases.items():
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            mx.eval([f() for _ in range(calls)])
            ts.append((time.perf_counter() - t) / calls)
        out[name] = statistics.median(ts[3:]) * 1e6
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=100, help="tokens in each layer's cache (default: 100)")
    p.add_argument("--steps", type=int, default=64, help="decode steps timed (default: 64)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of all configs (default: 2)")
    p.add_argument("--products", metavar="N,N,...", help="time the packed run's products over these key counts instead")
    p.add_argument("--rows", type=int, default=1, help="batch rows of --products (default: 1)")
    p.add_argument("--group-size", type=int, default=64, help="group size of --products (default: 64)")
    a = p.parse_args(argv)
    if a.products:
        for n in map(int, a.products.split(",")):
            print(f"{n:6d} keys: " + "  ".join(f"{k} {v:7.1f} us" for k, v in products(n, a.rows, a.group_size).items()))
        return
    for name, make in CONFIGS.items():
        n = nodes(make, a.keys)
        print(f"{name:12s} {sum(n.values()):3d} nodes per layer: {dict(n.most_common())}")
    for r in range(a.rounds):
        for name, make in CONFIGS.items():
            b, e = timed(make, a.keys, a.steps)
            print(f"round {r + 1} {name:12s} build {b:6.2f} ms  eval {e:6.2f} ms  per step of {LAYERS} layers")


if __name__ == "__main__":
    main()
