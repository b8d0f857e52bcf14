"""window_append: decoded keys/values rotated, cast and written into the cache's
unquantized window buffers in one launch (``metal/window_append.metal``)."""

import mlx.core as mx

from .. import format as fmt
from .args import const, param_array, rotates_in_kernel, rotation_args
from .backend import enabled, launcher
from .selfcheck import window_ok

def window_append_supports(buf_k, buf_v, keys, values, nw, rotate_k, rotate_v):
    """Whether :func:`window_append` takes these: a GPU, room in the buffers, head
    dims a multiple of 32 (a power of two >= 32 where a rotation is applied), and a
    configuration that passed its self-check (:mod:`.selfcheck`). Asked every decode step
    and layer: the shape checks are remembered per shapes and dtypes."""
    if not enabled() or buf_k is None or buf_v is None:
        return False
    key = (buf_k.shape, buf_k.dtype, buf_v.shape, buf_v.dtype, keys.shape, keys.dtype, values.shape, values.dtype,
           bool(rotate_k), bool(rotate_v))
    ok = _SHAPES_OK.get(key)
    if ok is None:
        if len(_SHAPES_OK) > 4096:
            _SHAPES_OK.clear()
        ok = _SHAPES_OK[key] = _shapes_ok(buf_k, buf_v, keys, values, rotate_k, rotate_v)
    if not ok or nw + keys.shape[2] > buf_k.shape[2]:
        return False
    return window_ok(launcher(), window_append_launch, keys.dtype, buf_k.dtype, buf_k.shape[3], rotate_k, rotate_v)


_SHAPES_OK = {}


def _shapes_ok(buf_k, buf_v, keys, values, rotate_k, rotate_v):
    B, H, C, D = buf_k.shape
    if buf_v.shape != buf_k.shape or buf_v.dtype != buf_k.dtype or buf_k.dtype not in fmt.FLOATS:
        return False
    if keys.shape != values.shape or keys.shape[:2] != (B, H) or keys.shape[3] != D or keys.dtype not in fmt.FLOATS:
        return False
    return not (D % 32 or ((rotate_k or rotate_v) and not rotates_in_kernel(D)))


def window_append_launch(launch, buf_k, buf_v, keys, values, nw, rotate_k=False, rotate_v=False):
    """The window buffers ``buf_k``/``buf_v`` (B, H, C, D) with rows ``[nw, nw + L)``
    replaced by ``keys``/``values`` (B, H, L, D), rotated by the cache's rotation
    where asked, in the buffers' dtype: new arrays (one launch)."""
    key = (buf_k.shape, buf_k.dtype, keys.dtype, bool(rotate_k), bool(rotate_v))
    st = _WINDOW_SETUPS.get(key)
    if st is None:
        B, H, C, D = buf_k.shape
        rows = B * H * C
        st = _WINDOW_SETUPS[key] = (
            window_params(D, rotate_k or rotate_v, buf_k.dtype),
            const("u8x1", lambda: mx.zeros((1,), dtype=mx.uint8)),
            ([("IT", keys.dtype), ("OT", buf_k.dtype), ("D", D), ("ROTK", bool(rotate_k)), ("ROTV", bool(rotate_v))],
             (-(-rows // 4) * 128, 2, 1), (128, 1, 1), [buf_k.shape, buf_k.shape], [buf_k.dtype, buf_k.dtype]),
        )
    consts, z, args = st
    carrier = mx.broadcast_to(z, (int(nw) + 1,))
    return launch("window_append", [buf_k, buf_v, keys, values, *consts, carrier], *args)


_WINDOW_SETUPS = {}


def window_params(D, rotate, dtype):
    """[signs, fparams] of ``window_append``: fparams [1 / sqrt(D) (1 unrotated), 1 / sqrt(D),
    the largest finite ``dtype``], at which the kernel saturates as ``format.fit`` does."""
    signs, _ = rotation_args(D, rotate, 1.0)
    f = D**-0.5 if rotate else 1.0
    big = float(mx.finfo(dtype).max)
    return [signs, const(("window", D, bool(rotate), str(dtype)), lambda: param_array([f, D**-0.5, big]))]


def window_append(buf_k, buf_v, keys, values, nw, rotate_k=False, rotate_v=False):
    """:func:`window_append_launch` on this backend's launcher."""
    return window_append_launch(launcher(), buf_k, buf_v, keys, values, nw, rotate_k, rotate_v)
