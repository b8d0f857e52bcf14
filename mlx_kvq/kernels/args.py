"""What the launches share: their argument packing (constant arrays, masks, the
per-call integers carried in a broadcast view's shape, rotation parameters) and the
shape checks of queries, packed K/V and masks."""

import mlx.core as mx

from .. import format as fmt
from ..rotation import signs as rotation_signs

_CONSTANTS = {}


def const(key, make):
    """Small constant arrays (dummy inputs, scale) made once, not per call."""
    v = _CONSTANTS.get(key)
    if v is None:
        v = _CONSTANTS[key] = make()
        mx.eval(v)
    return v


def mask_kind(mask):
    """The kernels' mask kind: 0 none, 1 bool keep-mask, 2 additive."""
    return 0 if mask is None else (1 if mask.dtype == mx.bool_ else 2)


def mask_arg(mask):
    """(4-D array, kind) for the kernel (``mask_kind``)."""
    if mask is None:
        return const("f32", lambda: mx.zeros((1, 1, 1, 1), dtype=mx.float32)), 0
    m = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape)) if mask.ndim < 4 else mask
    return m, mask_kind(m)


def carrier_view(n, delta):
    """A broadcast view (no buffer) whose shape carries n and q_start - k_start."""
    if not (0 <= n < 2**30 and -(2**31) <= delta < 2**31):
        raise ValueError("n or q_start - k_start out of range")
    d = delta + 2**31
    z = const("u8x4", lambda: mx.zeros((1, 1, 1, 1), dtype=mx.uint8))
    return mx.broadcast_to(z, (n // 32768 + 1, n % 32768 + 1, d // 65536 + 1, d % 65536 + 1))


def rotation_args(D, rotate, scale):
    """(signs, fparams) inputs: the rotation's signs (a dummy when not rotating) and
    ``[scale, 1 / sqrt(D)]``, the scale divided by sqrt(D) when rotating (the kernels'
    transform is unnormalized)."""
    if rotate:
        signs = const(("signs", D), lambda: rotation_signs(D))
        scale = scale * D**-0.5
    else:
        signs = const("signs0", lambda: mx.zeros((1,), dtype=mx.float32))
    return signs, const(("scale", float(scale), D), lambda: param_array([scale, D**-0.5]))


# MLX's CUDA allocator serves arrays of 8 bytes or less from a small-block pool of managed
# memory whose pages the host touches, and a kernel's first read from such a page waits
# for it to migrate: ~10% of a 128k-key decode launch under ncu (H100). Small arrays the
# kernels read are padded to this many 4-byte words.
MIN_KERNEL_WORDS = 8


def param_array(values):
    """float32 launch parameters as an array of at least MIN_KERNEL_WORDS words."""
    values = [float(v) for v in values]
    return mx.array(values + [0.0] * max(0, MIN_KERNEL_WORDS - len(values)), dtype=mx.float32)


def rotates_in_kernel(D):
    """Whether the decode kernels can apply the cache's rotation themselves
    (a fast Walsh-Hadamard transform: D a power of two, at least 32)."""
    return D >= 32 and D & (D - 1) == 0


def mask_sig(mask):
    """What the decode kernel's setup depends on in a mask: all but its width (the keys,
    which grow every step; the kernel reads the mask's shape and strides at launch)."""
    return None if mask is None else (mask.shape[:-1], mask.dtype)


def mask_ok(mask, B, Hq, L, n):
    if mask is None:
        return True
    if not isinstance(mask, mx.array):
        return False  # e.g. the string "causal": pass causal=True instead
    if mask.dtype not in (mx.bool_,) + fmt.FLOATS or mask.ndim > 4:
        return False
    shape = (1,) * (4 - mask.ndim) + tuple(mask.shape)
    return all(s in (1, t) for s, t in zip(shape, (B, Hq, L, n)))


def pair_ok(q, k_packed, v_packed, k_bits, v_bits, group_size, mode):
    """Packed K and V of the right shapes for ``q`` (B, Hq, L, D): GQA heads, words,
    scales of one dtype, and a grid within the CUDA y/z limits (tiles of 8 rows)."""
    B, Hq, L, D = q.shape
    Hkv = k_packed[0].shape[1]
    if Hkv < 1 or Hq % Hkv:
        return False
    if not (fmt.is_packed(k_packed, B, Hkv, D, k_bits, group_size, mode)
            and fmt.is_packed(v_packed, B, Hkv, D, v_bits, group_size, mode)):
        return False
    if k_packed[1].dtype != v_packed[1].dtype:
        return False
    return Hkv * -(-(Hq // Hkv) * L // 8) <= 65535 and B <= 65535
