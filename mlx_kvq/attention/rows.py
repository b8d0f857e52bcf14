"""Attention over a ``RowsView`` (``cache.rows``): each row's own queries over that row's
own view, as the row alone would attend; the right-padding queries of a padded prefill
get zeros (no later step reads them). A prefill chunk attends row by row: on an H200 one
fused attention over all rows' padded keys, dequantized, took 1.1-1.6x the time to first
tokens at 1.9x the MLX peak memory (``benchmarks/lab/results/rows_prefill_h200.txt``). A
prompt batch's first chunk, whose rows hold nothing else, takes one call on GPUs: their keys
are the chunk's own, unquantized, and one causal mask hides the right padding (8 rows of
2048 tokens on an H100: first tokens at 0.316 against 0.356 s, each row bit for bit as alone;
rows of 2008-2048 tokens 0.920 against 0.908 s; ``results/rows_one_call_h100.txt``)."""

import mlx.core as mx

from .. import kernels
from ..cache import KVView, RowsMask
from .dispatch import quantized_sdpa


def rows_sdpa(queries, view, scale, mask=None, sinks=None, attend=quantized_sdpa):
    """``attend`` (``quantized_sdpa``) row by row. ``queries``: (B, Hq, L, D) with one row per
    view; ``mask``: a ``RowsMask`` (each row's own), a batch array over the rows' keys
    left-padded (as ``RowsView`` gives them), or one mask for every row."""
    B, L = queries.shape[0], queries.shape[2]
    if B != len(view.views):
        raise ValueError(f"{B} query rows for a batch cache of {len(view.views)} rows.")
    masks = mask.masks if isinstance(mask, RowsMask) else [mask] * B
    if attend is quantized_sdpa and one_call_prefill(L):
        fresh = fresh_rows(view, masks, L)
        if fresh is not None:
            out = attend(queries, fresh, scale=scale, mask="causal", sinks=sinks)
            if min(view.takes) < L:  # right-padding queries get zeros, as below
                own = mx.arange(L)[None] < mx.array(view.takes)[:, None]
                out = mx.where(own[:, None, :, None], out, mx.zeros((), out.dtype))
            return out
    whole = all(n == L for n in view.takes)
    qs = mx.split(queries, B, axis=0) if whole else None  # one op, not B slices
    outs = []
    for b, (v, n, m) in enumerate(zip(view.views, view.takes, masks)):
        if n == 0:
            outs.append(None)
            continue
        if isinstance(m, mx.array) and not isinstance(mask, RowsMask):
            m = _row_mask(m, b, n, v.offset)
        o = attend(qs[b] if whole else queries[b : b + 1, :, :n], v, scale=scale, mask=m, sinks=sinks)
        if n < L:
            o = mx.concatenate([o, mx.zeros(o.shape[:2] + (L - n,) + o.shape[3:], o.dtype)], axis=2)
        outs.append(o)
    ref = next(o for o in outs if o is not None)
    return mx.concatenate([mx.zeros_like(ref) if o is None else o for o in outs], axis=0)


def one_call_prefill(L):
    """Whether a prefill chunk of ``L`` queries per row takes one attention call for rows
    that hold nothing before it (``fresh_rows``): where the GPU prefill path applies
    (``prefill_dequantized``, MLX's fused attention, which computes each row as alone)."""
    return kernels.enabled() and not kernels.is_decode(L)


def fresh_rows(view, masks, L):
    """Rows whose keys are all this chunk's, unquantized, each under a causal mask (a
    prompt batch's first chunk), as one view of ``B`` rows (``KVView.stacked``): each row's
    keys right-padded to ``L`` with zeros, which the causal mask hides from the row's own
    queries. None where a row holds keys from before, packed keys, another mask or another
    dtype, or takes a decode step's few tokens (alone it would take the decode path)."""
    views = view.views
    if len({v.store_dtype for v in views}) > 1:  # a float32 model's row widened alone
        return None
    causal = lambda m: isinstance(m, str) and m == "causal"
    if any(kernels.is_decode(n) or n != v.offset or v.packed[2] or v.holes is not None or not causal(m)
           for v, n, m in zip(views, view.takes, masks)):
        return None
    return KVView.stacked(views, L)


def _row_mask(mask, b, n, keys):
    """Row ``b``'s part of a batch mask (.., L, T) over keys left-padded to T (as
    ``RowsView`` gives them): its own ``n`` queries over its own last ``keys`` columns."""
    if mask.ndim == 4 and mask.shape[0] > 1:
        mask = mask[b : b + 1]
    return mask[..., :n, mask.shape[-1] - keys :]
