"""Kernel tests.

CPU (CI): every kernel body (decode, split-K decode + merge, prefill,
quantize-append) runs under the C++ Metal emulator (tests/emulator) on small
random shapes and is compared with an fp32 reference built from mx.dequantize.
GPU: the same checks through mx.fast.metal_kernel / mx.fast.cuda_kernel run
only when that backend is present (skipped otherwise).
"""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emulator.reference import reference_attention, rel_err  # noqa: E402

from mlx_kvq import kernels
from helpers import NO_LAUNCHES
from mlx_kvq.format import FP_FORMATS as FP_FORMAT
from mlx_kvq.rotation import rotate

ON_GPU = kernels.backend_name() is not None
TOL = 2e-5  # fp32 accumulation, fp32 dequantization: errors ~1e-7..1e-6


def make_case(B, Hkv, rep, L, D, C, *, k_bits, v_bits, group_size, mode, dtype, seed):
    mx.random.seed(seed)
    q = mx.random.normal((B, Hkv * rep, L, D)).astype(dtype)
    sdt = dtype if dtype != mx.float32 else mx.float16
    k = (mx.random.normal((B, Hkv, C, D)) * 1.5 + 0.3).astype(sdt)
    v = mx.random.normal((B, Hkv, C, D)).astype(sdt)
    kp = tuple(mx.quantize(k, group_size=group_size, bits=k_bits, mode=mode))
    vp = tuple(mx.quantize(v, group_size=group_size, bits=v_bits, mode=mode))
    mx.eval(q, kp, vp)
    return q, kp, vp


def run_and_compare(launch, q, kp, vp, n, tol=TOL, **kw):
    out, lse = kernels.attention_launch(launch, q, kp, vp, n, **kw)
    ref_kw = {k: v for k, v in kw.items() if k not in ("nsg", "nsplit", "prefill", "vu", "vpf")}
    with mx.stream(mx.cpu):  # fp32 reference on the CPU (no TF32 matmuls on CUDA)
        ro, rl = reference_attention(q, kp, vp, n, **ref_kw)
    return check_partial(out, lse, ro, rl, tol, lse_tol=1e-4)


def check_partial(out, lse, ro, rl, tol, lse_tol):
    """A kernel's (out, lse) against the reference's: every element written, the same
    empty rows, lse within ``lse_tol``, out within relative error ``tol``."""
    mx.eval(out, lse, ro, rl)
    assert out.dtype == mx.float32 and lse.dtype == mx.float32
    assert out.shape == ro.shape and lse.shape == rl.shape
    o, lo, rln = (np.array(a) for a in (out, lse, rl))
    assert not np.isnan(o).any() and not np.isnan(lo).any(), "unwritten (poisoned) or NaN output"
    np.testing.assert_array_equal(np.isinf(lo), np.isinf(rln))
    fin = np.isfinite(rln)
    if fin.any():
        assert np.abs(lo[fin] - rln[fin]).max() < lse_tol
    assert rel_err(out, ro) < tol, rel_err(out, ro)
    return out, lse


# ------------------------------------------------------------------ decode
DECODE_CASES = [
    # D, k_bits, v_bits, gs, mode, dtype, B, Hkv, rep, L, C, n
    (64, 4, 4, 32, "affine", mx.float16, 1, 2, 2, 1, 80, 70),
    (128, 8, 4, 64, "affine", mx.bfloat16, 1, 1, 4, 3, 100, 77),
    (128, 3, 5, 32, "affine", mx.float16, 2, 1, 1, 2, 64, 45),
    (64, 6, 2, 64, "affine", mx.float32, 1, 1, 3, 1, 40, 33),
    (96, 4, 8, 32, "affine", mx.float16, 1, 1, 2, 1, 40, 40),
    (256, 2, 4, 128, "affine", mx.float16, 1, 1, 2, 1, 48, 37),
    (64, 4, 4, 32, "mxfp4", mx.float16, 1, 1, 2, 1, 50, 41),
    (80, 4, 4, 16, "nvfp4", mx.bfloat16, 1, 1, 2, 1, 40, 35),
    (128, 8, 8, 32, "mxfp8", mx.float16, 1, 1, 2, 1, 40, 39),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"D{c[0]}-k{c[1]}v{c[2]}-g{c[3]}-{c[4]}")
def test_decode_emulated(emu, case):
    D, kb, vb, gs, mode, dtype, B, Hkv, rep, L, C, n = case
    q, kp, vp = make_case(
        B,
        Hkv,
        rep,
        L,
        D,
        C,
        k_bits=kb,
        v_bits=vb,
        group_size=gs,
        mode=mode,
        dtype=dtype,
        seed=D + kb * 7 + vb,
    )
    assert kernels.supports(q, kp, vp, kb, vb, gs, mode, None)
    run_and_compare(
        emu,
        q,
        kp,
        vp,
        n,
        k_bits=kb,
        v_bits=vb,
        group_size=gs,
        mode=mode,
        scale=D**-0.5,
        q_start=n - L,
        k_start=0,
        causal=True,
        nsplit=1,
    )


@pytest.mark.parametrize(
    "D,kb,vb,gs,mode", [(128, 4, 4, 64, "affine"), (64, 8, 8, 32, "mxfp8"), (96, 3, 2, 32, "affine")]
)
def test_decode_value_prefetch(emu, D, kb, vb, gs, mode):
    """VPF: value words and scales loaded at the top of each key block."""
    q, kp, vp = make_case(
        1, 1, 2, 1, D, 90, k_bits=kb, v_bits=vb, group_size=gs, mode=mode, dtype=mx.float16, seed=D + 1
    )
    run_and_compare(
        emu,
        q,
        kp,
        vp,
        83,
        k_bits=kb,
        v_bits=vb,
        group_size=gs,
        mode=mode,
        scale=D**-0.5,
        q_start=82,
        k_start=0,
        causal=True,
        nsplit=2,
        vpf=True,
    )
    assert emu.launches[-2][1]["VPF"] is True


def test_decode_split_k_and_merge(emu):
    """2-pass: the key range split over 3 threadgroups (last split partial)."""
    q, kp, vp = make_case(
        1, 2, 2, 1, 64, 320, k_bits=4, v_bits=4, group_size=64, mode="affine", dtype=mx.float16, seed=3
    )
    n = 301
    run_and_compare(
        emu,
        q,
        kp,
        vp,
        n,
        k_bits=4,
        v_bits=4,
        group_size=64,
        mode="affine",
        scale=0.125,
        q_start=n - 1,
        k_start=0,
        causal=True,
        nsplit=3,
    )
    assert any(x[0] == "sdpa_merge" for x in emu.launches)


def test_decode_split_k_causal_offsets_empty_rows(emu):
    """Segment starting after some queries: those rows see nothing (lse=-inf,
    out=0), also when whole splits are empty."""
    q, kp, vp = make_case(
        1, 1, 2, 4, 128, 200, k_bits=8, v_bits=4, group_size=32, mode="affine", dtype=mx.float16, seed=4
    )
    out, lse = run_and_compare(
        emu,
        q,
        kp,
        vp,
        150,
        k_bits=8,
        v_bits=4,
        group_size=32,
        mode="affine",
        scale=0.1,
        q_start=10,
        k_start=12,
        causal=True,
        nsplit=4,
    )
    lo = np.array(lse)
    assert np.isneginf(lo[:, :, :2]).all() and np.isfinite(lo[:, :, 2:]).all()
    assert (np.array(out)[:, :, :2] == 0).all()


