"""The KV cache report every command prints: bytes of the tokens held, and how many of them
sit unquantized in the sinks and window."""

import mlx.core as mx

from mlx_kvq.cache import QuantizedKVCache, QuantizedRotatingKVCache
from mlx_kvq.cli.report import cache_report


def _filled(cache, tokens, heads=2, dim=64):
    """``cache`` after a prefill of ``tokens`` and one decode step (which packs past the window)."""
    k = mx.random.normal((1, heads, tokens - 1, dim))
    cache.update_and_fetch(k, k)
    one = mx.random.normal((1, heads, 1, dim))
    cache.update_and_fetch(one, one)
    return cache


def test_report_counts_the_tokens_held_and_those_unquantized():
    plain = _filled(QuantizedKVCache(4, sinks=4, window=32), 48)
    held_plain = plain.held() - plain.n_packed
    assert plain.held() == 48 and 0 < plain.n_packed < 48
    assert f"({held_plain} of the 48 tokens are in the unquantized sinks and recent window" in cache_report([plain])
    dense = 48 * 2 * (64 + 64) * 4  # float32 keys and values of every token held
    assert f"they would take {dense / 1e6:.2f} MB" in cache_report([plain])


def test_report_of_a_rotating_cache_counts_what_it_holds_not_its_offset():
    """A 5-token sliding window over 34 tokens holds 5 of them, its offset 34."""
    cache = _filled(QuantizedRotatingKVCache(4, max_size=5, keep=4), 34)
    assert cache.offset == 34 and cache.held() == 5
    line = cache_report([cache])
    assert "of the 5 tokens are in the unquantized sinks" in line and "of the 34 tokens" not in line
    assert f"they would take {5 * 2 * (64 + 64) * 4 / 1e6:.2f} MB" in line
