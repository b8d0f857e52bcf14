"""The packed format of the cache: validation, quantize, dequantize, sizes.

A packed tensor is the tuple ``mx.quantize`` returns for the last axis:
``(words, scales, biases)`` for ``mode="affine"`` and ``(words, scales)`` for the
microscaling modes (``mxfp8``, ``mxfp4``, ``nvfp4``).
"""

import mlx.core as mx

# mode -> (allowed bits, allowed group sizes)
MODES = {
    "affine": ((2, 3, 4, 5, 6, 8), (32, 64, 128)),
    "mxfp8": ((8,), (32,)),
    "mxfp4": ((4,), (32,)),
    "nvfp4": ((4,), (16,)),
}


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
    """Unpack a tuple from :func:`quantize` back to ``dtype``."""
    if mode == "affine":
        w, scales, biases = packed
    else:
        (w, scales), biases = packed, None
    return mx.dequantize(
        w, scales, biases, group_size=group_size, bits=bits, mode=mode, dtype=dtype
    )


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
