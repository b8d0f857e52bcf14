"""A decode step's attention over a batch of rows on the CPU (the server's decode): B rows
of a 4-bit cache holding T random tokens each, SmolLM2's shape (9 query heads, 3 KV heads,
head dim 64), through ``quantized_sdpa``, the rows' work spread over the CPU's streams or on
one (``attention.streams.MAX_STREAMS = 1``); interleaved, median ms per layer:

    python3 benchmarks/lab/cpu_decode_rows.py --rows 16 --tokens 2048
"""

import argparse
import statistics
import time

import mlx_kvq  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx

from mlx_kvq.attention import quantized_sdpa, streams
from mlx_kvq.cache import QuantizedKVCache
from mlx_kvq.kernels import cpu

cpu.applies = lambda *a, **k: False  # the MLX ops' paths this measures (not the CPU body)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[4, 16], help="batch rows (default: 4 16)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens in each row's cache (default: 2048)")
    p.add_argument("--runs", type=int, default=12, help="runs of each, interleaved (default: 12)")
    p.add_argument("--streams", type=int, nargs="+",
                   help="stream counts to compare (default: the package's, one per core up to 4, and 1)")
    p.add_argument("--cpu", action="store_true", help="on the CPU device (a machine with a GPU)")
    a = p.parse_args(argv)
    if a.cpu:
        mx.set_default_device(mx.cpu)
    cores = streams.MAX_STREAMS
    for B in a.rows:
        mx.random.seed(0)
        cache = QuantizedKVCache(bits=4)
        cache.update_and_fetch(*(mx.random.normal((B, 3, a.tokens, 64)) for _ in range(2)))
        k = mx.random.normal((B, 3, 1, 64))
        keys, _ = cache.update_and_fetch(k, k)
        q = mx.random.normal((B, 9, 1, 64))
        mx.eval(q, cache.state)
        ts = {}
        for _ in range(a.runs):
            for n in a.streams or (cores, 1):
                streams.MAX_STREAMS = n
                t = time.perf_counter()
                mx.eval(quantized_sdpa(q, keys, scale=0.125))
                ts.setdefault(n, []).append(time.perf_counter() - t)
        streams.MAX_STREAMS = cores
        for n, t in ts.items():
            print(f"{B:3d} rows x {a.tokens} tokens, {n} stream(s): {statistics.median(t[2:]) * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
