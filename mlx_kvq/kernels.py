"""Fused dequantize-attention and quantize-append kernels for the packed KV cache.

One kernel body per algorithm lives in ``metal/*.metal`` (Metal dialect).  It
runs on Apple GPUs through ``mx.fast.metal_kernel`` (``metal/prelude_metal.h``),
on NVIDIA GPUs through ``mx.fast.cuda_kernel`` (``metal/prelude_cuda.h`` maps
the Metal constructs onto CUDA) and, in CI, on the CPU under the C++ emulation
of Metal's execution model in ``tests/emulator``.  The launch logic below is
shared by all three: it is written against a *launcher*, a callable with the
``mx.fast.metal_kernel(...)(...)`` call signature.

Public API (called by the attention dispatch):

* :func:`enabled` -- kernels usable on this backend.
* :func:`supports` -- shapes/formats the kernels handle.
* :func:`packed_attention` -- (out, lse) over a packed K/V segment.
* :func:`quantize_append` -- pack new tokens into the preallocated buffers.
"""

import hashlib
import math
import os
import re
from functools import lru_cache
from pathlib import Path

import mlx.core as mx

from .rotation import signs as rotation_signs

HEAD_DIMS = (64, 80, 96, 128, 256)
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
_MODE_ID = {"affine": 0, "mxfp4": 1, "nvfp4": 2, "mxfp8": 3}
_FP_FORMAT = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}
_FLOATS = (mx.float16, mx.bfloat16, mx.float32)
DECODE_MAX_L = 8
DEFAULT_VU = 0  # value-loop unroll (0 = full), see metal/sdpa_packed.metal
DEFAULT_VPF = True  # value prefetch at the top of each key block (2/4/8-bit values)


def _vpf_ok(v_bits, D):
    return v_bits in (2, 4, 8) and D // 8 <= 32

# kernel name -> (body file, input names, output names, ensure_row_contiguous)
# sdpa_packed reads its inputs through their strides (so cache slices and
# transposed queries are not copied) and gets its per-call integers from the
# shape of a broadcast "carrier" view, which must not be made contiguous.
_DECODE_INPUTS = ["q", "kw", "ks", "kb", "vw", "vs", "vb", "sk", "sv", "wk", "wv", "mask", "carrier", "fparams",
                  "signs"]
KERNELS = {
    "sdpa_packed": (
        "sdpa_packed.metal",
        ["q", "kw", "ks", "kb", "vw", "vs", "vb", "mask", "carrier", "fparams"],
        ["out", "lse"],
        False,
    ),
    "sdpa_decode": ("sdpa_decode.metal", _DECODE_INPUTS, ["out", "lse"], False),
    # the same body with the merge in the launch (DEFINES): + tile counters; + final out, lse
    "sdpa_decode_fused": ("sdpa_decode.metal", _DECODE_INPUTS + ["counter"], ["out", "lse", "fout", "flse"], False),
    "sdpa_merge": ("sdpa_merge.metal", ["o_part", "lse_part", "signs", "fparams"], ["out", "lse"], True),
    "quantize_append": ("quantize_append.metal", ["x"], ["w", "scales", "biases"], True),
    "window_append": (
        "window_append.metal",
        ["wk", "wv", "k", "v", "signs", "fparams", "carrier"],
        ["ok", "ov"],
        False,
    ),
}


# --------------------------------------------------------------------------- sources
def source_dir():
    """Directory holding the kernel sources: ``mlx_kvq/metal`` in an installed
    copy, ``<repo>/metal`` in a source checkout."""
    here = Path(__file__).resolve().parent
    for d in (here / "metal", here.parent / "metal"):
        if (d / "kvq_common.h").is_file():
            return d
    raise FileNotFoundError(
        f"mlx-kvq kernel sources not found next to {here} (looked for metal/kvq_common.h)"
    )


_TEXT = {}


def read_source(fname):
    if fname not in _TEXT:
        _TEXT[fname] = (source_dir() / fname).read_text()
    return _TEXT[fname]


def compact(text):
    """Kernel text without comments, indentation and blank lines: MLX copies a
    custom kernel's whole source on every call, which costs host time per step."""
    out = []
    for line in text.splitlines():
        i = line.find("//")
        if i >= 0 and '"' not in line[:i]:
            line = line[:i]
        line = line.strip()
        if line:
            out.append(line)
    return "\n".join(out) + "\n"


# kernels built from another's body with a preprocessor switch
DEFINES = {"sdpa_decode_fused": "#define KVQ_FUSED_MERGE 1\n"}


def kernel_source(name):
    """(common header text, body text, input names, output names) of a kernel."""
    fname, inputs, outputs, _ = KERNELS[name]
    return DEFINES.get(name, "") + read_source("kvq_common.h"), read_source(fname), list(inputs), list(outputs)


# --------------------------------------------------------------------------- backends
@lru_cache(maxsize=None)
def _backend():
    try:
        if mx.metal.is_available():
            return "metal"
    except Exception:
        pass
    try:
        if mx.cuda.is_available():
            return "cuda"
    except Exception:
        pass
    return None


