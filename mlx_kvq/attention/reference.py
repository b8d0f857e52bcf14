"""The reference attention: partial results ``(out, lse)`` over runs of keys, merged
exactly by log-sum-exp. It works on every backend: it walks the keys in blocks with an
online softmax in float32 and dequantizes one block at a time, so extra memory is
bounded by ``BLOCK_ELEMENTS`` whatever the context length."""

import mlx.core as mx

from .. import format

BLOCK_ELEMENTS = 1 << 23  # float32 elements of scores + dequantized K/V per block (CPU)
GPU_BLOCK_ELEMENTS = 1 << 25  # fewer, larger blocks on GPUs: launches cost more than bytes there


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


def packed_reference(q, k, v, n, fmt, **args):
    """Partial attention over the first ``n`` tokens of a packed run, dequantized to
    float32 one block of keys at a time (``fmt``: the cache's ``KVFormat``)."""
    deq = lambda p, bits, a, b: format.dequantize(
        tuple(x[:, :, a:b] for x in p), bits, fmt.group_size, fmt.mode, mx.float32
    )
    dims = (k[0].shape[1], format.unpacked_dim(k[0].shape[-1], fmt.k_bits),
            format.unpacked_dim(v[0].shape[-1], fmt.v_bits))
    return blocked_attention(q, _dense_qk(lambda a, b: deq(k, fmt.k_bits, a, b)),
                             _dense_pv(lambda a, b: deq(v, fmt.v_bits, a, b)), n, dims, **args)


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
    return blocked_attention(q, lambda qf, a, b: qmm(qf, k, fmt.k_bits, a, b, True),
                             lambda p, a, b: qmm(p, v, fmt.v_bits, a, b, False), n, dims, **args)


def dense_attention(q, k, v, **args):
    """Partial attention over unquantized keys/values (B, Hkv, n, D)."""
    qk = _dense_qk(lambda a, b: k[:, :, a:b].astype(mx.float32))
    pv = _dense_pv(lambda a, b: v[:, :, a:b].astype(mx.float32))
    return blocked_attention(q, qk, pv, k.shape[2], (k.shape[1], k.shape[-1], v.shape[-1]), **args)


def _dense_qk(get_k):
    """Scores of (B, Hkv, rep, L, D) queries against keys ``get_k(a, b)`` (B, Hkv, b - a, D)."""
    return lambda qf, a, b: qf @ get_k(a, b)[:, :, None].swapaxes(-1, -2)


def _dense_pv(get_v):
    """Weights (B, Hkv, rep, L, b - a) times values ``get_v(a, b)`` (B, Hkv, b - a, Dv)."""
    return lambda p, a, b: p @ get_v(a, b)[:, :, None]


def blocked_attention(q, qk, pv, n, dims, *, scale, q_start, k_start, causal, mask, k_pos=None):
    """Reference partial attention: keys in blocks, online softmax in float32.

    ``qk(qf, a, b)`` gives the scores (B, Hkv, rep, L, b - a) of the scaled float32
    queries ``qf`` (B, Hkv, rep, L, D) against keys a..b; ``pv(p, a, b)`` the weights ``p``
    of that shape times values a..b, (B, Hkv, rep, L, Dv). ``dims`` is ``(Hkv, Dk, Dv)``.
    Key j sits at position ``k_start + j``, or ``k_pos[j]``.

    Returns ``out`` (B, Hq, L, Dv) float32 normalized over visible keys and ``lse``
    (B, Hq, L); rows with no visible key get ``out = 0`` and ``lse = -inf``.
    """
    B, Hq, L, D = q.shape
    Hkv, Dk, Dv = dims
    rep = Hq // Hkv
    budget = GPU_BLOCK_ELEMENTS if mx.default_device() == mx.gpu else BLOCK_ELEMENTS
    block = max(64, budget // max(1, B * (Hq * L + Hkv * (Dk + Dv))))
    qf = (q.astype(mx.float32) * scale).reshape(B, Hkv, rep, L, D)
    q_pos = mx.arange(q_start, q_start + L)[:, None]
    mask5 = _mask5(mask, Hkv, rep)

    result = None
    for a in range(0, n, block):
        b = min(n, a + block)
        s = qk(qf, a, b)  # (B, Hkv, rep, L, b - a)
        if causal:
            kp = mx.arange(k_start + a, k_start + b) if k_pos is None else k_pos[a:b]
            s = mx.where(kp[None] <= q_pos, s, -mx.inf)
        if mask5 is not None:
            mb = mask5[..., a:b]
            s = mx.where(mb, s, -mx.inf) if mb.dtype == mx.bool_ else s + mb.astype(mx.float32)
        # Each block is a self-contained softmax merged by log-sum-exp: its scores are
        # dead once its small (out, lse) exist.
        m = s.max(axis=-1, keepdims=True)
        m = mx.where(m > -mx.inf, m, 0.0)
        p = mx.exp(s - m)
        l = p.sum(axis=-1)
        seen = l > 0
        out = pv(p, a, b) / mx.where(seen, l, 1.0)[..., None]
        lse = mx.where(seen, m[..., 0] + mx.log(mx.where(seen, l, 1.0)), -mx.inf)
        result = (out, lse) if result is None else merge([result, (out, lse)])
        if b < n:  # schedule block by block, so one block's scores are alive at a time
            mx.async_eval(result)
    if result is None:
        return mx.zeros((B, Hq, L, Dv)), mx.full((B, Hq, L), -mx.inf)
    out, lse = result
    return out.reshape(B, Hq, L, Dv), lse.reshape(B, Hq, L)


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
