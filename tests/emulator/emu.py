"""Run mlx-kvq kernel bodies on the CPU under the C++ Metal emulator.

``EmuLauncher`` has the call signature of a kvq launcher (see
``mlx_kvq.kernels.MLXLauncher``), so every ``*_launch`` function runs unchanged on
it; ``EmuLauncher.metal_kernel`` is ``mx.fast.metal_kernel`` on the emulator.  A
launch generates the exact source MLX would hand the Metal compiler
(``mlx_source.metal_source``: header, ``[[kernel]]`` signature, body, template
instantiation), compiles that text unchanged after the emulator's prelude
``metal_emu.h`` (standing in for MLX's ``metal::utils()``) with g++ into a shared
library (cached by source hash), and calls the instantiation through a small entry
point that binds the ``[[buffer(i)]]`` parameters in ``CustomKernel::eval_gpu``'s
order and the declared thread attributes.
"""

import ctypes
import hashlib
import math
import os
import re
import subprocess
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_kvq import kernels

from .mlx_source import encoder_buffers, kernel_name, metal_source

HERE = Path(__file__).resolve().parent
# Apple GPUs' limit; a pipeline's maxTotalThreadsPerThreadgroup can be lower
MAX_THREADS_PER_THREADGROUP = 1024

# numpy carrier dtype for each mx dtype (bf16 travels as its uint16 bits)
_NP = {
    mx.float32: np.float32,
    mx.float16: np.float16,
    mx.bfloat16: np.uint16,
    mx.uint32: np.uint32,
    mx.uint8: np.uint8,
    mx.int32: np.int32,
    mx.bool_: np.bool_,
}
_POISON = {
    mx.float32: np.float32(np.nan),
    mx.float16: np.float16(np.nan),
    mx.bfloat16: np.uint16(0x7FC1),
    mx.uint32: np.uint32(0xDEADBEEF),
    mx.uint8: np.uint8(0xAB),
    mx.int32: np.int32(-12345),
}


def to_numpy(a):
    if a.dtype == mx.bfloat16:
        return np.ascontiguousarray(np.array(a.view(mx.uint16)))
    return np.ascontiguousarray(np.array(a))


def from_numpy(x, dtype):
    if dtype == mx.bfloat16:
        return mx.array(x).view(mx.bfloat16)
    return mx.array(x)


def _param_binding(param):
    """C++ argument for one parameter line of the MLX signature: a buffer cast to the
    declared type, or the value of the declared attribute."""
    m = re.fullmatch(r"\s*(?P<decl>.*?)\s*\[\[(?P<attr>\w+)(?:\((?P<idx>\d+)\))?\]\]", param)
    if m is None:
        raise RuntimeError(f"unexpected parameter in the MLX signature: {param!r}")
    decl, attr = m["decl"], m["attr"]
    if attr == "buffer":
        name = re.search(r"(\w+)$", decl)[1]
        ty = decl[: -len(name)].strip()
        if ty.endswith("&"):
            return f"*({ty[:-1].strip()}*)bufs[{m['idx']}]"
        return f"({ty})bufs[{m['idx']}]"
    return f"A.{attr}"


def emulator_source(text, kname):
    """The C++ translation unit of an MLX-generated kernel source ``text``: the emulator's
    prelude (standing in for MLX's ``metal::utils()``), ``text`` unchanged, and a launch
    entry point that calls the instantiation with the buffers and attributes the
    signature declares."""
    sig = f"[[kernel]] void {kname}(\n"
    i = text.index(sig) + len(sig)
    j = text.index(") {\n", i)
    args = [_param_binding(p) for p in text[i:j].split(",\n")]
    inst = re.search(r'template \[\[host_name\("' + re.escape(kname) + r'"\)\]\] \[\[kernel\]\] decltype\((.*)\) \1;\n',
                     text)
    callee = inst[1] if inst else kname
    return f"""#include "metal_emu.h"
#line 1 "{kname}.metal"
{text}
#line 1 "emu_launch"
extern "C" int kvq_launch(void** bufs, int gx, int gy, int gz, int tx, int ty, int tz, unsigned seed,
                          char* err, int errlen) {{
  return emu::launch(gx, gy, gz, tx, ty, tz, seed, err, errlen, [&](const emu::Attrs& A) {{
    {callee}({", ".join(args)});
  }});
}}
"""


