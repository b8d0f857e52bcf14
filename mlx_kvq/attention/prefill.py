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
    dt = _attend_dtype(q, view)
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


def _attend_dtype(q, view):
    """The dtype the view's keys are dequantized to and attended in: the cache's, float32 for
    a float16 layer near the float16 maximum. Everything up to this layer's queries is
    evaluated first: left lazy, MLX kept every layer's transients alive at once (32k tokens,
    32 layers: 8-10 GiB instead of one layer's 0.25 GiB; the first chunk, with nothing packed
    yet, 3.1 GiB instead of ~0.5; benchmarks/lab/diag_peak.py). One sync per layer and chunk."""
    big = _near_float16_max(view)
    eval_now(q, *big)
    return mx.float32 if _any_true(big) else view.store_dtype


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
