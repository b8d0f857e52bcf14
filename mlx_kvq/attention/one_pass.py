"""Decode over a whole view in one softmax, with pure-MLX ops: the scores of the sinks, the
packed run (its codes as float32 planes, :func:`planes_scores`, or ``mx.quantized_matmul`` on
the packed words) and the window side by side, one softmax, then each run's values (the packed
run's by the same planes, :func:`planes_values`, or ``mx.quantized_matmul``). It is the
CPU's decode path where the CPU body (``kernels.cpu``, :func:`cpu_one_pass`: the same one
softmax in C++) is not built: a handful of ops per layer instead of a partial result per run
and their merge (``bench_generate.py --model embedded``)."""

import mlx.core as mx

from .. import format, kernels
from ..kernels import cpu
from ..rotation import rotate
from .softmax import softmax
from .streams import cores, keep_cpu_buffers, on, spread, streams_for

ONE_PASS_ELEMENTS = 1 << 23  # the most float32 scores a step takes in one softmax


def on_cpu():
    """Whether MLX computes on the CPU now. ``mx.quantized_matmul`` serves these products
    there; MLX's CUDA backend has no implementation for some of their shapes (e.g. float32
    activations, group 32)."""
    return mx.default_device() == mx.cpu


def decode_one_pass(q, view, scale, mask, sinks, dtype):
    """The path: :func:`one_pass_attention` on the CPU, where the kernels do not run."""
    if kernels.enabled() or not on_cpu():
        return None
    if kernels.is_decode(q.shape[2]):
        out = cpu_one_pass(q, view, scale, mask, sinks)
        if out is not None:
            return out
    B = q.shape[0]
    arrays = isinstance(mask, mx.array)
    streams = streams_for(B, q, view.sinks, view.packed[:2], view.window, mask if arrays else ()) \
        if B > 1 and kernels.is_decode(q.shape[2]) else None
    if not streams:
        return one_pass_attention(q, view, scale, mask, sinks, dtype)
    outs, size = [], -(-B // len(streams))  # the rows in groups, a stream each
    with spread(streams, outs):
        for i, a in enumerate(range(0, B, size)):
            b = min(B, a + size)
            m = mask[a:b] if arrays and mask.ndim == 4 and mask.shape[0] == B else mask
            with on(streams, i):
                outs.append(one_pass_attention(q[a:b], view.rows(a, b), scale, m, sinks, dtype))
            if outs[-1] is None:  # over the one-pass budget: partial results over the whole batch
                return None
    return mx.concatenate(outs, axis=0)


def cpu_one_pass(q, view, scale, mask, sinks):
    """A decode step's one softmax over the view's runs (sinks, packed, window: key ``j`` at
    position ``j``) by the CPU body (``kernels.cpu``), every batch row at once; None where it
    does not apply (not built, a packed format it does not read, inside a transform)."""
    f = view.format
    k, v, n = view.packed
    if not cpu.applies() or (n and not cpu.packed_applies(f, k[0], v[0])):
        return None
    (sk, sv), (wk, wv) = view.sinks, view.window
    s = 0 if sk is None else sk.shape[2]
    w = 0 if wk is None else wk.shape[2]
    runs = ([cpu.dense(sk, sv, 0, 0)] if s else []) + ([cpu.packed(k, v, n, f, s, s)] if n else []) + \
           ([cpu.dense(wk, wv, s + n, s + n)] if w else [])
    if not runs:
        return None
    if f.rotate:
        q = rotate(q.astype(mx.float32))  # float32: q R can exceed float16
    causal = isinstance(mask, str)
    got = cpu.attention(q, runs, scale=scale, q_start=view.q_start, causal=causal, threads=cores(),
                        mask=None if causal else mask, sinks=sinks)
    if got is None:
        return None
    return rotate(got[0], inverse=True) if f.rotate == "kv" else got[0]


def one_pass_attention(q, view, scale, mask, sinks, dtype):
    """The attention output of decode queries ``q`` (B, Hq, L, D) over ``view``, or None
    where it does not apply (prefill, scores over ``ONE_PASS_ELEMENTS``). It is also what a
    decode step takes when its kernel configuration failed its self-check."""
    B, Hq, L, D = q.shape
    if not kernels.is_decode(L):
        return None
    f = view.format
    k, v, n = view.packed
    (sk, sv), (wk, wv) = view.sinks, view.window
    s = 0 if sk is None else sk.shape[2]
    w = 0 if wk is None else wk.shape[2]
    total = s + n + w
    if total == 0 or B * Hq * L * (total + 1) > ONE_PASS_ELEMENTS:
        return None
    Hkv = (k[0] if n else sk if s else wk).shape[1]
    rot = f.rotate
    if rot:
        q = rotate(q.astype(mx.float32))  # float32: q R can exceed float16
    rows = Hq // Hkv * L
    qf = (q.astype(mx.float32) * scale).reshape(B, Hkv, rows, D)
    qmm = lambda x, p, bits, t: mx.quantized_matmul(
        x, *(a[:, :, :n] for a in p), transpose=t, group_size=f.group_size, bits=bits, mode=f.mode)
    # positions run sinks, packed, window: key j sits at position j
    parts = []
    if s:
        parts.append(qf @ sk.astype(mx.float32).swapaxes(-1, -2))
    if n:
        cuts = _planes_cuts(f, n, k[0].shape, f.k_bits)
        if cuts:  # keys in pieces of up to UNPACK_ELEMENTS plane elements
            parts += [planes_scores(qf, _tokens(k, a, b), f.k_bits) for a, b in zip(cuts, cuts[1:])]
        else:
            parts.append(qmm(qf, k, f.k_bits, True))
    if w:
        parts.append(qf @ wk.astype(mx.float32).swapaxes(-1, -2))
    scores = (mx.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]).reshape(B, Hq, L, total)
    if isinstance(mask, str):
        visible = mx.arange(total)[None] <= mx.arange(view.q_start, view.q_start + L)[:, None]
        scores = mx.where(visible, scores, -mx.inf)
    elif mask is not None:
        scores = mx.where(mask, scores, -mx.inf) if mask.dtype == mx.bool_ else scores + mask.astype(mx.float32)
    p = softmax(scores, sinks).reshape(B, Hkv, rows, total)
    out = 0
    if s:
        out = out + p[..., :s] @ sv.astype(mx.float32)
    if n:
        cuts = _planes_cuts(f, n, v[0].shape, f.v_bits)
        pn = p[..., s : s + n]
        if cuts:
            out = out + sum(planes_values(pn[..., a:b], _tokens(v, a, b), f.v_bits) for a, b in zip(cuts, cuts[1:]))
        else:
            out = out + qmm(pn, v, f.v_bits, False)
    if w:
        out = out + p[..., s + n :] @ wv.astype(mx.float32)
    out = out.reshape(B, Hq, L, -1)
    if rot == "kv":
        out = rotate(out, inverse=True)  # in float32, as the kernels do: it can exceed float16
    return out


