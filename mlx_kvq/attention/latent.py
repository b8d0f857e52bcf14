"""Attention whose keys and values are one cached part: MLA models (DeepSeek V2/V3, Kimi,
GLM-4 MoE Lite, Mistral 4) decode with ``sdpa(q, latent, latent, mask=rope_scores)``.

The part is used as stored, still rotated (``x R``): the queries are rotated instead and
the output rotated back, since ``(q R)(x R)^T = q x^T`` and ``p (x R) R^T = p x`` for an
orthogonal ``R``. That costs two (queries x D x D) products instead of the (tokens x D x D)
of rotating every cached token back (69 GFLOP per layer and step at 128k tokens of 512
dims). Where the latent kernel runs (``kernels.latent_attention``: Metal) the packed run is
read by it, every head over each block of keys, with no dequantized copy; elsewhere the part
is dequantized for the step and MLX's attention takes it: one DeepSeek-V3-shaped layer at 4
bits, 0.89x the step time of the rotated-back copy on the CPU at 4k tokens, 0.84-0.94x on
the H200 at 128k (``benchmarks/lab/mla_latent.py``; BENCHMARKS.md, "MLA layers")."""

import mlx.core as mx

from .. import kernels
from ..format import fit, unpacked_dim
from ..rotation import rotate
from .dispatch import segment_args
from .reference import dense_attention, merge


def rotated_part(view):
    """Whether the part ``view`` stands for is stored rotated."""
    return view.format.rotate == "kv" or (view.part == "keys" and bool(view.format.rotate))


def latent_sdpa(queries, view, attend, scale, mask=None, sinks=None):
    """``attend(q, x, x, scale=, mask=, sinks=)`` (MLX's attention) with ``x`` the part
    ``view`` stands for, in the model's dtype; ``queries``: (B, Hq, L, D) with D the
    part's head dim."""
    d = view.k_dim if view.part == "keys" else view.v_dim
    rot = rotated_part(view)
    out = latent_kernel(queries, view, scale, mask, sinks, rot)
    if out is not None:
        return _back(out, rot, d, queries.dtype)
    x = view.stored(view.part, view.model_dtype or queries.dtype) if rot else None
    if x is None:  # stored unrotated (or empty): the arrays themselves
        return attend(queries, view.array, view.array, scale=scale, mask=mask, sinks=sinks)
    out = attend(_queries(queries, x.shape[-1], rot), x, x, scale=scale, mask=mask, sinks=sinks)
    return _back(out, rot, d, queries.dtype)


def _queries(queries, D, rot, dtype=None):
    """The queries zero-padded to the stored head dim ``D`` and rotated as the part is (in
    float32: ``q R`` can exceed float16), in ``dtype`` (default: theirs, saturating)."""
    q = queries
    if D != q.shape[-1]:
        q = mx.pad(q, [(0, 0)] * 3 + [(0, D - q.shape[-1])])
    if rot:
        q = rotate(q.astype(mx.float32))
    dtype = dtype or queries.dtype
    return q if q.dtype == dtype else fit(q, dtype)


def _back(out, rot, d, dtype):
    """The output rotated back (in float32), cut to the part's head dim ``d``, in ``dtype``."""
    if rot:
        out = rotate(out.astype(mx.float32), inverse=True)
    out = out[..., :d]
    return fit(out, dtype) if out.dtype != dtype else out


def latent_kernel(queries, view, scale, mask, sinks, rot):
    """The attention over the stored part with its packed run read by the latent kernel
    and its unquantized tokens by the reference, merged: float32, rotated as stored and
    padded; None where the kernel does not run (no packed run, sinks, formats it lacks,
    backends other than Metal)."""
    f = view.format
    keys = view.part == "keys"
    k, v, n = view.packed
    packed = k if keys else v
    if sinks is not None or not n or packed is None or not kernels.enabled():
        return None
    if view.q_start is None:
        view = view.for_queries(queries.shape[2])
    bits = f.k_bits if keys else f.v_bits
    q = _queries(queries, unpacked_dim(packed[0].shape[-1], bits), rot, mx.float32)
    parts = []
    for kind, sk, sv, count, pos, args in segment_args(view, scale, mask):
        if kind == "packed":
            if not kernels.latent_supports(q, packed, bits, f.group_size, f.mode, args["mask"]):
                return None
            part = kernels.latent_attention(q, packed, count, bits=bits, group_size=f.group_size, **args)
            if part is None:
                return None
        else:
            x = sk if keys else sv
            part = dense_attention(q, x, x, k_pos=pos, **args)
        parts.append(part)
    return merge(parts)[0]
