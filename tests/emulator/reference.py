"""Plain fp32 reference for the kernel tests and the benchmark: dequantize with
mx.dequantize (scales upcast to float32, so no fp16 rounding), then fp32
matmuls and an explicit masked softmax."""

import math

import mlx.core as mx
import numpy as np


def dequant(p, n, bits, group_size, mode):
    if mode == "plain":  # already dense (B, H, C, D)
        return p[0][:, :, :n].astype(mx.float32)
    if mode == "affine":
        w, s, b = p
        return mx.dequantize(
            w[:, :, :n], s[:, :, :n].astype(mx.float32), b[:, :, :n].astype(mx.float32),
            group_size=group_size, bits=bits, dtype=mx.float32,
        )
    w, s = p
    try:
        return mx.dequantize(
            w[:, :, :n], s[:, :, :n], group_size=group_size, bits=bits, mode=mode,
            dtype=mx.float32,
        )
    except ValueError:
        # mx.dequantize (0.32.4) rejects some shapes it quantizes, e.g. nvfp4
        # with head_dim 80; decode those in numpy
        return _np_fp_dequant(w[:, :, :n], s[:, :, :n], bits, group_size, mode)


_E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def _e4m3(c):
    c = c.astype(np.int64)
    s = np.where(c >> 7, -1.0, 1.0)
    e = (c >> 3) & 15
    m = c & 7
    return s * np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * 2.0 ** (e - 7))


def _np_fp_dequant(w, s, bits, group_size, mode):
    by = np.array(w).view(np.uint8)
    b = np.unpackbits(by, axis=-1, bitorder="little")
    b = b.reshape(*b.shape[:-1], -1, bits)
    codes = (b * (1 << np.arange(bits))).sum(-1)
    vals = _E2M1[codes] if bits == 4 else _e4m3(codes)
    sc = np.array(s)
    scv = _e4m3(sc) if mode == "nvfp4" else np.where(sc == 0, 2.0**-127, 2.0 ** (sc.astype(np.float64) - 127))
    out = vals.reshape(*vals.shape[:-1], -1, group_size) * scv[..., None]
    return mx.array(out.reshape(vals.shape).astype(np.float32))


def reference_attention(q, kp, vp, n, *, k_bits, v_bits, group_size, mode, scale,
                        q_start, k_start, causal, mask=None):
    k = dequant(kp, n, k_bits, group_size, mode)
    v = dequant(vp, n, v_bits, group_size, mode)
    Hq, L = q.shape[1], q.shape[2]
    rep = Hq // k.shape[1]
    k = mx.repeat(k, rep, axis=1)
    v = mx.repeat(v, rep, axis=1)
    s = (q.astype(mx.float32) * scale) @ k.transpose(0, 1, 3, 2)
    vis = mx.ones((L, n), dtype=mx.bool_)
    if causal:
        vis = (mx.arange(n)[None, :] + k_start) <= (mx.arange(L)[:, None] + q_start)
    if mask is not None:
        if mask.dtype == mx.bool_:
            vis = vis & mask
        else:
            s = s + mask.astype(mx.float32)
    s = mx.where(vis, s, -math.inf)
    m = s.max(-1, keepdims=True)
    m = mx.where(mx.isinf(m), 0.0, m)
    p = mx.exp(s - m)
    den = p.sum(-1, keepdims=True)
    ok = den > 0
    out = mx.where(ok, (p @ v) / mx.where(ok, den, 1.0), 0.0)
    lse = mx.where(ok[..., 0], m[..., 0] + mx.log(mx.where(ok, den, 1.0)[..., 0]), -math.inf)
    return out, lse


def rel_err(a, b):
    a = a.astype(mx.float32)
    b = b.astype(mx.float32)
    return float(mx.sqrt(mx.sum((a - b) ** 2)) / mx.maximum(mx.sqrt(mx.sum(b**2)), 1e-30))
