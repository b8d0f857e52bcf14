"""Attention over a cache view: the paths, in order, and the one rule that picks them.

Each run of the cache (sinks, packed, recent window) gives a partial result
``(out, lse)``: the softmax-weighted values over that run's keys and the
log-sum-exp of its scores. Partials merge exactly by log-sum-exp, so the packed
run can go to a fused kernel while the short unquantized runs take the reference.

``PATHS`` are tried in order; the first that applies computes the output:

1. ``decode_whole``: a decode step (``kernels.is_decode``) on a GPU, with no attention
   sinks and a rotation the kernel applies itself: one launch does it all (rotations,
   the model's dtype) -- on GPUs every extra op costs host time, which decode steps
   are short of.
2. ``prefill_dequantized``: a prefill chunk on a GPU whose layer fits
   ``PREFILL_COPY_BYTES`` unquantized: dequantize once, MLX's fused attention.
3. ``decode_one_pass``: a decode step without the kernels (the CPU): one softmax over
   the whole view, by the CPU body (``kernels.cpu``) where it is built, else by MLX ops.
4. ``partials``: the decode kernel's ``(out, lse)`` where it applies, else the packed
   run's kernel (in prefill: the ``simdgroup_matrix`` kernel on Metal, else the packed one;
   memory bounded by a block of keys) or reference and the unquantized runs' reference, merged.
"""

import math
import numbers

import mlx.core as mx

from .. import kernels
from ..rotation import rotate
from .one_pass import decode_one_pass, on_cpu, one_pass_attention
from .prefill import prefill_dequantized
from .reference import dense_attention, merge, packed_quantized_matmul, packed_reference


def quantized_sdpa(queries, view, scale, mask=None, sinks=None):
    """``mx.fast.scaled_dot_product_attention`` over a cache view (see ``QuantizedKVCache``).

    ``queries``: (B, Hq, L, D). ``mask``: None, ``"causal"``, or a bool/additive array
    broadcastable to (B, Hq, L, offset). ``sinks``: optional per-head logits (Hq,)
    added to every softmax denominator, as in ``mx.fast.scaled_dot_product_attention``.
    """
    _check_queries(queries, view)
    _check_arguments(queries, scale, mask, sinks)
    if view.q_start is None:
        view = view.for_queries(queries.shape[2])
    q = _padded(queries, view.format)
    for path in PATHS:
        out = path(q, view, scale, mask, sinks, queries.dtype)
        if out is not None:
            return _finish(out, view.v_dim, queries.dtype)
    raise AssertionError("the partials path always applies")


def _padded(q, fmt):
    """The queries zero-padded to the format's padded head dim (``KVFormat.padded_dim``)."""
    d = fmt.padded_dim(q.shape[-1])
    return q if d == q.shape[-1] else mx.pad(q, [(0, 0)] * 3 + [(0, d - q.shape[-1])])


def _check_queries(q, view):
    """A clear error for queries that do not fit the cache: (B, Hq, L, D) with the cache's
    key dim and a multiple of its KV heads."""
    if not isinstance(q, mx.array) or q.ndim != 4:
        raise ValueError(f"queries must be a (B, Hq, L, D) array, got {getattr(q, 'shape', type(q).__name__)}.")
    if view.kv_heads is None:
        return
    B, Hq, _, D = q.shape
    if D != view.k_dim:
        raise ValueError(f"queries have head dim {D}; the cache's keys have {view.k_dim}.")
    if view.kv_heads % B or Hq % (view.kv_heads // B):
        raise ValueError(f"{B} x {Hq} query heads do not fit the cache's {view.kv_heads} batch x KV heads "
                         "(query heads must be a multiple of the KV heads).")


def _check_arguments(q, scale, mask, sinks):
    """A clear error for a ``scale`` that is not a finite number, a ``mask`` that is not
    ``"causal"`` or an array whose leading axes broadcast to the scores' (B, Hq, L), and ``sinks``
    that are not one logit per query head; each names the bad value."""
    B, Hq, L, _ = q.shape
    if isinstance(scale, mx.array):
        if scale.size != 1:
            raise ValueError(f"scale must be a number, got an array of shape {scale.shape}.")
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}.")
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"Unsupported mask {mask!r}.")
    elif mask is not None:
        rows = (B, Hq, L)  # its key axis is each path's to read (a sliding window's is its own)
        if not isinstance(mask, mx.array) or not 1 <= mask.ndim <= 4 or _broadcasts(mask.shape[:-1], rows) != rows:
            raise ValueError(f"mask must be 'causal' or an array that broadcasts to (batch, query heads, "
                             f"queries, keys) = {rows + ('keys',)}, got {getattr(mask, 'shape', type(mask).__name__)}.")
    if sinks is not None and (not isinstance(sinks, mx.array) or sinks.shape != (Hq,)):
        raise ValueError(f"sinks must be one logit per query head, shape ({Hq},), "
                         f"got {getattr(sinks, 'shape', type(sinks).__name__)}.")


