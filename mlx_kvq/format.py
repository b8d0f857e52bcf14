"""The packed format of the cache: validation, quantize, dequantize, sizes.

A packed tensor is the tuple ``mx.quantize`` returns for the last axis:
``(words, scales, biases)`` for ``mode="affine"`` and ``(words, scales)`` for the
microscaling modes (``mxfp8``, ``mxfp4``, ``nvfp4``).
"""

from functools import lru_cache, partial

import mlx.core as mx

FLOATS = (mx.float16, mx.bfloat16, mx.float32)

# mode -> (allowed bits, allowed group sizes)
MODES = {
    "affine": ((2, 3, 4, 5, 6, 8), (32, 64, 128)),
    "mxfp8": ((8,), (32,)),
    "mxfp4": ((4,), (32,)),
    "nvfp4": ((4,), (16,)),
}


AFFINE_BITS = MODES["affine"][0]
GROUP_SIZES = MODES["affine"][1]
FP_FORMATS = {m: (bits[0], groups[0]) for m, (bits, groups) in MODES.items() if m != "affine"}
MODE_ID = {"affine": 0, "mxfp4": 1, "nvfp4": 2, "mxfp8": 3}  # the kernels' MODE template value


def default_group_size(mode):
    return 64 if mode == "affine" else MODES.get(mode, (None, (None,)))[1][0]


def check(bits, group_size, mode="affine", head_dim=None, what="kv"):
    """Raise ``ValueError`` with a clear message if the format is not supported."""
    if mode not in MODES:
        raise ValueError(
            f"Unsupported {what} quantization mode {mode!r}; choose one of {sorted(MODES)}."
        )
    allowed_bits, allowed_groups = MODES[mode]
    if bits not in allowed_bits:
        raise ValueError(
            f"Unsupported {what} bits {bits!r} for mode {mode!r}; choose one of {list(allowed_bits)}."
        )
    if group_size not in allowed_groups:
        raise ValueError(
            f"Unsupported {what} group size {group_size!r} for mode {mode!r}; "
            f"choose one of {list(allowed_groups)}."
        )
    if head_dim is not None and head_dim % group_size != 0:
        raise ValueError(
            f"head_dim {head_dim} is not divisible by the {what} group size {group_size}; "
            f"choose a group size that divides it (e.g. 32)."
        )


def quantize(x, bits, group_size, mode="affine"):
    """Pack ``x`` along its last axis; returns a tuple of arrays."""
    return tuple(mx.quantize(x, group_size=group_size, bits=bits, mode=mode))


def dequantize(packed, bits, group_size, mode="affine", dtype=mx.float16):
    """Unpack a tuple from :func:`quantize` back to ``dtype``.

    ``mx.dequantize`` computes ``scale * q + bias`` in the scales' dtype: with float16
    scales a group near the float16 maximum overflows (``-7500 * 15 + 60000``) even
    where the result fits. Affine scales and biases are taken in float32 for a float32
    result (the decode kernels compute in float32 too); a half-precision result saturates.
    """
    if mode == "affine":
        w, scales, biases = packed
        if dtype == mx.float32 and scales.dtype != mx.float32:
            scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
    else:
        (w, scales), biases = packed, None
    return mx.dequantize(
        w, scales, biases, group_size=group_size, bits=bits, mode=mode, dtype=dtype
    )


def fit(x, dtype):
    """``x`` cast to ``dtype`` (a float dtype of the cache's runs), every value finite:
    finite values beyond its range saturate at its largest finite value (a float16 cast
    of 1e5 gives inf) and inf and NaN become 0, so that one non-finite channel stays in
    its channel instead of poisoning its whole token through the group scale (and the
    rotation), and the other channels of the token keep their precision. One compiled
    function per pair of dtypes: on the CPU the unfused ops (``mx.nan_to_num``: 13 graph
    nodes) cost ~30 us per call, four calls per layer and decode step."""
    return _fitter(x.dtype, dtype)(x)


@lru_cache(maxsize=None)
def _fitter(src, dst):
    top, big = mx.finfo(src).max, mx.finfo(dst).max

    def f(x):
        y = mx.clip(x, -big, big) if top > big else x
        return mx.where(mx.abs(x) <= top, y, 0.0).astype(dst)  # NaN compares false

    return mx.compile(f, shapeless=True)


def code_planes(words, bits):
    """The codes of packed ``words`` (2, 4 or 8 bits, which never straddle a byte) as float32
    planes: plane ``i`` holds each byte's ``i``-th code (``mx.quantize`` packs from the low
    bits up; every platform MLX runs on is little-endian), the dims ``i, i + 8 // bits, ...``, so
    that ``x · codes = sum(x[..., i :: 8 // bits] · plane_i)``. Byte-wise shifts and masks in
    one compiled call: on the CPU, with float32 matmuls after them, the cheapest way MLX has to
    multiply by packed codes (``benchmarks/lab/cpu_decode_ops.py --products``)."""
    return _planes(words.view(mx.uint8), bits)


@partial(mx.compile, shapeless=True)
def _planes(b, bits):
    mask = (1 << bits) - 1
    return [((b >> (bits * i)) & mask).astype(mx.float32) for i in range(8 // bits)]


def overflows(xs, dtype):
    """Whether a finite value of the arrays ``xs`` lies beyond ``dtype``'s range (one sync)."""
    big = mx.finfo(dtype).max
    xs = [x for x in xs if mx.finfo(x.dtype).max > big]
    if not xs:
        return False
    top = [mx.abs(mx.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)).max() for x in xs]
    return (mx.stack(top).max() > big).item()


def packed_dims(head_dim, bits, group_size, mode="affine"):
    """Last-axis sizes and dtypes of each packed array for one token."""
    words = head_dim * bits // 32
    groups = head_dim // group_size
    if mode == "affine":
        return [(words, mx.uint32), (groups, None), (groups, None)]
    return [(words, mx.uint32), (groups, mx.uint8)]


def bytes_per_token(head_dim, bits, group_size, mode="affine", scale_bytes=2):
    """Bytes one head of one token takes in the packed format."""
    n = head_dim * bits // 8
    groups = head_dim // group_size
    return n + (2 * groups * scale_bytes if mode == "affine" else groups)


def unpacked_dim(words, bits):
    """The head dim that ``words`` uint32 words of ``bits``-bit codes hold."""
    return words * 32 // bits


def supported(bits, group_size, mode, head_dim):
    """Whether ``(bits, group_size, mode)`` is a format and ``group_size`` divides ``head_dim``."""
    allowed = MODES.get(mode)
    return bool(allowed) and bits in allowed[0] and group_size in allowed[1] and head_dim % group_size == 0


def is_packed(p, B, H, head_dim, bits, group_size, mode):
    """Whether ``p`` is a packed tuple (B, H, C, ...) of this format for ``head_dim``."""
    if not isinstance(p, (tuple, list)) or len(p) != (3 if mode == "affine" else 2):
        return False
    w, s = p[0], p[1]
    if w.ndim != 4 or w.dtype != mx.uint32 or tuple(w.shape[:2]) != (B, H):
        return False
    if w.shape[3] * 32 != head_dim * bits:
        return False
    if tuple(s.shape) != (B, H, w.shape[2], head_dim // group_size):
        return False
    if mode == "affine":
        return s.dtype in FLOATS and p[2].dtype == s.dtype and tuple(p[2].shape) == tuple(s.shape)
    return s.dtype == mx.uint8
