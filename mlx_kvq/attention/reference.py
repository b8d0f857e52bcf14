"""The reference attention: partial results ``(out, lse)`` over runs of keys, merged
exactly by log-sum-exp. It works on every backend: it walks the keys in blocks with an
online softmax in float32 and dequantizes one block at a time, so extra memory is
bounded by ``BLOCK_ELEMENTS`` whatever the context length."""

import mlx.core as mx

from .. import format
from ..kernels import cpu
from .softmax import exp
from .streams import cores, keep_cpu_buffers, on, spread, streams_for

BLOCK_ELEMENTS = 1 << 20  # float32 elements of scores + dequantized K/V per block (CPU)
GPU_BLOCK_ELEMENTS = 1 << 25  # fewer, larger blocks on GPUs: launches cost more than bytes there
BLOCK_KEYS = 512  # keys per block where the queries are tiled to fit the budget


def merge(parts):
    """Combine partial ``(out, lse)`` results over disjoint key sets."""
    if len(parts) == 1:
        return parts[0]
    lse = parts[0][1]
    for _, l in parts[1:]:
        lse = mx.logaddexp(lse, l)
    finite = lse > -mx.inf
    safe = mx.where(finite, lse, 0.0)
    out = 0
    for o, l in parts:
        w = mx.where(finite, mx.exp(l - safe), 0.0)
        out = out + o * w[..., None]
    return out, lse


def packed_reference(q, k, v, n, fmt, body=True, **args):
    """Partial attention over the first ``n`` tokens of a packed run, dequantized to
    float32 one block of keys at a time (``fmt``: the cache's ``KVFormat``); on the CPU the
    CPU body (``kernels.cpu``) reads the codes itself where it applies (and ``body``)."""
    if body and cpu.applies(args["mask"], args.get("k_pos")) and cpu.packed_applies(fmt, k[0], v[0]):
        out = _cpu_part(q, cpu.packed(k, v, n, fmt, args["k_start"]), args)
        if out is not None:
            return out
    deq = lambda p, bits, a, b: format.dequantize(
        tuple(x[:, :, a:b] for x in p), bits, fmt.group_size, fmt.mode, mx.float32
    )
    dims = (k[0].shape[1], format.unpacked_dim(k[0].shape[-1], fmt.k_bits),
            format.unpacked_dim(v[0].shape[-1], fmt.v_bits))
    block = lambda a, b: _dense_products(deq(k, fmt.k_bits, a, b), deq(v, fmt.v_bits, a, b))
    return blocked_attention(q, block, n, dims, kv=(k, v), **args)


def packed_quantized_matmul(q, k, v, n, fmt, **args):
    """:func:`packed_reference` with the products taken on the packed words by
    ``mx.quantized_matmul`` (no dequantized copy of a block): on the CPU 4-9x faster than
    dequantizing (SmolLM2-135M at 2k keys: ``bench_generate.py --model embedded``). Its
    products differ from the dequantized ones by the fp16 rounding ``mx.dequantize``
    applies to each dequantized element (relative 1e-3 of a score)."""
    qmm = lambda x, p, bits, a, b, t: mx.quantized_matmul(
        x, *(y[:, :, None, a:b] for y in p), transpose=t, group_size=fmt.group_size, bits=bits, mode=fmt.mode)
    dims = (k[0].shape[1], format.unpacked_dim(k[0].shape[-1], fmt.k_bits),
            format.unpacked_dim(v[0].shape[-1], fmt.v_bits))
    block = lambda a, b: (lambda qf: qmm(qf, k, fmt.k_bits, a, b, True),
                          lambda p: qmm(p, v, fmt.v_bits, a, b, False))
    return blocked_attention(q, block, n, dims, kv=(k, v), **args)


def dense_attention(q, k, v, body=True, **args):
    """Partial attention over unquantized keys/values (B, Hkv, n, D): the CPU body where
    it applies (and ``body``), else MLX ops in blocks."""
    if body and k.shape[2] and cpu.applies(args["mask"], args.get("k_pos")):
        out = _cpu_part(q, cpu.dense(k, v, args["k_start"]), args)
        if out is not None:
            return out
    block = lambda a, b: _dense_products(k[:, :, a:b].astype(mx.float32), v[:, :, a:b].astype(mx.float32))
    return blocked_attention(q, block, k.shape[2], (k.shape[1], k.shape[-1], v.shape[-1]), kv=(k, v), **args)


