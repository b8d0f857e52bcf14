"""The Metal source text MLX builds for a custom kernel (``mx.fast.metal_kernel``).

A line-by-line port of ``write_signature``, ``write_template``,
``make_template_hash`` and the kernel-name logic of ``metal_kernel`` in MLX
0.32.x ``mlx/backend/common/metal_kernel.cpp`` (``get_type_string`` from
``mlx/backend/common/compiled.cpp``), and of the buffer order that
``CustomKernel::eval_gpu`` (``mlx/backend/metal/custom_kernel.cpp``) binds.
The Metal compiler gets ``metal::utils() + metal_source(...)``: ``utils()`` is
MLX's preprocessed ``kernels/utils.h`` (``float16_t``, ``bfloat16_t``, ...),
for which the emulator's ``metal_emu.h`` stands in.
"""

import math

import mlx.core as mx

# inputs with fewer elements are passed in the constant address space
MAX_CONSTANT_ARRAY_SIZE = 8

# (attribute, type) in MLX's order; one is declared when its name occurs in the body
METAL_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]

_TYPE_STRING = {
    mx.float32: "float",
    mx.float16: "float16_t",
    mx.bfloat16: "bfloat16_t",
    mx.float64: "double",
    mx.complex64: "complex64_t",
    mx.bool_: "bool",
    mx.int8: "int8_t",
    mx.int16: "int16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.uint8: "uint8_t",
    mx.uint16: "uint16_t",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
}


def type_string(dtype):
    """``get_type_string``: the Metal type name MLX writes for a dtype."""
    if dtype not in _TYPE_STRING:
        raise RuntimeError(f"Unsupported compilation type {dtype}")
    return _TYPE_STRING[dtype]


def shape_infos(input_names, source):
    """Per input, whether MLX adds ``<name>_shape``, ``_strides``, ``_ndim`` (a substring
    search of the body, not of the header)."""
    return [(f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source) for n in input_names]


def attributes(source):
    """The attribute parameters MLX declares: those whose name occurs in the body."""
    return [f"  {t} {a} [[{a}]]" for a, t in METAL_ATTRIBUTES if a in source]


def _ndim(a):
    return len(a.shape)


def _size(a):
    return math.prod(a.shape)


def _template_value(v):
    # std::variant<int, bool, Dtype> as the Python binding fills it: bool before int
    if isinstance(v, bool):
        return "bool", str(int(v))  # ostream << bool writes 1 / 0
    if isinstance(v, int):
        return "int", str(v)
    return "typename", type_string(v)


def write_template(template):
    return "<" + ", ".join(_template_value(v)[1] for _, v in template) + ">"


def make_template_hash(template_def):
    out = []
    i = 0
    while i < len(template_def):
        c = template_def[i]
        if c in "<>":
            out.append("_")
        elif c == "," and i + 1 < len(template_def) and template_def[i + 1] == " ":
            out.append("_")
            i += 1
        else:
            out.append(c)
        i += 1
    return "".join(out)[:-1]  # pop_back


def kernel_name(name, template, inputs, output_dtypes):
    """The ``[[host_name]]`` MLX gives one instantiation."""
    kname = "custom_kernel_" + name
    if template:
        kname += "_" + make_template_hash(write_template(template))
    for a in inputs:
        kname += "_" + type_string(a.dtype)
        if _ndim(a) == 0:
            kname += "s"
        elif _size(a) < MAX_CONSTANT_ARRAY_SIZE:
            kname += "c"
    for dt in output_dtypes:
        kname += "_" + type_string(dt)
    return kname


def write_signature(func_name, header, source, input_names, inputs, output_names, output_dtypes, template,
                    attrs, infos, atomic_outputs=False):
    ks = header
    if template:
        ks += "template <" + ", ".join(f"{_template_value(v)[0]} {n}" for n, v in template) + ">\n"
    ks += "[[kernel]] void " + func_name + "(\n"
    index = 0
    for i, (name, arr) in enumerate(zip(input_names, inputs)):
        location = "constant" if _size(arr) < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if _ndim(arr) == 0 else "*"
        ks += f"  const {location} {type_string(arr.dtype)}{ref} {name} [[buffer({index})]],\n"
        index += 1
        if _ndim(arr) > 0:
            if infos[i][0]:
                ks += f"  const constant int* {name}_shape [[buffer({index})]],\n"
                index += 1
            if infos[i][1]:
                ks += f"  const constant int64_t* {name}_strides [[buffer({index})]],\n"
                index += 1
            if infos[i][2]:
                ks += f"  const constant int& {name}_ndim [[buffer({index})]],\n"
                index += 1
    for name, dt in zip(output_names, output_dtypes):
        t = type_string(dt)
        ks += "  device " + (f"atomic<{t}>" if atomic_outputs else t) + f"* {name} [[buffer({index})]]"
        # MLX's test (`index` counts the shape/strides/ndim buffers too)
        if index < len(inputs) + len(output_names) - 1 or attrs:
            ks += ",\n"
        else:
            ks += ") {\n"
        index += 1
    for j, attr in enumerate(attrs):
        ks += attr + (",\n" if j < len(attrs) - 1 else ") {\n")
    ks += source
    ks += "\n}\n"
    return ks


def metal_source(name, input_names, output_names, source, header, template, inputs, output_dtypes,
                 ensure_row_contiguous=True, atomic_outputs=False):
    """The source MLX 0.32 generates for ``mx.fast.metal_kernel(name=name, input_names=...,
    output_names=..., source=source, header=header, ensure_row_contiguous=...,
    atomic_outputs=...)`` called with ``inputs`` (arrays: only dtype and shape matter),
    ``template`` and ``output_dtypes`` (what ``verbose=True`` prints).
    ``ensure_row_contiguous`` does not change the text (MLX copies such inputs)."""
    if not output_names:
        raise ValueError("[metal_kernel] Must specify at least one output.")
    if len(inputs) != len(input_names) or len(output_dtypes) != len(output_names):
        raise ValueError("[metal_kernel] inputs / output_dtypes do not match the names")
    template = list(template or [])
    kname = kernel_name(name, template, inputs, output_dtypes)
    text = write_signature(kname, header, source, input_names, inputs, output_names, output_dtypes, template,
                           attributes(source), shape_infos(input_names, source), atomic_outputs)
    if template:
        tdef = kname + write_template(template)
        text += f'\ntemplate [[host_name("{kname}")]] [[kernel]] decltype({tdef}) {tdef};\n'
    return text


def encoder_buffers(input_names, inputs, source):
    """The buffers ``CustomKernel::eval_gpu`` binds, in index order: ``("in", i)``,
    ``("shape", i)`` (int32), ``("strides", i)`` (int64), ``("ndim", i)`` (int32) and
    ``("out", j)``; shape/strides/ndim only for inputs with ``ndim > 0``."""
    bufs = []
    for i, (info, a) in enumerate(zip(shape_infos(input_names, source), inputs)):
        bufs.append(("in", i))
        if _ndim(a) > 0:
            bufs += [(k, i) for k, used in zip(("shape", "strides", "ndim"), info) if used]
    return bufs
