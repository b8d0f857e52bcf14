"""MLX's ``mx.exp`` against ``attention.softmax.exp`` (a compiled polynomial) on the CPU:
relative error against float64 over softmax's shifted range [-100, 0], and nanoseconds per
float32 element of ``exp(s - m)`` (s: scores, m: their row maxima) by array size; medians.

    python3 benchmarks/lab/cpu_exp.py
"""

import argparse
import statistics
import time

import numpy as np

import mlx_kvq  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx

from mlx_kvq.attention.softmax import exp


def ns_per_element(f, n, reps=15):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(f())
        ts.append(time.perf_counter() - t)
    return statistics.median(ts[3:]) * 1e9 / n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="18,20,21,22,23", help="log2 of the element counts (default: 18,20,21,22,23)")
    a = p.parse_args(argv)
    mx.set_default_device(mx.cpu)
    x = np.linspace(-100, 0, 2_000_001, dtype=np.float32)
    want = np.exp(x.astype(np.float64))
    ok = want > np.finfo(np.float32).tiny
    for name, f in (("mx.exp", mx.exp), ("softmax.exp", exp)):
        got = np.array(f(mx.array(x)), dtype=np.float64)
        rel = np.abs(got[ok] - want[ok]) / want[ok]
        print(f"{name:12s} relative error: max {rel.max():.2e}, mean {rel.mean():.2e}")
    for k in (int(v) for v in a.sizes.split(",")):
        s = mx.random.normal((1 << k - 9, 512)) * 4
        m = s.max(axis=-1, keepdims=True)
        mx.eval(s, m)
        base, fast = (ns_per_element(lambda: f(s - m), s.size) for f in (mx.exp, exp))
        print(f"2**{k:2d} elements: mx.exp {base:6.2f} ns, softmax.exp {fast:6.2f} ns")


if __name__ == "__main__":
    main()
