"""What one launch costs MLX to dispatch on this GPU: chains of ``--n`` dependent ops evaluated
at once (GPU-trivial work), median microseconds per op, for a built-in op, a trivial custom
kernel with 1 and with 16 inputs, and mlx-kvq's own decode-step launches (window append, decode
kernel over a 300-token single-row cache).

    python3 benchmarks/lab/launch_cost.py [--n 300]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

if not __package__:  # after $PYTHONPATH
    sys.path.append(str(Path(__file__).resolve().parents[2]))

import mlx_kvq  # noqa: E402
import mlx.core as mx  # noqa: E402

from mlx_kvq import kernels  # noqa: E402


def per_op_us(step, x0, n, reps=7):
    """(build, evaluate) us per op of a chain of ``n`` ``step`` calls."""
    build, ev = [], []
    for _ in range(reps + 2):
        mx.synchronize()
        t0 = time.perf_counter()
        x = x0
        for _ in range(n):
            x = step(x)
        t1 = time.perf_counter()
        mx.eval(x)
        t2 = time.perf_counter()
        build.append((t1 - t0) / n * 1e6)
        ev.append((t2 - t1) / n * 1e6)
    return statistics.median(build[2:]), statistics.median(ev[2:])


def custom(inputs):
    names = [f"in{i}" for i in range(inputs)]
    src = "unsigned int i = threadIdx.x + blockIdx.x * blockDim.x; if (i < 256) out[i] = in0[i] + 1.0f;"
    if mx.metal.is_available():
        src = "uint i = thread_position_in_grid.x; out[i] = in0[i] + 1.0f;"
        return mx.fast.metal_kernel(name=f"t{inputs}", input_names=names, output_names=["out"], source=src)
    return mx.fast.cuda_kernel(name=f"t{inputs}", input_names=names, output_names=["out"], source=src)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=300)
    a = p.parse_args(argv)
    x0 = mx.zeros((256,), mx.float32)
    extra = [mx.zeros((256,), mx.float32) for _ in range(15)]
    mx.eval(x0, extra)
    k1, k16 = custom(1), custom(16)
    launch = lambda k, xs: k(inputs=xs, grid=(256, 1, 1), threadgroup=(256, 1, 1), output_shapes=[(256,)],
                             output_dtypes=[mx.float32])[0]
    rows = [
        ("x + 1 (built-in)", lambda x: x + 1, x0),
        ("custom kernel, 1 input", lambda x: launch(k1, [x]), x0),
        ("custom kernel, 16 inputs", lambda x: launch(k16, [x] + extra), x0),
    ]
    # mlx-kvq's decode step of one row: window append, then the decode kernel over the cache
    c = mlx_kvq.QuantizedKVCache(bits=4)
    kv = mx.random.normal((1, 3, 300, 64)).astype(mx.float16)
    c.update_and_fetch(kv, kv)
    one = kv[:, :, :1]
    view, _ = c.update_and_fetch(one, one)
    mx.eval(c.state)
    q0 = mx.random.normal((1, 9, 1, 64)).astype(mx.float16)

    def append(x):
        c.offset -= 1
        c._wn -= 1
        c._wvn -= 1
        c._steps = 2  # off the flush schedule
        c.update_and_fetch(one + x[:1, :1, :1, :1] * 0, one)
        return c._wk

    def attend(q):
        from mlx_kvq.attention import quantized_sdpa
        return quantized_sdpa(q, view, scale=0.125)

    rows += [("kvq window append (update_and_fetch)", append, mx.zeros((1, 1, 1, 1), mx.float16)),
             ("kvq decode attention (quantized_sdpa)", attend, q0)]
    print(f"# {mx.default_device()}, chains of {a.n} dependent ops, median us per op")
    print("| op | build | evaluate |")
    print("|---|---|---|")
    for name, step, x in rows:
        b, e = per_op_us(step, x, a.n)
        print(f"| {name} | {b:.1f} | {e:.1f} |", flush=True)


if __name__ == "__main__":
    main()
