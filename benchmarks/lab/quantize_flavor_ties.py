"""Why ``bench attention --check --emu`` reported 18 mismatching elements for bf16 4-bit g64.

The quantize kernel has two roundings (FLAVOR): 0 is MLX's CPU mx.quantize (round half to
even, clamp at 0), 1 its Metal/CUDA one (round half away from zero). The check used flavour 1
against mx.quantize, which under --emu runs on the CPU. On the check's input both flavours
are exact against their own algorithm; they differ only at values exactly half-way between two
codes, which bf16 (8-bit mantissa) produces 18 times and fp16 once (rounding the same way).

    PYTHONPATH=$PWD python3 benchmarks/lab/quantize_flavor_ties.py   # needs g++
"""
import sys, tempfile
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "kernels")]
import mlx_kvq, mlx.core as mx, numpy as np
from mlx_kvq import kernels
from emulator.emu import EmuLauncher
from test_kernels import _np_quantize_gpu_flavor
emu = EmuLauncher(tempfile.mkdtemp())
bits, gs = 4, 64
for dt in (mx.float16, mx.bfloat16):
    mx.random.seed(bits * gs)   # the bench's input
    x = (mx.random.normal((2, 8, 5, 128)) * 3).astype(dt)
    x = mx.concatenate([x, -mx.abs(x[:, :, :1]), mx.full((2, 8, 1, 128), 0.25, dt)], 2)
    want = mx.quantize(x, group_size=gs, bits=bits)  # CPU mx.quantize
    for flavor in (0, 1):
        got = kernels.quantize_launch(emu, x, bits=bits, group_size=gs, flavor=flavor)
        mism = sum(int(mx.sum((a.view(mx.uint16) if a.dtype != mx.uint32 else a) != (b.view(mx.uint16) if b.dtype != mx.uint32 else b))) for a, b in zip(got, want))
        q, s, b = _np_quantize_gpu_flavor(x, bits, gs)
        codes = (np.unpackbits(np.array(got[0]).view(np.uint8), bitorder="little").reshape(-1, bits) * (1 << np.arange(bits))).sum(1)
        gpu_model = int((codes != q.reshape(-1)).sum()) + int((np.array(got[1].astype(mx.float32)).reshape(-1) != np.array(mx.array(s).astype(dt).astype(mx.float32))).sum())
        print(f"{str(dt).split('.')[-1]:9s} flavor {flavor}: elements differing from CPU mx.quantize {mism:3d}; "
              f"codes+scales differing from the numpy model of MLX's GPU algorithm (scales cast to the input dtype) {gpu_model}")
    # where the two algorithms disagree: half-way ties
    xf = np.array(x.astype(mx.float32)).reshape(-1, gs)
    w, s, b = (np.array(a.astype(mx.float32)) if a.dtype != mx.uint32 else np.array(a) for a in want)
    t = (xf - b.reshape(-1, 1)) / s.reshape(-1, 1)
    print(f"          values exactly half-way between two codes: {int((np.abs(t - np.floor(t) - 0.5) < 1e-6).sum())}")