def enabled():
    """True on the Metal or CUDA backend unless ``MLX_KVQ_REFERENCE=1``."""
    if os.environ.get("MLX_KVQ_REFERENCE", "0") not in ("", "0"):
        return False
    return _backend() is not None


class MLXLauncher:
    """Runs kernel bodies through mx.fast.metal_kernel / mx.fast.cuda_kernel.
    Kernel objects are built once per (backend, name) and cached; MLX caches
    the compiled pipeline per template instantiation."""

    def __init__(self, backend):
        self.backend = backend
        self._kernels = {}
        # decode merges its split partials in the same launch (sdpa_decode_fused): CUDA
        # only, it needs memory ordering across threadgroups (kvq_device_fence)
        self.fused_merge = backend == "cuda" and FUSED_MERGE

    def _kernel(self, name):
        k = self._kernels.get(name)
        if k is None:
            common, body, inputs, outputs = kernel_source(name)
            make, prelude = {
                "metal": (mx.fast.metal_kernel, "prelude_metal.h"),
                "cuda": (mx.fast.cuda_kernel, "prelude_cuda.h"),
            }[self.backend]
            header, source, kname = compact(read_source(prelude) + "\n" + common), compact(body), "kvq_" + name
            if self.backend == "cuda" and CUDA_INCLUDE:
                header, source, kname = _cuda_includes(name, prelude, body) or (header, source, kname)
            k = make(
                name=kname,
                input_names=inputs,
                output_names=outputs,
                source=source,
                header=header,
                ensure_row_contiguous=KERNELS[name][3],
            )
            self._kernels[name] = k
        return k

    def __call__(self, name, inputs, template, grid, threadgroup, output_shapes, output_dtypes):
        return self._kernel(name)(
            inputs=inputs,
            template=template,
            grid=grid,
            threadgroup=threadgroup,
            output_shapes=output_shapes,
            output_dtypes=output_dtypes,
        )


# On CUDA by default (MLX_KVQ_FUSED_MERGE=0: decode + sdpa_merge, two launches). Each
# launch counts on fresh zeros: a counter kept across launches raced (NOTES_kernels.md).
FUSED_MERGE = os.environ.get("MLX_KVQ_FUSED_MERGE", "1") not in ("", "0")
# MLX copies a custom kernel's whole source text on every call (host time per decode
# step): on CUDA the launcher hands NVRTC #include lines of the source files instead.
CUDA_INCLUDE = os.environ.get("MLX_KVQ_CUDA_INCLUDE", "1") not in ("", "0")


def _cuda_includes(name, prelude, body):
    """(header, source, kernel name) that #include the files by absolute path, or None
    where a path cannot be written in an #include line.  MLX passes ``x_shape`` /
    ``x_strides`` only for names it finds in the source text: the first line lists
    those the body uses.  The name carries a digest of the files (compile caches)."""
    d = source_dir()
    files = [d / prelude, d / "kvq_common.h", d / KERNELS[name][0]]
    if any('"' in str(f) or "\\" in str(f) or not str(f).isascii() for f in files):
        return None
    used = sorted(set(re.findall(r"\b\w+_(?:shape|strides|ndim)\b", body)))
    digest = hashlib.sha1("".join(read_source(f.name) for f in files).encode()).hexdigest()[:12]
    header = DEFINES.get(name, "") + "".join(f'#include "{f}"\n' for f in files[:2])
    return header, f"// {' '.join(used)}\n#include \"{files[2]}\"\n", f"kvq_{name}_{digest}"


_LAUNCHERS = {}


def _launcher():
    be = _backend()
    if be is None:
        raise RuntimeError("mlx-kvq kernels need the Metal or CUDA backend")
    if be not in _LAUNCHERS:
        _LAUNCHERS[be] = MLXLauncher(be)
    return _LAUNCHERS[be]


_CORES = []


def _num_cores():
    """Rough count of GPU compute units, to size the split-K grid (queried
    once: device_info is slow on CUDA)."""
    if _CORES:
        return _CORES[0]
    v = os.environ.get("MLX_KVQ_NUM_CU")
    n = None
    if v:
        n = int(v)
    else:
        try:
            info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
            for key in ("num_sms", "multi_processor_count", "gpu_core_count", "num_cores"):
                if key in info:
                    n = int(info[key])
                    break
        except Exception:
            pass
    if n is None:
        n = 132 if _backend() == "cuda" else 32
    _CORES.append(n)
    return n


# --------------------------------------------------------------------------- checks
def _fmt_ok(bits, group_size, mode, D):
    if mode == "affine":
        return bits in AFFINE_BITS and group_size in (32, 64, 128) and D % group_size == 0
    if mode in _FP_FORMAT:
        return (bits, group_size) == _FP_FORMAT[mode] and D % group_size == 0
    return False