def test_decode_bool_mask_left_padding(emu):
    """Batched decode with left padding: a bool (B,1,1,n) keep-mask."""
    B, n = 3, 90
    q, kp, vp = make_case(
        B, 2, 2, 1, 64, 96, k_bits=4, v_bits=4, group_size=32, mode="affine", dtype=mx.float16, seed=5
    )
    pad = mx.array([0, 17, 89])
    mask = (mx.arange(n)[None, :] >= pad[:, None]).reshape(B, 1, 1, n)
    run_and_compare(
        emu,
        q,
        kp,
        vp,
        n,
        k_bits=4,
        v_bits=4,
        group_size=32,
        mode="affine",
        scale=0.125,
        q_start=n - 1,
        k_start=0,
        causal=False,
        mask=mask,
        nsplit=2,
    )


def test_decode_additive_mask(emu):
    B, Hkv, rep, L, n = 2, 1, 2, 2, 50
    q, kp, vp = make_case(
        B, Hkv, rep, L, 64, 64, k_bits=5, v_bits=3, group_size=64, mode="affine", dtype=mx.float16, seed=6
    )
    mx.random.seed(60)
    m = mx.random.normal((B, Hkv * rep, L, n)).astype(mx.float16)
    m = mx.where(mx.random.uniform(shape=m.shape) < 0.2, -math.inf, m).astype(mx.float16)
    run_and_compare(
        emu,
        q,
        kp,
        vp,
        n,
        k_bits=5,
        v_bits=3,
        group_size=64,
        mode="affine",
        scale=0.125,
        q_start=0,
        k_start=0,
        causal=False,
        mask=m,
        nsplit=1,
    )


def test_decode_multi_simdgroup_tiles(emu):
    """rep*L = 12 rows -> 2 row tiles of 8; 2 simdgroups splitting the keys;
    value loop unrolled by 3 (not a divisor of its 16 steps)."""
    q, kp, vp = make_case(
        1, 1, 4, 3, 64, 130, k_bits=4, v_bits=8, group_size=64, mode="affine", dtype=mx.float16, seed=7
    )
    run_and_compare(
        emu,
        q,
        kp,
        vp,
        129,
        k_bits=4,
        v_bits=8,
        group_size=64,
        mode="affine",
        scale=0.125,
        q_start=126,
        k_start=0,
        causal=True,
        nsplit=1,
        nsg=2,
    )


# ------------------------------------------------------------------ prefill
@pytest.mark.parametrize(
    "D,kb,vb,gs,dtype,rep,L,n,q_start,k_start",
    [
        (64, 4, 4, 32, mx.float16, 2, 20, 50, 30, 0),  # chunk at the end of the context
        (128, 8, 4, 64, mx.bfloat16, 1, 17, 40, 25, 3),  # segment not at position 0
        (64, 2, 6, 64, mx.float16, 3, 12, 33, 21, 0),
    ],
)
def test_prefill_emulated(emu, D, kb, vb, gs, dtype, rep, L, n, q_start, k_start):
    q, kp, vp = make_case(
        1, 1, rep, L, D, n + 5, k_bits=kb, v_bits=vb, group_size=gs, mode="affine", dtype=dtype, seed=L
    )
    run_and_compare(
        emu,
        q,
        kp,
        vp,
        n,
        k_bits=kb,
        v_bits=vb,
        group_size=gs,
        mode="affine",
        scale=D**-0.5,
        q_start=q_start,
        k_start=k_start,
        causal=True,
    )
    assert emu.launches[-1][1]["PREFILL"] is True


SIMDGROUP_PREFILL_CASES = [
    # D, kb, vb, gs, dtype, B, Hkv, rep, L, n, q_start, k_start, causal, nsplit
    (64, 4, 4, 32, mx.float16, 1, 2, 2, 20, 50, 30, 0, True, 1),  # chunk at the end of the context
    (128, 8, 4, 64, mx.bfloat16, 1, 1, 3, 17, 40, 25, 3, True, 2),  # run not at position 0, split keys
    (64, 2, 8, 64, mx.float32, 2, 1, 1, 33, 45, 0, 0, True, 1),  # chunk over its own keys: rows see 1..33
    (256, 4, 2, 128, mx.float16, 1, 1, 2, 9, 21, 100, 0, False, 3),  # D 256 (8-key blocks), 3 splits
    (96, 4, 4, 32, mx.float16, 1, 2, 4, 11, 37, 40, 0, True, 1),  # 44 rows: a tile of 32 and a partial one
]


def check_simdgroup_prefill(launch, D, kb, vb, gs, dtype, B, Hkv, rep, L, n, q_start, k_start, causal, nsplit):
    q, kp, vp = make_case(
        B, Hkv, rep, L, D, n + 7, k_bits=kb, v_bits=vb, group_size=gs, mode="affine", dtype=dtype, seed=L + D
    )
    kw = dict(k_bits=kb, v_bits=vb, group_size=gs, mode="affine", scale=D**-0.5, q_start=q_start,
              k_start=k_start, causal=causal)
    assert kernels.prefill_supports(q, kp, vp, kb, vb, gs, "affine", None)
    out, lse = kernels.prefill_launch(launch, q, kp, vp, n, nsplit=nsplit, **kw)
    with mx.stream(mx.cpu):
        ro, rl = reference_attention(q, kp, vp, n, **kw)
    check_partial(out, lse, ro, rl, TOL, lse_tol=1e-4)


@pytest.mark.parametrize("case", SIMDGROUP_PREFILL_CASES)
def test_simdgroup_prefill_emulated(emu, case):
    check_simdgroup_prefill(emu, *case)
    assert emu.launches[-1 if case[-1] == 1 else -2][0] == "sdpa_prefill"


def test_prefill_mask_noncausal(emu):
    B, L, n = 2, 11, 37
    q, kp, vp = make_case(
        B, 1, 2, L, 64, 40, k_bits=4, v_bits=4, group_size=32, mode="affine", dtype=mx.float16, seed=8
    )
    mask = mx.random.uniform(shape=(B, 1, L, n)) > 0.3
    run_and_compare(
        emu,
        q,
        kp,
        vp,
        n,
        k_bits=4,
        v_bits=4,
        group_size=32,
        mode="affine",
        scale=0.125,
        q_start=0,
        k_start=0,
        causal=False,
        mask=mask,
    )


def test_schedule_independent(emu, tmp_path):
    """Same inputs, another fiber schedule: bit-identical results (a missing
    barrier would make the result depend on the interleaving)."""
    from emulator.emu import EmuLauncher

    other = EmuLauncher(emu.build_dir, seed=98765, pad_strides=True)
    q, kp, vp = make_case(
        1, 1, 2, 1, 64, 200, k_bits=4, v_bits=4, group_size=32, mode="affine", dtype=mx.float16, seed=9
    )
    kw = dict(
        k_bits=4,
        v_bits=4,
        group_size=32,
        mode="affine",
        scale=0.125,
        q_start=199,
        k_start=0,
        causal=True,
        nsplit=2,
    )
    a = kernels.attention_launch(emu, q, kp, vp, 190, **kw)
    b = kernels.attention_launch(other, q, kp, vp, 190, **kw)
    np.testing.assert_array_equal(np.array(a[0]), np.array(b[0]))
    np.testing.assert_array_equal(np.array(a[1]), np.array(b[1]))


