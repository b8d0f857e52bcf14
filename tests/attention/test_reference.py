"""The blocked reference (``attention.reference``) against float64 attention in NumPy: query
tiles and key blocks of every size, causal masks over keys in order and out of order
(rotating caches), array masks, queries that see no key; and the causal skip's saving."""

import numpy as np
import pytest

import mlx.core as mx

from mlx_kvq.attention import reference
from mlx_kvq.attention.reference import blocked_attention, dense_attention
from mlx_kvq.kernels import cpu
from helpers import check, numpy_attention


@pytest.fixture(autouse=True)
def mlx_ops(monkeypatch):
    """These tests are of the MLX ops' tiles and blocks: the CPU body (``kernels.cpu``,
    tests/kernels/test_cpu.py) off."""
    monkeypatch.setattr(cpu, "applies", lambda *a, **k: False)


def small_blocks(monkeypatch, budget, keys=8):
    monkeypatch.setattr(reference, "BLOCK_ELEMENTS", budget)
    monkeypatch.setattr(reference, "GPU_BLOCK_ELEMENTS", budget)
    monkeypatch.setattr(reference, "BLOCK_KEYS", keys)


@pytest.mark.parametrize("budget", [1 << 8, 1 << 11, 1 << 14, 1 << 30])
@pytest.mark.parametrize("q_start,k_start", [(64, 0), (90, 30), (10, 40)])
def test_causal_tiles_and_blocks_match_float64(monkeypatch, budget, q_start, k_start):
    """A chunk of 37 queries over 101 keys in order: any tiling gives the same result; with
    ``q_start < k_start`` the first queries see no key."""
    small_blocks(monkeypatch, budget)
    mx.random.seed(0)
    B, Hq, Hkv, L, n, D = 2, 6, 2, 37, 101, 16
    q, k, v = mx.random.normal((B, Hq, L, D)), mx.random.normal((B, Hkv, n, D)), mx.random.normal((B, Hkv, n, D))
    visible = np.arange(k_start, k_start + n)[None] <= np.arange(q_start, q_start + L)[:, None]
    got = dense_attention(q, k, v, scale=0.3, q_start=q_start, k_start=k_start, causal=True, mask=None)
    check(got, numpy_attention(q, k, v, 0.3, visible))


@pytest.mark.parametrize("budget", [1 << 8, 1 << 30])
def test_causal_keys_out_of_order(monkeypatch, budget):
    """A rotating cache's keys sit at positions out of order (``k_pos``): every block is
    masked, none skipped."""
    small_blocks(monkeypatch, budget)
    mx.random.seed(1)
    L, n, D = 23, 50, 8
    pos = np.random.default_rng(0).permutation(np.arange(40, 90))
    q, k, v = mx.random.normal((1, 4, L, D)), mx.random.normal((1, 2, n, D)), mx.random.normal((1, 2, n, D))
    visible = pos[None] <= np.arange(67, 67 + L)[:, None]
    got = dense_attention(q, k, v, scale=0.5, q_start=67, k_start=0, causal=True, mask=None, k_pos=mx.array(pos))
    check(got, numpy_attention(q, k, v, 0.5, visible))


@pytest.mark.parametrize("budget", [1 << 8, 1 << 30])
@pytest.mark.parametrize("kind", ["bool", "additive", "one row"])
def test_array_masks_per_query_row(monkeypatch, budget, kind):
    """An array mask's rows go with their query tile; a mask of one row serves every tile."""
    small_blocks(monkeypatch, budget)
    mx.random.seed(2)
    B, L, n, D = 2, 29, 45, 8
    rng = np.random.default_rng(1)
    rows = 1 if kind == "one row" else L
    visible = rng.random((B, 1, rows, n)) < 0.6
    visible[0, 0, 0] = False  # a query that sees no key
    mask = mx.array(visible) if kind != "additive" else mx.array(np.where(visible, 0.0, -np.inf).astype(np.float32))
    q, k, v = mx.random.normal((B, 6, L, D)), mx.random.normal((B, 3, n, D)), mx.random.normal((B, 3, n, D))
    got = dense_attention(q, k, v, scale=0.4, q_start=0, k_start=0, causal=False, mask=mask)
    check(got, numpy_attention(q, k, v, 0.4, np.broadcast_to(visible, (B, 1, L, n))))