def _broadcasts(a, b):
    """The shape ``a`` and ``b`` broadcast to, or None."""
    try:
        return tuple(mx.broadcast_shapes(a, b))
    except ValueError:
        return None


def _whole_in_kernel(q, view, sinks):
    """Whether the decode kernel can do a whole step: no sinks, a rotation it applies."""
    return sinks is None and (not view.format.rotate or kernels.rotates_in_kernel(q.shape[-1]))


def decode_whole(q, view, scale, mask, sinks, dtype):
    if not _whole_in_kernel(q, view, sinks):
        return None
    rot = view.format.rotate
    fused = _fused_decode(q, view, scale, mask, rotate=rot, out_dtype=dtype)
    if fused is DISABLED:  # the kernel failed its self-check
        return reference_path(q, view, scale, mask, sinks, dtype)
    return None if fused is None else fused[0]


def prefill_path(q, view, scale, mask, sinks, dtype):
    if kernels.is_decode(q.shape[2]) or not kernels.enabled():
        return None
    rot = view.format.rotate
    out = prefill_dequantized(rotate(q) if rot else q, view, scale, mask, sinks)  # in the cache's dtype
    if out is None:
        return None
    return rotate(out, inverse=True) if rot == "kv" else out


def partials(q, view, scale, mask, sinks, dtype, use_kernels=True):
    rot = view.format.rotate
    q0, q = q, rotate(q.astype(mx.float32)) if rot else q  # float32: q R can exceed float16
    fused = None
    if use_kernels and not _whole_in_kernel(q, view, sinks):
        fused = _fused_decode(q, view, scale, mask)
        if fused is DISABLED:
            return reference_path(q0, view, scale, mask, sinks, dtype)
    if fused is None:
        parts = _segment_parts(q, view, scale, mask, use_kernels)
        if not parts:  # no keys at all (an empty cache): an output of zeros, as rows with none visible
            B, Hq, L, _ = q.shape
            dv = view.format.padded_dim(view.v_dim or q.shape[-1])
            parts = [(mx.zeros((B, Hq, L, dv)), mx.full((B, Hq, L), -mx.inf))]
        fused = merge(parts)
    out, lse = fused  # float32: sinks applied here, then the model's dtype
    if sinks is not None:
        s = sinks.astype(mx.float32).reshape(1, -1, 1)
        total = mx.logaddexp(lse, s)
        out = out * mx.exp(lse - total)[..., None]
    if rot == "kv":
        out = rotate(out, inverse=True)  # in float32, as the kernels do: it can exceed float16
    return out


PATHS = (decode_whole, prefill_path, decode_one_pass, partials)


def reference_path(q, view, scale, mask, sinks, dtype):
    """What ``MLX_KVQ_REFERENCE=1`` computes (no kernel): where a kernel configuration
    failed its self-check."""
    if on_cpu():
        out = one_pass_attention(q, view, scale, mask, sinks, dtype)
        if out is not None:
            return out
    return partials(q, view, scale, mask, sinks, dtype, use_kernels=False)


def _finish(out, v_dim, dtype):
    """Drop the zero-padded value dims and cast, saturating (a float32 output a rounding
    over the float16 maximum is not inf); no ops where there is nothing to do."""
    if out.shape[-1] != v_dim:
        out = out[..., :v_dim]
    if out.dtype == dtype:
        return out
    if dtype.size < out.dtype.size:
        big = mx.finfo(dtype).max
        out = mx.clip(out, -big, big)
    return out.astype(dtype)


def _split_mask(mask):
    """``(causal, array_mask)`` from None, ``"causal"`` or an array."""
    causal = isinstance(mask, str)
    return causal, None if causal or mask is None else mask


DISABLED = "disabled"  # _fused_decode: the kernel applies, but its configuration failed its self-check


def _fused_decode(q, view, scale, mask, rotate=None, out_dtype=mx.float32):
    """(out, lse) from the one-launch decode kernel over the whole view, None where it
    does not apply (prefill, formats it lacks, no GPU, MLX_KVQ_REFERENCE=1), ``DISABLED``
    where its configuration failed its self-check.
    ``rotate``: the kernels rotate ``q`` (and, for ``"kv"``, rotate the output back).
    The kernel's setup (or None: it does not apply) is kept in the cache's ``decode_setups``
    per this step's shapes, so that the next step of the same shapes goes straight to the
    launch (a decode step asks for every layer and batch row: host time)."""
    if not kernels.is_decode(q.shape[2]) or not kernels.enabled():
        return None
    causal, mask = _split_mask(mask)
    k, v, n = view.packed
    if not (n > 0 and k is not None):
        k = v = None
    sinks = view.sinks
    if sinks[0] is None or not sinks[0].shape[2]:
        sinks = None
    wk, wv, nw, nwv = view.window_buffers
    if wk is not None and nw and nw == nwv:
        window = (wk, wv)  # the whole buffers: the kernel reads their first nw rows
    else:
        window = view.window
        window = None if window[0] is None or not window[0].shape[2] else window
        nw = 0 if window is None else window[0].shape[2]
    if k is None and sinks is None and window is None:
        return None
    launch = kernels.launcher()
    key = (launch, kernels.decode_body(launch), view.format, q.shape, q.dtype, n,
           None if k is None else (k[0].shape, k[1].dtype, v[0].shape, v[1].dtype),
           None if sinks is None else (sinks[0].shape, sinks[0].dtype),
           None if window is None else (window[0].shape, window[0].dtype, nw > 0),
           kernels.mask_sig(mask), causal, scale, rotate, out_dtype)
    setups = getattr(view, "decode_setups", None)
    if setups is None:
        setups = {}
    st = setups.get(key, _UNSET)
    if st is _UNSET:
        st = _kernel_setup(q, view, k, v, n, sinks, window, nw, scale, causal, mask, rotate, out_dtype, launch)
        if len(setups) > 64:  # packed runs grow: keep it bounded
            setups.clear()
        setups[key] = st
    if st is None:
        return None
    out = kernels.decode_run(  # None where it failed its self-check
        launch, st, q, k, v, n, sinks, window, nw, view.q_start, mask, check=True,
        rotate_out=rotate == "kv", out_dtype=out_dtype)
    return DISABLED if out is None else out