# ------------------------------------------------------------------ quantize
def _np_quantize_gpu_flavor(x, bits, gs):
    """numpy model of MLX's Metal/CUDA affine_quantize (max starts at 0,
    round half away from zero)."""
    xf = np.array(x.astype(mx.float32)).reshape(-1, gs)
    w_min = xf.min(1)
    w_max = np.maximum(xf.max(1), 0.0)
    n_bins = np.float32((1 << bits) - 1)
    scale = np.maximum((w_max - w_min) / n_bins, np.float32(1e-7)).astype(np.float32)
    side = np.abs(w_min) > np.abs(w_max)
    scale = np.where(side, scale, -scale).astype(np.float32)
    edge = np.where(side, w_min, w_max).astype(np.float32)
    r = edge / scale
    q0 = np.sign(r) * np.floor(np.abs(r) + 0.5)
    at0 = q0 == 0
    scale = np.where(at0, scale, edge / np.where(at0, 1, q0)).astype(np.float32)
    bias = np.where(at0, 0, edge).astype(np.float32)
    t = (xf - bias[:, None]) / scale[:, None]
    q = np.minimum(np.sign(t) * np.floor(np.abs(t) + 0.5), n_bins).astype(np.int64) & ((1 << bits) - 1)
    return q, scale, bias


@pytest.mark.parametrize(
    "bits,gs,dtype",
    [
        (2, 32, mx.float16),
        (3, 64, mx.float16),
        (4, 64, mx.bfloat16),
        (5, 128, mx.float16),
        (6, 32, mx.float32),
        (8, 64, mx.float16),
        (4, 128, mx.float16),
    ],
)
def test_quantize_bit_identical_emulated(emu, bits, gs, dtype):
    mx.random.seed(bits * gs)
    x = (mx.random.normal((2, 3, 5, 128)) * 2).astype(dtype)
    # some all-negative and constant groups
    x = mx.concatenate([x, -mx.abs(x[:, :, :1]), mx.full((2, 3, 1, 128), 0.5, dtype)], axis=2)
    got = kernels.quantize_launch(emu, x, bits=bits, group_size=gs, flavor=0)
    with mx.stream(mx.cpu):  # flavor 0: the CPU's mx.quantize (a GPU's rounds as flavor 1)
        want = mx.quantize(x, group_size=gs, bits=bits)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(to_u(a), to_u(b))


def to_u(a):
    if a.dtype in (mx.float16, mx.bfloat16):
        return np.array(a.view(mx.uint16))
    if a.dtype == mx.float32:
        return np.array(a.view(mx.uint32))
    return np.array(a)


def test_quantize_gpu_flavor_emulated(emu):
    """FLAVOR 1 (the Metal/CUDA algorithm) against a numpy model of it."""
    mx.random.seed(11)
    bits, gs = 4, 32
    x = (mx.random.normal((1, 2, 3, 64)) * 2).astype(mx.float32)
    x = mx.concatenate([x, -mx.abs(x[:, :, :1])], axis=2)
    w, s, b = kernels.quantize_launch(emu, x, bits=bits, group_size=gs, flavor=1)
    q, scale, bias = _np_quantize_gpu_flavor(x, bits, gs)
    np.testing.assert_array_equal(np.array(s).reshape(-1), scale)
    np.testing.assert_array_equal(np.array(b).reshape(-1), bias)
    bitsarr = np.unpackbits(np.array(w).view(np.uint8), bitorder="little").reshape(-1, bits)
    codes = (bitsarr * (1 << np.arange(bits))).sum(1)
    np.testing.assert_array_equal(codes, q.reshape(-1))


def test_quantize_append_writes_rows(run_kernels_on, emu, monkeypatch):
    """quantize_append = kernel + slice_update at `start`, other rows untouched."""
    B, H, C, D, L, start = 1, 2, 16, 64, 3, 5
    mx.random.seed(12)
    old = mx.random.normal((B, H, C, D)).astype(mx.float16)
    bufs = tuple(mx.quantize(old, group_size=32, bits=4))
    x = mx.random.normal((B, H, L, D)).astype(mx.float16)
    run_kernels_on(_Flavor0(emu))
    new = kernels.quantize_append(x, bufs, start, bits=4, group_size=32, mode="affine")
    want = tuple(mx.quantize(x, group_size=32, bits=4))
    for nb, ob, w in zip(new, bufs, want):
        nb_, ob_ = to_u(nb), to_u(ob)
        np.testing.assert_array_equal(nb_[:, :, start : start + L], to_u(w))
        np.testing.assert_array_equal(nb_[:, :, :start], ob_[:, :, :start])
        np.testing.assert_array_equal(nb_[:, :, start + L :], ob_[:, :, start + L :])


class _Flavor0:
    """Launcher wrapper forcing the CPU quantize flavor (the reference here is
    mx.quantize on the CPU)."""

    def __init__(self, launch):
        self.launch = launch

    def __call__(self, name, inputs, template, *a):
        template = [(k, 0 if k == "FLAVOR" else v) for k, v in template]
        return self.launch(name, inputs, template, *a)


# ------------------------------------------------------------------ API
def test_enabled_honours_reference_env(monkeypatch):
    monkeypatch.setenv("MLX_KVQ_REFERENCE", "1")
    assert kernels.enabled() is False
    monkeypatch.delenv("MLX_KVQ_REFERENCE")
    assert kernels.enabled() == ON_GPU


def test_supports():
    q, kp, vp = make_case(
        1, 2, 2, 1, 64, 40, k_bits=8, v_bits=4, group_size=32, mode="affine", dtype=mx.float16, seed=1
    )
    assert kernels.supports(q, kp, vp, 8, 4, 32, "affine", None)
    assert kernels.supports(q, kp, vp, 8, 4, 32, "affine", mx.ones((1, 1, 1, 40), dtype=mx.bool_))
    assert not kernels.supports(q, kp, vp, 4, 4, 32, "affine", None)  # wrong bits for k
    assert not kernels.supports(q, kp, vp, 8, 4, 64, "affine", None)  # wrong group size
    assert not kernels.supports(q, kp, vp, 8, 4, 32, "affine", "causal")
    q3 = mx.zeros((1, 3, 1, 64), dtype=mx.float16)
    assert not kernels.supports(q3, kp, vp, 8, 4, 32, "affine", None)  # 3 % 2 != 0
    q48 = mx.zeros((1, 4, 1, 48), dtype=mx.float16)
    assert not kernels.supports(q48, kp, vp, 8, 4, 32, "affine", None)


def test_sources_found():
    d = kernels.source_dir()
    for f in ("kvq_common.h", "prelude_metal.h", "prelude_cuda.h", "sdpa_packed.metal"):
        assert (d / f).is_file()


# ------------------------------------------------------------------ real GPU
gpu = pytest.mark.skipif(not ON_GPU, reason="needs the Metal or CUDA backend")


@gpu
@pytest.mark.parametrize("L,n,nsplit", [(1, 1000, None), (4, 777, 5), (40, 300, None)])
@pytest.mark.parametrize("kb,vb", [(4, 4), (8, 4), (3, 6)])
def test_gpu_attention(L, n, nsplit, kb, vb):
    q, kp, vp = make_case(
        2,
        2,
        4,
        L,
        128,
        n + 20,
        k_bits=kb,
        v_bits=vb,
        group_size=64,
        mode="affine",
        dtype=mx.float16,
        seed=n + kb,
    )
    launch = kernels.launcher()
    mask = None
    if L == 1:
        mask = (mx.arange(n)[None, :] >= mx.array([0, 100])[:, None]).reshape(2, 1, 1, n)
    run_and_compare(
        launch,
        q,
        kp,
        vp,
        n,
        tol=1e-4,
        k_bits=kb,
        v_bits=vb,
        group_size=64,
        mode="affine",
        scale=128**-0.5,
        q_start=n - L,
        k_start=0,
        causal=True,
        mask=mask,
        nsplit=nsplit,
    )


@gpu
@pytest.mark.parametrize("case", SIMDGROUP_PREFILL_CASES)
def test_gpu_simdgroup_prefill(case):
    check_simdgroup_prefill(kernels.launcher(), *case)


