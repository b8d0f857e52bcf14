"""A decode step's attention on the CPU (``quantized_sdpa`` over a 4-bit cache of 2048 random
tokens a row, SmolLM2's shape) with the packed run's weighted values by ``one_pass.planes_values``
against ``mx.quantized_matmul``, alternated in one process; median ms per layer:

    python3 benchmarks/lab/cpu_decode_values.py
"""

import statistics
import time

import mlx_kvq  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx

from mlx_kvq.attention import one_pass, quantized_sdpa
from mlx_kvq.kernels import cpu

cpu.applies = lambda *a, **k: False  # the MLX ops' paths this measures (not the CPU body)

from cpu_attention import decode_step  # noqa: E402


def qmm_values(p, packed, bits):
    """The values as before ``planes_values``: ``mx.quantized_matmul`` on the packed words."""
    return mx.quantized_matmul(p, *packed, transpose=False, group_size=64, bits=bits)


def main(rows=(1, 4, 16), tokens=2048, runs=40, calls=10):
    planes = one_pass.planes_values
    try:
        for B in rows:
            view, q = decode_step(B, tokens)
            ts = {"planes": [], "qmm": []}
            for r in range(runs):
                order = (("planes", planes), ("qmm", qmm_values))
                for name, f in order if r % 2 else order[::-1]:
                    one_pass.planes_values = f
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        mx.eval(quantized_sdpa(q, view, scale=0.125))
                    ts[name].append((time.perf_counter() - t0) / calls)
            print(B, "rows:", {k: round(statistics.median(v[4:]) * 1e3, 3) for k, v in ts.items()}, "ms per layer")
    finally:
        one_pass.planes_values = planes


if __name__ == "__main__":
    main()
