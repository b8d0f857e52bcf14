"""Run mlx-kvq kernel bodies on the CPU under the C++ Metal emulator.

``EmuLauncher`` has the call signature of an ``mx.fast.metal_kernel`` object
(see ``mlx_kvq.kernels.MLXLauncher``), so ``kernels.attention_launch`` and
``kernels.quantize_launch`` run unchanged on it.  For every kernel
instantiation it generates a C++ translation unit (prelude ``metal_emu.h`` +
``kvq_common.h`` + the kernel body wrapped in a function whose parameters are
exactly what metal_kernel would generate), builds it with g++ into a shared
library (cached by source hash) and calls it through ctypes.
"""

import ctypes
import hashlib
import os
import subprocess
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_kvq import kernels

HERE = Path(__file__).resolve().parent

_CTYPE = {
    mx.float32: "float",
    mx.float16: "emu_half",
    mx.bfloat16: "emu_bf16",
    mx.uint32: "uint32_t",
    mx.uint8: "uint8_t",
    mx.int32: "int32_t",
    mx.bool_: "bool",
    mx.uint16: "uint16_t",
}
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

ATTRS = {
    "threadgroup_position_in_grid": "uint3",
    "thread_position_in_grid": "uint3",
    "thread_position_in_threadgroup": "uint3",
    "thread_index_in_simdgroup": "uint",
    "simdgroup_index_in_threadgroup": "uint",
    "thread_index_in_threadgroup": "uint",
    "threads_per_threadgroup": "uint3",
    "threadgroups_per_grid": "uint3",
}


def to_numpy(a):
    if a.dtype == mx.bfloat16:
        return np.ascontiguousarray(np.array(a.view(mx.uint16)))
    return np.ascontiguousarray(np.array(a))


def from_numpy(x, dtype):
    if dtype == mx.bfloat16:
        return mx.array(x).view(mx.bfloat16)
    return mx.array(x)


def _tval(v):
    if isinstance(v, bool):
        return "bool", "true" if v else "false"
    if isinstance(v, int):
        return "int", str(v)
    return "type", _CTYPE[v]


def generate(name, in_dtypes, out_dtypes, template):
    common, body, in_names, out_names = kernels.kernel_source(name)
    params = []
    extra = []  # (input index, "shape"/"strides") in parameter order
    for i, (nm, dt) in enumerate(zip(in_names, in_dtypes)):
        params.append(f"const {_CTYPE[dt]}* {nm}")
        # like mx.fast.metal_kernel: shape/strides arguments when the body names them
        if f"{nm}_shape" in body:
            params.append(f"const int* {nm}_shape")
            extra.append((i, "shape"))
        if f"{nm}_strides" in body:
            params.append(f"const int64_t* {nm}_strides")
            extra.append((i, "strides"))
    for nm, dt in zip(out_names, out_dtypes):
        params.append(f"{_CTYPE[dt]}* {nm}")
    for a, t in ATTRS.items():
        params.append(f"{t} {a}")
    consts = []
    for k, v in template:
        kind, val = _tval(v)
        if kind == "type":
            consts.append(f"  using {k} = {val};")
        else:
            consts.append(f"  constexpr {kind} {k} = {val};")
    casts = []
    for i, (nm, dt) in enumerate(zip(in_names, in_dtypes)):
        casts.append(f"(const {_CTYPE[dt]}*)bufs[{i}]")
        for j, kind in extra:
            if j == i:
                cty = "int" if kind == "shape" else "int64_t"
                casts.append(f"(const {cty}*)meta[{2 * i + (kind == 'strides')}]")
    for i, (nm, dt) in enumerate(zip(out_names, out_dtypes)):
        casts.append(f"({_CTYPE[dt]}*)bufs[{len(in_names) + i}]")
    src = f"""#include "metal_emu.h"
#line 1 "kvq_common.h"
{common}
static void kvq_body({", ".join(params)}) {{
{chr(10).join(consts)}
#line 1 "{KERNEL_FILES[name]}"
{body}
}}

extern "C" int kvq_launch(void** bufs, void** meta, int gx, int gy, int gz, int tx, int ty,
                          int tz, unsigned seed, char* err, int errlen) {{
  std::mt19937 rng(seed);
  const int nx = (gx + tx - 1) / tx, ny = (gy + ty - 1) / ty, nz = (gz + tz - 1) / tz;
  const int nt = tx * ty * tz;
  for (int z = 0; z < nz; z++)
    for (int y = 0; y < ny; y++)
      for (int x = 0; x < nx; x++) {{
        uint3 tgp{{(uint)x, (uint)y, (uint)z}};
        std::string e = emu::run_threadgroup(nt, rng, [&](uint tid) {{
          uint3 tpos{{tid % tx, (tid / tx) % ty, tid / (tx * ty)}};
          uint3 tpg{{tgp.x * tx + tpos.x, tgp.y * ty + tpos.y, tgp.z * tz + tpos.z}};
          kvq_body({", ".join(casts)},
                   tgp, tpg, tpos, tid % 32, tid / 32, tid,
                   uint3{{(uint)tx, (uint)ty, (uint)tz}}, uint3{{(uint)nx, (uint)ny, (uint)nz}});
        }});
        if (!e.empty()) {{
          std::snprintf(err, errlen, "threadgroup (%d,%d,%d): %s", x, y, z, e.c_str());
          return 1;
        }}
      }}
  return 0;
}}
"""
    return src


