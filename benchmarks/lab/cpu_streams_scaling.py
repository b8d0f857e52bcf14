"""How the CPU attention of one 2048-token prefill chunk scales with CPU streams: one layer of
SmolLM2-135M's shape (9 query heads, 3 KV heads, head dim 64) over random float32 keys, the
blocked reference (``attention/reference.py``), per stream count: the wall time per layer, the
process's CPU time and the CPU time of the thread that builds and dispatches the graph; with
``--parts``, also with the softmax's exp left out (``noexp``) and with only the products and
merges (``mm``), to show which part does not scale:

    python3 benchmarks/lab/cpu_streams_scaling.py [--cpu] [--streams 1 2 4 8 16] [--parts]
"""

import argparse
import resource
import time

import mlx_kvq  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx

import mlx_kvq.attention.reference as R
from mlx_kvq import _blas
from mlx_kvq.attention import streams
from mlx_kvq.attention.softmax import exp
from mlx_kvq.kernels import cpu

cpu.applies = lambda *a, **k: False  # the MLX ops' paths this measures (not the CPU body)


def _noexp(s, pv):
    m = s.max(axis=-1, keepdims=True)
    p = s - m
    l = p.sum(axis=-1)
    return pv(p) / l[..., None], m[..., 0] + l


def _mm(s, pv):
    return pv(s), s[..., 0]


def _cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--streams", type=int, nargs="+", default=[1, streams.cores()])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--parts", action="store_true", help="also without the exp, and products only")
    p.add_argument("--cpu", action="store_true", help="on the CPU device (a machine with a GPU)")
    a = p.parse_args(argv)
    if a.cpu:
        mx.set_default_device(mx.cpu)
    if _blas._LIB is not None:
        _blas._LIB.openblas_get_config.restype = __import__("ctypes").c_char_p
        print(f"# OpenBLAS {_blas.OPENBLAS}: {_blas._LIB.openblas_get_config().decode()}, "
              f"{_blas._LIB.openblas_get_num_threads()} threads; {streams.cores()} cores")
    L = a.tokens
    mx.random.seed(0)
    q, k, v = (mx.random.normal((1, h, L, 64)) for h in (9, 3, 3))
    mx.eval(q, k, v)
    attend = lambda: R.dense_attention(q, k, v, scale=0.125, q_start=0, k_start=0, causal=True, mask=None)
    parts = {"full": R._block_part}
    if a.parts:
        parts.update(noexp=_noexp, mm=_mm)
    for name, part in parts.items():
        R._block_part = part
        for n in a.streams:
            streams.MAX_STREAMS = n
            mx.eval(attend())
            c0, m0, t0 = _cpu(), time.thread_time(), time.perf_counter()
            for _ in range(a.runs):
                mx.eval(attend())
            w, c, m = time.perf_counter() - t0, _cpu() - c0, time.thread_time() - m0
            print(f"{name:6s} streams {n:2d}: wall {w / a.runs * 1e3:6.1f} ms a layer, process CPU "
                  f"{c / a.runs * 1e3:6.1f} ms, main thread CPU {m / a.runs * 1e3:5.1f} ms", flush=True)


if __name__ == "__main__":
    main()
