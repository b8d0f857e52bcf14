"""Decode tokens/s at a long context without the prefill: every layer's cache is filled
with random keys and values, then mlx-lm's ``generate_step`` decodes from one prompt
token (Llama-3-8B shape, random 4-bit weights, as ``bench_generate.py``). Also prints the
host time of building one step's graph (Python) and of dispatching it (``mx.async_eval``),
which bounds the step time when the GPU is faster than the host:

    python3 benchmarks/lab/bench_decode_step.py --context 32768 --new 64 --configs fp16,kvq-4,kvq-8
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: bench_generate
from bench_generate import LLAMA3_8B, make_cache, random_model  # noqa: E402

import mlx.core as mx  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402


def fill(cache, context, chunk=2048):
    """Every layer's cache holding ``context`` random tokens (one random chunk, reused)."""
    B, Hkv, D = 1, LLAMA3_8B["num_key_value_heads"], LLAMA3_8B["hidden_size"] // LLAMA3_8B["num_attention_heads"]
    k = mx.random.normal((B, Hkv, chunk, D)).astype(mx.float16)
    v = mx.random.normal((B, Hkv, chunk, D)).astype(mx.float16)
    for c in cache:
        for s in range(0, context, chunk):
            n = min(chunk, context - s)
            c.update_and_fetch(k[:, :, :n], v[:, :, :n])
        mx.eval([x for x in _arrays(c.state)])


def _arrays(tree):
    if isinstance(tree, mx.array):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for t in tree:
            yield from _arrays(t)


def run(model, name, context, new):
    cache, extra = make_cache(model, name)
    fill(cache, context)
    tok = mx.array([1])
    # host time of one step: build the graph, then dispatch it
    build, dispatch = [], []
    for _ in range(12):
        mx.synchronize()
        t0 = time.perf_counter()
        y = model(tok[None], cache=cache)
        t1 = time.perf_counter()
        mx.async_eval(y)
        t2 = time.perf_counter()
        mx.synchronize()
        build.append(t1 - t0)
        dispatch.append(t2 - t1)
    # generate_step's pipeline (build and dispatch step t+1, then wait for step t),
    # timed piece by piece: wait > 0 means the GPU, not the host, sets the pace
    y = model(tok[None], cache=cache)[:, -1].argmax(-1)
    mx.async_eval(y)
    pb, pd, pw, times = [], [], [], []
    for _ in range(new):
        t0 = time.perf_counter()
        nxt = model(y[None], cache=cache)[:, -1].argmax(-1)
        t1 = time.perf_counter()
        mx.async_eval(nxt)
        t2 = time.perf_counter()
        y.item()
        t3 = time.perf_counter()
        y = nxt
        pb.append(t1 - t0)
        pd.append(t2 - t1)
        pw.append(t3 - t2)
        times.append(t3 - t0)
    med = lambda x: statistics.median(x[4:]) * 1e3
    steps = generate_step(tok, model, prompt_cache=cache, **extra)
    next(steps)
    gtimes = []
    for _ in range(new):
        a = time.perf_counter()
        next(steps)
        gtimes.append(time.perf_counter() - a)
    return dict(config=name, context=context, decode_tok_s=1 / statistics.median(gtimes[4:]),
                loop_tok_s=1e3 / med(times), loop_build_ms=med(pb), loop_dispatch_ms=med(pd), loop_wait_ms=med(pw),
                build_ms=statistics.median(build[2:]) * 1e3, dispatch_ms=statistics.median(dispatch[2:]) * 1e3)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--layers", type=int)
    p.add_argument("--configs", default="fp16,kvq-4,kvq-8")
    args = p.parse_args(argv)
    model = random_model(args.layers)
    print(f"device {mx.default_device()}  mlx {mx.__version__}  context {args.context}", flush=True)
    base = None
    for name in args.configs.split(","):
        r = run(model, name, args.context, args.new)
        base = base or r["decode_tok_s"]
        print(f"{name:8s} decode {r['decode_tok_s']:7.1f} tok/s ({r['decode_tok_s'] / base:4.2f}x)  host per step: "
              f"build {r['build_ms']:6.2f} ms  dispatch {r['dispatch_ms']:6.2f} ms", flush=True)
        print(f"         pipelined loop {r['loop_tok_s']:7.1f} tok/s: build {r['loop_build_ms']:6.2f} dispatch "
              f"{r['loop_dispatch_ms']:6.2f} wait for the GPU {r['loop_wait_ms']:6.2f} ms", flush=True)
        mx.clear_cache()


if __name__ == "__main__":
    main()