@gpu
@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
def test_gpu_attention_fp_modes(mode):
    bits, gs = FP_FORMAT[mode]
    q, kp, vp = make_case(
        1, 2, 4, 1, 128, 600, k_bits=bits, v_bits=bits, group_size=gs, mode=mode, dtype=mx.bfloat16, seed=3
    )
    run_and_compare(
        kernels.launcher(),
        q,
        kp,
        vp,
        555,
        tol=1e-4,
        k_bits=bits,
        v_bits=bits,
        group_size=gs,
        mode=mode,
        scale=128**-0.5,
        q_start=554,
        k_start=0,
        causal=True,
    )


@gpu
@pytest.mark.parametrize("bits,gs", [(2, 32), (3, 64), (4, 64), (5, 32), (6, 128), (8, 64)])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_gpu_quantize_append_bit_identical(bits, gs, dtype):
    mx.random.seed(bits)
    B, H, C, D, L, start = 2, 4, 64, 128, 7, 9
    bufs = tuple(mx.quantize(mx.zeros((B, H, C, D), dtype=dtype), group_size=gs, bits=bits))
    x = (mx.random.normal((B, H, L, D)) * 3).astype(dtype)
    new = kernels.quantize_append(x, bufs, start, bits=bits, group_size=gs, mode="affine")
    want = mx.quantize(x, group_size=gs, bits=bits)
    for a, b in zip(new, want):
        np.testing.assert_array_equal(to_u(a)[:, :, start : start + L], to_u(b))


@gpu
def test_gpu_attention_strided_inputs():
    """Transposed queries and a slice of a larger cache are read in place."""
    B, Hkv, rep, L, D, C, n = 1, 2, 4, 2, 128, 300, 250
    q, kp, vp = make_case(
        B, Hkv, rep, L, D, C, k_bits=4, v_bits=8, group_size=64, mode="affine", dtype=mx.float16, seed=21
    )
    qt = mx.array(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)  # non-contiguous view
    ks = tuple(a[:, :, 20:] for a in kp)  # cache slice starting at token 20
    vs = tuple(a[:, :, 20:] for a in vp)
    kw = dict(
        k_bits=4, v_bits=8, group_size=64, mode="affine", scale=D**-0.5, q_start=n - L, k_start=0, causal=True
    )
    out, _ = kernels.attention_launch(kernels.launcher(), qt, ks, vs, n, **kw)
    with mx.stream(mx.cpu):
        ro, _ = reference_attention(
            q, tuple(mx.array(a) for a in ks), tuple(mx.array(a) for a in vs), n, **kw
        )
    assert rel_err(out, ro) < 1e-4


# ------------------------------------------------------------------ decode over a whole view
VIEW_TOL = 2e-3  # fp16 tensor-core inputs (queries, dequantized K/V, probabilities)
SIMD_TOL = 1e-4  # the simd body: fp32 throughout (errors ~1e-6)
BODIES = ["mma", "simd"]


def make_view(B, Hkv, rep, L, D, n, ns, nw, *, k_bits, v_bits, group_size, dtype, seed, C=None):
    """Queries and a cache view: sinks, a packed run (capacity C >= n) and a window."""
    mx.random.seed(seed)
    C = C or max(n, 1) + 5
    q = mx.random.normal((B, Hkv * rep, L, D)).astype(dtype)
    sdt = dtype if dtype != mx.float32 else mx.float16
    k = (mx.random.normal((B, Hkv, C, D)) * 1.5 + 0.3).astype(sdt)
    v = mx.random.normal((B, Hkv, C, D)).astype(sdt)
    kp = tuple(mx.quantize(k, group_size=group_size, bits=k_bits))
    vp = tuple(mx.quantize(v, group_size=group_size, bits=v_bits))
    sk = (mx.random.normal((B, Hkv, ns, D)) * 1.5).astype(sdt) if ns else None
    sv = mx.random.normal((B, Hkv, ns, D)).astype(sdt) if ns else None
    wk = (mx.random.normal((B, Hkv, nw + 3, D)) * 1.5).astype(sdt)[:, :, :nw] if nw else None
    wv = mx.random.normal((B, Hkv, nw + 3, D)).astype(sdt)[:, :, :nw] if nw else None
    mx.eval(q, kp, vp, *[x for x in (sk, sv, wk, wv) if x is not None])
    return q, (kp if n else None), (vp if n else None), ((sk, sv) if ns else None), ((wk, wv) if nw else None)


def view_reference(q, kp, vp, n, sinks, window, *, k_bits, v_bits, group_size, scale, q_start, causal, mask):
    """Plain fp32 attention over [sinks | dequantized packed | window] (positions 0..)."""
    from emulator.reference import dequant

    ks, vs = [], []
    if sinks is not None:
        ks.append(sinks[0].astype(mx.float32))
        vs.append(sinks[1].astype(mx.float32))
    if kp is not None and n:
        ks.append(dequant(kp, n, k_bits, group_size, "affine"))
        vs.append(dequant(vp, n, v_bits, group_size, "affine"))
    if window is not None:
        ks.append(window[0].astype(mx.float32))
        vs.append(window[1].astype(mx.float32))
    k = mx.concatenate(ks, axis=2)
    v = mx.concatenate(vs, axis=2)
    return reference_attention(
        q, (k,), (v,), k.shape[2], k_bits=0, v_bits=0, group_size=0, mode="plain", scale=scale,
        q_start=q_start, k_start=0, causal=causal, mask=mask,
    )


def run_view(launch, q, kp, vp, n, sinks, window, *, mask=None, causal=True, q_start=None, **kw):
    ns = 0 if sinks is None else sinks[0].shape[2]
    nw = 0 if window is None else window[0].shape[2]
    total = ns + n + nw
    L = q.shape[2]
    q_start = total - L if q_start is None else q_start
    fmt = {k: kw[k] for k in ("k_bits", "v_bits", "group_size")}
    args = dict(scale=q.shape[-1] ** -0.5, q_start=q_start, causal=causal, mask=mask)
    out, lse = kernels.decode_launch(launch, q, kp, vp, n, sinks, window, **fmt, **args, **{
        k: v for k, v in kw.items() if k not in fmt})
    assert out.dtype == kw.get("out_dtype", mx.float32)
    with mx.stream(mx.cpu):  # the kernels' rotations: the view's keys/values count as rotated
        qr = rotate(q.astype(mx.float32)) if kw.get("rotate_q") else q
        ro, rl = view_reference(qr, kp, vp, n, sinks, window, **fmt, **args)
        if kw.get("rotate_out"):
            ro = rotate(ro, inverse=True)
    simd = kernels.decode.decode_body(launch, kw.get("body")) == "simd"
    fp32_out = kw.get("out_dtype", mx.float32) == mx.float32
    return check_partial(out.astype(mx.float32), lse, ro, rl, SIMD_TOL if simd and fp32_out else VIEW_TOL,
                         lse_tol=1e-3 if simd else 2e-2)


