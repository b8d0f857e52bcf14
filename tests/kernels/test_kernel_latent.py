"""sdpa_latent (kernels/latent.py): many query heads over one packed run that is both the
keys and the values (MLA's latent), against the fp32 reference over the dequantized run;
on the CPU under the emulator, and on a GPU backend when there is one."""

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emulator.reference import reference_attention  # noqa: E402
from test_kernels import TOL, check_partial  # noqa: E402

from mlx_kvq import kernels
from mlx_kvq.kernels import selfcheck

ON_GPU = kernels.backend_name() is not None

CASES = [
    # D, bits, gs, dtype, B, Hkv, rep, L, n, mask, causal, nsplit
    (64, 4, 32, mx.float16, 1, 1, 20, 1, 50, "add", False, 1),  # a tile of 16 rows and a partial one
    (512, 4, 64, mx.float16, 1, 1, 16, 1, 21, "add", False, 2),  # MLA's 512-wide latent, split keys
    (128, 8, 64, mx.bfloat16, 2, 2, 3, 4, 37, "bool", True, 3),  # queries at the end of the run, GQA
    (96, 2, 32, mx.float32, 1, 1, 5, 1, 9, None, False, 1),  # 3 dim tiles per simdgroup, a partial block
    (256, 4, 128, mx.float16, 1, 1, 8, 2, 30, "row", True, 1),  # a (B, 1, 1, n) mask, rows that see no key
]


def latent_case(D, bits, gs, dtype, B, Hkv, rep, L, n, mask, causal, nsplit, seed=0):
    mx.random.seed(seed + D + n)
    Hq = Hkv * rep
    q = (mx.random.normal((B, Hq, L, D)) * 2).astype(dtype)
    x = (mx.random.normal((B, Hkv, n + 6, D)) * 1.5 + 0.3).astype(mx.float16 if dtype == mx.float32 else dtype)
    packed = tuple(mx.quantize(x, group_size=gs, bits=bits))
    m = None
    if mask == "add":  # MLA's rope scores: additive, per head
        m = (mx.random.normal((B, Hq, L, n)) * 3).astype(dtype)
    elif mask == "bool":
        m = mx.random.uniform(shape=(B, Hq, L, n)) < 0.7
    elif mask == "row":  # the first keys hidden from every row (a batch row's left padding)
        m = (mx.arange(n) >= 20).reshape(1, 1, 1, n)
    mx.eval(q, packed, m)
    kw = dict(bits=bits, group_size=gs, scale=D**-0.5, q_start=n - L, k_start=0, causal=causal, mask=m)
    return q, packed, kw


def check(launch, case):
    n, nsplit = case[8], case[-1]
    q, packed, kw = latent_case(*case)
    assert kernels.latent_supports(q, packed, kw["bits"], kw["group_size"], "affine", kw["mask"])
    out, lse = kernels.latent_launch(launch, q, packed, n, nsplit=nsplit, **kw)
    ref = {k: v for k, v in kw.items() if k != "bits"}
    with mx.stream(mx.cpu):  # fp32 reference on the CPU (no TF32 matmuls on CUDA)
        ro, rl = reference_attention(q, packed, packed, n, k_bits=kw["bits"], v_bits=kw["bits"],
                                     mode="affine", **ref)
    return check_partial(out, lse, ro, rl, TOL, lse_tol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_latent_emulated(emu, case):
    check(emu, case)
    assert emu.launches[-1 if case[-1] == 1 else -2][0] == "sdpa_latent"


def test_latent_rows_that_see_no_key(emu):
    """A causal run whose first rows see none of its keys: out 0, lse -inf, as the reference."""
    q, packed, kw = latent_case(64, 4, 32, mx.float16, 1, 1, 2, 6, 3, None, True, 1)
    kw["q_start"] = -3  # rows at positions -3..2 over keys 0..2: the first three see nothing
    out, lse = kernels.latent_launch(emu, q, packed, 3, nsplit=1, **kw)
    with mx.stream(mx.cpu):
        ro, rl = reference_attention(q, packed, packed, 3, k_bits=4, v_bits=4, mode="affine",
                                     **{k: v for k, v in kw.items() if k != "bits"})
    check_partial(out, lse, ro, rl, TOL, lse_tol=1e-4)
    assert np.isinf(np.array(lse)[0, :, :3]).all()


def test_latent_supports():
    q = mx.zeros((1, 16, 1, 512), mx.float16)
    packed = tuple(mx.quantize(mx.zeros((1, 1, 8, 512), mx.float16), group_size=64, bits=4))
    assert kernels.latent_supports(q, packed, 4, 64, "affine", None)
    assert not kernels.latent_supports(q, packed, 3, 64, "affine", None)  # 3-bit words split groups
    assert not kernels.latent_supports(q, packed, 4, 64, "mxfp4", None)
    assert not kernels.latent_supports(mx.zeros((1, 16, 1, 256), mx.float16), packed, 4, 64, "affine", None)
    assert not kernels.latent_supports(q, packed, 4, 64, "affine", mx.zeros((2, 16, 1, 8)))  # batch 2 mask
    big = tuple(mx.quantize(mx.zeros((1, 1, 8, 1024), mx.float16), group_size=64, bits=4))
    assert not kernels.latent_supports(mx.zeros((1, 16, 1, 1024), mx.float16), big, 4, 64, "affine", None)


def test_latent_selfcheck_passes_on_the_emulator(emu):
    """The self-check's tiny problem (the one a GPU runs at a configuration's first use)."""
    q, packed, kw = latent_case(512, 4, 64, mx.float16, 1, 1, 16, 1, 21, "add", False, 1)
    family, config, run = selfcheck.latent_case(emu, kernels.latent_launch, q.dtype, packed[1].dtype, 512, 4, 64,
                                                128, 1, kw["mask"], False)
    assert family == "latent" and run() is None


gpu = pytest.mark.skipif(not ON_GPU, reason="needs the Metal or CUDA backend")


@gpu
@pytest.mark.parametrize("case", CASES)
def test_gpu_latent(case):
    check(kernels.launcher(), case)