def counted_blocks(k, computed):
    """``blocked_attention``'s ``block`` over keys (and values) ``k``, appending to ``computed``
    the number of scores each call of its ``qk`` computes."""

    def block(a, b):
        qk, pv = reference._dense_products(k[:, :, a:b], k[:, :, a:b])
        return (lambda qf: computed.append(qf.shape[-2] * (b - a)) or qk(qf)), pv

    return block


def counted_causal_chunk(L, D, seed, heads=(1, 1)):
    """A first causal chunk of ``L`` queries over its own keys (``heads``: query and KV heads)
    through ``blocked_attention``, checked against float64; the scores each block computed."""
    mx.random.seed(seed)
    q, k = mx.random.normal((1, heads[0], L, D)), mx.random.normal((1, heads[1], L, D))
    computed = []
    got = blocked_attention(q, counted_blocks(k, computed), L, (heads[1], D, D),
                            scale=0.3, q_start=0, k_start=0, causal=True, mask=None)
    check(got, numpy_attention(q, k, k, 0.3, np.arange(L)[None] <= np.arange(L)[:, None]))
    return computed


def test_causal_chunk_skips_the_blocks_after_its_queries(monkeypatch):
    """A first chunk of 512 queries (causal, keys in order) in tiles: the blocks after a tile's
    last query are not computed, so about half the scores are, and the result is unchanged."""
    small_blocks(monkeypatch, 1 << 13, keys=64)  # tiles of 64 queries, blocks of 64 keys
    L = 512
    computed = counted_causal_chunk(L, 8, seed=3, heads=(2, 1))
    assert len(computed) > 4 and sum(computed) < 0.6 * L * L


def test_causal_blocks_start_at_each_tiles_first_query(monkeypatch):
    """Tiles of 48 queries and blocks of at most 64 keys: a key block starts at each tile's
    first query, so a tile computes exactly the keys up to its last query (the block after
    its first query is its own square) and the blocks past it are skipped."""
    small_blocks(monkeypatch, 48 * 64, keys=64)
    L = 240
    computed = counted_causal_chunk(L, 8, seed=5)
    assert sum(computed) == sum(48 * j for j in range(48, L + 1, 48))


def test_a_tiles_last_query_sees_the_first_key_of_the_next_block(monkeypatch):
    """Tiles of 16 queries at positions 17..64 and blocks of 64 keys: the last tile's last
    query sits at the second block's first key, which it sees."""
    small_blocks(monkeypatch, 16 * 64, keys=64)
    mx.random.seed(4)
    L, n, D = 48, 128, 8
    q, k, v = mx.random.normal((1, 1, L, D)), mx.random.normal((1, 1, n, D)), mx.random.normal((1, 1, n, D))
    visible = np.arange(n)[None] <= np.arange(17, 17 + L)[:, None]
    got = dense_attention(q, k, v, scale=0.5, q_start=17, k_start=0, causal=True, mask=None)
    check(got, numpy_attention(q, k, v, 0.5, visible))


def test_a_tile_takes_the_keys_it_sees_whole_in_blocks_of_the_budget(monkeypatch):
    """Tiles of 16 queries, blocks of at most 64 keys: a tile takes the keys before its first
    query in runs of up to 64 (four of the tiles' 16-key steps), shared by the tiles that see
    them, and only its own square masked: 18 blocks for 8 tiles instead of one per tile and
    step (36), the same scores computed, the same result."""
    small_blocks(monkeypatch, 16 * 64, keys=64)
    computed = counted_causal_chunk(128, 8, seed=6)
    assert len(computed) == sum(-(-t // 4) + 1 for t in range(8)) == 18
    assert sum(computed) == sum(16 * 16 * (t + 1) for t in range(8)) and max(computed) <= 16 * 64
