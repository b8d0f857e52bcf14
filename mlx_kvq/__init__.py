"""mlx-kvq: quantized KV caches and fused dequantize-attention for MLX and mlx-lm."""

from . import _blas  # noqa: F401  (must run before mlx.core is imported)
