"""Extra memory and time of one prefill chunk's attention against a long cache.

A 2048-token chunk (Llama-3-8B attention shape: 32 query heads, 8 KV heads, d=128) attends
to a cache of 32k tokens plus itself. Measures peak memory above the inputs and the median
time for: fp16 ``mx.fast.scaled_dot_product_attention``, mlx-lm's quantized attention, and
mlx_kvq's attention (fused kernels where present, and the reference with MLX_KVQ_REFERENCE=1).

    python benchmarks/bench_prefill_memory.py --cache 32768 --chunk 2048 --json out.json --plot out.png
    mlx_kvq.bench prefill-memory --cache 32768 --chunk 2048      # the same, installed

``--json`` writes ``{"meta": {command, device, versions, date}, "rows": [one per path]}``;
``--plot`` a PNG of the ``--plot-y`` column per path (default: the extra peak memory).
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if __package__:  # mlx_kvq.benchmarks.bench_prefill_memory (python -m mlx_kvq.bench prefill-memory)
    from .report import plot, require_matplotlib, write_json
else:  # python3 benchmarks/bench_prefill_memory.py: the repository's mlx_kvq, and report.py beside this
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from report import plot, require_matplotlib, write_json

import mlx_kvq  # noqa: E402
import mlx.core as mx  # noqa: E402
from mlx_lm.models.base import quantized_scaled_dot_product_attention  # noqa: E402


def measure(fn, repeat=5):
    mx.eval(fn())  # warm-up (compiles kernels)
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        times.append(time.perf_counter() - t)
    return (mx.get_peak_memory() - base) / 2**30, statistics.median(times) * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=int, default=32768, help="tokens already in the cache (default: 32768)")
    p.add_argument("--chunk", type=int, default=2048, help="tokens of the prefill chunk (default: 2048)")
    p.add_argument("--bits", type=int, default=4, help="KV bits (default: 4)")
    p.add_argument("--json", metavar="PATH", help="write the rows and the run's meta data here")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of the --plot-y column per path here")
    p.add_argument("--plot-y", default="extra_peak_gib", help="columns to plot (default: %(default)s; also median_ms)")
    args = p.parse_args(argv)
    if args.plot:
        require_matplotlib()
    Hq, Hkv, D, L = 32, 8, 128, args.chunk
    mx.random.seed(0)
    kv = mlx_kvq.QuantizedKVCache(args.bits, 64, sinks=0, window=0, rotate=False)
    for _ in range(args.cache // 4096):
        x = mx.random.normal((1, Hkv, 4096, D)).astype(mx.float16)
        kv.update_and_fetch(x, x)
    new = mx.random.normal((1, Hkv, L, D)).astype(mx.float16)
    view, _ = kv.update_and_fetch(new, new)
    q = mx.random.normal((1, Hq, L, D)).astype(mx.float16)
    N = kv.offset
    dense_k = mx.random.normal((1, Hkv, N, D)).astype(mx.float16)
    packed = tuple(a[:, :, : kv.n_packed] for a in kv.keys)
    mask = mlx_kvq.cache.causal_mask(L, N - L)
    mx.eval(q, dense_k, packed, view.packed[0], view.window[0])
    runs = {
        "fp16 mx.fast sdpa": lambda: mx.fast.scaled_dot_product_attention(q, dense_k, dense_k, scale=D**-0.5, mask="causal"),
        f"mlx-lm {args.bits}-bit": lambda: quantized_scaled_dot_product_attention(
            q, packed, packed, scale=D**-0.5, mask=mask[:, : kv.n_packed], group_size=64, bits=args.bits),
        f"mlx_kvq {args.bits}-bit": lambda: mlx_kvq.quantized_sdpa(q, view, scale=D**-0.5, mask="causal"),
    }
    print(f"device {mx.default_device()}, chunk {L} x cache {N}, Hq {Hq}, Hkv {Hkv}, d {D}")
    print(f"{'path':28} {'extra peak GiB':>15} {'median ms':>10}")
    rows = []
    for name, fn in runs.items():
        for ref in ([False, True] if name.startswith("mlx_kvq") else [False]):
            os.environ["MLX_KVQ_REFERENCE"] = "1" if ref else "0"
            label = name + (" (reference)" if ref else "")
            row = dict(path=label, chunk=L, keys=N, bits=args.bits)
            try:
                gib, ms = measure(fn)
                print(f"{label:28} {gib:15.2f} {ms:10.2f}", flush=True)
                rows.append(dict(row, extra_peak_gib=gib, median_ms=ms))
            except Exception as e:
                print(f"{label:28} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                rows.append(dict(row, error=f"{type(e).__name__}: {str(e)[:200]}"))
    if args.json:
        write_json(rows, args.json, dict(args=vars(args)))
    if args.plot:
        ys = args.plot_y.split(",")
        units = {"GiB" if y.endswith("_gib") else "ms" if y.endswith("_ms") else y for y in ys}
        plot(rows, "path", ys, args.plot, f"one {L}-query prefill chunk against {N} keys, {args.bits}-bit",
             ylabel=units.pop() if len(units) == 1 else None)


if __name__ == "__main__":
    main()
