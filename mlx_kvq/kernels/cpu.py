"""The CPU body of the attention: ``cpu_attention.cpp``, built at first use.

MLX runs custom kernels only on GPUs, and on the CPU its element-wise ops take one core
each and pass over memory once per op: a 2048-token prompt's attention through MLX ops
(``attention.reference``, its tiles over the CPU's streams) took 4.0-4.1 s of a 7.0-7.2 s
prefill of SmolLM2-135M on a 2-core Intel Xeon (``python3
benchmarks/lab/cpu_prefill_attention.py --step 2048``). This body computes a prefill chunk's
``(out, lse)`` over a run of keys, or a decode step's output over all the view's runs in one
softmax, in one pass: scores, online softmax and weighted values per block of keys, the
packed run's codes read in place, on every core. On that Xeon a 2048-token first chunk's
layer takes 35 ms against 113 through MLX ops, a 16-row decode step's 4.7 against 7.8 ms
(``python3 benchmarks/lab/cpu_attention.py``, ``benchmarks/lab/results/cpu_attention.txt``).

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
_I64x4 = ctypes.c_int64 * 4
PACKED_BITS = (2, 4, 8)  # codes that do not cross a uint32 word
# each pointer field's strides field (the sinks, one logit a head, have none)
_STRIDES = dict(k="ks", v="vs", kw="ks", vw="vs", k_scales="kss", k_biases="kbs", v_scales="vss", v_biases="vbs",
                q="qs", mask="ms")


class _Run(ctypes.Structure):
    _fields_ = [(n, _P) for n in ("k", "v", "kw", "vw", "k_scales", "k_biases", "v_scales", "v_biases")] + \
               [(n, _I64x4) for n in ("ks", "vs", "kss", "kbs", "vss", "vbs")] + \
               [(n, ctypes.c_int64) for n in ("n", "k_start", "col")] + \
               [(n, ctypes.c_int32) for n in ("packed", "k_bits", "v_bits", "group")]


class _Args(ctypes.Structure):
    _fields_ = [("q", _P), ("qs", _I64x4), ("runs", ctypes.POINTER(_Run)), ("nruns", ctypes.c_int),
                ("mask", _P), ("ms", _I64x4), ("sinks", _P), ("out", _P), ("lse", _P)] + \
               [(n, ctypes.c_int) for n in ("B", "Hq", "Hkv", "L", "D", "Dv", "causal")] + \
               [("scale", ctypes.c_float), ("q_start", ctypes.c_int64)]


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
    """The loaded library, or None (not Linux, or it could not be built: warned once)."""
    if sys.platform != "linux":
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
    sizes = (ctypes.c_int * 2)()
    lib.kvq_cpu_sizes(sizes)
    if tuple(sizes) != (ctypes.sizeof(_Run), ctypes.sizeof(_Args)):
        raise RuntimeError(f"cpu_attention.cpp's structures ({tuple(sizes)} bytes) do not match cpu.py's")
    lib.kvq_cpu_attention.argtypes = [ctypes.POINTER(_Args), ctypes.c_int]
    lib.kvq_cpu_attention.restype = ctypes.c_int
    return lib


def applies(mask=None, k_pos=None):
    """Whether this body computes now: on the CPU (the default device), not
    ``MLX_KVQ_REFERENCE=1``, built, with no array mask and keys in order for a prefill chunk's
    partial attention (``blocked_attention``'s ``mask`` and ``k_pos`` are None)."""
    return (mask is None and k_pos is None and mx.default_device() == mx.cpu
            and os.environ.get("MLX_KVQ_REFERENCE", "0") in ("", "0") and library() is not None)


def packed_applies(fmt, k_words, v_words):
    """Whether the body reads this packed run (``fmt``: its ``KVFormat``): affine codes of
    ``PACKED_BITS`` in groups that divide the head dims."""
    dims = (k_words.shape[-1] * 32 // fmt.k_bits, v_words.shape[-1] * 32 // fmt.v_bits)
    return (fmt.mode == "affine" and fmt.k_bits in PACKED_BITS and fmt.v_bits in PACKED_BITS
            and all(d % fmt.group_size == 0 for d in dims))


def dense(k, v, k_start, col=0):
    """A run of float32 keys and values (B, Hkv, n, D): key ``j`` at position ``k_start + j``
    and column ``col + j`` of the mask."""
    return ("dense", k, v, k_start, col)


def packed(k, v, n, fmt, k_start, col=0):
    """The first ``n`` tokens of a packed run: ``k`` and ``v`` its ``(words, scales, biases)``."""
    return ("packed", k, v, n, fmt, k_start, col)


def attention(q, runs, *, scale, q_start, causal, threads, mask=None, sinks=None):
    """``(out, lse)`` of queries (B, Hq, L, D) over ``runs`` (:func:`dense`, :func:`packed`),
    float32, as ``attention.reference.blocked_attention`` returns them (rows with no visible
    key: zeros and -inf); query ``i`` sits at ``q_start + i``. ``mask``: an additive or bool
    array broadcastable to (B, Hq, L, columns), or None; ``sinks``: per-head logits (Hq,) in
    every denominator, or None. The inputs are evaluated here. None inside ``mx.compile``
    or a transform, where nothing can be evaluated."""
    f32 = lambda x: x.astype(mx.float32)
    cruns = (_Run * len(runs))()
    fields = []  # (structure, its pointer field, the array), pointers set once evaluated
    for c, run in zip(cruns, runs):
        if run[0] == "dense":
            _, k, v, k_start, col = run
            c.n = k.shape[2]
            fields += [(c, "k", f32(k)), (c, "v", f32(v))]
            Hkv, Dv = k.shape[1], v.shape[-1]
        else:
            _, (kw, ks, kb), (vw, vs, vb), n, fmt, k_start, col = run
            c.n, c.packed, c.k_bits, c.v_bits, c.group = n, 1, fmt.k_bits, fmt.v_bits, fmt.group_size
            fields += [(c, "kw", kw), (c, "k_scales", f32(ks)), (c, "k_biases", f32(kb)),
                       (c, "vw", vw), (c, "v_scales", f32(vs)), (c, "v_biases", f32(vb))]
            Hkv, Dv = kw.shape[1], vw.shape[-1] * 32 // fmt.v_bits
        c.k_start, c.col = k_start, col
    B, Hq, L, D = q.shape
    a = _Args(runs=cruns, nruns=len(runs), B=B, Hq=Hq, Hkv=Hkv, L=L, D=D, Dv=Dv, causal=int(bool(causal)),
              scale=float(scale), q_start=int(q_start))
    fields.append((a, "q", f32(q)))
    if mask is not None:
        mask = mx.where(mask, 0.0, -mx.inf) if mask.dtype == mx.bool_ else f32(mask)
        fields.append((a, "mask", mask.reshape((1,) * (4 - mask.ndim) + mask.shape)))
    if sinks is not None:
        fields.append((a, "sinks", f32(sinks)))
    try:
        mx.eval([x for _, _, x in fields])
    except ValueError:
        return None
    held = []  # the arrays' numpy views stay alive through the call
    for struct, name, x in fields:
        m = np.asarray(memoryview(x))
        held.append(m)
        setattr(struct, name, m.ctypes.data)
        if name in _STRIDES:  # in elements; 0 along a mask's axes of size 1 (broadcast)
            setattr(struct, _STRIDES[name], _I64x4(*(0 if name == "mask" and d == 1 else s // m.itemsize
                                                    for d, s in zip(m.shape, m.strides))))
    out = np.empty((B, Hq, L, Dv), np.float32)
    lse = np.empty((B, Hq, L), np.float32)
    a.out, a.lse = out.ctypes.data, lse.ctypes.data
    library().kvq_cpu_attention(ctypes.byref(a), int(threads))
    return mx.array(out), mx.array(lse)
