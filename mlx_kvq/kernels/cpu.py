"""The CPU body of the prefill attention: ``cpu_attention.cpp``, built at first use.

MLX runs custom kernels only on GPUs, and on the CPU its element-wise ops take one core
each and pass over memory once per op: a 2048-token prompt's attention through MLX ops
(``attention.reference``, its tiles over the CPU's streams) took 4.0-4.1 s of a 7.0-7.2 s
prefill of SmolLM2-135M on a 2-core Intel Xeon (``python3
benchmarks/lab/cpu_prefill_attention.py --step 2048``). This body computes a chunk's
``(out, lse)`` over float32 keys and values in one pass: scores, online softmax and
weighted values per block of keys, on every core (``python3 benchmarks/lab/cpu_attention.py``).

It is compiled with the system's C++ compiler (``$CXX``, else ``g++``; ``-O3
-march=native``) into ``$MLX_KVQ_HOME/cpu`` (``home.cache_dir``), one library per
source, compiler and CPU, and loaded with ``ctypes``. Linux only. Where it cannot be built
(no compiler) the attention stays on MLX ops, with one warning; ``MLX_KVQ_REFERENCE=1``
keeps it off as it keeps the GPU kernels off.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..home import cache_dir

SOURCE = Path(__file__).with_name("cpu_attention.cpp")
FLAGS = ("-O3", "-march=native", "-pthread", "-shared", "-fPIC", "-std=c++17")
_P = ctypes.c_void_p
_ARGTYPES = [_P] * 8 + [ctypes.c_int] * 7 + [ctypes.c_float, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                             ctypes.c_int]


def _cpu_signature():
    """What the library's machine code depends on besides its source: the CPU's flags."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine()


def _build(compiler):
    """The library's path, compiled if it is not there yet (atomically: processes may race)."""
    src = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(b"\0".join(x.encode() if isinstance(x, str) else x for x in
                                    (src, version, _cpu_signature(), *FLAGS))).hexdigest()[:16]
    out = cache_dir() / "cpu" / f"attention-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        part = Path(tmp) / out.name
        proc = subprocess.run([compiler, *FLAGS, "-o", str(part), str(SOURCE)], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{compiler} failed:\n{proc.stderr.strip()[-2000:]}")
        os.replace(part, out)
    return out


@lru_cache(maxsize=None)
def library():
    """The loaded library, or None (not Linux, ``MLX_KVQ_REFERENCE=1``, or it could not be built:
    warned once)."""
    if sys.platform != "linux" or os.environ.get("MLX_KVQ_REFERENCE", "0") not in ("", "0"):
        return None
    compiler = shutil.which(os.environ.get("CXX") or "g++")
    try:
        if compiler is None:
            raise RuntimeError("no C++ compiler found ($CXX, or g++ on the PATH)")
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError) as e:
        warnings.warn(f"mlx-kvq's CPU attention could not be built; the CPU attention runs on MLX ops "
                      f"(slower). {e}", RuntimeWarning, stacklevel=2)
        return None
    lib.kvq_cpu_attention.argtypes = _ARGTYPES
    lib.kvq_cpu_attention.restype = ctypes.c_int
    return lib


def _pointer(a):
    """``a``'s memory as numpy (no copy), its address and strides in elements."""
    m = np.asarray(memoryview(a))
    return m, m.ctypes.data, np.array([s // m.itemsize for s in m.strides], dtype=np.int64)


def applies(mask=None, k_pos=None):
    """Whether this body computes a partial attention now: on the CPU (the default device),
    built, with no array mask and keys in order (``blocked_attention``'s ``mask`` and
    ``k_pos`` are None)."""
    return mask is None and k_pos is None and mx.default_device() == mx.cpu and library() is not None


def attention(q, k, v, *, scale, q_start, k_start, causal, threads):
    """``(out, lse)`` of queries (B, Hq, L, D) over float32 keys (B, Hkv, n, D) and values
    (B, Hkv, n, Dv), as ``attention.reference.blocked_attention`` returns them (float32,
    rows with no visible key: zeros and -inf); query ``i`` sits at ``q_start + i``, key ``j``
    at ``k_start + j``. The inputs are evaluated here. None inside ``mx.compile`` or a
    transform, where nothing can be evaluated."""
    q, k, v = (x.astype(mx.float32) for x in (q, k, v))
    try:
        mx.eval(q, k, v)
    except ValueError:
        return None
    B, Hq, L, D = q.shape
    Hkv, n, Dv = k.shape[1], k.shape[2], v.shape[-1]
    out = np.empty((B, Hq, L, Dv), np.float32)
    lse = np.empty((B, Hq, L), np.float32)
    held = [_pointer(x) for x in (q, k, v)]  # the arrays stay alive through the call
    (_, qp, qs), (_, kp, ks), (_, vp, vs) = held
    library().kvq_cpu_attention(qp, qs.ctypes.data, kp, ks.ctypes.data, vp, vs.ctypes.data, out.ctypes.data,
                                lse.ctypes.data, B, Hq, Hkv, L, n, D, Dv, float(scale), int(bool(causal)),
                                int(q_start), int(k_start), int(threads))
    return mx.array(out), mx.array(lse)
