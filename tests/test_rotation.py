"""The fixed rotation: orthogonal, and computed in the input's precision."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_kvq.rotation import rotate, rotation


@pytest.mark.parametrize("d", [64, 128, 256])
def test_rotation_is_orthogonal(d):
    r = np.array(rotation(d))
    assert np.allclose(r @ r.T, np.eye(d), atol=1e-5)
    assert np.array_equal(np.array(rotation(d, transpose=True)), r.T)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
def test_half_rotation_is_the_rotation_times_a_scalar(dtype, d):
    r = np.array(rotation(d))
    h = np.array(rotation(d, dtype).astype(mx.float32))
    c = h / r
    assert np.allclose(c, c[0, 0]) and abs(c[0, 0] - 1) < 1.1e-4


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_rotate_stays_in_its_dtype_and_inverts(dtype):
    x = mx.random.normal((2, 3, 5, 128)).astype(dtype)
    y = rotate(x)
    assert y.dtype == dtype
    ref = np.array(x.astype(mx.float32)) @ np.array(rotation(128))
    # float32 products on CUDA may run in TF32 (a float16-sized mantissa)
    tol = {mx.float16: 2e-3, mx.bfloat16: 2e-2, mx.float32: 2e-3}[dtype]
    assert np.abs(np.array(y.astype(mx.float32)) - ref).max() < tol * np.abs(ref).max()
    back = rotate(y, inverse=True).astype(mx.float32)
    assert np.abs(np.array(back) - np.array(x.astype(mx.float32))).max() < 2 * tol * np.abs(ref).max()


def test_sizes_mlx_cannot_rotate_are_refused_before_mlx_sees_them():
    """mx.hadamard_transform (MLX 0.32) corrupts the heap for 144 and 288: never called."""
    from mlx_kvq.rotation import has_hadamard

    assert [d for d in (64, 80, 96, 112, 128, 160, 192, 224, 256, 384) if has_hadamard(d)] == \
        [64, 80, 96, 112, 128, 160, 192, 224, 256, 384]
    for d in (144, 288, 48 * 3, 100, 72):
        assert not has_hadamard(d)
        with pytest.raises(ValueError, match=f"head_dim {d}"):
            rotation(d)


def test_a_cache_with_an_unrotatable_head_dim_says_so():
    from mlx_kvq import QuantizedKVCache

    c = QuantizedKVCache(bits=4, group_size=32, rotate="kv")
    k = mx.random.normal((1, 1, 3, 288)).astype(mx.float16)
    with pytest.raises(ValueError, match="head_dim 288"):
        c.update_and_fetch(k, k)