_UNSET = object()


def _kernel_setup(q, view, k, v, n, sinks, window, nw, scale, causal, mask, rotate, out_dtype, launch):
    """The decode kernel's setup for these shapes, None where it does not apply."""
    f = view.format
    fmt = dict(k_bits=f.k_bits, v_bits=f.v_bits, group_size=f.group_size)
    dense = sinks or window
    dims = (dense[0].shape[-1], dense[1].shape[-1]) if dense else None
    if not kernels.decode_supports(q, k, v, dense[0].dtype if dense else None, mode=f.mode, mask=mask,
                                   dense_dims=dims, **fmt):
        return None
    return kernels.decode_launch(
        launch, q, k, v, n, sinks, window, nw=nw, scale=scale, q_start=view.q_start, causal=causal, mask=mask,
        rotate_q=bool(rotate), rotate_out=rotate == "kv", out_dtype=out_dtype, setup_only=True, **fmt)


def _segment_parts(q, view, scale, mask, use_kernels=True):
    """Partial (out, lse) per run of the view: packed kernel or reference, dense reference."""
    parts = []
    for kind, k, v, n, pos, args in segment_args(view, scale, mask, split=q.shape[2] > 1):
        if kind == "packed":
            parts.append(packed_attention(q, k, v, n, view.format, use_kernels, **args))
        else:  # without kernels (a failed self-check) as MLX_KVQ_REFERENCE=1: nor the CPU body
            parts.append(dense_attention(q, k, v, body=use_kernels, k_pos=pos, **args))
    return parts


def segment_args(view, scale, mask, split=False):
    """Per run of the view (``view.segments(split)``): ``(kind, keys, values, n, pos, args)``,
    with ``args`` the partial attention's keywords (scale, positions, causal, and the columns
    of an array ``mask`` for that run)."""
    causal, array_mask = _split_mask(mask)
    for kind, k, v, k_start, n, pos in view.segments(split):
        m = None
        if array_mask is not None:
            m = array_mask[..., k_start : k_start + n] if pos is None else mx.take(array_mask, pos, axis=-1)
        yield kind, k, v, n, pos, dict(scale=scale, q_start=view.q_start, k_start=k_start, causal=causal, mask=m)


def packed_attention(q, k, v, n, fmt, use_kernels=True, **args):
    """Partial attention over the packed run (``fmt``: the cache's ``KVFormat``): in decode
    steps the packed kernel where it applies, else products on the packed words
    (``mx.quantized_matmul``: on the CPU; MLX's CUDA backend lacks it for some shapes),
    else dequantized block by block. Prefill chunks here are GPU layers too large to copy
    (``prefill_dequantized``): the ``simdgroup_matrix`` prefill kernel (Metal), else the
    packed kernel (1.2-1.4x faster than the blocked reference for 512-2048 queries over
    4k-64k keys on the H200: ``bench_attention.py --prefill``), else dequantized block by
    block (on the CPU a dequantized block goes through BLAS).
    """
    f = dict(k_bits=fmt.k_bits, v_bits=fmt.v_bits, group_size=fmt.group_size, mode=fmt.mode)
    if use_kernels and kernels.enabled():
        out = None  # each None: not this chunk, not on this backend, or failed its self-check
        if kernels.prefill_supports(q, k, v, mask=args["mask"], **f):  # prefill chunks only
            out = kernels.prefill_attention(q, k, v, n, **f, **args)
        if out is None and kernels.supports(q, k, v, mask=args["mask"], **f):
            out = kernels.packed_attention(q, k, v, n, **f, **args)
        if out is not None:
            return out
    if kernels.is_decode(q.shape[2]) and on_cpu():
        return packed_quantized_matmul(q, k, v, n, fmt, **args)
    return packed_reference(q, k, v, n, fmt, body=use_kernels, **args)