VIEW_CASES = [
    # D, k_bits, v_bits, gs, dtype, B, Hkv, rep, L, n, ns, nw, nsplit
    (128, 4, 4, 64, mx.float16, 1, 2, 4, 1, 150, 4, 20, 3),
    (128, 8, 8, 64, mx.bfloat16, 1, 1, 4, 1, 70, 0, 9, None),
    (128, 8, 4, 32, mx.float32, 2, 1, 2, 3, 45, 4, 0, 2),
    (64, 2, 4, 32, mx.float16, 1, 1, 7, 2, 33, 0, 0, 1),
    (256, 2, 4, 32, mx.float16, 1, 1, 2, 1, 40, 2, 5, 2),
    (128, 4, 8, 128, mx.float16, 1, 1, 20, 1, 37, 1, 3, 1),
    (128, 4, 4, 64, mx.float16, 1, 1, 4, 1, 0, 4, 30, None),
]


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("case", VIEW_CASES, ids=lambda c: f"D{c[0]}-k{c[1]}v{c[2]}-g{c[3]}-n{c[9]}-s{c[10]}-w{c[11]}")
def test_decode_view_emulated(emu, case, body):
    D, kb, vb, gs, dtype, B, Hkv, rep, L, n, ns, nw, nsplit = case
    q, kp, vp, sinks, window = make_view(
        B, Hkv, rep, L, D, n, ns, nw, k_bits=kb, v_bits=vb, group_size=gs, dtype=dtype, seed=D + n)
    dense_dt = None if sinks is None and window is None else (sinks or window)[0].dtype
    assert kernels.decode_supports(q, kp, vp, dense_dt, kb, vb, gs, "affine", None)
    run_view(emu, q, kp, vp, n, sinks, window, k_bits=kb, v_bits=vb, group_size=gs, nsplit=nsplit, body=body)
    name = "sdpa_decode" if body == "mma" else "sdpa_decode_simd"
    assert emu.launches[-1][0] == "sdpa_merge" or emu.launches[-1][0] == name
    assert name in [x[0] for x in emu.launches[-2:]]
    if n > 100:  # one warp per threadgroup; every prefetch depth (simd: and keys per step)
        for ku, pf, dpl in ([(None, 0, None), (None, 1, None), (None, 2, None)] if body == "mma"
                            else [(4, 0, 8), (3, 1, 16)]):
            run_view(emu, q, kp, vp, n, sinks, window, k_bits=kb, v_bits=vb, group_size=gs, nsplit=nsplit, pf=pf,
                     nsg=1, body=body, ku=ku, dpl=dpl)


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("D, nsplit", [(128, 40), (256, 20)])
def test_decode_merge_many_partials(emu, D, nsplit, body):
    """More partials than the merge takes per step (16 at D=128, 8 at D=256), and a last
    step with missing splits (which must weigh 0); 16 keys per split, so that no partial
    is empty (an empty one weighs 0 whatever the merge does)."""
    n = 16 * nsplit
    q, kp, vp, sinks, window = make_view(
        1, 1, 4, 1, D, n, 0, 5, k_bits=4, v_bits=4, group_size=64, dtype=mx.float16, seed=n)
    run_view(emu, q, kp, vp, n, sinks, window, k_bits=4, v_bits=4, group_size=64, nsplit=nsplit, nsg=1, body=body)
    name, _, grid, tg = emu.launches[-2]
    parts = grid[0] // tg[0]
    assert name == ("sdpa_decode" if body == "mma" else "sdpa_decode_simd") and emu.launches[-1][0] == "sdpa_merge"
    assert parts == nsplit + 1 and parts % (16 if D == 128 else 8) != 0


ROTATION_CASES = [
    # D, k_bits, v_bits, gs, dtype, B, Hkv, rep, L, n, ns, nw, nsplit
    (128, 4, 4, 64, mx.float16, 1, 2, 4, 1, 150, 4, 20, 3),
    (64, 8, 4, 32, mx.bfloat16, 2, 1, 3, 3, 40, 0, 7, 1),
    (256, 2, 2, 32, mx.float16, 1, 1, 2, 1, 0, 2, 9, None),
]


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("rot", ["k", "kv"])
@pytest.mark.parametrize("case", ROTATION_CASES, ids=lambda c: f"D{c[0]}-k{c[1]}v{c[2]}-n{c[9]}-L{c[8]}")
def test_decode_view_rotations_emulated(emu, case, rot, body):
    """The kernels rotate the queries (and the output back) themselves, and write the
    model's dtype: against rotating outside around the plain fp32 reference."""
    D, kb, vb, gs, dtype, B, Hkv, rep, L, n, ns, nw, nsplit = case
    q, kp, vp, sinks, window = make_view(
        B, Hkv, rep, L, D, n, ns, nw, k_bits=kb, v_bits=vb, group_size=gs, dtype=dtype, seed=D + n + 1)
    run_view(emu, q, kp, vp, n, sinks, window, k_bits=kb, v_bits=vb, group_size=gs, nsplit=nsplit,
             rotate_q=True, rotate_out=rot == "kv", out_dtype=dtype, body=body)
    assert emu.launches[-1][0] == "sdpa_merge"


@pytest.mark.parametrize("body", BODIES)
def test_decode_running_max_jumps(emu, body):
    """Scores that jump by far more than the kernel's rescale slack (2^8) several
    times along a warp's keys, and rows whose first keys are all far below the max."""
    B, Hkv, rep, L, D, n, nsplit = 1, 1, 4, 1, 64, 200, 1
    q, _, _, _, window = make_view(B, Hkv, rep, L, D, n, 0, 5, k_bits=4, v_bits=4, group_size=32,
                                   dtype=mx.float16, seed=11)
    mx.random.seed(12)
    k = mx.random.normal((B, Hkv, n, D)) * 0.1
    qdir = q[:, :1, 0].astype(mx.float32)  # (B, 1, D): aligned with the first head's query
    pos = mx.arange(n)[None, None, :, None]
    boost = mx.where(pos == 40, 6.0, 0.0) + mx.where(pos == 150, 14.0, 0.0) + mx.where(pos == 197, 25.0, 0.0)
    k = (k + boost * qdir[:, :, None] / mx.linalg.norm(qdir)).astype(mx.float16)
    v = mx.random.normal((B, Hkv, n, D)).astype(mx.float16)
    kp = tuple(mx.quantize(k, group_size=32, bits=4))
    vp = tuple(mx.quantize(v, group_size=32, bits=4))
    run_view(emu, q, kp, vp, n, None, window, k_bits=4, v_bits=4, group_size=32, nsplit=nsplit, body=body)


@pytest.mark.parametrize("kb,body", [(4, "mma"), (8, "mma"), (4, "simd")])
def test_decode_large_queries_and_key_offsets(emu, kb, body):
    """Keys enter the mma as raw codes (1024 + c in fp16) with the scales applied in
    fp32 afterwards, less 1024 x the sum of the queries: large queries (an outlier
    channel) and keys far from zero (a large bias per group) must not cost accuracy."""
    B, Hkv, rep, L, D, n, nw = 1, 1, 4, 1, 128, 120, 6
    q, _, _, _, window = make_view(B, Hkv, rep, L, D, n, 0, nw, k_bits=kb, v_bits=4, group_size=64,
                                   dtype=mx.float16, seed=21)
    mx.random.seed(22)
    chan = mx.where(mx.arange(D) == 5, 60.0, 0.0) + mx.where(mx.arange(D) == 70, -40.0, 0.0)
    q = (q.astype(mx.float32) * 6.0 + chan).astype(mx.float16)
    k = (mx.random.normal((B, Hkv, n, D)) * 0.8 + mx.where(mx.arange(D) < 64, 30.0, -18.0)).astype(mx.float16)
    v = mx.random.normal((B, Hkv, n, D)).astype(mx.float16)
    kp = tuple(mx.quantize(k, group_size=64, bits=kb))
    vp = tuple(mx.quantize(v, group_size=64, bits=4))
    run_view(emu, q, kp, vp, n, None, window, k_bits=kb, v_bits=4, group_size=64, nsplit=2, body=body)


