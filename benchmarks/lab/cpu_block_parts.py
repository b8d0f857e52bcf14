"""One block of a prefill chunk's CPU attention, op by op, on one thread (as on a CPU stream):
a 228-query tile of SmolLM2's shape (9 query heads, 3 KV heads, head dim 64) against 437 keys,
the block ``attention/reference.py`` takes for a 2048-token chunk; median ms per op:

    python3 benchmarks/lab/cpu_block_parts.py
"""

import statistics
import time

import mlx_kvq  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx

from mlx_kvq import _blas
from mlx_kvq.attention import softmax as S
from mlx_kvq.attention.reference import _block_part, _dense_products


def timed(name, f, runs=30, calls=20):
    for _ in range(3):
        mx.eval(f())
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(calls):
            mx.eval(f())
        ts.append((time.perf_counter() - t0) / calls)
    print(f"{name:34s} {statistics.median(ts) * 1e3:7.3f} ms")


def main():
    mx.set_cache_limit(256 << 20)
    Lt, b = 228, 437
    q, k, v = mx.random.normal((1, 3, 3, Lt, 64)), mx.random.normal((1, 3, b, 64)), mx.random.normal((1, 3, b, 64))
    s = q @ k[:, :, None].swapaxes(-1, -2)
    m = s.max(-1, keepdims=True)
    p = S.exp(s, m)
    f, bits = S._reduce(s, m)
    scale = bits.view(mx.float32)
    vo = mx.concatenate([v, mx.ones((1, 3, b, 1))], -1)
    mx.eval(q, k, v, s, m, p, f, scale, vo)
    qk, pv = _dense_products(k, v)
    with _blas.single_threaded():
        timed("scores (qk)", lambda: q @ k[:, :, None].swapaxes(-1, -2))
        timed("max", lambda: s.max(-1, keepdims=True))
        timed("exp (softmax.exp)", lambda: S.exp(s, m))
        timed("  its range reduction", lambda: S._reduce(s, m)[0])
        timed("  its polynomial", lambda: S._poly(f, scale))
        timed("mx.exp(s - m)", lambda: mx.exp(s - m))
        timed("s - m (one pass)", lambda: s - m)
        timed("sum", lambda: p.sum(-1))
        timed("weighted values (pv)", lambda: p @ v[:, :, None])
        timed("pv with a column of ones", lambda: p @ vo[:, :, None])
        timed("_block_part (scores given)", lambda: _block_part(s, pv)[0])
        timed("scores + _block_part", lambda: _block_part(qk(q), pv)[0])


if __name__ == "__main__":
    main()
