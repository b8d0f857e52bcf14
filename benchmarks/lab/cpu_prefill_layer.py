"""One layer's prefill attention on the CPU: MLX's sdpa over float32 keys (what mlx-lm's
own cache runs) against the 4-bit cache's update and ``quantized_sdpa``, SmolLM2's shape
(9 query heads, 3 KV heads, head dim 64, float32), a first chunk and a chunk after it;
median milliseconds. On the CPU the cache's prefill takes the blocked reference (scores
bounded by a block). Tried and not kept: MLX's sdpa over the dequantized layer for chunks
whose float32 scores fit 256 MiB; on the idle 2-core machine it was no faster (first 2048:
681 against 671 ms; 512 after it: 260 against 223 ms; MLX's sdpa over float32 keys 607 / 188,
``benchmarks/lab/results/cpu_prefill_layer.txt``). With the reference's query tiles, causal
skip and polynomial exp (147a7e8), on a slower day of the same machine: first 2048 493 ms
against MLX's float32 sdpa 987 (the package before: 1020); 512 after it 183 against 255
(before: 404), same file:

    python3 benchmarks/lab/cpu_prefill_layer.py --chunk 2048 --next 512
"""

import argparse
import copy
import statistics
import time

import mlx_kvq  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx

from mlx_kvq.attention import quantized_sdpa
from mlx_kvq.cache.quantized import QuantizedKVCache
from mlx_kvq.kernels import cpu

cpu.applies = lambda *a, **k: False  # the MLX ops' paths this measures (not the CPU body)

HQ, HKV, D = 9, 3, 64


def median_ms(f, reps=5):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(f())
        ts.append(time.perf_counter() - t)
    return statistics.median(ts[1:]) * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunk", type=int, default=2048, help="first chunk's tokens (default: 2048)")
    p.add_argument("--next", type=int, default=512, help="the next chunk's tokens (default: 512)")
    a = p.parse_args(argv)
    L, M = a.chunk, a.next
    q, k = mx.random.normal((1, HQ, L, D)), mx.random.normal((1, HKV, L, D))
    q2, k2 = mx.random.normal((1, HQ, M, D)), mx.random.normal((1, HKV, M, D))
    both = mx.concatenate([k, k2], axis=2)
    mask2 = mx.arange(L + M)[None] <= mx.arange(L, L + M)[:, None]
    mx.eval(q, k, q2, k2, both, mask2)

    def first():
        c = QuantizedKVCache(4)
        return quantized_sdpa(q, c.update_and_fetch(k, k)[0], 0.125, mask="causal")

    filled = QuantizedKVCache(4)
    filled.update_and_fetch(k, k)
    mx.eval(filled.state)

    def second():
        c = copy.deepcopy(filled)
        return quantized_sdpa(q2, c.update_and_fetch(k2, k2)[0], 0.125, mask="causal")

    rows = [
        (f"MLX sdpa, float32, first {L}", lambda: mx.fast.scaled_dot_product_attention(q, k, k, scale=0.125, mask="causal")),
        (f"4-bit cache, first {L}", first),
        (f"MLX sdpa, float32, {M} after {L}", lambda: mx.fast.scaled_dot_product_attention(q2, both, both, scale=0.125, mask=mask2)),
        (f"4-bit cache, {M} after {L}", second),
    ]
    for name, f in rows:
        print(f"{name:36s} {median_ms(f):8.1f} ms")


if __name__ == "__main__":
    main()
