"""Attention whose keys and values are one cached part: MLA models (DeepSeek V2/V3, Kimi,
GLM-4 MoE Lite, Mistral 4) decode with ``sdpa(q, latent, latent, mask=rope_scores)``.

The part is dequantized for the step as stored, still rotated (``x R``): the queries are
rotated instead and the output rotated back, since ``(q R)(x R)^T = q x^T`` and
``p (x R) R^T = p x`` for an orthogonal ``R``. That costs two (queries x D x D) products
instead of the (tokens x D x D) of rotating every cached token back (69 GFLOP per layer and
step at 128k tokens of 512 dims). One DeepSeek-V3-shaped layer at 4 bits: 0.89x the step time of
the rotated-back copy on the CPU at 4k tokens, 0.84-0.94x on the H200 at 128k
(``benchmarks/lab/mla_latent.py``; BENCHMARKS.md, "MLA layers")."""

import mlx.core as mx

from ..format import fit
from ..rotation import rotate


def rotated_part(view):
    """Whether the part ``view`` stands for is stored rotated."""
    return view.format.rotate == "kv" or (view.part == "keys" and bool(view.format.rotate))


def latent_sdpa(queries, view, attend, scale, mask=None, sinks=None):
    """``attend(q, x, x, scale=, mask=, sinks=)`` (MLX's attention) with ``x`` the part
    ``view`` stands for, in the model's dtype; ``queries``: (B, Hq, L, D) with D the
    part's head dim."""
    x = view.stored(view.part, view.model_dtype or queries.dtype) if rotated_part(view) else None
    if x is None:  # stored unrotated (or empty): the arrays themselves
        return attend(queries, view.array, view.array, scale=scale, mask=mask, sinks=sinks)
    d = view.k_dim if view.part == "keys" else view.v_dim
    q = queries
    if x.shape[-1] != q.shape[-1]:
        q = mx.pad(q, [(0, 0)] * 3 + [(0, x.shape[-1] - q.shape[-1])])
    q = fit(rotate(q.astype(mx.float32)), q.dtype)  # float32: q R can exceed float16
    out = attend(q, x, x, scale=scale, mask=mask, sinks=sinks)
    out = rotate(out.astype(mx.float32), inverse=True)[..., :d]
    return fit(out, queries.dtype) if out.dtype != queries.dtype else out
