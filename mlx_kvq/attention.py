"""Attention over a QuantizedKVCache: dispatch to fused kernels or the reference.

Each run of the cache (sinks, packed, recent window) gives a partial result
``(out, lse)``: the softmax-weighted values over that run's keys and the
log-sum-exp of its scores. Partials merge exactly by log-sum-exp, so the packed
run can go to a fused kernel while the short unquantized runs take the reference.

The reference works on every backend: it walks the keys in blocks with an online
softmax in float32 and dequantizes one block at a time, so extra memory is
bounded by ``BLOCK_ELEMENTS`` whatever the context length.
"""

import mlx.core as mx

from . import kernels, quant
from .rotation import rotate

BLOCK_ELEMENTS = 1 << 23  # float32 elements of scores + dequantized K/V per block (CPU)
GPU_BLOCK_ELEMENTS = 1 << 25  # fewer, larger blocks on GPUs: launches cost more than bytes there


def causal_mask(N, offset, window_size=None):
    """Boolean (N, offset + N) mask: query i sees key j iff j <= offset + i (and within the window)."""
    q = mx.arange(offset, offset + N)[:, None]
    k = mx.arange(offset + N)[None]
    mask = q >= k
    if window_size is not None:
        mask = mask & (q < k + window_size)
    return mask


def quantized_sdpa(queries, view, scale, mask=None, sinks=None):
    """``mx.fast.scaled_dot_product_attention`` over a cache view (see ``QuantizedKVCache``).

    ``queries``: (B, Hq, L, D). ``mask``: None, ``"causal"``, or a bool/additive array
    broadcastable to (B, Hq, L, offset). ``sinks``: optional per-head logits (Hq,)
    added to every softmax denominator, as in ``mx.fast.scaled_dot_product_attention``.
    """
    cache = view.cache
    q = queries
    d = cache.padded_dim(q.shape[-1])
    if d != q.shape[-1]:
        q = mx.pad(q, [(0, 0)] * 3 + [(0, d - q.shape[-1])])
    causal = isinstance(mask, str)
    if causal and mask != "causal":
        raise ValueError(f"Unsupported mask {mask!r}.")
    array_mask = None if causal or mask is None else mask
    # Decode: the decode kernel and its merge do it all (rotations, the model's dtype): on
    # GPUs every extra op costs host time, which decode steps are short of.
    whole = sinks is None and (not cache.rotate or kernels.rotates_in_kernel(d))
    if whole:
        fused = _fused_decode(q, view, scale, causal, array_mask, cache.rotate, queries.dtype)
        if fused is not None:
            return _finish(fused[0], cache.v_dim, queries.dtype)
    if cache.rotate:
        q = rotate(q)

    out = _gpu_prefill(q, view, scale, mask, sinks)  # in the cache's dtype
    if out is None:  # float32 (out, lse): sinks applied here, then the model's dtype
        fused = None if whole else _fused_decode(q, view, scale, causal, array_mask)
        out, lse = fused if fused is not None else merge(_segment_parts(q, view, scale, causal, array_mask))
        if sinks is not None:
            s = sinks.astype(mx.float32).reshape(1, -1, 1)
            total = mx.logaddexp(lse, s)
            out = out * mx.exp(lse - total)[..., None]
        if cache.rotate == "kv":
            out = out.astype(queries.dtype)  # rotate back in the model's precision
    if cache.rotate == "kv":
        out = rotate(out, inverse=True)
    return _finish(out, cache.v_dim, queries.dtype)


def _finish(out, v_dim, dtype):
    """Drop the zero-padded value dims and cast (no ops where there is nothing to do)."""
    if out.shape[-1] != v_dim:
        out = out[..., :v_dim]
    return out if out.dtype == dtype else out.astype(dtype)


PREFILL_COPY_BYTES = 1 << 30  # largest transient unquantized copy of one layer's K/V (GPU prefill)


def _gpu_prefill(q, view, scale, mask, sinks):
    """Prefill chunks on a GPU: the layer's packed run dequantized to the model dtype
    in one go, then MLX's fused ``scaled_dot_product_attention`` over all keys.

    The tiled prefill kernel is correct but slower than this on CUDA, and the
    reference materializes fp32 scores block by block; a chunk of thousands of
    queries is compute-bound, so one transient unquantized copy of one layer's keys
    and values (at most ``PREFILL_COPY_BYTES``, freed after the layer) is the fast
    path. Decode never takes it. Returns the output or None where it does not apply.
    """
    cache = view.cache
    if q.shape[2] <= kernels.DECODE_MAX_L or not kernels.enabled():
        return None
    k, v, n = view.packed
    dt = cache.store_dtype
    B, Hkv = k[0].shape[:2] if n else (None, None)
    if n:
        d = k[0].shape[-1] * 32 // cache.k_bits + v[0].shape[-1] * 32 // cache.v_bits
        if B * Hkv * (cache.offset) * d * dt.size > PREFILL_COPY_BYTES:
            return None
    # Evaluate everything up to this layer's queries first: left lazy, MLX kept every
    # layer's transients alive at once (32k tokens, 32 layers: 8-10 GiB instead of one
    # layer's 0.25 GiB; the first chunk, with nothing packed yet, 3.1 GiB instead of
    # ~0.5; benchmarks/diag_peak.py). One sync per layer and chunk.
    eval_now(q)
    parts_k, parts_v = [], []
    if view.sinks[0] is not None and view.sinks[0].shape[2]:
        parts_k.append(view.sinks[0])
        parts_v.append(view.sinks[1])
    if n:
        deq = lambda p, bits: quant.dequantize(
            tuple(x[:, :, :n] for x in p), bits, cache.group_size, cache.mode, dt
        )
        parts_k.append(deq(k, cache.k_bits))
        parts_v.append(deq(v, cache.v_bits))
    if view.window[0] is not None and view.window[0].shape[2]:
        parts_k.append(view.window[0])
        parts_v.append(view.window[1])
    keys = mx.concatenate(parts_k, axis=2) if len(parts_k) > 1 else parts_k[0]
    values = mx.concatenate(parts_v, axis=2) if len(parts_v) > 1 else parts_v[0]
    return mx.fast.scaled_dot_product_attention(
        q.astype(dt), keys, values, scale=scale, mask=mask, sinks=sinks
    )


