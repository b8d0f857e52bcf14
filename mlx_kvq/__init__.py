"""mlx-kvq: quantized KV caches and fused dequantize-attention for MLX and mlx-lm."""

from . import _blas  # noqa: F401  (must run before mlx.core is imported)
from .attention import quantized_sdpa
from .batch import batch_generate
from .cache import QuantizedKVCache
from .integration import load_prompt_cache, make_prompt_cache, patch, save_prompt_cache
from .models import load
from .rotating import QuantizedRotatingKVCache

__version__ = "0.1.0"
