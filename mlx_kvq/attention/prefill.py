"""The prefill path on GPUs: a layer's packed run dequantized once, then MLX's fused
attention over all its keys."""

import mlx.core as mx

from .. import format, kernels
from ..kernels.backend import eval_now

# largest transient unquantized copy of one layer's K/V (GPU prefill), per backend: a Mac's
# unified memory holds the model, the cache and this copy, so Metal takes less; a layer
# over it takes the blocked reference, whose memory is bounded by a block of keys
PREFILL_COPY_BYTES = {"cuda": 1 << 30, "metal": 1 << 28}


def prefill_dequantized(q, view, scale, mask, sinks):
    """Prefill chunks on a GPU: the layer's packed run dequantized to the cache's dtype
    (float32 for a float16 layer near the float16 maximum) in one go, then MLX's fused
    ``scaled_dot_product_attention`` over all keys.

    The tiled prefill kernel is correct but slower than this on CUDA, and the
    reference materializes fp32 scores block by block; a chunk of thousands of
    queries is compute-bound, so one transient unquantized copy of one layer's keys
    and values (at most ``PREFILL_COPY_BYTES`` of the backend, freed after the layer) is the fast
    path. Decode never takes it. Returns the output or None where it does not apply.
    """
    f = view.format
    if kernels.is_decode(q.shape[2]) or not kernels.enabled():
        return None
    dt = _attend_dtype(q, [view])
    k, v, n = view.packed
    if n:
        B, Hkv = k[0].shape[:2]
        d = format.unpacked_dim(k[0].shape[-1], f.k_bits) + format.unpacked_dim(v[0].shape[-1], f.v_bits)
        if B * Hkv * view.offset * d * dt.size > PREFILL_COPY_BYTES.get(kernels.backend_name(), 1 << 30):
            return None
    keys, values = view.stored("keys", dt), view.stored("values", dt)
    return mx.fast.scaled_dot_product_attention(
        q.astype(dt), keys, values, scale=scale, mask=mask,
        sinks=None if sinks is None else sinks.astype(dt),  # MLX's CUDA backend: sinks in the output's dtype
    )


# the most a batched prefill pads its rows' keys to: (rows x the longest) / (all rows' keys)
ROWS_PADDING = 2


def prefill_dequantized_rows(q, views, takes, masks, scale, sinks):
    """``prefill_dequantized`` for the rows of a batch cache (``RowsKVCache``) in one go: each
    row's stored run dequantized as ``prefill_dequantized`` dequantizes it, right-padded to
    the longest, and one fused attention over all rows, each row's first ``takes[b]`` queries
    seeing that row's keys as its own mask (``masks[b]``: ``"causal"`` or None) lets them alone.
    Row by row this was one transient copy, one attention and one sync per row and layer
    (BENCHMARKS.md, "What the remaining gap is"). The queries past a row's take get that
    row's keys too and are left to the caller. None where it does not apply (then row by row):
    rows of very different lengths (``ROWS_PADDING``), over ``PREFILL_COPY_BYTES``."""
    f = views[0].format
    if (kernels.is_decode(min(takes)) or not kernels.enabled() or any(v.format != f for v in views)
            or any(not (m is None or (isinstance(m, str) and m == "causal")) for m in masks)):
        return None
    dt = _attend_dtype(q, views)
    keys = [v.stored("keys", dt) for v in views]
    values = [v.stored("values", dt) for v in views]
    if any(k is None or k.shape[2] != v.offset for k, v in zip(keys, views)):
        return None
    T = max(k.shape[2] for k in keys)
    if len(views) * T > ROWS_PADDING * sum(k.shape[2] for k in keys):
        return None  # rows of very different lengths: padding would multiply the work
    H, d = keys[0].shape[1], keys[0].shape[-1] + values[0].shape[-1]
    if len(views) * H * T * d * dt.size > PREFILL_COPY_BYTES.get(kernels.backend_name(), 1 << 30):
        return None
    pad = lambda x: mx.pad(x, [(0, 0), (0, 0), (0, T - x.shape[2]), (0, 0)]) if x.shape[2] < T else x
    keys, values = mx.concatenate([pad(k) for k in keys]), mx.concatenate([pad(v) for v in values])
    # row b's keys are its first T_b columns; its query i sits at position T_b - n_b + i
    Tb = mx.array([v.offset for v in views])[:, None, None]
    first = Tb - mx.array(takes)[:, None, None]
    causal = mx.array([m is not None for m in masks])[:, None, None]
    i, j = mx.arange(q.shape[2])[None, :, None], mx.arange(T)[None, None, :]
    mask = ((j < Tb) & (~causal | (j <= first + i)))[:, None]
    return mx.fast.scaled_dot_product_attention(
        q.astype(dt), keys, values, scale=scale, mask=mask,
        sinks=None if sinks is None else sinks.astype(dt),
    )


def _attend_dtype(q, views):
    """The dtype the views' keys are dequantized to and attended in: the cache's, float32 for
    a float16 layer near the float16 maximum. Everything up to this layer's queries is
    evaluated first: left lazy, MLX kept every layer's transients alive at once (32k tokens,
    32 layers: 8-10 GiB instead of one layer's 0.25 GiB; the first chunk, with nothing packed
    yet, 3.1 GiB instead of ~0.5; benchmarks/lab/diag_peak.py). One sync per layer and chunk."""
    big = [x for v in views for x in _near_float16_max(v)]
    eval_now(q, *big)
    return mx.float32 if _any_true(big) else views[0].store_dtype


def _near_float16_max(view):
    """Whether a layer that would attend in float16 holds values near or beyond its maximum
    (lazy booleans; none where it attends in another dtype). The packed run: ``mx.dequantize``
    computes ``scale * q + bias`` in float16, and ``scale * q`` overflows (``-7500 * 15 +
    60000``) although the result fits; and the queries that meet such keys are float16
    subnormals, which MLX's float16 attention scales further down. A float32 model's
    unquantized runs are float32 and may hold values beyond float16. Such a layer is
    dequantized, and attended to, in float32 (``format.dequantize``)."""
    if view.store_dtype != mx.float16:
        return []
    k, v, n = view.packed
    f = view.format
    limit = float(mx.finfo(mx.float16).max)
    big = []
    if n and f.mode == "affine":
        big = [mx.abs(p[1][:, :, :n]).max() * (2**bits - 1) > limit for p, bits in ((k, f.k_bits), (v, f.v_bits))]
    dense = [x for run in (view.sinks, view.window) for x in run if x is not None and x.dtype == mx.float32]
    return big + [mx.abs(x).max() > limit for x in dense if x.size]


def _any_true(flags):
    """Whether any of the evaluated booleans ``flags`` is true (no sync: they were evaluated
    with the queries); False inside ``mx.compile`` or a transform, which cannot branch on them."""
    try:
        return any(x.item() for x in flags)
    except ValueError:
        return False
