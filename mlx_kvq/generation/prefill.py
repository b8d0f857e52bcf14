"""The prefill loop every command, ``batch_generate`` and the eval use, its progress
line, and the cache it fills."""

import sys
import time

import mlx.core as mx

from ..bridge import make_prompt_cache, patch
from ..cache import compact


def build_cache(model, kv):
    """``model``'s prompt cache for ``make_prompt_cache`` keyword arguments ``kv``
    (``None``: mlx-lm's unquantized caches)."""
    return make_prompt_cache(model, kv_bits=None) if kv is None else make_prompt_cache(model, **kv)


class Progress:
    """A one-line progress bar on a stream: tokens done/total, tokens/s, memory in use."""

    def __init__(self, total, stream=sys.stderr, label="prefill", width=24):
        self.total, self.stream, self.label, self.width = total, stream, label, width
        self.start = time.perf_counter()

    def __call__(self, done):
        if self.stream is None:
            return
        frac = done / max(1, self.total)
        bar = "#" * int(frac * self.width)
        tps = done / max(1e-9, time.perf_counter() - self.start)
        mem = mx.get_active_memory() / 1e9
        self.stream.write(
            f"\r{self.label} [{bar:<{self.width}}] {done}/{self.total} tokens "
            f"{tps:7.1f} tok/s  memory {mem:.2f} GB"
        )
        if done >= self.total:
            self.stream.write("\n")
        self.stream.flush()



def prefill(model, tokens, cache, step=512, progress=None, hold_last=False):
    """Feed ``tokens`` through ``model`` into ``cache`` in steps of ``step`` tokens.

    ``hold_last``: all but the last token, as ``mlx_lm.generate_step`` does (generation
    starts from the last one). Only the caches are evaluated, so the logits (the
    vocabulary projection) are never computed. ``progress(done)`` is called after each
    step. Then the quantized caches pack what fell out of their recent window (the next
    update would) and drop the prefill buffers that sink/window slices keep alive.
    """
    tokens = mx.array(tokens)
    patch(model)
    end = len(tokens) - 1 if hold_last else len(tokens)
    for a in range(0, end, step):
        b = min(end, a + step)
        model(tokens[a:b][None], cache=cache)
        mx.eval([c.state for c in cache])
        if progress:
            progress(b)
    for c in cache:
        if hasattr(c, "flush"):
            c.flush()
    compact(cache)
    mx.eval([c.state for c in cache])
    return cache
