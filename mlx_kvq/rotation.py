"""The fixed orthogonal rotation applied to keys (and values) before packing.

A Hadamard matrix with fixed random signs, ``R = diag(s) H / sqrt(d)`` (for a power of
two ``d``, ``H`` is the Sylvester matrix: the decode kernels apply it as a fast
Walsh-Hadamard transform), spreads an
outlier channel over every channel of the head, so group-wise quantization loses
less. ``q R (k R)^T = q k^T``, so attention rotates queries by ``R`` and, when
values are rotated too, rotates the output back by ``R^T``.
"""

from functools import lru_cache

import mlx.core as mx
import numpy as np

SEED = 0x6B7671  # fixed: a saved cache must be read back with the same rotation


def signs(d):
    """The rotation's fixed random signs ``s`` (float32, (d,))."""
    return mx.array(np.random.default_rng(SEED).choice([-1.0, 1.0], size=d).astype(np.float32))


def has_hadamard(d):
    """Whether ``mx.hadamard_transform`` takes size ``d``: ``m * 2^k`` with ``m`` the first of
    12, 20, 28 that divides ``d`` (or 1), ``k <= 26``. MLX 0.32 checks only that ``m`` divides
    ``d`` and corrupts the heap for other sizes (144, 288), so this is asked first."""
    pow2 = lambda x: x > 0 and x & (x - 1) == 0
    if pow2(d):
        return d <= 1 << 26
    for m in (12, 20, 28):
        if d % m == 0:
            return pow2(d // m) and d // m <= 1 << 26
    return False


@lru_cache(maxsize=None)
def rotation(d, dtype=mx.float32, transpose=False):
    """The ``d x d`` rotation matrix (or its transpose, the inverse) in ``dtype`` (cached).

    In float16 and bfloat16 every entry ``+-1/sqrt(d)`` rounds the same way, so the
    rounded matrix is the rotation times a scalar within 1.1e-4 of 1.
    """
    if not has_hadamard(d):
        raise ValueError(
            f"head_dim {d} has no Hadamard rotation in MLX (it takes m * 2^k, m in 1, 12, 20, 28); "
            "use rotate=False."
        )
    h = mx.hadamard_transform(mx.eye(d), scale=d**-0.5)
    r = signs(d)[:, None] * h
    r = mx.contiguous(r.T if transpose else r).astype(dtype)
    mx.eval(r)
    return r


def rotate(x, inverse=False):
    """``x @ R`` (``inverse``: ``x @ R^T``) over the last axis, computed in ``x``'s dtype.

    Half-precision inputs stay in half precision: on GPUs a float32 product costs a
    slower matmul plus a cast on every decode step, per layer.
    """
    dtype = x.dtype if x.dtype in (mx.float16, mx.bfloat16) else mx.float32
    return x @ rotation(x.shape[-1], dtype, inverse)