KERNEL_FILES = {k: v[0] for k, v in kernels.KERNELS.items()}


class EmuLauncher:
    def __init__(self, build_dir, seed=1234, opt="-O1", cxx=None, pad_strides=False):
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

    def build(self, name, in_dtypes, out_dtypes, template):
        src = generate(name, in_dtypes, out_dtypes, template)
        # the included emulator header is part of what gets built: an edit to it must rebuild
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
                f"-I{HERE}", f"-I{kernels.source_dir()}", str(cpp), "-o", str(tmp),
            ]
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                raise RuntimeError(f"emulator build failed for {name}:\n{r.stderr[-6000:]}")
            os.replace(tmp, so)
        lib = ctypes.CDLL(str(so))
        lib.kvq_launch.restype = ctypes.c_int
        with self._lock:
            self._libs[h] = lib
        return lib

    def __call__(self, name, inputs, template, grid, threadgroup, output_shapes, output_dtypes):
        in_dtypes = [a.dtype for a in inputs]
        lib = self.build(name, in_dtypes, list(output_dtypes), template)
        strided = not kernels.KERNELS[name][3]
        arrs, metas = [], []
        for a in inputs:
            if a.size > 2**26 or a.size == 0:  # a broadcast "carrier": no data is read
                x = np.zeros(16, dtype=np.uint8)
                shape = tuple(a.shape)
                st = (0,) * len(shape)
            else:
                x = to_numpy(a)
                if strided and self.pad_strides and x.ndim == 4:
                    big = np.empty(
                        (x.shape[0], x.shape[1] + 1, x.shape[2] + 3, x.shape[3]), dtype=x.dtype
                    )
                    big.view(np.uint8).reshape(-1)[:] = self._rng.integers(
                        0, 256, big.nbytes, dtype=np.uint8)
                    big[:, : x.shape[1], 1 : 1 + x.shape[2]] = x
                    x = big[:, : x.shape[1], 1 : 1 + x.shape[2]]
                shape = x.shape
                st = tuple(s // x.itemsize for s in x.strides)
            arrs.append(x)
            metas.append(np.array(shape if shape else (1,), dtype=np.int32))
            metas.append(np.array(st if st else (0,), dtype=np.int64))
        outs = []
        for shp, dt in zip(output_shapes, output_dtypes):
            o = np.empty(tuple(shp), dtype=_NP[dt])
            o.fill(_POISON[dt])
            outs.append(o)
        ptrs = (ctypes.c_void_p * (len(arrs) + len(outs)))(
            *[a.ctypes.data_as(ctypes.c_void_p) for a in arrs + outs]
        )
        err = ctypes.create_string_buffer(512)
        gx, gy, gz = grid
        tx, ty, tz = threadgroup
        self.launches.append((name, dict(template), tuple(grid), tuple(threadgroup)))
        mptrs = (ctypes.c_void_p * len(metas))(*[m.ctypes.data_as(ctypes.c_void_p) for m in metas])
        rc = lib.kvq_launch(ptrs, mptrs, gx, gy, gz, tx, ty, tz, ctypes.c_uint(self.seed), err, 512)
        if rc != 0:
            raise RuntimeError(f"emulated kernel {name} failed: {err.value.decode()}")
        return [from_numpy(o, dt) for o, dt in zip(outs, output_dtypes)]
