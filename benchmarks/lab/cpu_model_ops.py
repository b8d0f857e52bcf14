"""What one SmolLM2-135M layer's own ops (not the attention) cost on the CPU at a 2048-token
prefill chunk, float32: the projections' matmuls (GFLOP/s through OpenBLAS) and the element-wise
ops around them (mlx-lm's ``swiglu``, whose ``mx.sigmoid`` takes MLX's CPU exp; norm, RoPE);
median ms of 10 runs:

    python3 benchmarks/lab/cpu_model_ops.py
"""

import time

import mlx_kvq  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx
from mlx_lm.models.activations import swiglu


def timed(f):
    for _ in range(3):
        mx.eval(f())
    ts = []
    for _ in range(10):
        t = time.perf_counter()
        mx.eval(f())
        ts.append(time.perf_counter() - t)
    return sorted(ts)[5]


def main():
    mx.random.seed(0)
    x, h = mx.random.normal((2048, 576)), mx.random.normal((2048, 1536))
    weights = {"q, o 576x576": (x, (576, 576)), "k, v 192x576": (x, (192, 576)),
               "gate, up 1536x576": (x, (1536, 576)), "down 576x1536": (h, (576, 1536))}
    for name, (a, shape) in weights.items():
        w = mx.random.normal(shape)
        mx.eval(w)
        t = timed(lambda: a @ w.T)
        print(f"{name:18s} {t * 1e3:7.2f} ms  {2 * a.shape[0] * a.shape[1] * shape[0] / t / 1e9:6.1f} GFLOP/s")
    g, u, w = mx.random.normal((1, 2048, 1536)), mx.random.normal((1, 2048, 1536)), mx.ones((576,))
    xs = x.reshape(1, 2048, 9, 64).transpose(0, 2, 1, 3)
    mx.eval(g, u, w, xs)
    for name, f in [("swiglu (mlx-lm)", lambda: swiglu(g, u)), ("mx.sigmoid", lambda: mx.sigmoid(g)),
                    ("mx.exp", lambda: mx.exp(g)), ("multiply", lambda: g * u),
                    ("rms_norm", lambda: mx.fast.rms_norm(x, w, 1e-5)),
                    ("rope (queries)", lambda: mx.fast.rope(xs, 64, traditional=False, base=1e4, scale=1.0, offset=0))]:
        print(f"{name:18s} {timed(f) * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
