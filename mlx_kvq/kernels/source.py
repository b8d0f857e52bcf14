"""The kernel sources: which body file each kernel is, its inputs and outputs, and the
text handed to MLX (``metal/`` holds the files)."""

import hashlib
import re
from pathlib import Path

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
    # a prefill chunk over a packed run, simdgroup_matrix products (Apple GPUs' matrix path)
    "sdpa_prefill": (
        "sdpa_prefill.metal",
        ["q", "kw", "ks", "kb", "vw", "vs", "vb", "carrier", "fparams"],
        ["out", "lse"],
        False,
    ),
    # keys and values one packed run (MLA's latent), simdgroup_matrix products
    "sdpa_latent": (
        "sdpa_latent.metal",
        ["q", "kw", "ks", "kb", "mask", "carrier", "fparams"],
        ["out", "lse"],
        False,
    ),
    "sdpa_decode": ("sdpa_decode.metal", _DECODE_INPUTS, ["out", "lse"], False),
    # the same body with the merge in the launch (DEFINES): + tile counters; + final out, lse
    "sdpa_decode_fused": ("sdpa_decode.metal", _DECODE_INPUTS + ["counter"], ["out", "lse", "fout", "flse"], False),
    # the decode body laid out for Apple GPUs (fp32 simd_sum-style dot products, no matrix op)
    "sdpa_decode_simd": ("sdpa_decode_simd.metal", _DECODE_INPUTS, ["out", "lse"], False),
    "sdpa_decode_simd_fused": ("sdpa_decode_simd.metal", _DECODE_INPUTS + ["counter"], ["out", "lse", "fout", "flse"],
                               False),
    "sdpa_merge": ("sdpa_merge.metal", ["o_part", "lse_part", "signs", "fparams"], ["out", "lse"], True),
    "quantize_append": ("quantize_append.metal", ["x"], ["w", "scales", "biases"], True),
    "window_append": (
        "window_append.metal",
        ["wk", "wv", "k", "v", "signs", "fparams", "carrier"],
        ["ok", "ov"],
        False,
    ),
}


def source_dir():
    """Directory holding the kernel sources: ``mlx_kvq/metal`` in an installed
    copy, ``<repo>/metal`` in a source checkout."""
    pkg = Path(__file__).resolve().parent.parent
    for d in (pkg / "metal", pkg.parent / "metal"):
        if (d / "kvq_common.h").is_file():
            return d
    raise FileNotFoundError(
        f"mlx-kvq kernel sources not found next to {pkg} (looked for metal/kvq_common.h)"
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
DEFINES = {"sdpa_decode_fused": "#define KVQ_FUSED_MERGE 1\n", "sdpa_decode_simd_fused": "#define KVQ_FUSED_MERGE 1\n"}


def kernel_source(name):
    """(common header text, body text, input names, output names) of a kernel."""
    fname, inputs, outputs, _ = KERNELS[name]
    return DEFINES.get(name, "") + read_source("kvq_common.h"), read_source(fname), list(inputs), list(outputs)


def metal_kernel_args(name, prelude, compacted=True):
    """Keyword arguments of ``mx.fast.metal_kernel`` / ``cuda_kernel`` for kernel ``name``:
    the header is the ``prelude`` text followed by the common header; both it and the
    body are compacted (:func:`compact`) unless ``compacted`` is false."""
    common, body, inputs, outputs = kernel_source(name)
    header = prelude + "\n" + common
    if compacted:
        header, body = compact(header), compact(body)
    return dict(name="kvq_" + name, input_names=inputs, output_names=outputs, source=body, header=header,
                ensure_row_contiguous=KERNELS[name][3])


def cuda_includes(name, prelude, body):
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