def test_compacted_sources_run_the_same(emu):
    """GPUs get the sources without comments and blank lines (kernels.compact), as the
    emulator runs them: the decode kernel and merge from the plain files give the same bits."""
    from emulator.emu import EmuLauncher

    case = ROTATION_CASES[0]
    D, kb, vb, gs, dtype, B, Hkv, rep, L, n, ns, nw, nsplit = case
    q, kp, vp, sinks, window = make_view(
        B, Hkv, rep, L, D, n, ns, nw, k_bits=kb, v_bits=vb, group_size=gs, dtype=dtype, seed=3)
    args = dict(k_bits=kb, v_bits=vb, group_size=gs, scale=0.1, q_start=ns + n + nw - 1, causal=True,
                nsplit=nsplit, rotate_q=True, rotate_out=True, out_dtype=dtype)
    compacted = kernels.decode_launch(emu, q, kp, vp, n, sinks, window, **args)
    plain_emu = EmuLauncher(emu.build_dir, pad_strides=True, compacted=False)
    assert "//" in plain_emu.kernel("sdpa_decode").source and "//" not in emu.kernel("sdpa_decode").source
    plain = kernels.decode_launch(plain_emu, q, kp, vp, n, sinks, window, **args)
    for a, b in zip(plain, compacted):
        assert mx.array_equal(a, b).item()


def test_decode_rotation_needs_a_power_of_two():
    q, kp, vp, sinks, window = make_view(1, 1, 2, 1, 96, 0, 0, 5, k_bits=4, v_bits=4, group_size=32,
                                         dtype=mx.float16, seed=1)
    assert not kernels.rotates_in_kernel(96) and kernels.rotates_in_kernel(64)
    with pytest.raises(ValueError, match="power-of-two"):
        kernels.decode_launch(kernels.MLXLauncher("cuda"), q, None, None, 0, None, window, k_bits=4, v_bits=4,
                              group_size=32, scale=1.0, q_start=4, causal=True, rotate_q=True)


def view_mask(kind, B, Hq, L, total, hidden):
    """A random bool keep-mask whose row 1 also hides its first ``hidden`` positions (left
    padding: sinks and part of the packed run), or a random additive mask."""
    mx.random.seed(9)
    if kind == "bool":
        mask = mx.random.uniform(shape=(B, 1, L, total)) > 0.3
        mask[1, :, :, :hidden] = False
        return mask
    return mx.random.normal((B, Hq, L, total)).astype(mx.float16)


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_decode_view_masks(emu, kind, body):
    B, Hkv, rep, L, D, n, ns, nw = 2, 1, 2, 2, 64, 50, 4, 6
    q, kp, vp, sinks, window = make_view(
        B, Hkv, rep, L, D, n, ns, nw, k_bits=4, v_bits=4, group_size=32, dtype=mx.float16, seed=5)
    mask = view_mask(kind, B, Hkv * rep, L, ns + n + nw, hidden=20)
    run_view(emu, q, kp, vp, n, sinks, window, mask=mask, k_bits=4, v_bits=4, group_size=32, nsplit=3, body=body)


def _random_view_case(rng):
    """A random configuration that decode_supports accepts: (view arrays, run_view kwargs)."""
    while True:
        D = int(rng.choice([64, 128, 256]))
        kb, vb = (int(x) for x in rng.choice([2, 4, 8], 2))
        gs = int(rng.choice([32, 64, 128]))
        B, Hkv = int(rng.integers(1, 3)), int(rng.integers(1, 3))
        rep, L = int(rng.choice([1, 2, 3, 4, 8])), int(rng.integers(1, 9))
        n, ns, nw = int(rng.integers(0, 120)), int(rng.choice([0, 4])), int(rng.integers(0, 20))
        dtype = [mx.float16, mx.bfloat16, mx.float32][int(rng.integers(0, 3))]
        if ns + n + nw < L:
            continue
        q = mx.zeros((B, Hkv * rep, L, D), dtype)
        if kernels.decode_supports(q, None, None, mx.float16, kb, vb, gs, "affine", None):
            break
    q, kp, vp, sinks, window = make_view(B, Hkv, rep, L, D, n, ns, nw, k_bits=kb, v_bits=vb, group_size=gs,
                                         dtype=dtype, seed=int(rng.integers(1 << 20)))
    view = (q, kp, vp, n, sinks, window)
    total = ns + n + nw
    kind = ["none", "bool", "additive"][int(rng.integers(0, 3))]
    mask = None
    if kind != "none":
        mask = view_mask(kind, B, Hkv * rep, L, total, hidden=int(rng.integers(0, total + 1)))
        if kind == "bool":
            mask[..., -1] = True  # (a row with every key hidden: the reference's softmax has NaNs)
    kw = dict(k_bits=kb, v_bits=vb, group_size=gs, mask=mask, causal=bool(rng.integers(0, 2)),
              q_start=int(rng.integers(0, total - L + 1)), nsplit=[None, 1, 3][int(rng.integers(0, 3))])
    if rng.integers(0, 3) == 0:
        kw.update(rotate_q=True, rotate_out=bool(rng.integers(0, 2)), out_dtype=dtype)
    return view, kw


@pytest.mark.parametrize("seed", range(4))
def test_decode_simd_random_shapes(emu, seed):
    """The simd body on random shapes (L 1..8, GQA, bits, groups, head dims, sinks, window,
    masks, causal or not, query offsets, rotations) against the reference."""
    view, kw = _random_view_case(np.random.default_rng(seed))
    run_view(emu, *view, body="simd", **kw)


def test_decode_body_selection(monkeypatch):
    class Metal:
        backend = "metal"

    class Cuda:
        backend = "cuda"

    monkeypatch.delenv("MLX_KVQ_DECODE_BODY", raising=False)
    assert kernels.decode.decode_body(Metal()) == "simd" and kernels.decode.decode_body(Cuda()) == "mma"
    assert kernels.decode.decode_body(Cuda(), "simd") == "simd"
    monkeypatch.setenv("MLX_KVQ_DECODE_BODY", "simd")
    assert kernels.decode.decode_body(Cuda()) == "simd" and kernels.decode.decode_body(Metal(), "mma") == "mma"
    monkeypatch.setenv("MLX_KVQ_DECODE_BODY", "wmma")
    with pytest.raises(ValueError):
        kernels.decode.decode_body(Cuda())


@pytest.mark.parametrize("kb, vb, gs", [(2, 4, 32), (4, 8, 64)])
def test_decode_view_beyond_fp16_in_some_blocks(emu, kb, vb, gs):
    """A bfloat16 view (the mma body's WIDE instantiation) in which one block of packed keys,
    one packed value and one window key and value lie beyond fp16 (2^17 x, 2-bit keys of
    group 32: scales applied in the fp16 fragments, 4-bit of group 64 after the mma), with
    queries of 2^-17 x so that every key counts: the blocks that hold them are computed in
    fp32, the rest on the matrix op, over split-K partials; as the fp32 reference."""
    B, Hkv, rep, L, D, n, ns, nw = 1, 2, 4, 2, 64, 80, 2, 20
    q, kp, vp, sinks, window = make_view(
        B, Hkv, rep, L, D, n, ns, nw, k_bits=kb, v_bits=vb, group_size=gs, dtype=mx.bfloat16, seed=17)
    mx.random.seed(18)
    k = (mx.random.normal((B, Hkv, n + 5, D)) * 1.5).astype(mx.bfloat16)
    v = mx.random.normal((B, Hkv, n + 5, D)).astype(mx.bfloat16)
    k, v = k.at[:, :, 20:23].multiply(2.0**17), v.at[:, :, 50].multiply(2.0**17)
    kp, vp = (tuple(mx.quantize(x, group_size=gs, bits=b)) for x, b in ((k, kb), (v, vb)))
    wk, wv = window
    window = (wk.at[:, :, 17].multiply(2.0**17), wv.at[:, :, 18].multiply(2.0**17))
    q = q * 2.0**-17
    run_view(emu, q, kp, vp, n, sinks, window, k_bits=kb, v_bits=vb, group_size=gs, nsplit=3, body="mma")
    assert [x[1]["WIDE"] for x in emu.launches if x[0] == "sdpa_decode"][-1:] == [True]


