"""A first prefill chunk's causal attention on the CPU (``attention.reference``), SmolLM2's
shape (9 query heads, 3 KV heads, head dim 64, float32), with key blocks cut at each query
tile's first position (as committed) and without (blocks of equal size only, where a tile's
diagonal block runs past its last query and is masked); interleaved, median milliseconds:

    python3 benchmarks/lab/cpu_causal_blocks.py --tokens 512 2048
"""

import argparse
import statistics
import time

import mlx_kvq  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx

from mlx_kvq.attention import reference
from mlx_kvq.kernels import cpu

cpu.applies = lambda *a, **k: False  # the MLX ops' paths this measures (not the CPU body)

HQ, HKV, D = 9, 3, 64


def equal_blocks(n, keys, cuts):
    keys = -(-n // -(-n // keys))
    return [(a, min(n, a + keys)) for a in range(0, n, keys)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048], help="chunk lengths (default: 512 2048)")
    p.add_argument("--runs", type=int, default=10, help="runs of each, interleaved (default: 10)")
    a = p.parse_args(argv)
    cut = reference._key_blocks
    for L in a.tokens:
        mx.random.seed(0)
        q, k = mx.random.normal((1, HQ, L, D)), mx.random.normal((1, HKV, L, D))
        mx.eval(q, k)
        ts = {"cut at tiles": [], "equal blocks": []}
        for _ in range(a.runs):
            for name, blocks in [("cut at tiles", cut), ("equal blocks", equal_blocks)]:
                reference._key_blocks = blocks
                t = time.perf_counter()
                mx.eval(reference.dense_attention(q, k, k, scale=0.125, q_start=0, k_start=0, causal=True, mask=None))
                ts[name].append(time.perf_counter() - t)
        reference._key_blocks = cut
        for name, t in ts.items():
            print(f"first {L:5d}, {name}: {statistics.median(t[2:]) * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
