"""The emulator runs the source MLX would hand the Metal compiler (tests/emulator/mlx_source.py):
its text against MLX's, names MLX would not declare failing to build, and the
simdgroup_matrix emulation against numpy."""

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emulator.mlx_source import kernel_name, metal_source  # noqa: E402

from mlx_kvq import kernels  # noqa: E402

# What MLX 0.32's metal_kernel (mlx/backend/common/metal_kernel.cpp) writes for this call:
# x has 6 elements (< 8: constant address space, name suffix "c"), s is 0-d (a reference,
# suffix "s", no _shape/_ndim even though the body names them), y gets _strides and _ndim;
# the attributes the body names, in MLX's table order; bool template arguments print as 1.
SMALL = dict(
    name="axpy",
    input_names=["x", "s", "y"],
    output_names=["out"],
    source="uint i = thread_position_in_grid.x; out[i] = T(x[i] * s + y[i * y_strides[0]]) + N + y_ndim "
           "+ simdgroup_index_in_threadgroup + F;",
    header="#define HDR 1\n",
    template=[("T", mx.float16), ("N", 3), ("F", True)],
    output_dtypes=[mx.float16],
)
SMALL_TEXT = """#define HDR 1
template <typename T, int N, bool F>
[[kernel]] void custom_kernel_axpy__float16_t_3_1_floatc_floats_bfloat16_t_float16_t(
  const constant float* x [[buffer(0)]],
  const constant float& s [[buffer(1)]],
  const device bfloat16_t* y [[buffer(2)]],
  const constant int64_t* y_strides [[buffer(3)]],
  const constant int& y_ndim [[buffer(4)]],
  device float16_t* out [[buffer(5)]],
  uint simdgroup_index_in_threadgroup [[simdgroup_index_in_threadgroup]],
  uint3 thread_position_in_grid [[thread_position_in_grid]]) {
uint i = thread_position_in_grid.x; out[i] = T(x[i] * s + y[i * y_strides[0]]) + N + y_ndim + \
simdgroup_index_in_threadgroup + F;
}

template [[host_name("custom_kernel_axpy__float16_t_3_1_floatc_floats_bfloat16_t_float16_t")]] [[kernel]] \
decltype(custom_kernel_axpy__float16_t_3_1_floatc_floats_bfloat16_t_float16_t<float16_t, 3, 1>) \
custom_kernel_axpy__float16_t_3_1_floatc_floats_bfloat16_t_float16_t<float16_t, 3, 1>;
"""


def small_inputs():
    return [mx.arange(6, dtype=mx.float32), mx.array(2.0), mx.arange(8, dtype=mx.bfloat16)]


def test_metal_source_is_mlx_text():
    text = metal_source(**{k: v for k, v in SMALL.items()}, inputs=small_inputs())
    assert text == SMALL_TEXT


def mlx_generated(kernel_args, call_args):
    """The source the installed MLX generates (``verbose=True`` prints it), traced through
    mx.export_function, which records a metal_kernel call without a Metal device."""
    k = mx.fast.metal_kernel(**kernel_args)
    inputs = call_args.pop("inputs")

    def f(*xs):
        return k(inputs=list(xs), verbose=True, **call_args)

    d = tempfile.mkdtemp()
    with tempfile.TemporaryFile() as out:
        saved = os.dup(1)
        sys.stdout.flush()
        os.dup2(out.fileno(), 1)
        try:
            mx.export_function(os.path.join(d, "k.mlxfn"), f, *inputs)
        except Exception as e:  # noqa: BLE001
            pytest.skip(f"MLX cannot trace metal_kernel here: {e}")
        finally:
            os.dup2(saved, 1)
        out.seek(0)
        printed = out.read().decode()
    return printed.split("```\n", 1)[1].rsplit("\n```", 1)[0]


def test_metal_source_matches_installed_mlx():
    """The port against the installed MLX itself: the small kernel and the kvq merge kernel."""
    args = dict(SMALL)
    tmpl, odt = args.pop("template"), args.pop("output_dtypes")
    got = mlx_generated(args, dict(inputs=small_inputs(), template=tmpl, grid=(6, 1, 1), threadgroup=(6, 1, 1),
                                   output_shapes=[(6,)], output_dtypes=odt))
    assert got == SMALL_TEXT
    from emulator.emu import kvq_kernel_args

    margs = kvq_kernel_args("sdpa_merge")
    inputs = [mx.zeros((1, 4, 2, 1, 64), dtype=mx.float32), mx.zeros((1, 4, 2, 1), dtype=mx.float32),
              mx.zeros((64,), dtype=mx.float32), mx.zeros((4,), dtype=mx.float32)]
    tmpl = [("D", 64), ("OT", mx.bfloat16), ("ROTO", False)]
    got = mlx_generated(dict(margs), dict(inputs=inputs, template=tmpl, grid=(32, 4, 1), threadgroup=(32, 1, 1),
                                          output_shapes=[(1, 4, 1, 64), (1, 4, 1)],
                                          output_dtypes=[mx.bfloat16, mx.float32]))
    assert got == metal_source(**margs, template=tmpl, inputs=inputs, output_dtypes=[mx.bfloat16, mx.float32])