UNPACK_MIN_KEYS = 512  # keys over the rows of a call; below, mx.quantized_matmul's fewer ops win
UNPACK_ELEMENTS = 1 << 22  # float32 elements of the key planes of one piece of the keys (16 MiB)


def _planes_cuts(f, n, words_shape, bits):
    """Where the ``n`` packed keys are cut for :func:`planes_scores` and :func:`planes_values`
    (pieces of up to ``UNPACK_ELEMENTS`` plane elements), or None: ``mx.quantized_matmul``
    takes them. On the CPU (SmolLM2's shape, 2, 4 and 8 bits, groups 32 and 64) the planes
    take the scores over 2048 keys 1.5-3.4x faster than ``mx.quantized_matmul``, as fast at
    512 keys of one row, and the weighted values 1.4-2.0x faster over 2048 keys, 1.2-1.7x over
    512 keys but for one row in groups of 32 (115 against 93 us; its scores save 112 us)
    (``benchmarks/lab/cpu_decode_ops.py --products``). With the values by planes too, a decode
    step's attention over 2048 keys a row takes 0.66-1.01 against 0.85-1.25 ms a layer for one
    row, 6.9-7.7 against 7.9-8.6 ms for 16 (``benchmarks/lab/cpu_decode_values.py``)."""
    B, H, _, words = words_shape
    if f.mode != "affine" or bits not in (2, 4, 8) or B * n < UNPACK_MIN_KEYS:
        return None
    keep_cpu_buffers()
    pieces = -(-B * H * n * format.unpacked_dim(words, bits) // UNPACK_ELEMENTS)
    return [n * i // pieces for i in range(pieces + 1)]


def _tokens(packed, a, b):
    """Tokens ``a:b`` of a packed run ``(words, scales, biases)``: its keys or its values."""
    return tuple(x[:, :, a:b] for x in packed)


def _in_group(D, G):
    """(G, D) bool: dim d lies in group g."""
    return mx.arange(D)[None] // (D // G) == mx.arange(G)[:, None]


def planes_scores(q, packed, bits):
    """``q`` (B, H, R, D) float32 times the affine packed keys ``(words, scales, biases)``
    transposed: with key ``k = s_g c_g + b_g`` per group ``g``, ``q·k = sum_g s_g (q_g·c_g) +
    b_g sum(q_g)``. The codes ``c`` stay codes (``format.code_planes``, no scale or bias
    applied to them); each plane is one float32 matmul, against ``q`` split into its groups
    where a key has more than one."""
    w, s, b = packed
    B, H, R, D = q.shape
    G = s.shape[-1]
    per = 8 // bits
    qg = q
    if G > 1:  # row (r, g): q_r outside group g zeroed
        qg = mx.where(_in_group(D, G), q[..., None, :], 0.0).reshape(B, H, R * G, D)
    dots = sum(qg[..., i::per] @ c.swapaxes(-1, -2) for i, c in enumerate(format.code_planes(w, bits)))
    s, b = s.astype(mx.float32).swapaxes(-1, -2), b.astype(mx.float32).swapaxes(-1, -2)  # (B, H, G, n)
    sums = q.reshape(B, H, R, G, D // G).sum(-1)
    if G == 1:
        return dots * s + sums * b
    return (dots.reshape(B, H, R, G, -1) * s[:, :, None]).sum(-2) + sums @ b


def planes_values(p, packed, bits):
    """Weights ``p`` (B, H, R, n) float32 times the affine packed values ``(words, scales,
    biases)``: with ``v_d = s_g(d) c_d + b_g(d)``, ``p·v_d = (p s_g(d))·c_d + p·b_g(d)``, each code
    plane (``format.code_planes``: the dims ``i, i + 8 // bits, ...``) one float32 matmul
    against the weights times each group's scales."""
    w, s, b = packed
    B, H, R, n = p.shape
    G = s.shape[-1]
    per = 8 // bits
    planes = format.code_planes(w, bits)
    D = planes[0].shape[-1] * per
    s, b = s.astype(mx.float32).swapaxes(-1, -2), b.astype(mx.float32)  # (B, H, G, n), (B, H, n, G)
    if G == 1:
        outs = [(p * s) @ c for c in planes]
    else:  # rows (r, g): the weights times group g's scales; each dim keeps its group's row
        ps = (p[..., None, :] * s[:, :, None]).reshape(B, H, R * G, n)
        inside = _in_group(D, G)
        outs = [mx.where(inside[:, i::per], (ps @ c).reshape(B, H, R, G, -1), 0.0).sum(-2)
                for i, c in enumerate(planes)]
    out = mx.stack(outs, axis=-1).reshape(B, H, R, D) if per > 1 else outs[0]
    pb = p @ b  # (B, H, R, G)
    return out + (pb if G == 1 else mx.repeat(pb, D // G, axis=-1))
