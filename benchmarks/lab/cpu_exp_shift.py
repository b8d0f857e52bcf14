"""The softmax's exp with the row maximum subtracted inside its first compiled kernel
(``attention.softmax.exp(s, m)``) against subtracting it first (``exp(s - m)``, one more pass
over the scores), on the shapes of a 2048-token chunk's layer on the CPU (45 blocks of
9 x 228 x 228 scores), each block's max and sum included, over the CPU's streams; medians:

    python3 benchmarks/lab/cpu_exp_shift.py
"""

import argparse
import time

import mlx_kvq  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx

from mlx_kvq.attention.softmax import exp
from mlx_kvq.attention.streams import on, spread, streams_for


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=45)
    p.add_argument("--runs", type=int, default=9)
    a = p.parse_args(argv)
    mx.random.seed(0)
    xs = [mx.random.normal((1, 3, 3, 228, 228)) * 3 for _ in range(a.blocks)]
    mx.eval(xs)
    ways = {"exp(s, m)": lambda s, m: exp(s, m), "exp(s - m)": lambda s, m: exp(s - m)}
    for _ in range(3):
        for name, f in ways.items():
            ts = []
            for _ in range(a.runs):
                t = time.perf_counter()
                st, res = streams_for(len(xs), *xs), [None] * len(xs)
                with spread(st, res):
                    for i, x in enumerate(xs):
                        with on(st, i):
                            res[i] = f(x, x.max(axis=-1, keepdims=True)).sum(axis=-1)
                ts.append(time.perf_counter() - t)
            print(f"{name:11s} {sorted(ts)[len(ts) // 2] * 1e3:6.1f} ms", flush=True)


if __name__ == "__main__":
    main()
