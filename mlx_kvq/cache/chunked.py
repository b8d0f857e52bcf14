"""QuantizedChunkedKVCache: mlx-lm's ``ChunkedKVCache`` (llama4's chunked-attention
layers) in the packed format.

The model calls ``maybe_trim_front`` before each forward pass: tokens past the last
``chunk_size`` are dropped (oldest packed ones first, then the oldest of the recent
window) and ``start_position`` moves past them. The model builds its chunk mask itself
over positions ``start_position .. offset``, the tokens this cache returns, so attention
goes through ``quantized_sdpa`` with that mask unchanged. No sinks: the first tokens are
dropped like the others.
"""

from .defaults import whole
from .quantized import QuantizedKVCache
from .rotating import drop_front
from .view import fetch


class QuantizedChunkedKVCache(QuantizedKVCache):
    """A quantized ``ChunkedKVCache``: at most ``chunk_size`` tokens before each update.

    Other arguments are ``QuantizedKVCache``'s (``sinks`` must be 0 or None).
    """

    one_buffer = False  # rows drop tokens on their own: each keeps its own buffers

    def __init__(self, chunk_size, bits=4, group_size=None, *, sinks=None, **kwargs):
        if sinks:
            raise ValueError(f"A chunked cache drops its first tokens like the others: sinks={sinks} cannot be kept.")
        super().__init__(bits, group_size, sinks=0, **kwargs)
        self.chunk_size = whole("chunk_size", chunk_size, 1)
        self.start_position = 0

    @property
    def config(self):
        return {**super().config, "chunk_size": self.chunk_size, "start_position": self.start_position}

    def held(self):
        """Tokens held: positions ``start_position`` to ``offset``."""
        return self.offset - self.start_position

    def maybe_trim_front(self):
        """Drop the oldest tokens past the last ``chunk_size`` (as mlx-lm's ``ChunkedKVCache``)."""
        trim = self.held() - self.chunk_size
        if self.empty() or trim <= 0:
            return
        drop_front(self, trim)
        self.start_position += trim

    def update_and_fetch(self, keys, values):
        super().update_and_fetch(keys, values)
        return fetch(self, keys.shape[2], self.held())  # positions count the tokens held

    def size(self):
        return self.held()

    def is_trimmable(self):
        return self.start_position == 0  # nothing dropped yet

    def _restore(self, config):
        self.chunk_size = whole("the cache state's chunk_size", config.get("chunk_size"), 1)
        self.start_position = whole("the cache state's start_position", config.get("start_position"), 0,
                                    self.offset)
        sinks = 0 if self.sink_keys is None else self.sink_keys.shape[2]
        if sinks or self.n_packed + (0 if self.window_keys is None else self.window_keys.shape[2]) != self.held():
            raise ValueError(f"The cache state holds tokens other than positions {self.start_position} to "
                             f"{self.offset}: the file is damaged.")

    @staticmethod
    def _exact_offset(config):
        return False  # the tokens before start_position are dropped

    @classmethod
    def from_cache(cls, cache, **config):
        raise NotImplementedError("Build a QuantizedChunkedKVCache empty and fill it with the model.")