def kvq_kernel_args(name, compacted=True):
    """``mx.fast.metal_kernel`` arguments of a kvq kernel as :class:`kernels.MLXLauncher`
    makes them, with the emulator's prelude (prelude_emu.h) in place of prelude_metal.h."""
    return kernels.metal_kernel_args(name, (HERE / "prelude_emu.h").read_text(), compacted=compacted)


class EmuKernel:
    """What ``mx.fast.metal_kernel(...)`` returns, run on the CPU: called with the
    keyword arguments of an MLX kernel call, it runs the source MLX would generate."""

    def __init__(self, launcher, name, input_names, output_names, source, header="",
                 ensure_row_contiguous=True, atomic_outputs=False):
        if atomic_outputs:
            raise NotImplementedError("the emulator has no atomic outputs")
        self.launcher = launcher
        self.name, self.input_names, self.output_names = name, list(input_names), list(output_names)
        self.source, self.header, self.ensure_row_contiguous = source, header, ensure_row_contiguous
        self.strided_view = None  # (input index, ndim) -> bool: hand that input as a padded view

    def source_text(self, inputs, template, output_dtypes):
        return metal_source(self.name, self.input_names, self.output_names, self.source, self.header,
                            template, inputs, output_dtypes, self.ensure_row_contiguous)

    def __call__(self, *, inputs, template=None, grid, threadgroup, output_shapes, output_dtypes, label=None):
        inputs = [a if isinstance(a, mx.array) else mx.array(a) for a in inputs]
        if math.prod(threadgroup) > MAX_THREADS_PER_THREADGROUP:  # MLX checks the pipeline's maximum
            raise ValueError(f"Thread group size ({math.prod(threadgroup)}) is greater than  the maximum "
                             f"allowed threads per threadgroup ({MAX_THREADS_PER_THREADGROUP}).")
        template = list(template or [])
        text = self.source_text(inputs, template, output_dtypes)
        kname = kernel_name(self.name, template, inputs, output_dtypes)
        lib = self.launcher.build(label or self.name, emulator_source(text, kname))
        arrs, shapes, strides = [], [], []
        for i, a in enumerate(inputs):
            if a.size > 2**26 or a.size == 0:  # a broadcast "carrier": no data is read
                x = np.zeros(16, dtype=np.uint8)
                shape = tuple(a.shape)
                st = (0,) * len(shape)
            else:
                x = to_numpy(a)
                if self.strided_view is not None and self.strided_view(i, x.ndim):
                    x = self.launcher.padded_view(x)
                shape = x.shape
                st = tuple(s // x.itemsize for s in x.strides)
            arrs.append(x)
            shapes.append(np.array(shape, dtype=np.int32))
            strides.append(np.array(st, dtype=np.int64))
        outs = []
        for shp, dt in zip(output_shapes, output_dtypes):
            o = np.empty(tuple(shp), dtype=_NP[dt])
            o.fill(_POISON[dt])
            outs.append(o)
        # the buffers in the order CustomKernel::eval_gpu binds them
        per_kind = {"in": arrs, "shape": shapes, "strides": strides,
                    "ndim": [np.array(len(a.shape), dtype=np.int32) for a in inputs]}
        held = [per_kind[kind][i] for kind, i in encoder_buffers(self.input_names, inputs, self.source)] + outs
        ptrs = (ctypes.c_void_p * len(held))(*[h.ctypes.data_as(ctypes.c_void_p) for h in held])
        err = ctypes.create_string_buffer(512)
        gx, gy, gz = grid
        tx, ty, tz = threadgroup
        rc = lib.kvq_launch(ptrs, gx, gy, gz, tx, ty, tz, ctypes.c_uint(self.launcher.seed), err, 512)
        if rc != 0:
            raise RuntimeError(f"emulated kernel {label or self.name} failed: {err.value.decode()}")
        return [from_numpy(o, dt) for o, dt in zip(outs, output_dtypes)]


class EmuLauncher:
    def __init__(self, build_dir, seed=1234, opt="-O1", cxx=None, pad_strides=False, compacted=True):
        self.build_dir = Path(build_dir)
        self.build_dir.mkdir(parents=True, exist_ok=True)
        self.seed = seed
        self.opt = opt
        self.cxx = cxx or os.environ.get("CXX", "g++")
        self._libs = {}
        self._lock = threading.Lock()
        self.launches = []  # (name, template, grid, threadgroup) log for tests
        self.fused_merge = False  # decode_launch: sdpa_decode_fused instead of decode + merge
        # pad_strides: hand kernels that read strided inputs (ensure_row_contiguous
        # off) views into larger buffers filled with garbage, so that wrong
        # stride handling shows up
        self.pad_strides = pad_strides
        self._rng = np.random.default_rng(seed)
        # compacted: the kernel text without comments and blank lines, as MLXLauncher hands it
        self.compacted = compacted
        self._kernels = {}

    def metal_kernel(self, name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                     atomic_outputs=False):
        """``mx.fast.metal_kernel`` on the emulator."""
        return EmuKernel(self, name, input_names, output_names, source, header, ensure_row_contiguous,
                         atomic_outputs)

    def padded_view(self, x):
        """``x`` as a view into a larger buffer of garbage (a slice of a preallocated cache)."""
        big = np.empty((x.shape[0], x.shape[1] + 1, x.shape[2] + 3, x.shape[3]), dtype=x.dtype)
        big.view(np.uint8).reshape(-1)[:] = self._rng.integers(0, 256, big.nbytes, dtype=np.uint8)
        big[:, : x.shape[1], 1 : 1 + x.shape[2]] = x
        return big[:, : x.shape[1], 1 : 1 + x.shape[2]]

    def build(self, name, src):
        """Build the translation unit ``src`` (cached by its hash and the included headers')."""
        emu_h = (HERE / "metal_emu.h").read_text()
        h = hashlib.sha1((src + emu_h + self.opt).encode()).hexdigest()[:16]
        with self._lock:
            if h in self._libs:
                return self._libs[h]
        so = self.build_dir / f"kvq_{name}_{h}.so"
        if not so.exists():
            cpp = self.build_dir / f"kvq_{name}_{h}.cpp"
            cpp.write_text(src)
            tmp = so.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            cmd = [
                self.cxx, "-std=c++20", self.opt, "-fno-strict-aliasing", "-shared", "-fPIC", "-w",
                f"-I{HERE}", str(cpp), "-o", str(tmp),
            ]
            r = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "LC_ALL": "C"})
            if r.returncode != 0:
                raise RuntimeError(f"emulator build failed for {name}:\n{r.stderr[-6000:]}")
            os.replace(tmp, so)
        lib = ctypes.CDLL(str(so))
        lib.kvq_launch.restype = ctypes.c_int
        with self._lock:
            self._libs[h] = lib
        return lib

    def kernel(self, name):
        """The emulated ``mx.fast.metal_kernel`` object of kvq kernel ``name``."""
        k = self._kernels.get(name)
        if k is None:
            k = self.metal_kernel(**kvq_kernel_args(name, self.compacted))
            if self.pad_strides and not kernels.KERNELS[name][3]:
                k.strided_view = lambda i, ndim: ndim == 4
            self._kernels[name] = k
        return k

    def __call__(self, name, inputs, template, grid, threadgroup, output_shapes, output_dtypes):
        self.launches.append((name, dict(template), tuple(grid), tuple(threadgroup)))
        return self.kernel(name)(inputs=inputs, template=template, grid=grid, threadgroup=threadgroup,
                                 output_shapes=output_shapes, output_dtypes=output_dtypes, label=name)
