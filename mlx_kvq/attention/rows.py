"""Attention over a ``RowsView`` (``cache.rows``): each row's own queries over that row's
own view, as the row alone would attend; the right-padding queries of a padded prefill
get zeros (no later step reads them). A prefill chunk attends row by row: on an H200 one
fused attention over all rows' padded keys took 1.1-1.6x the time to first tokens at 1.9x
the MLX peak memory (``benchmarks/lab/results/rows_prefill_h200.txt``)."""

import mlx.core as mx

from ..cache import RowsMask
from .dispatch import quantized_sdpa


def rows_sdpa(queries, view, scale, mask=None, sinks=None, attend=quantized_sdpa):
    """``attend`` (``quantized_sdpa``) row by row. ``queries``: (B, Hq, L, D) with one row per
    view; ``mask``: a ``RowsMask`` (each row's own), a batch array over the rows' keys
    left-padded (as ``RowsView`` gives them), or one mask for every row."""
    B, L = queries.shape[0], queries.shape[2]
    if B != len(view.views):
        raise ValueError(f"{B} query rows for a batch cache of {len(view.views)} rows.")
    masks = mask.masks if isinstance(mask, RowsMask) else [mask] * B
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


def _row_mask(mask, b, n, keys):
    """Row ``b``'s part of a batch mask (.., L, T) over keys left-padded to T (as
    ``RowsView`` gives them): its own ``n`` queries over its own last ``keys`` columns."""
    if mask.ndim == 4 and mask.shape[0] > 1:
        mask = mask[b : b + 1]
    return mask[..., :n, mask.shape[-1] - keys :]
