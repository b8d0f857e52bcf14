"""sdpa_decode: attention of up to ``MAX_QUERIES`` queries per sequence over a whole cache
view (fp16 sinks, packed run, fp16 window) in one launch (``metal/sdpa_decode.metal``);
the split partials are merged in the same launch on CUDA, by :mod:`.merge` elsewhere."""

import math
import os

import mlx.core as mx

from .. import format as fmt
from .args import MIN_KERNEL_WORDS, const, mask_arg, mask_ok, mask_sig, pair_ok, rotates_in_kernel, rotation_args
from .backend import launcher, num_cores
from .merge import merge_args
from .selfcheck import applies, decode_ok

MAX_QUERIES = 8  # query rows per sequence that make a decode step


def is_decode(query_len):
    """Whether ``query_len`` queries make a decode step (the decode kernels' case)."""
    return query_len <= MAX_QUERIES


DECODE_BITS = (2, 4, 8)
WARPS_PER_CORE = 8  # packed splits: about this many warps per GPU core in all (12: no faster)
# blocks of keys loaded ahead in registers (sdpa_decode PF): 1 from this many keys per
# split, else 0. PF=1 takes 168 registers (206 at 8 bits; PF=0 162); the grid has 8 warps
# per SM (WARPS_PER_CORE; 12, which 168 registers allow, is no faster, nor is PF=2). In
# chained decode calls on the H100 (bench_attention --chain) PF=1 is 1.17x faster at
# 128k keys and PF=0 at 4k-16k.
DECODE_PF_MIN_KEYS = 192


# The two decode bodies: "mma" (metal/sdpa_decode.metal, the m16n8k16 matrix op: tensor
# cores on NVIDIA) and "simd" (metal/sdpa_decode_simd.metal, fp32 dot products reduced by
# simd shuffles, laid out for Apple GPUs). Default: "simd" on Metal, "mma" elsewhere;
# MLX_KVQ_DECODE_BODY or decode_launch(body=...) picks one explicitly.
DECODE_BODIES = ("mma", "simd")
# simd body: (KU, PF) keys per lane group and loop step, loaded one step ahead. Its dims per
# lane (simd_tile) trade arithmetic (benchmarks/lab/decode_roofline.py: 2432 lane ops per key
# at 4 rows and DPL 16, 3072 at DPL 8) for registers (ptxas, sm_90: 245-255 at 4 rows and
# DPL 16, 150-168 at DPL 8); bench_attention --bodies times both (BENCHMARKS.md).
SIMD_KU = (2, 1)
SIMD_MAX_ROWS = 8  # query rows per threadgroup of the simd body (the registers of RT * DPL * 2 floats)


def decode_body(launch, body=None):
    """The decode body ``launch`` runs: ``body``, else $MLX_KVQ_DECODE_BODY, else the backend's."""
    body = body or os.environ.get("MLX_KVQ_DECODE_BODY") or (
        "simd" if getattr(launch, "backend", None) == "metal" else "mma")
    if body not in DECODE_BODIES:
        raise ValueError(f"decode body {body!r} is not one of {DECODE_BODIES}")
    return body


