"""Attention on the CPU: the CPU body (``kernels.cpu``) against the MLX ops (a prefill chunk's
blocked path, its tiles over the CPU's streams; a decode step's one pass over the 4-bit cache,
its rows over the streams), SmolLM2-135M's heads (9 query, 3 KV, head dim 64); median ms of
interleaved runs per layer. Prefill chunks over float32 keys, causal, and the body on one
thread; decode steps of B rows over a 4-bit cache of T tokens each:

    python3 benchmarks/lab/cpu_attention.py [--chunks 2048:0 512:1536] [--decode 1:2048 16:2048] [--runs 9]
"""

import argparse
import time

import mlx_kvq  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx

from mlx_kvq.attention import quantized_sdpa, reference
from mlx_kvq.cache import QuantizedKVCache
from mlx_kvq.kernels import cpu


def decode_step(rows, tokens):
    """A 4-bit cache's view of ``rows`` rows of ``tokens`` random tokens and one decoded token,
    and a step's queries (SmolLM2's shape), evaluated."""
    mx.random.seed(0)
    cache = QuantizedKVCache(bits=4)
    cache.update_and_fetch(*(mx.random.normal((rows, 3, tokens, 64)) for _ in range(2)))
    k = mx.random.normal((rows, 3, 1, 64))
    view, _ = cache.update_and_fetch(k, k)
    q = mx.random.normal((rows, 9, 1, 64))
    mx.eval(q, cache.state)
    return view, q


def timed(f, runs):
    mx.eval(f())
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        mx.eval(f())
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2] * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", nargs="+", default=["2048:0", "512:1536"],
                   help="queries:keys before them (default: 2048:0 512:1536)")
    p.add_argument("--decode", nargs="+", default=["1:2048", "16:2048"],
                   help="rows:tokens of decode steps (default: 1:2048 16:2048)")
    p.add_argument("--runs", type=int, default=9, help="runs of each (default: 9)")
    a = p.parse_args(argv)
    mx.set_default_device(mx.cpu)
    applies = cpu.applies
    print(f"vector width {cpu.library().kvq_cpu_vector_width()} floats, cores {reference.cores()}")
    for chunk in a.chunks:
        L, before = map(int, chunk.split(":"))
        n = before + L
        mx.random.seed(0)
        q, k, v = mx.random.normal((1, 9, L, 64)), mx.random.normal((1, 3, n, 64)), mx.random.normal((1, 3, n, 64))
        mx.eval(q, k, v)
        args = dict(scale=0.125, q_start=before, k_start=0, causal=True, mask=None)
        body = lambda: reference.dense_attention(q, k, v, **args)
        one = lambda: cpu.attention(q, [cpu.dense(k, v, 0)], threads=1, scale=0.125, q_start=before, causal=True)
        report(f"prefill: {L} queries after {before} keys", body, without(applies, body), one, a.runs)
    for step in a.decode:
        B, T = map(int, step.split(":"))
        view, q = decode_step(B, T)
        body = lambda: quantized_sdpa(q, view, 0.125)
        report(f"decode: {B} rows x {T} tokens", body, without(applies, body), None, a.runs)


def without(applies, f):
    """``f`` with the CPU body off."""
    def g():
        cpu.applies = lambda *x, **y: False
        try:
            return f()
        finally:
            cpu.applies = applies
    return g


def report(label, body, ops, one, runs):
    ts = {"body": [], "MLX ops": [], "body, 1 thread": []}
    for _ in range(3):
        for name, f in (("body", body), ("MLX ops", ops), ("body, 1 thread", one)):
            if f is not None:
                ts[name].append(timed(f, max(1, runs // 3)))
    print(f"{label}: " + ", ".join(f"{k} {sorted(v)[1]:.2f} ms" for k, v in ts.items() if v), flush=True)


if __name__ == "__main__":
    main()
