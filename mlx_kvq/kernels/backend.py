"""The backend: which GPU MLX runs on, the launcher that runs kernel bodies there, and
the environment switches.

A *launcher* is a callable ``launch(name, inputs, template, grid, threadgroup,
output_shapes, output_dtypes)``: :class:`MLXLauncher` runs the bodies through
``mx.fast.metal_kernel`` / ``mx.fast.cuda_kernel``; the tests' emulator runs them on the CPU.
Every ``*_launch`` function of this package takes one, so one launch logic serves all three.
"""

import os
from functools import lru_cache

import mlx.core as mx

from .source import cuda_includes, kernel_source, metal_kernel_args, read_source

# On CUDA decode merges its split partials in the same launch by default
# (MLX_KVQ_FUSED_MERGE=0: decode + sdpa_merge, two launches).
FUSED_MERGE = os.environ.get("MLX_KVQ_FUSED_MERGE", "1") not in ("", "0")
# MLX copies a custom kernel's whole source text on every call (host time per decode
# step): on CUDA the launcher hands NVRTC #include lines of the source files instead.
CUDA_INCLUDE = os.environ.get("MLX_KVQ_CUDA_INCLUDE", "1") not in ("", "0")



@lru_cache(maxsize=None)
def backend_name():
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
    """True on the Metal or CUDA backend while MLX computes on the GPU (the default
    device: ``mx.set_default_device(mx.cpu)`` or ``with mx.stream(mx.cpu)`` take the
    reference, custom kernels run only on GPUs), or with a launcher set by
    :func:`use_launcher` (it stands in for the GPU whatever the device), unless
    ``MLX_KVQ_REFERENCE=1``."""
    if os.environ.get("MLX_KVQ_REFERENCE", "0") not in ("", "0"):
        return False
    return _ACTIVE[0] is not None or (backend_name() is not None and on_gpu())


def on_gpu():
    """Whether MLX computes on the GPU now (the default device)."""
    try:
        return mx.default_device() == mx.gpu
    except Exception:
        return False


_ACTIVE = [None]  # the launcher set by use_launcher


def use_launcher(launch):
    """Run the kernels on ``launch`` from now on, whatever the backend (the tests' CPU
    emulator, say); ``None``: the backend's own again. Returns the previous one."""
    previous, _ACTIVE[0] = _ACTIVE[0], launch
    return previous


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
            make, prelude = {
                "metal": (mx.fast.metal_kernel, "prelude_metal.h"),
                "cuda": (mx.fast.cuda_kernel, "prelude_cuda.h"),
            }[self.backend]
            args = metal_kernel_args(name, read_source(prelude))
            if self.backend == "cuda" and CUDA_INCLUDE:
                inc = cuda_includes(name, prelude, kernel_source(name)[1])
                if inc is not None:
                    args.update(zip(("header", "source", "name"), inc))
            k = make(**args)
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


_LAUNCHERS = {}


def launcher():
    """The launcher the kernels run on: :func:`use_launcher`'s, else this backend's."""
    if _ACTIVE[0] is not None:
        return _ACTIVE[0]
    be = backend_name()
    if be is None:
        raise RuntimeError("mlx-kvq kernels need the Metal or CUDA backend")
    if be not in _LAUNCHERS:
        _LAUNCHERS[be] = MLXLauncher(be)
    return _LAUNCHERS[be]


_CORES = []


def num_cores():
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
        n = 132 if backend_name() == "cuda" else 32
    _CORES.append(n)
    return n


def eval_now(*x):
    """``mx.eval``, except inside ``mx.compile`` or a transform (nothing to sync there).
    Bounds memory where MLX's lazy schedule would keep many layers' transients alive."""
    try:
        mx.eval(*x)
    except ValueError:  # inside mx.compile / a transform: nothing to sync
        pass