def test_decode_view_unsupported_formats(emu):
    q = mx.zeros((1, 4, 1, 96), mx.float16)
    assert not kernels.decode_supports(q, None, None, mx.float16, 4, 4, 32, "affine", None)  # D/8 = 12
    q = mx.zeros((1, 4, 1, 128), mx.float16)
    assert not kernels.decode_supports(q, None, None, mx.float16, 3, 4, 64, "affine", None)
    assert not kernels.decode_supports(q, None, None, mx.float16, 4, 4, 32, "mxfp4", None)
    assert kernels.decode_supports(q, None, None, mx.float16, 4, 8, 64, "affine", None)
    q = mx.zeros((1, 4, 9, 128), mx.float16)
    assert not kernels.decode_supports(q, None, None, mx.float16, 4, 4, 64, "affine", None)
    q = mx.zeros((1, 4, 1, 128), mx.float16)  # values of 64 dims in the sinks and window
    assert not kernels.decode_supports(q, None, None, mx.float16, 4, 4, 64, "affine", None, dense_dims=(128, 64))
    assert kernels.decode_supports(q, None, None, mx.float16, 4, 4, 64, "affine", None, dense_dims=(128, 128))
    dense = (mx.zeros((1, 1, 4, 128), mx.float16), mx.zeros((1, 1, 4, 64), mx.float16))
    with pytest.raises(ValueError, match="head dims 128 and 64"):
        kernels.decode_launch(emu, q, None, None, 0, None, dense, k_bits=4, v_bits=4,
                              group_size=64, scale=1.0, q_start=3, causal=False)


@gpu
@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("case", VIEW_CASES, ids=lambda c: f"D{c[0]}-k{c[1]}v{c[2]}-g{c[3]}-n{c[9]}-s{c[10]}-w{c[11]}")
def test_gpu_decode_view(case, body):
    D, kb, vb, gs, dtype, B, Hkv, rep, L, n, ns, nw, nsplit = case
    n = n * 37  # longer runs than under the emulator
    q, kp, vp, sinks, window = make_view(
        B, Hkv, rep, L, D, n, ns, nw, k_bits=kb, v_bits=vb, group_size=gs, dtype=dtype, seed=D + n)
    run_view(kernels.launcher(), q, kp, vp, n, sinks, window, k_bits=kb, v_bits=vb, group_size=gs, nsplit=None,
             body=body)
    run_view(kernels.launcher(), q, kp, vp, n, sinks, window, k_bits=kb, v_bits=vb, group_size=gs, nsplit=nsplit,
             body=body)


@gpu
@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("rot", ["k", "kv"])
@pytest.mark.parametrize("case", ROTATION_CASES, ids=lambda c: f"D{c[0]}-k{c[1]}v{c[2]}-n{c[9]}-L{c[8]}")
def test_gpu_decode_view_rotations(case, rot, body):
    D, kb, vb, gs, dtype, B, Hkv, rep, L, n, ns, nw, nsplit = case
    n = n * 37
    q, kp, vp, sinks, window = make_view(
        B, Hkv, rep, L, D, n, ns, nw, k_bits=kb, v_bits=vb, group_size=gs, dtype=dtype, seed=D + n + 1)
    run_view(kernels.launcher(), q, kp, vp, n, sinks, window, k_bits=kb, v_bits=vb, group_size=gs,
             rotate_q=True, rotate_out=rot == "kv", out_dtype=dtype, body=body)


@gpu
@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_gpu_decode_view_masks(kind, body):
    B, Hkv, rep, L, D, n, ns, nw = 2, 2, 4, 1, 128, 3000, 4, 40
    q, kp, vp, sinks, window = make_view(
        B, Hkv, rep, L, D, n, ns, nw, k_bits=4, v_bits=4, group_size=64, dtype=mx.float16, seed=7)
    mask = view_mask(kind, B, Hkv * rep, L, ns + n + nw, hidden=700)
    run_view(kernels.launcher(), q, kp, vp, n, sinks, window, mask=mask, k_bits=4, v_bits=4, group_size=64,
             body=body)


# ------------------------------------------------------------------ window append
WINDOW_CASES = [
    # D, B, H, C, L, nw, in dtype, window dtype, rotate k, rotate v
    (64, 1, 2, 12, 1, 5, mx.float16, mx.float16, True, True),
    (128, 2, 3, 9, 3, 6, mx.bfloat16, mx.bfloat16, True, False),
    (32, 1, 1, 8, 2, 0, mx.float32, mx.float16, False, True),
    (96, 1, 2, 7, 1, 6, mx.float16, mx.float16, False, False),
]


def window_reference(buf, x, nw, rot):
    """The buffer with rows [nw, nw + L) = x (times the rotation, in fp32, when ``rot``)."""
    from mlx_kvq.rotation import rotation

    with mx.stream(mx.cpu):
        new = x.astype(mx.float32) @ rotation(x.shape[-1], mx.float32) if rot else x
        out = mx.array(buf)
        out[:, :, nw : nw + x.shape[2]] = new.astype(buf.dtype)
        return out


def window_case(case, seed):
    D, B, H, C, L, nw, dt, wdt, rk, rv = case
    mx.random.seed(seed)
    wk, wv = (mx.random.normal((B, H, C, D)).astype(wdt) for _ in range(2))
    # new rows as the model hands them: a transposed (strided) view
    k, v = (mx.random.normal((B, L, H, D)).astype(dt).transpose(0, 2, 1, 3) for _ in range(2))
    mx.eval(wk, wv, k, v)
    return wk, wv, k, v, nw, rk, rv


def check_window(launch, case, seed):
    wk, wv, k, v, nw, rk, rv = window_case(case, seed)
    assert kernels.window_append_supports(wk, wv, k, v, nw, rk, rv) or not kernels.enabled()
    ok, ov = kernels.window_append_launch(launch, wk, wv, k, v, nw, rk, rv)
    for got, buf, x, rot in ((ok, wk, k, rk), (ov, wv, v, rv)):
        ref = window_reference(buf, x, nw, rot)
        assert got.dtype == buf.dtype and got.shape == buf.shape
        g, r = np.array(got.astype(mx.float32)), np.array(ref.astype(mx.float32))
        assert not np.isnan(g).any(), "unwritten (poisoned) rows"
        L = x.shape[2]
        # untouched rows bit for bit; new rows within one rounding of the window dtype
        np.testing.assert_array_equal(np.delete(g, range(nw, nw + L), axis=2), np.delete(r, range(nw, nw + L), axis=2))
        tol = 8e-3 if buf.dtype == mx.bfloat16 else 1e-3
        np.testing.assert_allclose(g[:, :, nw : nw + L], r[:, :, nw : nw + L], rtol=tol, atol=tol)


@pytest.mark.parametrize("case", WINDOW_CASES)
def test_window_append_emulated(emu, case):
    check_window(emu, case, seed=11)
    assert emu.launches[-1][0] == "window_append"


@pytest.mark.skipif(not ON_GPU, reason="needs the Metal or CUDA backend")
@pytest.mark.parametrize("case", WINDOW_CASES)
def test_gpu_window_append(case):
    check_window(kernels.launcher(), case, seed=12)


