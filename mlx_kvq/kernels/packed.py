"""sdpa_packed: attention of queries over one packed K/V run (``metal/sdpa_packed.metal``),
split over the keys and merged by :mod:`.merge`. The decode path of a whole cache view is
:mod:`.decode`; this kernel serves the runs that path does not take (microscaling modes,
3/5/6-bit, head dims it lacks)."""

import math

import mlx.core as mx

from .. import format as fmt
from .args import carrier_view, const, mask_arg, mask_ok, pair_ok, param_array
from .backend import launcher, num_cores
from .decode import is_decode
from .merge import split_launch
from .selfcheck import packed_ok

HEAD_DIMS = (64, 80, 96, 128, 256)
DEFAULT_VU = 0  # value-loop unroll (0 = full), see metal/sdpa_packed.metal
DEFAULT_VPF = True  # value prefetch at the top of each key block (2/4/8-bit values)


def vpf_ok(v_bits, D):
    return v_bits in (2, 4, 8) and D // 8 <= 32


def supports(q, k_packed, v_packed, k_bits, v_bits, group_size, mode, mask):
    """Whether :func:`packed_attention` handles these shapes and formats.
    Does not look at the backend (see :func:`enabled`)."""
    try:
        if not isinstance(q, mx.array) or q.ndim != 4 or q.dtype not in fmt.FLOATS:
            return False
        B, Hq, L, D = q.shape
        if D not in HEAD_DIMS or L < 1:
            return False
        if mode not in fmt.MODE_ID:
            return False
        if not (fmt.supported(k_bits, group_size, mode, D) and fmt.supported(v_bits, group_size, mode, D)):
            return False
        if not pair_ok(q, k_packed, v_packed, k_bits, v_bits, group_size, mode):
            return False
        if k_packed[0].shape[2] != v_packed[0].shape[2]:
            return False
        C = k_packed[0].shape[2]
        if mask is not None and not mask_ok(mask, B, Hq, L, mask.shape[-1] if mask.ndim else 1):
            return False
        if mask is not None and mask.ndim and mask.shape[-1] not in (1,) and mask.shape[-1] > C:
            return False
        return True
    except Exception:
        return False


def _pow2ceil(x):
    return 1 << max(0, (x - 1).bit_length())


def plan(B, Hkv, rep, L, D, n, nsg=None, nsplit=None, prefill=None):
    """Launch geometry: (prefill, RT, NSG, QR, tiles, nsplit, kps)."""
    R = rep * L
    if prefill is None:
        prefill = not is_decode(L)
    if prefill:
        RT = 8
        # threadgroup memory ~ QR*D*4 bytes: keep it <= 16 KiB
        NSG = nsg or max(1, min(4, 4096 // (RT * D)))
        QR = NSG * RT
    else:
        RT = min(8, _pow2ceil(R))
        NSG = nsg or 4
        QR = RT
    tiles = -(-R // QR)
    if nsplit is None:
        base = B * Hkv * tiles
        target = 2 * num_cores()
        nsplit = 1
        if not prefill and base < target:
            nsplit = min(-(-target // base), max(1, n // (2 * NSG * 32)))
    nsplit = max(1, min(nsplit, max(1, n)))
    kps = -(-n // nsplit)
    kps = -(-kps // 32) * 32
    nsplit = max(1, -(-n // kps))
    kps = ((n + nsplit - 1) // nsplit + 31) // 32 * 32  # what the kernel recomputes
    return prefill, RT, NSG, QR, tiles, nsplit, kps


def attention_launch(
    launch, q, k_packed, v_packed, n, *, k_bits, v_bits, group_size, mode, scale,
    q_start, k_start, causal, mask=None, nsg=None, nsplit=None, prefill=None, vu=None,
    vpf=None,
):
    """The whole kernel sequence of :func:`packed_attention` on ``launch``.
    ``nsg``, ``nsplit``, ``prefill``, ``vu`` override the launch plan (tests,
    tuning)."""
    B, Hq, L, D = q.shape
    Hkv = k_packed[0].shape[1]
    C = k_packed[0].shape[2]
    rep = Hq // Hkv
    n = int(n)
    if n <= 0:
        return (
            mx.zeros((B, Hq, L, D), dtype=mx.float32),
            mx.full((B, Hq, L), -math.inf, dtype=mx.float32),
        )
    if n > C:
        raise ValueError(f"n={n} exceeds the cache capacity {C}")
    prefill, RT, NSG, _, tiles, nsplit, _ = plan(B, Hkv, rep, L, D, n, nsg, nsplit, prefill)
    marr, mkind = mask_arg(mask)
    mode_id = fmt.MODE_ID[mode]
    if mode == "affine":
        kw, ks, kb = k_packed
        vw, vs, vb = v_packed
    else:
        kw, ks = k_packed
        vw, vs = v_packed
        kb = vb = const("u8", lambda: mx.zeros((1, 1, 1, 1), dtype=mx.uint8))
    KW = D * k_bits // 32
    kvw = 4 if KW % 4 == 0 else 1
    carrier = carrier_view(n, int(q_start) - int(k_start))
    fparams = const(("scale", float(scale)), lambda: param_array([scale]))
    template = [
        ("T", q.dtype),
        ("S", ks.dtype),
        ("MT", marr.dtype),
        ("D", D),
        ("KB", k_bits),
        ("VB", v_bits),
        ("GS", group_size),
        ("MODE", mode_id),
        ("RT", RT),
        ("NSG", NSG),
        ("PREFILL", bool(prefill)),
        ("MASK", mkind),
        ("CAUSAL", bool(causal)),
        ("KVW", kvw),
        ("VU", DEFAULT_VU if vu is None else vu),
        ("VPF", bool(vpf_ok(v_bits, D) and (DEFAULT_VPF if vpf is None else vpf))),
    ]
    inputs = [q, kw, ks, kb, vw, vs, vb, marr, carrier, fparams]
    return split_launch(launch, "sdpa_packed", inputs, template, nsplit, NSG * 32, (Hkv * tiles, B), q.shape)


def packed_attention(
    q, k_packed, v_packed, n, *, k_bits, v_bits, group_size, mode, scale,
    q_start, k_start, causal, mask=None,
):
    """Attention of ``q`` over the first ``n`` tokens of a packed K/V segment.

    Returns ``(out, lse)``: ``out`` float32 (B, Hq, L, D), the softmax-weighted
    mean of the dequantized values over the visible keys of this segment, and
    ``lse`` float32 (B, Hq, L), the log-sum-exp of ``scale * q.k`` (+ additive
    mask) over those keys; a row with no visible key gets ``out = 0``,
    ``lse = -inf``.  Query i sits at ``q_start + i``, key j at ``k_start + j``;
    with ``causal`` key j is visible to query i iff ``k_start + j <= q_start + i``.
    ``mask``: bool (True = keep) or additive, broadcastable to (B, Hq, L, n).
    Pass the full preallocated buffers (B, Hkv, C, ...), not a slice.
    None where this configuration failed its self-check (:mod:`.selfcheck`).
    """
    launch = launcher()
    if not packed_ok(launch, attention_launch, q, k_packed, k_bits, v_bits, group_size, mode, mask, causal):
        return None
    return attention_launch(
        launch, q, k_packed, v_packed, n, k_bits=k_bits, v_bits=v_bits,
        group_size=group_size, mode=mode, scale=scale, q_start=q_start,
        k_start=k_start, causal=causal, mask=mask,
    )
