"""A decode step's attention on the CPU (``quantized_sdpa`` over a 4-bit cache of 2048 random
tokens a row, SmolLM2's shape) with the packed run's weighted values by ``one_pass.planes_values``
against ``mx.quantized_matmul``, alternated in one process; median ms per layer:

    python3 benchmarks/lab/cpu_decode_values.py
"""
import statistics
import time

import mlx_kvq  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx
from mlx_kvq.attention import quantized_sdpa, one_pass
from mlx_kvq.cache import QuantizedKVCache
real = one_pass.planes_values
def qmm_values(p, packed, bits):
    return mx.quantized_matmul(p, *packed, transpose=False, group_size=64, bits=bits)
for B in (1, 4, 16):
    mx.random.seed(0)
    cache = QuantizedKVCache(bits=4)
    cache.update_and_fetch(*(mx.random.normal((B, 3, 2048, 64)) for _ in range(2)))
    k = mx.random.normal((B, 3, 1, 64))
    view, _ = cache.update_and_fetch(k, k)
    q = mx.random.normal((B, 9, 1, 64))
    mx.eval(q, cache.state)
    ts = {"planes": [], "qmm": []}
    for r in range(40):
        for name, f in (("planes", real), ("qmm", qmm_values)) if r % 2 else (("qmm", qmm_values), ("planes", real)):
            one_pass.planes_values = f
            t0 = time.perf_counter()
            for _ in range(10):
                mx.eval(quantized_sdpa(q, view, scale=0.125))
            ts[name].append((time.perf_counter() - t0) / 10)
    print(B, "rows:", {k: round(statistics.median(v[4:]) * 1e3, 3) for k, v in ts.items()}, "ms per layer")
