"""The server's prompt cache in one process: held to its byte limit as mlx-lm's own LRU
cache holds it, and, under mlx.launch, emptied on every rank while any rank is over."""

from mlx_kvq.bridge import mlx_lm_server
from mlx_kvq.generation import distributed, serving
from mlx_kvq.generation.distributed import by_rank_line


class Entry:
    """A one-layer prompt cache of ``nbytes`` bytes (not trimmable: entries never merge)."""

    def __init__(self, nbytes):
        self.nbytes = nbytes

    def is_trimmable(self):
        return False


def fill(cache, sizes):
    for i, n in enumerate(sizes):
        cache.insert_cache("m", [i, i + 1], [Entry(n)])
    return cache


def keys(cache):
    return sorted(tokens[0] for lru in cache._lru._lrus.values() for _, tokens in lru)


def test_one_process_keeps_what_mlx_lms_cache_keeps():
    sizes = [300, 500, 200, 400, 100, 600]
    for limit, count in [(1000, 10), (700, 10), (10**6, 3), (0, 10)]:
        ours = fill(serving.PromptCache(count, limit), sizes)
        theirs = fill(mlx_lm_server().LRUPromptCache(count, limit), sizes)
        assert keys(ours) == keys(theirs) and ours.nbytes == theirs.nbytes, (limit, count)
        ours.trim_to(n_bytes=limit // 2)
        theirs.trim_to(n_bytes=limit // 2)
        assert keys(ours) == keys(theirs), limit


def test_every_rank_evicts_while_any_rank_is_over(monkeypatch):
    """Another rank holds twice these bytes (a pipeline rank with more layers): the entries
    it must drop leave this rank's cache too."""
    def over_on_a_rank(value, group=None, stream=None):
        return [value, int(2 * cache.nbytes > cache.max_bytes)]

    cache = serving.PromptCache(10, 1000)
    monkeypatch.setattr(serving, "ints_by_rank", over_on_a_rank)
    fill(cache, [300, 200, 100])  # here 600 bytes, there 1200: the oldest leaves
    assert keys(cache) == [1, 2] and cache.nbytes == 300


def test_ints_and_line_by_rank():
    assert distributed.ints_by_rank(5 << 40) == [5 << 40]  # one process: no collective
    assert by_rank_line("KV cache", [3 << 20, 1 << 20]) == "KV cache per rank: 3.00, 1.00 MiB; total 4.00 MiB over 2 ranks"
    assert by_rank_line("Prompt cache", [18432, 18432]) == (
        "Prompt cache per rank: 18.00, 18.00 KiB; total 36.00 KiB over 2 ranks")
