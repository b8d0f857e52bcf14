"""Compile a kernel body offline with the local CUDA toolkit (no GPU) and report
registers, spills and the SASS instruction mix of the hot loop.

The kernel is wrapped the way ``mx.fast.cuda_kernel`` wraps it (a templated
``__global__`` function; inputs ``const T*``, shapes and strides passed by
value), so register counts match what MLX's NVRTC build gives within a few.
Used to iterate on ``sdpa_decode`` without spending device time:

    python3 benchmarks/lab/ptxas_report.py --bits 4 --pf 0 [--sass]
"""

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from mlx_kvq import kernels  # noqa: E402

CTYPES = {"float16": "__half", "float32": "float", "bfloat16": "__nv_bfloat16", "uint32": "uint32_t",
          "bool": "bool", "uint8": "uint8_t"}


def wrap(name, template, input_types, output_types, body=None):
    body_file, inputs, outputs, _ = kernels.KERNELS[name]
    d = kernels.source_dir()
    body = body or d / body_file
    tparams = ", ".join(("typename " if isinstance(v, str) else "int ") + k for k, v in template)
    targs = ", ".join(CTYPES[v] if isinstance(v, str) else str(int(v)) for k, v in template)
    params = []
    for n, t in zip(inputs, input_types):
        params += [f"const {t}* __restrict__ {n}", f"const __grid_constant__ Shape {n}_shape",
                   f"const __grid_constant__ Strides {n}_strides"]
    params += [f"{t}* __restrict__ {n}" for n, t in zip(outputs, output_types)]
    return f"""#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda/std/limits>
#include <cstdint>
// nvcc (unlike NVRTC with -default-device) needs __device__ spelled without the
// word `device`, which the prelude defines away
#undef __device__
#define __device__ __attribute__((__device__))
struct Shape {{ int32_t v[8]; __device__ int32_t operator[](int i) const {{ return v[i]; }} }};
struct Strides {{ int64_t v[8]; __device__ int64_t operator[](int i) const {{ return v[i]; }} }};
{kernels.source.DEFINES.get(name, "")}#include "{d / 'prelude_cuda.h'}"
#include "{d / 'kvq_common.h'}"
template <{tparams}>
__global__ void kernel({", ".join(params)}) {{
#include "{body}"
}}
template __global__ void kernel<{targs}>({", ".join(p.rsplit(" ", 1)[0] for p in params)});
"""


def hot_loop(sass, marker="HMMA"):
    """Instruction mix of the loop (backward branch) with the most ``marker`` instructions
    (the longest of those, on a tie)."""
    ins = []
    for ln in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?\s*([^;]*)", ln)
        if m:
            ins.append((int(m.group(1), 16), m.group(3), m.group(5)))
    best = None
    for addr, op, args in ins:
        t = re.match(r"(0x[0-9a-f]+)", args.strip())
        if op == "BRA" and t and int(t.group(1), 16) < addr:
            lo = int(t.group(1), 16)
            body = [o for a, o, _ in ins if lo <= a <= addr]
            rank = (body.count(marker), len(body))
            if marker in body and (best is None or rank > (best.count(marker), len(best))):
                best = body
    return collections.Counter(best) if best else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="sdpa_decode_fused")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--gs", type=int, default=64)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--pf", type=int, default=0)
    ap.add_argument("--nsg", type=int, default=4)
    ap.add_argument("--rotq", type=int, default=0)
    ap.add_argument("--rt", type=int, default=4, help="sdpa_decode_simd*: rows per tile")
    ap.add_argument("--dpl", type=int, default=16, help="sdpa_decode_simd*: dims per lane")
    ap.add_argument("--ku", type=int, default=2, help="sdpa_decode_simd*: keys per slot and step")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"],
                    help="queries, scales, sinks/window and output (bfloat16: sdpa_decode's WIDE blocks)")
    ap.add_argument("--sass", action="store_true", help="print the SASS instruction mix (and keep the .sass file)")
    ap.add_argument("--packed-only", action="store_true",
                    help="sdpa_decode without its dense (sinks/window) warp: the block loop's mix is the packed path's")
    a = ap.parse_args()
    dt, ct = a.dtype, CTYPES[a.dtype]
    template = [("T", dt), ("S", dt), ("DT", dt), ("MT", "bool"), ("D", a.D),
                ("KB", a.bits), ("VB", a.bits), ("GS", a.gs), ("MASK", 0), ("CAUSAL", 1), ("NSG", a.nsg),
                ("PF", a.pf), ("ROTQ", a.rotq), ("WIDE", int(dt != "float16"))]
    if a.name.startswith("sdpa_decode_simd"):
        template = template[:-3] + [("ROTQ", a.rotq), ("RT", a.rt), ("DPL", a.dpl), ("KU", a.ku), ("PF", a.pf)]
    ins = [ct, "uint32_t", ct, ct, "uint32_t", ct, ct, ct, ct, ct, ct, "bool", "uint8_t", "float", "float"]
    outs = ["float", "float"]
    if a.name.endswith("_fused"):
        template += [("OT", dt), ("ROTO", 0)]
        ins += ["uint32_t"]
        outs += [ct, "float"]
    tmp = Path(tempfile.mkdtemp())
    body = None
    if a.packed_only:
        body = tmp / "body.metal"
        text = (kernels.source_dir() / kernels.KERNELS[a.name][0]).read_text()
        body.write_text(text.replace("const bool dense = (w == P);", "const bool dense = false;"))
    (tmp / "k.cu").write_text(wrap(a.name, template, ins, outs, body))
    r = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-O3", "-std=c++17", "-Xptxas", "-v", "-o",
                        str(tmp / "k.cubin"), str(tmp / "k.cu")], capture_output=True, text=True)
    info = [ln for ln in r.stderr.splitlines() if "registers" in ln or "spill" in ln or "error" in ln]
    print("\n".join(info) if info else r.stderr[-3000:])
    if r.returncode != 0 or not a.sass:
        return r.returncode
    sass = subprocess.run(["cuobjdump", "-sass", str(tmp / "k.cubin")], capture_output=True, text=True).stdout
    (tmp / "k.sass").write_text(sass)
    ops = collections.Counter()
    for ln in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?", ln)
        if m:
            ops[m.group(1)] += 1
    total = sum(ops.values())
    print(f"SASS: {total} instructions ({tmp / 'k.sass'})")
    print("  ".join(f"{k} {v}" for k, v in ops.most_common(30)))
    marker = "FFMA" if a.name.startswith("sdpa_decode_simd") else "HMMA"
    loop = hot_loop(sass, marker)
    if loop:
        print(f"hot loop (the longest backward branch holding {marker}): {sum(loop.values())} instructions")
        print("  ".join(f"{k} {v}" for k, v in loop.most_common(30)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