def eval_now(*x):
    """``mx.eval``, except inside ``mx.compile`` or a transform (nothing to sync there).
    Bounds memory where MLX's lazy schedule would keep many layers' transients alive."""
    try:
        mx.eval(*x)
    except ValueError:  # inside mx.compile / a transform: nothing to sync
        pass


def _fused_decode(q, view, scale, causal, mask, rotate=None, out_dtype=mx.float32):
    """(out, lse) from the one-launch decode kernel over the whole view, or None
    where it does not apply (prefill, formats it lacks, no GPU, MLX_KVQ_REFERENCE=1).
    ``rotate``: the kernels rotate ``q`` (and, for ``"kv"``, rotate the output back)."""
    cache = view.cache
    if q.shape[2] > kernels.DECODE_MAX_L or not kernels.enabled():
        return None
    k, v, n = view.packed
    if not (n > 0 and k is not None):
        k = v = None
    present = lambda run: run if run[0] is not None and run[0].shape[2] else None
    sinks = present(view.sinks)
    wk, wv, nw, nwv = view.window_buffers
    if wk is not None and nw and nw == nwv:
        window = (wk, wv)  # the whole buffers: the kernel reads their first nw rows
    else:
        window = present(view.window)
        nw = 0 if window is None else window[0].shape[2]
    dense = sinks or window
    if k is None and dense is None:
        return None
    fmt = dict(k_bits=cache.k_bits, v_bits=cache.v_bits, group_size=cache.group_size)
    dense_dtype = dense[0].dtype if dense else None
    if not kernels.decode_supports(q, k, v, dense_dtype, mode=cache.mode, mask=mask, **fmt):
        return None
    return kernels.decode_attention(
        q, k, v, n, sinks, window, nw=nw, scale=scale, q_start=view.q_start, causal=causal, mask=mask,
        rotate_q=bool(rotate), rotate_out=rotate == "kv", out_dtype=out_dtype, **fmt
    )


def _segment_parts(q, view, scale, causal, array_mask):
    """Partial (out, lse) per run of the view: packed kernel or reference, dense reference."""
    cache = view.cache
    parts = []
    for kind, k, v, k_start, n, pos in view.segments():
        m = array_mask
        if m is not None:
            m = m[..., k_start : k_start + n] if pos is None else mx.take(m, pos, axis=-1)
        args = dict(scale=scale, q_start=view.q_start, k_start=k_start, causal=causal, mask=m)
        if kind == "packed":
            parts.append(packed_attention(q, k, v, n, cache, **args))
        else:
            parts.append(dense_attention(q, k, v, k_pos=pos, **args))
    return parts


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


def packed_attention(q, k, v, n, cache, **args):
    """Partial attention over the packed run: the fused decode kernel when it applies.

    Prefill chunks (more than ``kernels.DECODE_MAX_L`` queries) take the reference: the
    tiled prefill kernel is correct but measured slower than it (benchmarks/NOTES_kernels.md).
    """
    fmt = dict(k_bits=cache.k_bits, v_bits=cache.v_bits, group_size=cache.group_size, mode=cache.mode)
    if q.shape[2] <= kernels.DECODE_MAX_L and kernels.enabled():  # MLX_KVQ_REFERENCE=1: never
        if kernels.supports(q, k, v, mask=args["mask"], **fmt):
            return kernels.packed_attention(q, k, v, n, **fmt, **args)
    get_k = lambda a, b: quant.dequantize(
        tuple(x[:, :, a:b] for x in k), cache.k_bits, cache.group_size, cache.mode, mx.float32
    )
    get_v = lambda a, b: quant.dequantize(
        tuple(x[:, :, a:b] for x in v), cache.v_bits, cache.group_size, cache.mode, mx.float32
    )
    dims = (k[0].shape[1], k[0].shape[-1] * 32 // cache.k_bits, v[0].shape[-1] * 32 // cache.v_bits)
    return blocked_attention(q, get_k, get_v, n, dims, **args)


def dense_attention(q, k, v, **args):
    """Partial attention over unquantized keys/values (B, Hkv, n, D)."""
    get_k = lambda a, b: k[:, :, a:b].astype(mx.float32)
    get_v = lambda a, b: v[:, :, a:b].astype(mx.float32)
    return blocked_attention(q, get_k, get_v, k.shape[2], (k.shape[1], k.shape[-1], v.shape[-1]), **args)


def blocked_attention(q, get_k, get_v, n, dims, *, scale, q_start, k_start, causal, mask, k_pos=None):
    """Reference partial attention: keys in blocks, online softmax in float32.

    ``get_k(a, b)``/``get_v(a, b)`` give keys/values a..b as float32 (B, Hkv, b - a, D);
    ``dims`` is ``(Hkv, Dk, Dv)``. Key j sits at position ``k_start + j``, or ``k_pos[j]``.

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
        k = get_k(a, b)
        s = qf @ k[:, :, None].swapaxes(-1, -2)  # (B, Hkv, rep, L, b - a)
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
        out = (p @ get_v(a, b)[:, :, None]) / mx.where(seen, l, 1.0)[..., None]
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
