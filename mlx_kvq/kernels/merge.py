"""sdpa_merge: split-K partials ``(out, lse)`` merged by log-sum-exp in one launch,
optionally rotated back and cast (``metal/sdpa_merge.metal``)."""

import mlx.core as mx

from .args import rotation_args


def split_launch(launch, name, inputs, template, nsplit, threads, grid_yz, shape):
    """Kernel ``name`` writing one partial ``(out, lse)`` per split of the keys (``nsplit``
    threadgroups of ``threads`` along x, ``grid_yz`` the other two grid dims), then their
    merge: ``(out, lse)`` float32 of ``shape`` (B, Hq, L, D) / (B, Hq, L)."""
    B, Hq, L, D = shape
    rows = B * Hq * L
    out, lse = launch(name, inputs, template, (nsplit * threads, *grid_yz), (threads, 1, 1),
                      [(nsplit, rows, D), (nsplit, rows)], [mx.float32, mx.float32])
    if nsplit > 1:
        return merge_launch(launch, out, lse, shape)
    return out.reshape(shape), lse.reshape(shape[:-1])


def merge_launch(launch, out, lse, shape, rotate_out=False, out_dtype=mx.float32):
    """sdpa_merge of split partials ``out`` (nsplit, rows, D) / ``lse`` (nsplit, rows) into
    ``(out, lse)`` of ``shape`` (B, Hq, L, D) / (B, Hq, L); ``rotate_out``: times the
    transposed rotation of the cache (D a power of two >= 32), written as ``out_dtype``."""
    inputs, args = merge_args(out.shape[1], tuple(shape), rotate_out, out_dtype)
    return launch("sdpa_merge", [out, lse, *inputs], *args)


def merge_args(rows, shape, rotate_out, out_dtype):
    """(extra inputs, (template, grid, threadgroup, output shapes, dtypes)) of sdpa_merge."""
    D = shape[-1]
    signs, fp = rotation_args(D, rotate_out, 1.0)
    return [signs, fp], (
        [("D", D), ("OT", out_dtype), ("ROTO", bool(rotate_out))],
        (rows * 32, 1, 1), (32, 1, 1), [shape, shape[:-1]], [out_dtype, mx.float32],
    )