def simd_tile(R, D, dpl=None):
    """(tiles, RT, DPL) of the simd body: row tiles of at most SIMD_MAX_ROWS rows, and the
    dims per lane (``dpl``; default 16 up to 4 rows, else 8, so that the rows' queries and
    outputs stay 2 * RT * DPL <= 128 registers; 16 where D / 8 > 32 lanes per key)."""
    tiles = -(-R // SIMD_MAX_ROWS)
    RT = -(-R // tiles)
    DPL = dpl or (16 if RT <= 4 or D // 8 > 32 else 8)
    if DPL not in (8, 16) or D % DPL or D // DPL > 32:
        raise ValueError(f"dims per lane {DPL} do not fit head dim {D}")
    return tiles, RT, min(DPL, D)


_SUPPORTED = {}


def decode_supports(q, k_packed, v_packed, dense_dtype, k_bits, v_bits, group_size, mode, mask, dense_dims=None):
    """Whether :func:`decode_attention` (the tensor-core decode kernel over a whole
    cache view) handles these shapes and formats; others take :func:`packed_attention`.
    ``dense_dims``: the (key, value) head dims of the unquantized runs (sinks, window), which
    must be the queries' (the kernel reads one head dim). The answer is remembered per
    shapes and formats (it is asked every decode step)."""
    try:
        key = (q.shape, q.dtype, _packed_sig(k_packed), _packed_sig(v_packed), dense_dtype, k_bits, v_bits,
               group_size, mode, mask_sig(mask), dense_dims)
    except Exception:
        return False
    ok = _SUPPORTED.get(key)
    if ok is None:
        if len(_SUPPORTED) > 4096:  # packed capacities grow in steps: keep it bounded
            _SUPPORTED.clear()
        ok = _SUPPORTED[key] = _decode_supports(
            q, k_packed, v_packed, dense_dtype, k_bits, v_bits, group_size, mode, mask) and (
            dense_dims is None or all(d == q.shape[-1] for d in dense_dims))
    return ok


def _packed_sig(t):
    """Shapes and dtypes of a packed run ``(words, scales[, biases])`` (None: none)."""
    if t is None:
        return None
    return (len(t), t[0].shape, t[0].dtype, t[1].shape, t[1].dtype, t[-1].shape, t[-1].dtype)


def _decode_supports(q, k_packed, v_packed, dense_dtype, k_bits, v_bits, group_size, mode, mask):
    try:
        if not isinstance(q, mx.array) or q.ndim != 4 or q.dtype not in fmt.FLOATS:
            return False
        B, Hq, L, D = q.shape
        if not (1 <= L <= MAX_QUERIES) or mode != "affine":
            return False
        if k_bits not in DECODE_BITS or v_bits not in DECODE_BITS or group_size not in (32, 64, 128):
            return False
        if D % 16 or D % group_size or (D * k_bits) % 128 or (D * v_bits) % 256:
            return False
        if group_size % (D // 8) or ((D // 4) % group_size and group_size % (D // 4)):
            return False
        if dense_dtype is not None and dense_dtype not in fmt.FLOATS:
            return False
        if k_packed is not None and not pair_ok(q, k_packed, v_packed, k_bits, v_bits, group_size, mode):
            return False
        if mask is not None and not mask_ok(mask, B, Hq, L, mask.shape[-1] if mask.ndim else 1):
            return False
        return True
    except Exception:
        return False


def decode_plan(B, Hkv, tiles, n, nsplit=None, warps_per_core=WARPS_PER_CORE):
    """Packed splits P (one warp each): about ``warps_per_core`` warps per GPU core in all."""
    if n <= 0:
        return 0
    if nsplit is None:
        target = warps_per_core * num_cores()
        nsplit = -(-target // (B * Hkv * tiles))
        nsplit = min(nsplit, -(-n // 64))  # at least ~64 keys per warp
    return max(1, min(int(nsplit), -(-n // 16)))


def carrier_view7(n, delta, ns, nw, P):
    if not (0 <= n < 2**30 and -(2**31) <= delta < 2**31 and 0 <= ns < 2**30 and 0 <= nw < 2**30):
        raise ValueError("decode parameters out of range")
    d = delta + 2**31
    z = const("u8x7", lambda: mx.zeros((1,) * 7, dtype=mx.uint8))
    return mx.broadcast_to(z, (n // 32768 + 1, n % 32768 + 1, d // 65536 + 1, d % 65536 + 1, ns + 1, nw + 1, P + 1))


def decode_launch(
    launch, q, k_packed, v_packed, n, sinks, window, *, k_bits, v_bits, group_size,
    scale, q_start, causal, mask=None, nsplit=None, nsg=4, merge=True, pf=None,
    rotate_q=False, rotate_out=False, out_dtype=mx.float32, nw=None, warps_per_core=WARPS_PER_CORE, body=None,
    ku=None, dpl=None, check=False, setup_only=False,
):
    """The kernel sequence of :func:`decode_attention` on ``launch`` (``merge=False``:
    the per-threadgroup partials (out (T, rows, D), lse (T, rows)), for benchmarks).
    ``nw``: the window rows in use (default: all of ``window``'s).  ``body``: "mma" or
    "simd" (:func:`decode_body`); ``ku``, ``pf``: the simd body's keys per lane group and
    loop step, and whether the next step's are loaded ahead (default ``SIMD_KU``); ``dpl``: its
    dims per lane (8 or 16, default by :func:`simd_tile`). ``check``: None where this
    instantiation fails its self-check (:mod:`.selfcheck`). ``setup_only``: the setup
    :func:`decode_run` takes, no launch."""
    body = decode_body(launch, body)
    n = int(n) if k_packed is not None else 0
    ns = 0 if sinks is None else sinks[0].shape[2]
    if window is None:
        nw = 0
    elif nw is None:
        nw = window[0].shape[2]
    elif not 0 <= nw <= min(window[0].shape[2], window[1].shape[2]):
        raise ValueError(f"nw={nw} exceeds the window buffers {window[0].shape[2]}")
    # everything but the arrays and the per-step integers, worked out once per
    # shapes and options (a decode step asks again for every layer)
    key = (
        q.shape, q.dtype, None if k_packed is None else (k_packed[0].shape, k_packed[1].dtype, v_packed[0].shape),
        n, ns, None if sinks is None else sinks[0].dtype, None if window is None else (window[0].shape, window[0].dtype),
        nw > 0, mask_sig(mask), k_bits, v_bits, group_size, float(scale),
        bool(causal), nsplit, warps_per_core, nsg, pf, bool(rotate_q), bool(rotate_out), out_dtype, body, ku, dpl,
    )
    st = _DECODE_SETUPS.get(key)
    if st is None:
        if len(_DECODE_SETUPS) > 4096:
            _DECODE_SETUPS.clear()
        st = _DECODE_SETUPS[key] = _decode_setup(
            q, k_packed, v_packed, n, sinks, window, ns, nw, k_bits, v_bits, group_size, scale, causal, mask,
            nsplit, nsg, pf, rotate_q, rotate_out, out_dtype, warps_per_core, body, ku, dpl)
    if setup_only:
        return st
    return decode_run(launch, st, q, k_packed, v_packed, n, sinks, window, nw, q_start, mask, merge=merge,
                      check=check, rotate_out=rotate_out, out_dtype=out_dtype)


def decode_run(launch, st, q, k_packed, v_packed, n, sinks, window, nw, q_start, mask=None, *, merge=True,
               check=False, rotate_out=False, out_dtype=mx.float32):
    """The launches of a setup :func:`decode_launch` made (``st``, kept by callers that
    see the same shapes every decode step) for this step's arrays and integers."""
    n = int(n) if k_packed is not None else 0
    ns = 0 if sinks is None else sinks[0].shape[2]
    nw = 0 if window is None else nw
    if st.P is None:  # nothing to attend to
        B, Hq, L, D = q.shape
        return mx.zeros((B, Hq, L, D), dtype=out_dtype), mx.full((B, Hq, L), -math.inf, dtype=mx.float32)
    if check:
        ok = st.checked.get(launch)
        if ok is None:  # once per setup and launcher; selfcheck remembers per instantiation
            rep = q.shape[1] // (k_packed[0] if k_packed is not None else (sinks or window)[0]).shape[1]
            ok = decode_ok(launch, decode_launch, st.decode[0], rep, q.shape[2], rotate_out, out_dtype)
            if applies(launch):  # a verdict (not "unchecked") is kept
                st.checked[launch] = ok
        if not ok:
            return None
    sk, sv = sinks if sinks is not None else st.empty
    wk, wv = window if window is not None else st.empty
    kp = k_packed if k_packed is not None else st.kp0
    vp = v_packed if v_packed is not None else st.vp0
    marr = st.marr if mask is None else mask_arg(mask)[0]
    carrier = carrier_view7(n, int(q_start) - ns, ns, nw, st.P)
    inputs = [q, *kp, *vp, sk, sv, wk, wv, marr, carrier, st.fparams, st.signs]
    if merge and st.merge is not None and getattr(launch, "fused_merge", False):
        # the tile counters: fresh zeros per launch (one op). A workspace kept across
        # launches would race: MLX's CUDA graphs run launches with no data dependency at once.
        ws = mx.zeros((st.counters,), dtype=mx.uint32)
        return tuple(launch(st.name + "_fused", inputs + [ws], *st.fused)[2:4])
    out, lse = launch(st.name, inputs, *st.decode)
    if not merge:
        return out, lse
    if st.merge is not None:
        return launch("sdpa_merge", [out, lse, *st.merge_inputs], *st.merge)
    B, Hq, L, D = q.shape
    return out.reshape(B, Hq, L, D), lse.reshape(B, Hq, L)


_DECODE_SETUPS = {}


class _DecodeSetup:
    """What :func:`decode_launch` needs besides the arrays and the per-step integers."""

    P = None


def _decode_setup(q, k_packed, v_packed, n, sinks, window, ns, nw, k_bits, v_bits, group_size, scale, causal,
                  mask, nsplit, nsg, pf, rotate_q, rotate_out, out_dtype, warps_per_core, body, ku, dpl):
    st = _DecodeSetup()
    st.checked = {}  # launcher -> its self-check verdict
    B, Hq, L, D = q.shape
    dense = [x for x in (sinks, window) if x is not None]
    for name, run in (("sinks", sinks), ("window", window)):
        if run is not None and any(x.shape[-1] != D for x in run):
            raise ValueError(f"the {name}' keys and values have head dims {run[0].shape[-1]} and "
                             f"{run[1].shape[-1]}; the decode kernels take the queries' {D} for both")
    Hkv = (k_packed[0] if k_packed is not None else dense[0][0]).shape[1]
    rep = Hq // Hkv
    if body == "simd":
        tiles, RT, DPL = simd_tile(rep * L, D, dpl)
    else:
        tiles = -(-(rep * L) // 8)
    if k_packed is not None and n > k_packed[0].shape[2]:
        raise ValueError(f"n={n} exceeds the cache capacity {k_packed[0].shape[2]}")
    if (rotate_q or rotate_out) and not rotates_in_kernel(D):
        raise ValueError(f"the decode kernels rotate only power-of-two head dims >= 32, not {D}")
    P = decode_plan(B, Hkv, tiles, n, nsplit, warps_per_core)
    warps = P + (1 if ns + nw else 0)
    if warps == 0:
        return st
    st.P = P
    nsg = max(1, min(nsg, warps))
    parts = -(-warps // nsg)  # threadgroups along x, one partial each
    sdt = (k_packed[1] if k_packed is not None else dense[0][0]).dtype
    st.kp0 = const(("kp0", B, Hkv, D, k_bits, sdt), lambda: (
        mx.zeros((B, Hkv, 1, D * k_bits // 32), mx.uint32), mx.zeros((B, Hkv, 1, D // group_size), sdt),
        mx.zeros((B, Hkv, 1, D // group_size), sdt)))
    st.vp0 = const(("vp0", B, Hkv, D, v_bits, sdt), lambda: (
        mx.zeros((B, Hkv, 1, D * v_bits // 32), mx.uint32), mx.zeros((B, Hkv, 1, D // group_size), sdt),
        mx.zeros((B, Hkv, 1, D // group_size), sdt)))
    dt = dense[0][0].dtype if dense else q.dtype
    empty = const(("dense0", D, dt), lambda: mx.zeros((1, 1, 1, D), dtype=dt))
    st.empty = (empty, empty)
    st.marr, mkind = mask_arg(mask)
    st.signs, st.fparams = rotation_args(D, rotate_q, float(scale))
    template = [
        ("T", q.dtype), ("S", sdt), ("DT", dt), ("MT", st.marr.dtype), ("D", D),
        ("KB", k_bits), ("VB", v_bits), ("GS", group_size), ("MASK", mkind), ("CAUSAL", bool(causal)),
        ("NSG", nsg),
    ]
    if body == "simd":
        st.name = "sdpa_decode_simd"
        template += [("ROTQ", bool(rotate_q)), ("RT", RT), ("DPL", DPL), ("KU", int(ku or SIMD_KU[0])),
                     ("PF", int(SIMD_KU[1] if pf is None else pf))]
    else:
        st.name = "sdpa_decode"
        # WIDE: scales or dense runs wider than fp16 (bf16, fp32); blocks whose values would
        # leave fp16 are computed in fp32 (sdpa_decode.metal)
        wide = (k_packed is not None and sdt != mx.float16) or (bool(dense) and dt != mx.float16)
        template += [("PF", int((P > 0 and -(-n // P) >= DECODE_PF_MIN_KEYS) if pf is None else pf)),
                     ("ROTQ", bool(rotate_q)), ("WIDE", bool(wide))]
    rows = B * Hq * L
    st.decode = (
        template, (parts * nsg * 32, Hkv * tiles, B), (nsg * 32, 1, 1),
        [(parts, rows, D), (parts, rows)], [mx.float32, mx.float32],
    )
    st.merge = None
    if parts > 1 or rotate_out or out_dtype != mx.float32:
        st.merge_inputs, st.merge = merge_args(rows, (B, Hq, L, D), rotate_out, out_dtype)
        # the same with the merge in the launch: + OT, ROTO; + final out, lse, tile counters
        t, grid, tg, shapes, dtypes = st.decode
        st.fused = (
            t + [("OT", out_dtype), ("ROTO", bool(rotate_out))], grid, tg,
            shapes + [(B, Hq, L, D), (B, Hq, L)], dtypes + [out_dtype, mx.float32],
        )
        st.counters = max(B * Hkv * tiles, MIN_KERNEL_WORDS)  # one per row tile, padded
    return st


def decode_attention(q, k_packed, v_packed, n, sinks, window, **kw):
    """Attention of ``q`` (L <= 8) over a whole cache view in one kernel launch
    (plus the split merge): the packed run ``k_packed``/``v_packed`` (first ``n``
    tokens, or None), and the unquantized ``sinks`` and ``window`` (``(keys,
    values)`` (B, Hkv, *, D) or None).  Positions: sinks from 0, the packed run
    right after them, the window after the packed run.  ``mask`` (bool or
    additive) is indexed by absolute key position.  Returns ``(out, lse)`` as
    :func:`packed_attention`.  Scores and values go through fp16 (tensor cores), the query
    rows scaled by a power of two first; blocks whose bf16/fp32 keys or values would leave
    fp16 are computed in fp32 (``metal/sdpa_decode.metal``, ``WIDE``).
    ``rotate_q``/``rotate_out``: the kernels apply the cache's rotation to the
    queries / its inverse to the output (see :func:`rotates_in_kernel`);
    ``out_dtype``: the dtype of ``out``. None where this configuration failed its
    self-check (:mod:`.selfcheck`): the caller takes the reference.
    """
    return decode_launch(launcher(), q, k_packed, v_packed, n, sinks, window, check=True, **kw)
