"""mlx-kvq: quantized KV caches and fused dequantize-attention for MLX and mlx-lm."""

from . import _blas  # noqa: F401  (must run before mlx.core is imported)
from .attention import quantized_sdpa
from .bridge import load_prompt_cache, make_prompt_cache, patch, save_prompt_cache
from .cache import QuantizedChunkedKVCache, QuantizedKVCache, QuantizedRotatingKVCache
from .generation import batch_generate, cache_document, summarize
from .models import load

__version__ = "0.1.0"
