"""What limits MLX's CPU streams: independent chains of attention-like ops (a product, the
softmax's element-wise ops, a product, a merge), one chain per stream, for 1..N streams:
``--shared`` makes every chain read an array computed on the default stream (a fence
between streams, as the blocked reference's key blocks), ``--step-eval`` calls
``mx.async_eval`` after every step (as the reference does after every key block):

    python3 benchmarks/lab/cpu_streams_chains.py [--cpu] [--shared] [--step-eval]
"""

import argparse
import resource
import time

import mlx_kvq  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx

from mlx_kvq import _blas
from mlx_kvq.attention import streams as S
from mlx_kvq.attention.softmax import exp


def _cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(n_streams, chains, steps, shared, step_eval, elementwise_only):
    pool = [mx.new_stream(mx.cpu) for _ in range(n_streams)] if n_streams > 1 else None
    q = [mx.random.normal((1, 3, 3, 108, 64)) for _ in range(chains)]
    k = mx.random.normal((1, 3, 1, 386, 64))
    mx.eval(q, k)
    acc = [None] * chains
    with _blas.single_threaded() if pool else S.contextlib.nullcontext():
        for step in range(steps):
            kb = (k * 1.0) if shared else None  # on the default stream
            for c in range(chains):
                with S.on(pool, c):
                    kk = kb if shared else k
                    if elementwise_only:
                        s = q[c].sum(-1, keepdims=True) + mx.zeros((1, 3, 3, 108, 386))
                    else:
                        s = q[c] @ kk.swapaxes(-1, -2)
                    m = s.max(-1, keepdims=True)
                    p = exp(s - m)
                    l = p.sum(-1)
                    o = (p @ kk) / l[..., None] if not elementwise_only else p[..., :64] / l[..., None]
                    acc[c] = o if acc[c] is None else acc[c] * 0.5 + o
            if step_eval:
                mx.async_eval(acc)
        mx.eval(acc)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--chains", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--shared", action="store_true")
    p.add_argument("--step-eval", action="store_true")
    p.add_argument("--elementwise", action="store_true", help="no products: element-wise ops only")
    p.add_argument("--cpu", action="store_true")
    a = p.parse_args(argv)
    if a.cpu:
        mx.set_default_device(mx.cpu)
    for n in a.streams:
        run(n, a.chains, 2, a.shared, a.step_eval, a.elementwise)
        c0, m0, t0 = _cpu(), time.thread_time(), time.perf_counter()
        for _ in range(3):
            run(n, a.chains, a.steps, a.shared, a.step_eval, a.elementwise)
        w, c, m = (time.perf_counter() - t0) / 3, (_cpu() - c0) / 3, (time.thread_time() - m0) / 3
        print(f"streams {n:2d} shared={a.shared} step_eval={a.step_eval} elementwise={a.elementwise}: "
              f"wall {w * 1e3:6.1f} ms, process CPU {c * 1e3:6.1f} ms, main thread {m * 1e3:5.1f} ms", flush=True)


if __name__ == "__main__":
    main()
