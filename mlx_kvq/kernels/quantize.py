"""quantize_append: new tokens packed exactly as ``mx.quantize`` packs them
(``metal/quantize_append.metal``) and written into the cache's preallocated buffers."""

import mlx.core as mx

from .. import format as fmt
from .backend import enabled, launcher, on_gpu
from .selfcheck import quantize_ok

def quantize_supported(x, bits, group_size, mode):
    return (
        mode == "affine"
        and bits in fmt.AFFINE_BITS
        and group_size in fmt.GROUP_SIZES
        and isinstance(x, mx.array)
        and x.dtype in fmt.FLOATS
        and x.shape[-1] % group_size == 0
    )


def quantize_flavor():
    """The rounding of ``mx.quantize`` where MLX computes now: 1 on GPUs (MLX's Metal and
    CUDA quantize kernels share one algorithm), 0 on the CPU (an emulator standing in)."""
    return 1 if on_gpu() else 0


def quantize_launch(launch, x, *, bits, group_size, flavor):
    """Packed (words, scales, biases) of x (..., D) via the quantize kernel."""
    D = x.shape[-1]
    lead = tuple(x.shape[:-1])
    rows = 1
    for s in lead:
        rows *= s
    ng = D // group_size
    total = rows * ng
    w, s, b = launch(
        "quantize_append",
        [x.reshape(rows, D)],
        [("T", x.dtype), ("D", D), ("BITS", bits), ("GS", group_size), ("FLAVOR", flavor)],
        (-(-total // 256) * 256, 1, 1),
        (256, 1, 1),
        [(rows, D * bits // 32), (rows, ng), (rows, ng)],
        [mx.uint32, x.dtype, x.dtype],
    )
    return (
        w.reshape(*lead, D * bits // 32),
        s.reshape(*lead, ng),
        b.reshape(*lead, ng),
    )


def _write_rows(buf, new, start):
    L = new.shape[2]
    if hasattr(mx, "slice_update"):
        return mx.slice_update(buf, new, mx.array([0, 0, start, 0]), axes=(0, 1, 2, 3))
    out = buf
    out[:, :, start : start + L, :] = new
    return out


def quantize_append(x, buffers, start, *, bits, group_size, mode):
    """Pack ``x`` (B, H, L, D) and write it into ``buffers`` (the cache's
    preallocated packed arrays, (B, H, C, ...)) at token index ``start``.

    Returns the updated buffers (new array objects; the inputs are not
    mutated).  MLX custom kernels cannot alias an output to an input, so the
    kernel packs only the L new tokens and the write into the buffers is a
    ``slice_update``, which MLX performs in place when the old buffer is
    donatable (no other reference alive) -- drop your reference, e.g.
    ``self.packed_keys = quantize_append(x, self.packed_keys, ...)``.
    The packing is bit-identical to ``mx.quantize`` on this backend.  Modes
    other than affine (or no GPU, or a configuration that failed its self-check) use
    ``mx.quantize`` itself.
    """
    if enabled() and quantize_supported(x, bits, group_size, mode) and (
        quantize_ok(launcher(), quantize_launch, x.dtype, x.shape[-1], bits, group_size, quantize_flavor())
    ):
        new = quantize_launch(launcher(), x, bits=bits, group_size=group_size, flavor=quantize_flavor())
    else:
        new = tuple(mx.quantize(x, group_size=group_size, bits=bits, mode=mode))
    return tuple(_write_rows(buf, v, start) for buf, v in zip(buffers, new))
