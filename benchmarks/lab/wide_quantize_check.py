"""Whether the quantize-append kernel packs float32 tokens as ``mx.quantize`` does where MLX
computes (GPUs: bit for bit), for ordinary tokens and for tokens past float16's range (the
scales a float32 model's cache widens to): counts of words, scales and biases that differ.

    python3 benchmarks/lab/wide_quantize_check.py
"""

import sys
from pathlib import Path

if not __package__:
    sys.path.append(str(Path(__file__).resolve().parents[2]))

import mlx_kvq  # noqa: E402,F401
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_kvq import kernels  # noqa: E402
from mlx_kvq.kernels.backend import launcher  # noqa: E402


def main():
    print(mx.default_device(), "kernels enabled:", kernels.enabled(), "flavor:", kernels.quantize_flavor())
    for dtype in (mx.float16, mx.bfloat16, mx.float32):
        for scale in (1.0, 1e3, 1e5):
            for bits in (4, 8):
                x = mx.random.normal((2, 2, 64, 128), key=mx.random.key(3)) * 2
                if scale != 1.0:
                    x[0, 0, 0, :7] = x[0, 0, 0, :7] * scale
                x = x.astype(dtype)
                ref = mx.quantize(x, group_size=64, bits=bits)
                got = kernels.quantize_launch(launcher(), x, bits=bits, group_size=64, flavor=kernels.quantize_flavor())
                diffs = [int((np.array(a.astype(mx.float32) if a.dtype != mx.uint32 else a) !=
                              np.array(b.astype(mx.float32) if b.dtype != mx.uint32 else b)).sum())
                         for a, b in zip(ref, got)]
                where = np.argwhere(np.array(ref[0]) != np.array(got[0]))[:4].tolist()
                print(f"{str(dtype):>16} x{scale:g} bits {bits}: words/scales/biases differing {diffs} at {where}")
                if diffs[1]:
                    i = np.argwhere(np.array(ref[1].astype(mx.float32)) != np.array(got[1].astype(mx.float32)))[0]
                    print("    scale", np.array(ref[1].astype(mx.float32))[tuple(i)], np.array(got[1].astype(mx.float32))[tuple(i)])


if __name__ == "__main__":
    main()
