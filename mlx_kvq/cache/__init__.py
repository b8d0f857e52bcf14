"""The quantized caches: the plain cache, its sliding-window and chunked variants, the rows
cache of a batch (and its shared decode buffer), the view attention reads, and the defaults. They implement mlx-lm's cache
protocol (``update_and_fetch``, ``make_mask``, ``state``, ``trim``, ...) duck-typed."""

from .chunked import QuantizedChunkedKVCache
from .defaults import MAX_TOKENS, ROTATE, cache_options, default_options, init_kwargs, whole
from .quantized import QuantizedKVCache, causal_mask, compact
from .rotating import QuantizedRotatingKVCache
from .rows import RowsKVCache, RowsMask, RowsView
from .rows_buffer import RowsBuffer, with_holes
from .view import KVFormat, KVView, fetch, first_tokens, plain
