"""sdpa_prefill: a prefill chunk's attention over one packed (affine) run with
``simdgroup_matrix`` products (``metal/sdpa_prefill.metal``): Apple GPUs' prefill kernel for
layers too large for a transient unquantized copy; its memory is a block of keys per
threadgroup. Returns ``(out, lse)`` as :func:`.packed.packed_attention` does."""

import math

import mlx.core as mx

from .args import carrier_view, const, pair_ok, param_array
from .backend import launcher, num_cores
from .decode import is_decode
from .merge import split_launch
from .selfcheck import prefill_ok

PREFILL_BITS = (2, 4, 8)
PREFILL_NSG = 4  # simdgroups (8 query rows each) per threadgroup
# backends whose launcher runs it in the library (the tests' emulator has no backend: Metal).
# On CUDA, simdgroup_matrix is emulated by warp shuffles (prelude_cuda.h) and sdpa_packed is
# faster: 31.8 against 77.7 ms for 512 queries over 64k keys (bench_attention.py --prefill,
# H200); it runs there only in tests and benchmarks.
NATIVE = ("metal",)


def runs_on(launch):
    """Whether the library runs sdpa_prefill on ``launch`` (``NATIVE``)."""
    return getattr(launch, "backend", "metal") in NATIVE


def prefill_supports(q, k_packed, v_packed, k_bits, v_bits, group_size, mode, mask):
    """Whether :func:`prefill_attention` takes this chunk: affine 2/4/8-bit runs, head dims
    a multiple of 8 and of the group up to 256, a causal mask or none (array masks take
    the packed kernel or the reference)."""
    try:
        if not isinstance(q, mx.array) or q.ndim != 4 or is_decode(q.shape[2]) or mask is not None:
            return False
        D = q.shape[-1]
        if mode != "affine" or k_bits not in PREFILL_BITS or v_bits not in PREFILL_BITS:
            return False
        if D % 8 or D > 256 or group_size not in (32, 64, 128) or D % group_size:
            return False
        return pair_ok(q, k_packed, v_packed, k_bits, v_bits, group_size, mode)
    except Exception:
        return False


def prefill_launch(launch, q, k_packed, v_packed, n, *, k_bits, v_bits, group_size, mode, scale, q_start, k_start,
                   causal, mask=None, nsg=None, nsplit=None):
    """The kernel sequence of :func:`prefill_attention` on ``launch`` (``nsg``, ``nsplit``:
    override the plan, for tests)."""
    if mask is not None or mode != "affine":
        raise ValueError("sdpa_prefill takes affine runs with a causal mask or none")
    B, Hq, L, D = q.shape
    Hkv = k_packed[0].shape[1]
    n = int(n)
    if n <= 0:
        return mx.zeros((B, Hq, L, D), mx.float32), mx.full((B, Hq, L), -math.inf, mx.float32)
    NSG = nsg or PREFILL_NSG
    tiles = -(-(Hq // Hkv) * L // (NSG * 8))
    if nsplit is None:  # few threadgroups (short chunks, few heads): split the keys too
        nsplit = max(1, min(-(-2 * num_cores() // (B * Hkv * tiles)), n // 256))
    kw, ks, kb = k_packed
    vw, vs, vb = v_packed
    template = [("T", q.dtype), ("S", ks.dtype), ("D", D), ("KB", k_bits), ("VB", v_bits),
                ("GS", group_size), ("NSG", NSG), ("CAUSAL", bool(causal))]
    fparams = const(("scale", float(scale)), lambda: param_array([scale]))
    inputs = [q, kw, ks, kb, vw, vs, vb, carrier_view(n, int(q_start) - int(k_start)), fparams]
    return split_launch(launch, "sdpa_prefill", inputs, template, nsplit, NSG * 32, (Hkv * tiles, B), q.shape)


def prefill_attention(q, k_packed, v_packed, n, *, k_bits, v_bits, group_size, mode, scale, q_start, k_start,
                      causal, mask=None):
    """Attention of a prefill chunk ``q`` (B, Hq, L, D) over the first ``n`` tokens of a
    packed run, as :func:`.packed.packed_attention`: ``(out, lse)`` in float32; None on CUDA
    (``NATIVE``) and where this configuration failed its self-check."""
    launch = launcher()
    if not runs_on(launch):
        return None
    if not prefill_ok(launch, prefill_launch, q, k_packed, k_bits, v_bits, group_size, mode, causal):
        return None
    return prefill_launch(launch, q, k_packed, v_packed, n, k_bits=k_bits, v_bits=v_bits, group_size=group_size,
                          mode=mode, scale=scale, q_start=q_start, k_start=k_start, causal=causal)
