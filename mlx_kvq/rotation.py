"""The fixed orthogonal rotation applied to keys (and values) before packing.

A Hadamard matrix with fixed random signs, ``R = diag(s) H / sqrt(d)``, spreads an
outlier channel over every channel of the head, so group-wise quantization loses
less. ``q R (k R)^T = q k^T``, so attention rotates queries by ``R`` and, when
values are rotated too, rotates the output back by ``R^T``.
"""

from functools import lru_cache

import mlx.core as mx
import numpy as np

SEED = 0x6B7671  # fixed: a saved cache must be read back with the same rotation


@lru_cache(maxsize=None)
def rotation(d):
    """The ``d x d`` float32 rotation matrix (cached)."""
    try:
        h = mx.hadamard_transform(mx.eye(d), scale=d**-0.5)
    except Exception as e:
        raise ValueError(
            f"head_dim {d} has no Hadamard rotation in MLX ({e}); use rotate=None."
        ) from None
    signs = np.random.default_rng(SEED).choice([-1.0, 1.0], size=d).astype(np.float32)
    return mx.array(signs)[:, None] * h
