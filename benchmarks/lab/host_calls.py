"""Host cost of one custom-kernel call, split: mlx-kvq's Python preparation, MLX's
binding (it rebuilds the kernel's source text on every call), and the launch.

    python3 benchmarks/lab/host_calls.py
"""

import sys
from pathlib import Path

import mlx.core as mx

from mlx_kvq import kernels

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_host import per_call_us  # noqa: E402


class Recorder:
    """A launcher that remembers the arguments of its last call."""

    def __init__(self, inner):
        self.inner, self.last = inner, None

    def __call__(self, *a):
        self.last = a
        return self.inner(*a)


def main():
    B, Hq, Hkv, D, n = 1, 32, 8, 128, 32768
    q = mx.random.normal((B, Hq, 1, D)).astype(mx.float16)
    k = mx.random.normal((B, Hkv, n, D)).astype(mx.float16)
    kp = mx.quantize(k, group_size=64, bits=4)
    mx.eval(q, kp)
    launch = kernels._launcher()
    rec = Recorder(launch)
    kw = dict(k_bits=4, v_bits=4, group_size=64, scale=0.1, q_start=n, causal=False, merge=False)
    kernels.decode_launch(rec, q, kp, kp, n, None, None, **kw)
    name, inputs, template, grid, tg, oshapes, odtypes = rec.last
    tiny = mx.fast.cuda_kernel(name="tiny", input_names=kernels.KERNELS[name][1], output_names=["out", "lse"],
                               source="if (threadIdx.x == 0) { out[0] = 0.0f; lse[0] = 0.0f; }", ensure_row_contiguous=False)
    d = kernels.source_dir()
    inc = mx.fast.cuda_kernel(
        name="kvq_inc_sdpa_decode", input_names=kernels.KERNELS[name][1], output_names=["out", "lse"],
        header=f'#include "{d / "prelude_cuda.h"}"\n#include "{d / "kvq_common.h"}"\n',
        source="// " + " ".join(f"{a}_shape {a}_strides" for a in kernels.KERNELS[name][1]) +
        f'\n#include "{d / "sdpa_decode.metal"}"\n', ensure_row_contiguous=False)
    try:
        a = launch(name, inputs, template, grid, tg, oshapes, odtypes)
        b = inc(inputs=inputs, template=template, grid=grid, threadgroup=tg, output_shapes=oshapes, output_dtypes=odtypes)
        mx.eval(a, b)
        print("include-file kernel: max |diff| vs inline source", mx.abs(a[0] - b[0]).max().item(), flush=True)
    except Exception as e:
        inc = None
        print("include-file kernel failed:", repr(e)[:2000], flush=True)
    rows = [
        ("decode_launch (Python prep + call)", lambda: kernels.decode_launch(launch, q, kp, kp, n, None, None, **kw)[0]),
        ("the cuda_kernel call alone", lambda: launch(name, inputs, template, grid, tg, oshapes, odtypes)[0]),
        ("a 1-line kernel, same inputs/template", lambda: tiny(inputs=inputs, template=template, grid=grid, threadgroup=tg,
                                                              output_shapes=oshapes, output_dtypes=odtypes)[0]),
        ("a 1-line kernel, no template", lambda: tiny(inputs=inputs, grid=grid, threadgroup=tg,
                                                     output_shapes=oshapes, output_dtypes=odtypes)[0]),
        ("mx.zeros", lambda: mx.zeros((4,))),
    ] + ([] if inc is None else [
        ("include-file kernel call", lambda: inc(inputs=inputs, template=template, grid=grid, threadgroup=tg,
                                                 output_shapes=oshapes, output_dtypes=odtypes)[0]),
    ])
    print(f"device {mx.default_device()}  mlx {mx.__version__}; build / dispatch us per call, median")
    for label, fn in rows:
        b, d = per_call_us(fn, 200)
        print(f"  {label:42s} {b:8.1f} {d:8.1f}", flush=True)


if __name__ == "__main__":
    main()