def run_tiny(emu, source, input_names=("a",), header=""):
    k = emu.metal_kernel(name="tiny", input_names=list(input_names), output_names=["o"], source=source,
                         header=header)
    a = mx.arange(64, dtype=mx.float32)
    return k(inputs=[a] * len(input_names), template=[("T", mx.float32)], grid=(64, 1, 1), threadgroup=(64, 1, 1),
             output_shapes=[(64,)], output_dtypes=[mx.float32])[0]


def test_correct_tiny_body_runs(emu):
    o = run_tiny(emu, "uint i = thread_position_in_grid.x;\n"
                      "o[i] = T(a[i]) * 2 + a_shape[0] + thread_index_in_simdgroup;")
    assert np.array_equal(np.array(o), np.arange(64) * 2 + 64 + np.arange(64) % 32)


FIRST_LANE = "inline float first_lane() { return float(thread_index_in_simdgroup); }\n"


@pytest.mark.parametrize("body, header, missing", [
    # an attribute name MLX does not declare (Metal's spelling is thread_index_in_simdgroup)
    ("o[simd_lane_id] = a[simd_lane_id];", "", "simd_lane_id"),
    # a misspelled input
    ("uint i = thread_position_in_grid.x; o[i] = b[i];", "", "b"),
    # an attribute is a parameter of the kernel: a header function cannot use it
    ("o[thread_index_in_simdgroup] = first_lane();", FIRST_LANE, "thread_index_in_simdgroup"),
])
def test_names_mlx_does_not_declare_fail(emu, body, header, missing):
    with pytest.raises(RuntimeError, match=f"error: '{missing}' was not declared"):
        run_tiny(emu, body, header=header)


def test_shape_of_a_0d_input_is_not_passed(emu):
    """MLX declares x_shape / x_ndim only for inputs with ndim > 0."""
    k = emu.metal_kernel(name="tiny0d", input_names=["s"], output_names=["o"], source="o[0] = s + s_ndim;")
    with pytest.raises(RuntimeError, match="error: 's_ndim' was not declared"):
        k(inputs=[mx.array(1.0)], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(1,)],
          output_dtypes=[mx.float32])
    k = emu.metal_kernel(name="tiny0d", input_names=["s"], output_names=["o"], source="o[0] = s * 3;")
    assert k(inputs=[2.0], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(1,)],
             output_dtypes=[mx.float32])[0].item() == 6.0