def _cpu_part(q, run, args):
    """``(out, lse)`` over one run from the CPU body (``kernels.cpu``), or None (inside a transform)."""
    return cpu.attention(q, [run], scale=args["scale"], q_start=args["q_start"], causal=args["causal"],
                         threads=cores())


def _dense_products(k, v):
    """``(qk, pv)`` over a block's float32 keys and values (B, Hkv, b - a, D): the scores of
    (B, Hkv, rep, L, D) queries, and weights (B, Hkv, rep, L, b - a) times the values."""
    return lambda qf: qf @ k[:, :, None].swapaxes(-1, -2), lambda p: p @ v[:, :, None]


def blocked_attention(q, block, n, dims, *, scale, q_start, k_start, causal, mask, k_pos=None, kv=()):
    """Reference partial attention: keys in blocks, online softmax in float32.

    ``block(a, b)`` gives the products over keys a..b, computed once for all queries:
    ``(qk, pv)``, ``qk(qf)`` the scores (B, Hkv, rep, Lt, b - a) of scaled float32 queries
    ``qf`` (B, Hkv, rep, Lt, D), ``pv(p)`` the weights ``p`` of that shape times the values,
    (B, Hkv, rep, Lt, Dv). ``dims`` is ``(Hkv, Dk, Dv)``. Key j sits at position
    ``k_start + j``, or ``k_pos[j]``. ``kv``: the arrays ``block`` reads, evaluated with the
    queries before the tiles go to the CPU's streams (``attention.streams``).

    A block's scores stay within the backend's budget (``BLOCK_ELEMENTS`` on the CPU, where
    larger blocks fall out of the processor's caches): a chunk's queries
    go in tiles where they would not fit beside ``BLOCK_KEYS`` keys. With a causal mask over
    keys in order a tile skips the blocks after its last query, masks only the block that
    starts at its first query and takes the keys before it in blocks of up to the budget
    (``_plan``; a 2048-token chunk computes about half of its scores).

    Returns ``out`` (B, Hq, L, Dv) float32 normalized over visible keys and ``lse``
    (B, Hq, L); rows with no visible key get ``out = 0`` and ``lse = -inf``.
    """
    B, Hq, L, D = q.shape
    Hkv, Dk, Dv = dims
    rep = Hq // Hkv
    budget = GPU_BLOCK_ELEMENTS if mx.default_device() == mx.gpu else BLOCK_ELEMENTS
    keep_cpu_buffers()
    tile = L if B * Hq * L * BLOCK_KEYS <= budget else max(16, budget // (B * Hq * BLOCK_KEYS))
    tile = -(-L // -(-L // tile))  # tiles of (nearly) equal size
    keys = max(64, budget // max(1, B * (Hq * tile + Hkv * (Dk + Dv))))
    qf = (q.astype(mx.float32) * scale).reshape(B, Hkv, rep, L, D)
    tiles = [(i, min(L, i + tile)) for i in range(0, L, tile)]
    qfs = [qf[..., i:j, :] for i, j in tiles] if len(tiles) > 1 else [qf]
    mask5 = _mask5(mask, Hkv, rep)
    ordered = causal and k_pos is None  # key positions rise with j: whole blocks seen or hidden
    cuts = [q_start + i - k_start for i, _ in tiles] if ordered else []

    streams = streams_for(len(tiles), q, kv)  # the CPU's cores: a tile per stream in turn
    results, parts = [None] * len(tiles), [[] for _ in tiles]  # parts: each tile's (out, lse) per block
    plan = _plan(_key_blocks(n, keys, cuts), keys, tiles, q_start, k_start, causal, ordered)
    with spread(streams, results):
        for (a, b), users in plan:
            qk, pv = block(a, b)
            for t, masked in users:
                i, j = tiles[t]
                first, last = q_start + i, q_start + j - 1  # the tile's query positions
                with on(streams, t):
                    s = qk(qfs[t])  # (B, Hkv, rep, Lt, b - a)
                    if masked:
                        kp = mx.arange(k_start + a, k_start + b) if k_pos is None else k_pos[a:b]
                        s = mx.where(kp[None] <= mx.arange(first, last + 1)[:, None], s, -mx.inf)
                    if mask5 is not None:
                        mb = mask5[..., a:b] if mask5.shape[-2] == 1 else mask5[..., i:j, a:b]
                        s = mx.where(mb, s, -mx.inf) if mb.dtype == mx.bool_ else s + mb.astype(mx.float32)
                    parts[t].append(_block_part(s, pv))
            if b < n:  # schedule block by block, so one block's scores are alive at a time
                mx.async_eval(parts)
        for t, p in enumerate(parts):  # each tile's parts merged at once: fewer ops than by pairs
            if p:
                with on(streams, t):
                    results[t] = merge(p)
    for t, (i, j) in enumerate(tiles):
        if results[t] is None:  # no key visible to the tile
            results[t] = mx.zeros((B, Hkv, rep, j - i, Dv)), mx.full((B, Hkv, rep, j - i), -mx.inf)
    out = mx.concatenate([o for o, _ in results], axis=-2) if len(results) > 1 else results[0][0]
    lse = mx.concatenate([l for _, l in results], axis=-1) if len(results) > 1 else results[0][1]
    return out.reshape(B, Hq, L, Dv), lse.reshape(B, Hq, L)


def _key_blocks(n, keys, cuts):
    """Blocks ``(a, b)`` of at most ``keys`` of ``n`` keys, nearly equal, with a boundary at
    each of ``cuts``: under a causal mask a tile's first query, so that only the block of
    the tile's own positions crosses it, no larger than the tile (a first chunk on the CPU,
    SmolLM2's shape: 512 tokens 19 against 25 ms with blocks of equal size, 2048 tokens 310
    against 358 ms; ``benchmarks/lab/cpu_causal_blocks.py``)."""
    edges = sorted({0, n, *(c for c in cuts if 0 < c < n)})
    blocks = []
    for a, b in zip(edges, edges[1:]):
        parts = -(-(b - a) // keys)
        blocks += [(a + (b - a) * i // parts, a + (b - a) * (i + 1) // parts) for i in range(parts)]
    return blocks


def _plan(intervals, keys, tiles, q_start, k_start, causal, ordered):
    """The blocks of keys each query tile attends to, as ``[((a, b), [(tile, masked), ...])]``
    in key order. ``intervals`` (``_key_blocks``) cut the keys at each tile's first query: a
    tile skips those after its last query and masks the one of its own positions; the runs of
    intervals it sees whole go as blocks of up to ``keys``, grouped from the first key on, so
    that tiles share them (a first chunk of 2048 tokens on the CPU, SmolLM2's shape, 512k-element
    blocks: 75 blocks a layer instead of 171, a prompt's attention 5.3-6.1 against 6.4-7.1 s;
    ``benchmarks/lab/results/cpu_prefill_blocks.txt``)."""
    groups, width = [], keys + 1  # runs of consecutive intervals up to ``keys`` wide
    for a, b in intervals:
        if width + b - a > keys:
            groups.append([])
            width = 0
        groups[-1].append((a, b))
        width += b - a
    plan = {}
    for t, (i, j) in enumerate(tiles):
        first, last = q_start + i, q_start + j - 1
        for group in groups:
            whole = []
            for a, b in group:
                if ordered and k_start + a > last:
                    break  # every key from here on after every query of the tile
                if causal and not (ordered and k_start + b - 1 <= first):
                    plan.setdefault((a, b), []).append((t, True))
                else:
                    whole.append((a, b))
            if whole:
                plan.setdefault((whole[0][0], whole[-1][1]), []).append((t, False))
    return sorted(plan.items())


def _block_part(s, pv):
    """``(out, lse)`` of one block's scores ``s``: a self-contained softmax merged by
    log-sum-exp, so the scores are dead once these small results exist."""
    m = s.max(axis=-1, keepdims=True)
    m = mx.where(m > -mx.inf, m, 0.0)
    p = exp(s, m)
    l = p.sum(axis=-1)
    seen = l > 0
    out = pv(p) / mx.where(seen, l, 1.0)[..., None]
    lse = mx.where(seen, m[..., 0] + mx.log(mx.where(seen, l, 1.0)), -mx.inf)
    return out, lse


def _mask5(mask, Hkv, rep):
    """A (B|1, Hq|1, L|1, n) mask as (B|1, Hkv|1, rep|1, L|1, n) to match GQA scores."""
    if mask is None:
        return None
    while mask.ndim < 4:
        mask = mask[None]
    B, H, L, n = mask.shape
    if H == 1:
        return mask[:, :, None]
    return mask.reshape(B, Hkv, rep, L, n)
