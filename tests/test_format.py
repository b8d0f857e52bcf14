import mlx.core as mx
import numpy as np
import pytest

from mlx_kvq import format as quant
from helpers import rel_err


@pytest.mark.parametrize(
    "bits,group,mode",
    [(b, g, "affine") for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128)]
    + [(8, 32, "mxfp8"), (4, 32, "mxfp4"), (4, 16, "nvfp4")],
)
def test_round_trip_error_shrinks_with_bits(bits, group, mode):
    x = mx.random.normal((2, 3, 5, 128)).astype(mx.float16)
    packed = quant.quantize(x, bits, group, mode)
    assert [a.shape[-1] for a in packed] == [d for d, _ in quant.packed_dims(128, bits, group, mode)]
    y = quant.dequantize(packed, bits, group, mode, mx.float16)
    assert y.dtype == mx.float16 and y.shape == x.shape
    # affine: uniform steps, error ~ range / 2^bits; fp modes: error ~ 2^-mantissa bits
    bound = 3.0 / 2**bits + 0.01 if mode == "affine" else {8: 0.05, 4: 0.15}[bits]
    assert rel_err(y, x) < bound


def test_bytes_per_token_matches_arrays():
    for bits, group, mode in [(4, 64, "affine"), (3, 32, "affine"), (4, 32, "mxfp4")]:
        x = mx.random.normal((1, 1, 1, 128)).astype(mx.float16)
        packed = quant.quantize(x, bits, group, mode)
        assert quant.bytes_per_token(128, bits, group, mode) == sum(a.nbytes for a in packed)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=7, group_size=64), "bits 7"),
        (dict(bits=4, group_size=48), "group size 48"),
        (dict(bits=4, group_size=64, mode="int4"), "mode 'int4'"),
        (dict(bits=4, group_size=64, mode="mxfp8"), "bits 4 for mode 'mxfp8'"),
        (dict(bits=4, group_size=128, head_dim=80), "head_dim 80 is not divisible"),
    ],
)
def test_check_rejects_bad_formats_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quant.check(**kwargs)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_code_planes_hold_each_bytes_codes_in_turn(bits):
    """Plane i holds the codes of dims i, i + 8/bits, ...: the integers ``mx.dequantize``
    scales, read back from it as ``(x - bias) / scale``."""
    x = mx.random.normal((2, 3, 17, 64), key=mx.random.key(bits))
    w, s, b = quant.quantize(x, bits, 32)
    codes = np.asarray((quant.dequantize((w, s, b), bits, 32, dtype=mx.float32) - mx.repeat(b, 32, -1))
                       / mx.repeat(s, 32, -1)).round()
    planes = quant.code_planes(w, bits)
    assert len(planes) == 8 // bits
    for i, plane in enumerate(planes):
        assert plane.dtype == mx.float32 and plane.shape == (2, 3, 17, 64 * bits // 8)
        assert np.array_equal(np.asarray(plane), codes[..., i :: 8 // bits])
    assert codes.min() == 0 and codes.max() == (1 << bits) - 1  # every bit of a code read