def test_attributes_of_a_non_uniform_grid(emu):
    """MLX dispatches threads: threadgroups min(threadgroup, grid), edge groups partial."""
    src = """uint3 p = thread_position_in_grid;
uint i = p.y * threads_per_grid.x + p.x;
o[4 * i + 0] = threadgroup_position_in_grid.x * 100 + threadgroup_position_in_grid.y;
o[4 * i + 1] = thread_index_in_threadgroup;
o[4 * i + 2] = dispatch_threads_per_threadgroup.x * 100 + threads_per_threadgroup.x;
o[4 * i + 3] = threadgroups_per_grid.x * 100 + threadgroups_per_grid.y;"""
    k = emu.metal_kernel(name="attrs", input_names=[], output_names=["o"], source=src)
    o = np.array(k(inputs=[], grid=(10, 3, 1), threadgroup=(4, 8, 1), output_shapes=[(30 * 4,)],
                   output_dtypes=[mx.uint32])[0]).reshape(3, 10, 4)
    x, y = np.meshgrid(np.arange(10), np.arange(3))
    assert np.array_equal(o[..., 0], (x // 4) * 100)
    ax = np.where(x < 8, 4, 2)
    assert np.array_equal(o[..., 1], y * ax + x % 4)
    assert np.array_equal(o[..., 2], ax * 100 + 4)
    assert np.array_equal(o[..., 3], np.full((3, 10), 301))


def test_threadgroup_over_1024_threads_is_refused(emu):
    k = emu.metal_kernel(name="big", input_names=[], output_names=["o"], source="o[0] = 1;")
    with pytest.raises(ValueError, match="maximum allowed threads per threadgroup"):
        k(inputs=[], grid=(2048, 1, 1), threadgroup=(1056, 1, 1), output_shapes=[(1,)], output_dtypes=[mx.float32])


# ---------------------------------------------------------------- simdgroup_matrix

MMA_BODY = """
threadgroup T ta[8 * SA];
threadgroup T tb[8 * SB];
const uint lane = thread_index_in_simdgroup;
for (uint i = lane; i < 8 * SA; i += 32) ta[i] = a[i];
for (uint i = lane; i < 8 * SB; i += 32) tb[i] = b[i];
threadgroup_barrier(mem_flags::mem_threadgroup);
simdgroup_matrix<T, 8, 8> A, B;
simdgroup_matrix<float, 8, 8> C = make_filled_simdgroup_matrix<float, 8, 8>(1.5f);
simdgroup_load(A, ta, SA, ulong2(0, 0), TA);
simdgroup_load(B, tb + 1, SB, ulong2(0, 0), TB);
simdgroup_multiply_accumulate(C, A, B, C);
simdgroup_store(C, out, 9);
// thread_elements(): the lane layout steel's MMAFrag::get_coord reads
const short qid = lane / 4;
const short fm = (qid & 4) + ((lane / 2) % 4);
const short fn = (qid & 2) * 2 + (lane % 2) * 2;
elems[fm * 8 + fn] = C.thread_elements()[0];
elems[fm * 8 + fn + 1] = C.thread_elements()[1];
"""


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("ta, tb", [(False, False), (True, False), (False, True)])
def test_simdgroup_matrix_against_numpy(emu, dtype, ta, tb):
    """Through the full MLX-generated source: strided loads from threadgroup memory (one
    transposed), a multiply-accumulate in float, a strided store to device memory."""
    sa, sb = 11, 10
    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, sa)).astype(np.float32)
    b = rng.standard_normal((8, sb)).astype(np.float32)
    k = emu.metal_kernel(name="mma", input_names=["a", "b"], output_names=["out", "elems"], source=MMA_BODY)
    out, elems = k(inputs=[mx.array(a).astype(dtype), mx.array(b).astype(dtype)],
                   template=[("T", dtype), ("SA", sa), ("SB", sb), ("TA", ta), ("TB", tb)],
                   grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(8, 9), (64,)],
                   output_dtypes=[mx.float32, mx.float32])
    an = np.array(mx.array(a).astype(dtype).astype(mx.float32))
    bn = np.array(mx.array(b).astype(dtype).astype(mx.float32))
    A = an[:, :8].T if ta else an[:, :8]
    B = bn[:, 1:9].T if tb else bn[:, 1:9]
    want = A.astype(np.float64) @ B.astype(np.float64) + 1.5
    got = np.array(out)
    assert np.allclose(got[:, :8], want, rtol=1e-5, atol=1e-5)
    assert np.isnan(got[:, 8]).all()  # the store's stride skips column 8 (poisoned output)
    assert np.array_equal(np.array(elems).reshape(8, 8), got[:, :8])


def test_simdgroup_matrix_needs_the_whole_simdgroup(emu):
    src = """simdgroup_matrix<float, 8, 8> A = make_filled_simdgroup_matrix<float, 8, 8>(1.0f);
if (thread_index_in_simdgroup < 16) { simdgroup_multiply(A, A, A); }
simdgroup_store(A, o, 8);"""
    k = emu.metal_kernel(name="mma_div", input_names=[], output_names=["o"], source=src)
    with pytest.raises(RuntimeError, match="all 32 lanes"):
        k(inputs=[], grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(64,)], output_dtypes=[mx.float32])


def test_kvq_kernel_name_is_mlx_name():
    """The kvq kernels are instantiated under MLX's host name; lse_part and fparams have < 8
    elements (constant address space: "c")."""
    inputs = [mx.zeros((1, 2, 3, 1, 64)), mx.zeros((1, 2, 3, 1)), mx.zeros((64,)), mx.zeros((4,))]
    name = kernel_name("kvq_sdpa_merge", [("D", 64), ("OT", mx.float16), ("ROTO", True)], inputs,
                       [mx.float16, mx.float32])
    assert name == "custom_kernel_kvq_sdpa_merge__64_float16_t_1_float_floatc_float_floatc_float16_t_float"
    assert kernels.KERNELS["sdpa_merge"][1] == ["o_part", "lse_part", "signs", "fparams"]