def test_window_append_supports(run_kernels_on, monkeypatch):
    wk = wv = mx.zeros((1, 2, 8, 64), mx.float16)
    k = v = mx.zeros((1, 2, 1, 64), mx.float16)
    assert kernels.window_append_supports(wk, wv, k, v, 7, True, True) == kernels.enabled()
    run_kernels_on(NO_LAUNCHES)  # the shape rules, on any machine
    on = True
    assert kernels.window_append_supports(wk, wv, k, v, 7, True, True) == on
    assert not kernels.window_append_supports(wk, wv, k, v, 8, False, False)  # no room
    w96 = mx.zeros((1, 2, 8, 96), mx.float16)
    k96 = mx.zeros((1, 2, 1, 96), mx.float16)
    assert kernels.window_append_supports(w96, w96, k96, k96, 0, False, False) == on
    assert not kernels.window_append_supports(w96, w96, k96, k96, 0, True, False)  # rotation needs 2^k
    w80 = mx.zeros((1, 2, 8, 80), mx.float16)
    k80 = mx.zeros((1, 2, 1, 80), mx.float16)
    assert not kernels.window_append_supports(w80, w80, k80, k80, 0, False, False)


def test_cuda_launcher_includes_the_source_files():
    """On CUDA the launcher passes #include lines instead of the source text (MLX copies
    the text on every call); the first line must name every shape/strides argument the
    body reads, or MLX would not pass it."""
    import re

    for name, (fname, inputs, _, _) in kernels.KERNELS.items():
        header, source, kname = kernels.source.cuda_includes(name, "prelude_cuda.h", kernels.read_source(fname))
        files = re.findall(r'#include "([^"]+)"', header + source)
        assert [Path(f).name for f in files] == ["prelude_cuda.h", "kvq_common.h", fname]
        assert all(Path(f).is_file() for f in files)
        body = kernels.read_source(fname)
        for x in inputs:
            for kind in ("shape", "strides"):
                assert (f"{x}_{kind}" in body) == (f"{x}_{kind}" in source.splitlines()[0]), (name, x, kind)
        assert kname.startswith(f"kvq_{name}_") and len(kname) > len(f"kvq_{name}_") + 8


FUSED_CASES = VIEW_CASES[:3] + VIEW_CASES[4:5] + ROTATION_CASES[:2]


def test_launch_parameters_are_not_small_arrays():
    """The float parameters the kernels read come in arrays of more than 8 bytes, which
    MLX's CUDA allocator serves from a small-block pool whose pages the host touches
    (a kernel's first read then waited for the page: see kernels.param_array)."""
    p = kernels.param_array([0.25])
    assert p.nbytes >= 32 and p.dtype == mx.float32 and p[0].item() == 0.25
    assert kernels.param_array(range(9)).tolist() == list(range(9))
    for rotate in (False, True):
        signs, fp = kernels.args.rotation_args(128, rotate, 0.5)
        assert fp.nbytes >= 32
        assert fp[0].item() == pytest.approx(0.5 / math.sqrt(128) if rotate else 0.5)
        assert fp[1].item() == pytest.approx(1 / math.sqrt(128))


def test_decode_plan_follows_warps_per_core(emu, monkeypatch):
    """The memoized launch setup must not keep a split plan made for another
    warps_per_core (benchmarks sweep it): more warps per core, more partials."""
    monkeypatch.setattr(kernels.decode, "num_cores", lambda: 8)  # a GPU with 132 cores caps both plans
    n = 8192
    q, kp, vp, _, _ = make_view(1, 1, 4, 1, 64, n, 0, 0, k_bits=4, v_bits=4, group_size=64, dtype=mx.float16,
                                seed=3)
    parts = []
    for wpc in (1, 2, 1):
        out, _ = kernels.decode_launch(emu, q, kp, vp, n, None, None, k_bits=4, v_bits=4, group_size=64,
                                       scale=0.125, q_start=n - 1, causal=True, merge=False, warps_per_core=wpc)
        parts.append(out.shape[0])
    assert parts[1] > parts[0] == parts[2], parts


@pytest.mark.parametrize("rot", [None, "kv"])
@pytest.mark.parametrize("case,body", [(c, "mma") for c in FUSED_CASES] + [(c, "simd") for c in FUSED_CASES[:2]],
                         ids=lambda c: f"D{c[0]}-k{c[1]}v{c[2]}-n{c[9]}-L{c[8]}-p{c[12]}" if isinstance(c, tuple) else c)
def test_decode_fused_merge_emulated(emu, case, rot, body, monkeypatch):
    """CUDA merges the split partials in the decode launch (the last threadgroup of a row
    tile to finish does it): the same bits as decode + sdpa_merge, and the reference."""
    D, kb, vb, gs, dtype, B, Hkv, rep, L, n, ns, nw, nsplit = case
    if rot and not kernels.rotates_in_kernel(D):
        pytest.skip("rotation needs a power-of-two head dim")
    q, kp, vp, sinks, window = make_view(
        B, Hkv, rep, L, D, n, ns, nw, k_bits=kb, v_bits=vb, group_size=gs, dtype=dtype, seed=21)
    kw = dict(k_bits=kb, v_bits=vb, group_size=gs, nsplit=nsplit, rotate_q=bool(rot), rotate_out=rot == "kv",
              out_dtype=dtype if rot else mx.float32, body=body)
    name = "sdpa_decode" if body == "mma" else "sdpa_decode_simd"
    two = run_view(emu, q, kp, vp, n, sinks, window, **kw)
    assert emu.launches[-1][0] in ("sdpa_merge", name)
    monkeypatch.setattr(emu, "fused_merge", True)
    fused = run_view(emu, q, kp, vp, n, sinks, window, **kw)
    if emu.launches[-2][0] == "sdpa_merge":  # a merge was needed: now one launch
        assert emu.launches[-1][0] == name + "_fused"
        assert emu.launches[-1][1]["ROTO"] == (rot == "kv")
    for a, b in zip(two, fused):
        assert mx.array_equal(a, b).item()


@pytest.mark.skipif(not ON_GPU, reason="needs the Metal or CUDA backend")
@pytest.mark.parametrize("body", BODIES)
def test_gpu_decode_fused_merge_independent_launches(body):
    """Launches with no data dependency may run at once (MLX's CUDA graphs): each fused
    launch must count its own threadgroups. Many independent calls evaluated together
    must each match the reference and one another."""
    if kernels.backend_name() != "cuda":
        pytest.skip("the fused merge runs on CUDA only")
    launch = kernels.MLXLauncher("cuda")
    launch.fused_merge = True  # the CUDA default, whatever MLX_KVQ_FUSED_MERGE says
    D, kb, vb, gs, dtype, B, Hkv, rep, L, n, ns, nw, nsplit = VIEW_CASES[0]
    n = n * 37
    q, kp, vp, sinks, window = make_view(
        B, Hkv, rep, L, D, n, ns, nw, k_bits=kb, v_bits=vb, group_size=gs, dtype=dtype, seed=4)
    args = dict(k_bits=kb, v_bits=vb, group_size=gs, scale=D**-0.5, q_start=ns + n + nw - 1, causal=True,
                rotate_q=True, rotate_out=True, out_dtype=dtype, body=body)
    qs = [q * (1 + 0.1 * i) for i in range(12)]
    outs = [kernels.decode_launch(launch, x, kp, vp, n, sinks, window, **args) for x in qs for _ in range(2)]
    mx.eval(outs)
    two = kernels.MLXLauncher(launch.backend)  # decode + sdpa_merge, one after another
    two.fused_merge = False
    refs = [kernels.decode_launch(two, x, kp, vp, n, sinks, window, **args) for x in qs]
    mx.eval(refs)
    for i, (ro, rl) in enumerate(refs):
        for o, l in outs[2 * i : 2 * i + 2]:
            assert mx.array_equal(o, ro).item() and mx.array_equal(l, rl).item(), i
    run_view(launch, qs[-1], kp, vp, n, sinks, window, k_bits=kb, v_bits=vb, group_size=gs,
             rotate_q=True, rotate_out=True, out_dtype=dtype, body=body)