def _packed_ok(p, B, Hkv, D, bits, group_size, mode):
    nexp = 3 if mode == "affine" else 2
    if not isinstance(p, (tuple, list)) or len(p) != nexp:
        return False
    w, s = p[0], p[1]
    if w.ndim != 4 or w.dtype != mx.uint32 or tuple(w.shape[:2]) != (B, Hkv):
        return False
    C = w.shape[2]
    if w.shape[3] * 32 != D * bits:
        return False
    if tuple(s.shape) != (B, Hkv, C, D // group_size):
        return False
    if mode == "affine":
        if s.dtype not in _FLOATS or p[2].dtype != s.dtype or tuple(p[2].shape) != tuple(s.shape):
            return False
    elif s.dtype != mx.uint8:
        return False
    return True


def _mask_ok(mask, B, Hq, L, n):
    if mask is None:
        return True
    if not isinstance(mask, mx.array):
        return False  # e.g. the string "causal": pass causal=True instead
    if mask.dtype not in (mx.bool_,) + _FLOATS or mask.ndim > 4:
        return False
    shape = (1,) * (4 - mask.ndim) + tuple(mask.shape)
    return all(s in (1, t) for s, t in zip(shape, (B, Hq, L, n)))


def _pair_ok(q, k_packed, v_packed, k_bits, v_bits, group_size, mode):
    """Packed K and V of the right shapes for ``q`` (B, Hq, L, D): GQA heads, words,
    scales of one dtype, and a grid within the CUDA y/z limits (tiles of 8 rows)."""
    B, Hq, L, D = q.shape
    Hkv = k_packed[0].shape[1]
    if Hkv < 1 or Hq % Hkv:
        return False
    if not (_packed_ok(k_packed, B, Hkv, D, k_bits, group_size, mode)
            and _packed_ok(v_packed, B, Hkv, D, v_bits, group_size, mode)):
        return False
    if k_packed[1].dtype != v_packed[1].dtype:
        return False
    return Hkv * -(-(Hq // Hkv) * L // 8) <= 65535 and B <= 65535


def supports(q, k_packed, v_packed, k_bits, v_bits, group_size, mode, mask):
    """Whether :func:`packed_attention` handles these shapes and formats.
    Does not look at the backend (see :func:`enabled`)."""
    try:
        if not isinstance(q, mx.array) or q.ndim != 4 or q.dtype not in _FLOATS:
            return False
        B, Hq, L, D = q.shape
        if D not in HEAD_DIMS or L < 1:
            return False
        if mode not in _MODE_ID:
            return False
        if not (_fmt_ok(k_bits, group_size, mode, D) and _fmt_ok(v_bits, group_size, mode, D)):
            return False
        if not _pair_ok(q, k_packed, v_packed, k_bits, v_bits, group_size, mode):
            return False
        if k_packed[0].shape[2] != v_packed[0].shape[2]:
            return False
        C = k_packed[0].shape[2]
        if mask is not None and not _mask_ok(mask, B, Hq, L, mask.shape[-1] if mask.ndim else 1):
            return False
        if mask is not None and mask.ndim and mask.shape[-1] not in (1,) and mask.shape[-1] > C:
            return False
        return True
    except Exception:
        return False


# --------------------------------------------------------------------------- attention
def _pow2ceil(x):
    return 1 << max(0, (x - 1).bit_length())


def _plan(B, Hkv, rep, L, D, n, nsg=None, nsplit=None, prefill=None):
    """Launch geometry: (prefill, RT, NSG, QR, tiles, nsplit, kps)."""
    R = rep * L
    if prefill is None:
        prefill = L > DECODE_MAX_L
    if prefill:
        RT = 8
        # threadgroup memory ~ QR*D*4 bytes: keep it <= 16 KiB
        NSG = nsg or max(1, min(4, 4096 // (RT * D)))
        QR = NSG * RT
    else:
        RT = min(8, _pow2ceil(R))
        NSG = nsg or 4
        QR = RT
    tiles = -(-R // QR)
    if nsplit is None:
        base = B * Hkv * tiles
        target = 2 * _num_cores()
        nsplit = 1
        if not prefill and base < target:
            nsplit = min(-(-target // base), max(1, n // (2 * NSG * 32)))
    nsplit = max(1, min(nsplit, max(1, n)))
    kps = -(-n // nsplit)
    kps = -(-kps // 32) * 32
    nsplit = max(1, -(-n // kps))
    kps = ((n + nsplit - 1) // nsplit + 31) // 32 * 32  # what the kernel recomputes
    return prefill, RT, NSG, QR, tiles, nsplit, kps


_CONST = {}


def _const(key, make):
    """Small constant arrays (dummy inputs, scale) made once, not per call."""
    v = _CONST.get(key)
    if v is None:
        v = _CONST[key] = make()
        mx.eval(v)
    return v


def _mask_arg(mask):
    """(4-D array, kind) for the kernel: kind 0 none, 1 bool keep-mask, 2 additive."""
    if mask is None:
        return _const("f32", lambda: mx.zeros((1, 1, 1, 1), dtype=mx.float32)), 0
    m = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape)) if mask.ndim < 4 else mask
    return m, (1 if m.dtype == mx.bool_ else 2)


def _carrier(n, delta):
    """A broadcast view (no buffer) whose shape carries n and q_start - k_start."""
    if not (0 <= n < 2**30 and -(2**31) <= delta < 2**31):
        raise ValueError("n or q_start - k_start out of range")
    d = delta + 2**31
    z = _const("u8x4", lambda: mx.zeros((1, 1, 1, 1), dtype=mx.uint8))
    return mx.broadcast_to(z, (n // 32768 + 1, n % 32768 + 1, d // 65536 + 1, d % 65536 + 1))


def attention_launch(
    launch, q, k_packed, v_packed, n, *, k_bits, v_bits, group_size, mode, scale,
    q_start, k_start, causal, mask=None, nsg=None, nsplit=None, prefill=None, vu=None,
    vpf=None,
):
    """The whole kernel sequence of :func:`packed_attention` on ``launch``.
    ``nsg``, ``nsplit``, ``prefill``, ``vu`` override the launch plan (tests,
    tuning)."""
    B, Hq, L, D = q.shape
    Hkv = k_packed[0].shape[1]
    C = k_packed[0].shape[2]
    rep = Hq // Hkv
    n = int(n)
    if n <= 0:
        return (
            mx.zeros((B, Hq, L, D), dtype=mx.float32),
            mx.full((B, Hq, L), -math.inf, dtype=mx.float32),
        )
    if n > C:
        raise ValueError(f"n={n} exceeds the cache capacity {C}")
    prefill, RT, NSG, _, tiles, nsplit, _ = _plan(B, Hkv, rep, L, D, n, nsg, nsplit, prefill)
    marr, mkind = _mask_arg(mask)
    mode_id = _MODE_ID[mode]
    if mode == "affine":
        kw, ks, kb = k_packed
        vw, vs, vb = v_packed
    else:
        kw, ks = k_packed
        vw, vs = v_packed
        kb = vb = _const("u8", lambda: mx.zeros((1, 1, 1, 1), dtype=mx.uint8))
    KW = D * k_bits // 32
    kvw = 4 if KW % 4 == 0 else 1
    carrier = _carrier(n, int(q_start) - int(k_start))
    fparams = _const(("scale", float(scale)), lambda: param_array([scale]))
    template = [
        ("T", q.dtype),
        ("S", ks.dtype),
        ("MT", marr.dtype),
        ("D", D),
        ("KB", k_bits),
        ("VB", v_bits),
        ("GS", group_size),
        ("MODE", mode_id),
        ("RT", RT),
        ("NSG", NSG),
        ("PREFILL", bool(prefill)),
        ("MASK", mkind),
        ("CAUSAL", bool(causal)),
        ("KVW", kvw),
        ("VU", DEFAULT_VU if vu is None else vu),
        ("VPF", bool(_vpf_ok(v_bits, D) and (DEFAULT_VPF if vpf is None else vpf))),
    ]
    rows = B * Hq * L
    out, lse = launch(
        "sdpa_packed",
        [q, kw, ks, kb, vw, vs, vb, marr, carrier, fparams],
        template,
        (nsplit * NSG * 32, Hkv * tiles, B),
        (NSG * 32, 1, 1),
        [(nsplit, rows, D), (nsplit, rows)],
        [mx.float32, mx.float32],
    )
    if nsplit > 1:
        return merge_launch(launch, out, lse, (B, Hq, L, D))
    return out.reshape(B, Hq, L, D), lse.reshape(B, Hq, L)


def merge_launch(launch, out, lse, shape, rotate_out=False, out_dtype=mx.float32):
    """sdpa_merge of split partials ``out`` (nsplit, rows, D) / ``lse`` (nsplit, rows) into
    ``(out, lse)`` of ``shape`` (B, Hq, L, D) / (B, Hq, L); ``rotate_out``: times the
    transposed rotation of the cache (D a power of two >= 32), written as ``out_dtype``."""
    inputs, args = _merge_args(out.shape[1], tuple(shape), rotate_out, out_dtype)
    return launch("sdpa_merge", [out, lse, *inputs], *args)


def _merge_args(rows, shape, rotate_out, out_dtype):
    """(extra inputs, (template, grid, threadgroup, output shapes, dtypes)) of sdpa_merge."""
    D = shape[-1]
    signs, fp = _rotation_args(D, rotate_out, 1.0)
    return [signs, fp], (
        [("D", D), ("OT", out_dtype), ("ROTO", bool(rotate_out))],
        (rows * 32, 1, 1), (32, 1, 1), [shape, shape[:-1]], [out_dtype, mx.float32],
    )


def _rotation_args(D, rotate, scale):
    """(signs, fparams) inputs: the rotation's signs (a dummy when not rotating) and
    ``[scale, 1 / sqrt(D)]``, the scale divided by sqrt(D) when rotating (the kernels'
    transform is unnormalized)."""
    if rotate:
        signs = _const(("signs", D), lambda: rotation_signs(D))
        scale = scale * D**-0.5
    else:
        signs = _const("signs0", lambda: mx.zeros((1,), dtype=mx.float32))
    return signs, _const(("scale", float(scale), D), lambda: param_array([scale, D**-0.5]))


# MLX's CUDA allocator serves arrays of 8 bytes or less from a small-block pool of managed
# memory whose pages the host touches, and a kernel's first read from such a page waited
# for it to migrate: ~10% of a 128k-key decode launch (benchmarks/NOTES_kernels.md,
# session 8). Small arrays the kernels read are padded to this many 4-byte words.
MIN_KERNEL_WORDS = 8


def param_array(values):
    """float32 launch parameters as an array of at least MIN_KERNEL_WORDS words."""
    values = [float(v) for v in values]
    return mx.array(values + [0.0] * max(0, MIN_KERNEL_WORDS - len(values)), dtype=mx.float32)


def rotates_in_kernel(D):
    """Whether the decode kernels can apply the cache's rotation themselves
    (a fast Walsh-Hadamard transform: D a power of two, at least 32)."""
    return D >= 32 and D & (D - 1) == 0


def packed_attention(
    q, k_packed, v_packed, n, *, k_bits, v_bits, group_size, mode, scale,
    q_start, k_start, causal, mask=None,
):
    """Attention of ``q`` over the first ``n`` tokens of a packed K/V segment.

    Returns ``(out, lse)``: ``out`` float32 (B, Hq, L, D), the softmax-weighted
    mean of the dequantized values over the visible keys of this segment, and
    ``lse`` float32 (B, Hq, L), the log-sum-exp of ``scale * q.k`` (+ additive
    mask) over those keys; a row with no visible key gets ``out = 0``,
    ``lse = -inf``.  Query i sits at ``q_start + i``, key j at ``k_start + j``;
    with ``causal`` key j is visible to query i iff ``k_start + j <= q_start + i``.
    ``mask``: bool (True = keep) or additive, broadcastable to (B, Hq, L, n).
    Pass the full preallocated buffers (B, Hkv, C, ...), not a slice.
    """
    return attention_launch(
        _launcher(), q, k_packed, v_packed, n, k_bits=k_bits, v_bits=v_bits,
        group_size=group_size, mode=mode, scale=scale, q_start=q_start,
        k_start=k_start, causal=causal, mask=mask,
    )


# --------------------------------------------------------------------------- decode (whole view)
DECODE_BITS = (2, 4, 8)
WARPS_PER_CORE = 8  # packed splits: about this many warps per GPU core in all (12: no faster)
# blocks of keys loaded ahead in registers (sdpa_decode PF): 1 from this many keys per
# split, else 0. PF=1 takes 168 registers (206 at 8 bits; PF=0 162); the grid has 8 warps
# per SM (WARPS_PER_CORE; 12, which 168 registers allow, was no faster, nor was PF=2);
# a model's layers run one launch at a time, and there, on the H100, PF=1 was 1.17x
# faster at 128k keys and PF=0 at 4k-16k.
DECODE_PF_MIN_KEYS = 192


_SUPPORTED = {}


def decode_supports(q, k_packed, v_packed, dense_dtype, k_bits, v_bits, group_size, mode, mask):
    """Whether :func:`decode_attention` (the tensor-core decode kernel over a whole
    cache view) handles these shapes and formats; others take :func:`packed_attention`.
    The answer is remembered per shapes and formats (it is asked every decode step)."""
    try:
        sig = lambda t: None if t is None else tuple((a.shape, a.dtype) for a in t)
        key = (q.shape, q.dtype, sig(k_packed), sig(v_packed), dense_dtype, k_bits, v_bits,
               group_size, mode, None if mask is None else (mask.shape, mask.dtype))
    except Exception:
        return False
    ok = _SUPPORTED.get(key)
    if ok is None:
        if len(_SUPPORTED) > 4096:  # packed capacities grow in steps: keep it bounded
            _SUPPORTED.clear()
        ok = _SUPPORTED[key] = _decode_supports(
            q, k_packed, v_packed, dense_dtype, k_bits, v_bits, group_size, mode, mask)
    return ok


def _decode_supports(q, k_packed, v_packed, dense_dtype, k_bits, v_bits, group_size, mode, mask):
    try:
        if not isinstance(q, mx.array) or q.ndim != 4 or q.dtype not in _FLOATS:
            return False
        B, Hq, L, D = q.shape
        if not (1 <= L <= DECODE_MAX_L) or mode != "affine":
            return False
        if k_bits not in DECODE_BITS or v_bits not in DECODE_BITS or group_size not in (32, 64, 128):
            return False
        if D % 16 or D % group_size or (D * k_bits) % 128 or (D * v_bits) % 256:
            return False
        if group_size % (D // 8) or ((D // 4) % group_size and group_size % (D // 4)):
            return False
        if dense_dtype is not None and dense_dtype not in _FLOATS:
            return False
        if k_packed is not None and not _pair_ok(q, k_packed, v_packed, k_bits, v_bits, group_size, mode):
            return False
        if mask is not None and not _mask_ok(mask, B, Hq, L, mask.shape[-1] if mask.ndim else 1):
            return False
        return True
    except Exception:
        return False


def _carrier7(n, delta, ns, nw, P):
    if not (0 <= n < 2**30 and -(2**31) <= delta < 2**31 and 0 <= ns < 2**30 and 0 <= nw < 2**30):
        raise ValueError("decode parameters out of range")
    d = delta + 2**31
    z = _const("u8x7", lambda: mx.zeros((1,) * 7, dtype=mx.uint8))
    return mx.broadcast_to(z, (n // 32768 + 1, n % 32768 + 1, d // 65536 + 1, d % 65536 + 1, ns + 1, nw + 1, P + 1))


def decode_plan(B, Hkv, tiles, n, nsplit=None):
    """Packed splits P (one warp each), and warps per threadgroup."""
    if n <= 0:
        return 0
    if nsplit is None:
        target = WARPS_PER_CORE * _num_cores()
        nsplit = -(-target // (B * Hkv * tiles))
        nsplit = min(nsplit, -(-n // 64))  # at least ~64 keys per warp
    return max(1, min(int(nsplit), -(-n // 16)))


def decode_launch(
    launch, q, k_packed, v_packed, n, sinks, window, *, k_bits, v_bits, group_size,
    scale, q_start, causal, mask=None, nsplit=None, nsg=4, merge=True, pf=None,
    rotate_q=False, rotate_out=False, out_dtype=mx.float32, nw=None,
):
    """The kernel sequence of :func:`decode_attention` on ``launch`` (``merge=False``:
    the per-threadgroup partials (out (T, rows, D), lse (T, rows)), for benchmarks).
    ``nw``: the window rows in use (default: all of ``window``'s)."""
    n = int(n) if k_packed is not None else 0
    ns = 0 if sinks is None else sinks[0].shape[2]
    if window is None:
        nw = 0
    elif nw is None:
        nw = window[0].shape[2]
    elif not 0 <= nw <= min(window[0].shape[2], window[1].shape[2]):
        raise ValueError(f"nw={nw} exceeds the window buffers {window[0].shape[2]}")
    # everything but the arrays and the per-step integers, worked out once per
    # shapes and options (a decode step asks again for every layer)
    key = (
        q.shape, q.dtype, None if k_packed is None else (k_packed[0].shape, k_packed[1].dtype, v_packed[0].shape),
        n, ns, None if sinks is None else sinks[0].dtype, None if window is None else (window[0].shape, window[0].dtype),
        nw > 0, None if mask is None else (mask.shape, mask.dtype), k_bits, v_bits, group_size, float(scale),
        bool(causal), nsplit, WARPS_PER_CORE, nsg, pf, bool(rotate_q), bool(rotate_out), out_dtype,
    )
    st = _DECODE_SETUPS.get(key)
    if st is None:
        if len(_DECODE_SETUPS) > 4096:
            _DECODE_SETUPS.clear()
        st = _DECODE_SETUPS[key] = _decode_setup(
            q, k_packed, v_packed, n, sinks, window, ns, nw, k_bits, v_bits, group_size, scale, causal, mask,
            nsplit, nsg, pf, rotate_q, rotate_out, out_dtype)
    if st.P is None:  # nothing to attend to
        B, Hq, L, D = q.shape
        return mx.zeros((B, Hq, L, D), dtype=out_dtype), mx.full((B, Hq, L), -math.inf, dtype=mx.float32)
    sk, sv = sinks if sinks is not None else st.empty
    wk, wv = window if window is not None else st.empty
    kp = k_packed if k_packed is not None else st.kp0
    vp = v_packed if v_packed is not None else st.vp0
    marr = st.marr if mask is None else _mask_arg(mask)[0]
    carrier = _carrier7(n, int(q_start) - ns, ns, nw, st.P)
    inputs = [q, *kp, *vp, sk, sv, wk, wv, marr, carrier, st.fparams, st.signs]
    if merge and st.merge is not None and getattr(launch, "fused_merge", False):
        # the tile counters: fresh zeros per launch (one op). A workspace kept across
        # launches raced: MLX's CUDA graphs run launches with no data dependency at once.
        ws = mx.zeros((st.counters,), dtype=mx.uint32)
        return tuple(launch("sdpa_decode_fused", inputs + [ws], *st.fused)[2:4])
    out, lse = launch("sdpa_decode", inputs, *st.decode)
    if not merge:
        return out, lse
    if st.merge is not None:
        return launch("sdpa_merge", [out, lse, *st.merge_inputs], *st.merge)
    B, Hq, L, D = q.shape
    return out.reshape(B, Hq, L, D), lse.reshape(B, Hq, L)


_DECODE_SETUPS = {}


class _DecodeSetup:
    """What :func:`decode_launch` needs besides the arrays and the per-step integers."""

    P = None


def _decode_setup(q, k_packed, v_packed, n, sinks, window, ns, nw, k_bits, v_bits, group_size, scale, causal,
                  mask, nsplit, nsg, pf, rotate_q, rotate_out, out_dtype):
    st = _DecodeSetup()
    B, Hq, L, D = q.shape
    dense = [x for x in (sinks, window) if x is not None]
    Hkv = (k_packed[0] if k_packed is not None else dense[0][0]).shape[1]
    rep = Hq // Hkv
    tiles = -(-(rep * L) // 8)
    if k_packed is not None and n > k_packed[0].shape[2]:
        raise ValueError(f"n={n} exceeds the cache capacity {k_packed[0].shape[2]}")
    if (rotate_q or rotate_out) and not rotates_in_kernel(D):
        raise ValueError(f"the decode kernels rotate only power-of-two head dims >= 32, not {D}")
    P = decode_plan(B, Hkv, tiles, n, nsplit)
    warps = P + (1 if ns + nw else 0)
    if warps == 0:
        return st
    st.P = P
    nsg = max(1, min(nsg, warps))
    parts = -(-warps // nsg)  # threadgroups along x, one partial each
    sdt = (k_packed[1] if k_packed is not None else dense[0][0]).dtype
    st.kp0 = _const(("kp0", B, Hkv, D, k_bits, sdt), lambda: (
        mx.zeros((B, Hkv, 1, D * k_bits // 32), mx.uint32), mx.zeros((B, Hkv, 1, D // group_size), sdt),
        mx.zeros((B, Hkv, 1, D // group_size), sdt)))
    st.vp0 = _const(("vp0", B, Hkv, D, v_bits, sdt), lambda: (
        mx.zeros((B, Hkv, 1, D * v_bits // 32), mx.uint32), mx.zeros((B, Hkv, 1, D // group_size), sdt),
        mx.zeros((B, Hkv, 1, D // group_size), sdt)))
    dt = dense[0][0].dtype if dense else q.dtype
    empty = _const(("dense0", D, dt), lambda: mx.zeros((1, 1, 1, D), dtype=dt))
    st.empty = (empty, empty)
    st.marr, mkind = _mask_arg(mask)
    st.signs, st.fparams = _rotation_args(D, rotate_q, float(scale))
    template = [
        ("T", q.dtype), ("S", sdt), ("DT", dt), ("MT", st.marr.dtype), ("D", D),
        ("KB", k_bits), ("VB", v_bits), ("GS", group_size), ("MASK", mkind), ("CAUSAL", bool(causal)),
        ("NSG", nsg), ("PF", int((P > 0 and -(-n // P) >= DECODE_PF_MIN_KEYS) if pf is None else pf)),
        ("ROTQ", bool(rotate_q)),
    ]
    rows = B * Hq * L
    st.decode = (
        template, (parts * nsg * 32, Hkv * tiles, B), (nsg * 32, 1, 1),
        [(parts, rows, D), (parts, rows)], [mx.float32, mx.float32],
    )
    st.merge = None
    if parts > 1 or rotate_out or out_dtype != mx.float32:
        st.merge_inputs, st.merge = _merge_args(rows, (B, Hq, L, D), rotate_out, out_dtype)
        # the same with the merge in the launch: + OT, ROTO; + final out, lse, tile counters
        t, grid, tg, shapes, dtypes = st.decode
        st.fused = (
            t + [("OT", out_dtype), ("ROTO", bool(rotate_out))], grid, tg,
            shapes + [(B, Hq, L, D), (B, Hq, L)], dtypes + [out_dtype, mx.float32],
        )
        st.counters = max(B * Hkv * tiles, MIN_KERNEL_WORDS)  # one per row tile, padded
    return st


def decode_attention(q, k_packed, v_packed, n, sinks, window, **kw):
    """Attention of ``q`` (L <= 8) over a whole cache view in one kernel launch
    (plus the split merge): the packed run ``k_packed``/``v_packed`` (first ``n``
    tokens, or None), and the unquantized ``sinks`` and ``window`` (``(keys,
    values)`` (B, Hkv, *, D) or None).  Positions: sinks from 0, the packed run
    right after them, the window after the packed run.  ``mask`` (bool or
    additive) is indexed by absolute key position.  Returns ``(out, lse)`` as
    :func:`packed_attention`.  Scores and values go through fp16 (tensor cores).
    ``rotate_q``/``rotate_out``: the kernels apply the cache's rotation to the
    queries / its inverse to the output (see :func:`rotates_in_kernel`);
    ``out_dtype``: the dtype of ``out``.
    """
    return decode_launch(_launcher(), q, k_packed, v_packed, n, sinks, window, **kw)


# --------------------------------------------------------------------------- quantize
def quantize_supported(x, bits, group_size, mode):
    return (
        mode == "affine"
        and bits in AFFINE_BITS
        and group_size in (32, 64, 128)
        and isinstance(x, mx.array)
        and x.dtype in _FLOATS
        and x.shape[-1] % group_size == 0
    )


def quantize_launch(launch, x, *, bits, group_size, flavor):
    """Packed (words, scales, biases) of x (..., D) via the quantize kernel."""
    D = x.shape[-1]
    lead = tuple(x.shape[:-1])
    rows = 1
    for s in lead:
        rows *= s
    ng = D // group_size
    total = rows * ng
    w, s, b = launch(
        "quantize_append",
        [x.reshape(rows, D)],
        [("T", x.dtype), ("D", D), ("BITS", bits), ("GS", group_size), ("FLAVOR", flavor)],
        (-(-total // 256) * 256, 1, 1),
        (256, 1, 1),
        [(rows, D * bits // 32), (rows, ng), (rows, ng)],
        [mx.uint32, x.dtype, x.dtype],
    )
    return (
        w.reshape(*lead, D * bits // 32),
        s.reshape(*lead, ng),
        b.reshape(*lead, ng),
    )


def _write_rows(buf, new, start):
    L = new.shape[2]
    if hasattr(mx, "slice_update"):
        return mx.slice_update(buf, new, mx.array([0, 0, start, 0]), axes=(0, 1, 2, 3))
    out = buf
    out[:, :, start : start + L, :] = new
    return out


def quantize_append(x, buffers, start, *, bits, group_size, mode):
    """Pack ``x`` (B, H, L, D) and write it into ``buffers`` (the cache's
    preallocated packed arrays, (B, H, C, ...)) at token index ``start``.

    Returns the updated buffers (new array objects; the inputs are not
    mutated).  MLX custom kernels cannot alias an output to an input, so the
    kernel packs only the L new tokens and the write into the buffers is a
    ``slice_update``, which MLX performs in place when the old buffer is
    donatable (no other reference alive) -- drop your reference, e.g.
    ``self.keys = quantize_append(x, self.keys, ...)``.
    The packing is bit-identical to ``mx.quantize`` on this backend.  Modes
    other than affine (or no GPU) use ``mx.quantize`` itself.
    """
    if enabled() and quantize_supported(x, bits, group_size, mode):
        flavor = 1  # MLX's Metal and CUDA quantize kernels share one algorithm
        new = quantize_launch(_launcher(), x, bits=bits, group_size=group_size, flavor=flavor)
    else:
        new = tuple(mx.quantize(x, group_size=group_size, bits=bits, mode=mode))
    return tuple(_write_rows(buf, v, start) for buf, v in zip(buffers, new))


# --------------------------------------------------------------------------- window append
def window_append_supports(buf_k, buf_v, keys, values, nw, rotate_k, rotate_v):
    """Whether :func:`window_append` takes these: a GPU, room in the buffers, head
    dims a multiple of 32 (a power of two >= 32 where a rotation is applied)."""
    if not enabled() or buf_k is None or buf_v is None:
        return False
    B, H, C, D = buf_k.shape
    if buf_v.shape != buf_k.shape or buf_v.dtype != buf_k.dtype or buf_k.dtype not in _FLOATS:
        return False
    if keys.shape != values.shape or keys.shape[:2] != (B, H) or keys.shape[3] != D or keys.dtype not in _FLOATS:
        return False
    if D % 32 or nw + keys.shape[2] > C or ((rotate_k or rotate_v) and not rotates_in_kernel(D)):
        return False
    return True


def window_append_launch(launch, buf_k, buf_v, keys, values, nw, rotate_k=False, rotate_v=False):
    """The window buffers ``buf_k``/``buf_v`` (B, H, C, D) with rows ``[nw, nw + L)``
    replaced by ``keys``/``values`` (B, H, L, D), rotated by the cache's rotation
    where asked, in the buffers' dtype: new arrays (one launch)."""
    key = (buf_k.shape, buf_k.dtype, keys.dtype, bool(rotate_k), bool(rotate_v))
    st = _WINDOW_SETUPS.get(key)
    if st is None:
        B, H, C, D = buf_k.shape
        rows = B * H * C
        st = _WINDOW_SETUPS[key] = (
            list(_rotation_args(D, rotate_k or rotate_v, 1.0)),
            _const("u8x1", lambda: mx.zeros((1,), dtype=mx.uint8)),
            ([("IT", keys.dtype), ("OT", buf_k.dtype), ("D", D), ("ROTK", bool(rotate_k)), ("ROTV", bool(rotate_v))],
             (-(-rows // 4) * 128, 2, 1), (128, 1, 1), [buf_k.shape, buf_k.shape], [buf_k.dtype, buf_k.dtype]),
        )
    consts, z, args = st
    carrier = mx.broadcast_to(z, (int(nw) + 1,))
    return launch("window_append", [buf_k, buf_v, keys, values, *consts, carrier], *args)


_WINDOW_SETUPS = {}


def window_append(buf_k, buf_v, keys, values, nw, rotate_k=False, rotate_v=False):
    """:func:`window_append_launch` on this backend's launcher."""
    return window_append_launch(_launcher(), buf_k, buf_v, keys, values, nw, rotate_k, rotate_v)
