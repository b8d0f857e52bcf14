"""sdpa_latent: attention whose keys and values are one packed (affine) run, MLA's decode
step (``metal/sdpa_latent.metal``): many query heads over one latent, read and dequantized
once per block of keys for both products, ``simdgroup_matrix`` 8x8 products. Returns
``(out, lse)`` as :func:`.packed.packed_attention` does."""

import math

import mlx.core as mx

from .. import format as fmt
from .args import carrier_view, const, mask_arg, mask_ok, param_array
from .backend import launcher, num_cores
from .merge import split_launch
from .selfcheck import latent_ok

LATENT_BITS = (2, 4, 8)
LATENT_ROWS = 16  # query rows per threadgroup (two 8-row tiles)
MAX_DIM = 512  # a block of 8 dequantized keys: 16 KiB of threadgroup memory
# backends whose launcher runs it in the library (the tests' emulator has no backend: Metal).
# On CUDA, simdgroup_matrix is emulated by warp shuffles (prelude_cuda.h); there the latent is
# dequantized for the step and MLX's attention takes it (BENCHMARKS.md, "MLA layers").
NATIVE = ("metal",)


def runs_on(launch):
    """Whether the library runs sdpa_latent on ``launch`` (``NATIVE``)."""
    return getattr(launch, "backend", "metal") in NATIVE


def latent_nsg(D):
    """Simdgroups per threadgroup: they split the head dim, 8 dims per tile each."""
    return next(s for s in (4, 2, 1) if D % (8 * s) == 0)


def latent_supports(q, packed, bits, group_size, mode, mask):
    """Whether :func:`latent_attention` takes these queries over this packed run: affine
    2/4/8 bits, head dims a multiple of 8 and of the group up to ``MAX_DIM``, a bool or
    additive mask broadcastable to (B, Hq, L, keys) or none."""
    try:
        if not isinstance(q, mx.array) or q.ndim != 4 or q.dtype not in fmt.FLOATS:
            return False
        B, Hq, L, D = q.shape
        if mode != "affine" or bits not in LATENT_BITS or group_size not in (32, 64, 128):
            return False
        if D % 8 or D > MAX_DIM or D % group_size:
            return False
        if not fmt.is_packed(packed, B, packed[0].shape[1], D, bits, group_size, mode):
            return False
        Hkv = packed[0].shape[1]
        if Hkv < 1 or Hq % Hkv or Hkv * -(-(Hq // Hkv) * L // LATENT_ROWS) > 65535 or B > 65535:
            return False
        return mask is None or mask_ok(mask, B, Hq, L, mask.shape[-1] if mask.ndim else 1)
    except Exception:
        return False


def latent_launch(launch, q, packed, n, *, bits, group_size, scale, q_start, k_start, causal, mask=None,
                  nsplit=None):
    """The kernel sequence of :func:`latent_attention` on ``launch`` (``nsplit``: override
    the plan, for tests)."""
    B, Hq, L, D = q.shape
    kw, ks, kb = packed
    Hkv = kw.shape[1]
    n = int(n)
    if n <= 0:
        return mx.zeros((B, Hq, L, D), mx.float32), mx.full((B, Hq, L), -math.inf, mx.float32)
    if n > kw.shape[2]:
        raise ValueError(f"n={n} exceeds the cache capacity {kw.shape[2]}")
    tiles = -(-(Hq // Hkv) * L // LATENT_ROWS)
    if nsplit is None:  # few threadgroups (one latent, 128 heads: 8 per row): split the keys too
        nsplit = max(1, min(-(-2 * num_cores() // (B * Hkv * tiles)), n // 256))
    nsg = latent_nsg(D)
    marr, mkind = mask_arg(mask)
    template = [("T", q.dtype), ("S", ks.dtype), ("MT", marr.dtype), ("D", D), ("KB", bits), ("GS", group_size),
                ("NSG", nsg), ("MASK", mkind), ("CAUSAL", bool(causal))]
    fparams = const(("scale", float(scale)), lambda: param_array([scale]))
    inputs = [q, kw, ks, kb, marr, carrier_view(n, int(q_start) - int(k_start)), fparams]
    return split_launch(launch, "sdpa_latent", inputs, template, nsplit, nsg * 32, (Hkv * tiles, B), q.shape)


def latent_attention(q, packed, n, *, bits, group_size, scale, q_start, k_start, causal, mask=None):
    """Attention of ``q`` (B, Hq, L, D) over the first ``n`` tokens of one packed run used
    as both keys and values: ``(out, lse)`` in float32, as :func:`.packed.packed_attention`.
    None where the library does not run it (``NATIVE``) and where this configuration failed
    its self-check."""
    launch = launcher()
    if not runs_on(launch):
        return None
    if not latent_ok(launch, latent_launch, q, packed, bits, group_size, mask, causal):
        return None
    return latent_launch(launch, q, packed, n, bits=bits, group_size=group_size, scale=scale, q_start=q_start,
                         k_start=k_start, causal=causal, mask=mask)
