"""Fused kernels over the packed KV cache.

One kernel body per algorithm lives in ``metal/*.metal`` (Metal dialect). It runs on
Apple GPUs through ``mx.fast.metal_kernel`` (``metal/prelude_metal.h``), on NVIDIA GPUs
through ``mx.fast.cuda_kernel`` (``metal/prelude_cuda.h`` maps the Metal constructs onto
CUDA) and, in the tests, on the CPU under the C++ emulation of Metal in
``tests/emulator``. Each family's ``*_launch`` function takes a *launcher* (see
:mod:`.backend`), so one launch logic serves all three; the plain function runs it on
this backend's :func:`launcher`.

The families, one module each:

* :mod:`.decode` -- ``decode_attention``: up to ``MAX_QUERIES`` queries per sequence over a
  whole cache view (sinks, packed run, window) in one launch; ``decode_supports``. Two bodies:
  ``"simd"`` (``sdpa_decode_simd.metal``, Metal's default) and ``"mma"`` (``sdpa_decode.metal``,
  tensor cores; elsewhere), chosen by ``decode_launch(body=...)`` or ``MLX_KVQ_DECODE_BODY``.
* :mod:`.packed` -- ``packed_attention``: ``(out, lse)`` over one packed run; ``supports``.
* :mod:`.prefill` -- ``prefill_attention``: a prefill chunk over one packed run with
  ``simdgroup_matrix`` products (Metal's prefill of layers too large to copy); ``prefill_supports``.
* :mod:`.latent` -- ``latent_attention``: many query heads over one packed run that is both the
  keys and the values (MLA's latent), ``simdgroup_matrix`` products (Metal); ``latent_supports``.
* :mod:`.merge` -- ``merge_launch``: split partials merged by log-sum-exp.
* :mod:`.quantize` -- ``quantize_append``: pack new tokens into the preallocated buffers.
* :mod:`.window` -- ``window_append``: write decoded tokens into the unquantized window.

The CPU has a body of its own (:mod:`.cpu`, ``cpu_attention.cpp``, C++ built at first use on
Linux and called through ``ctypes``; MLX runs custom kernels only on GPUs): a prefill chunk's
partial attention over a run, a decode step's one softmax over a view's runs.

The safety net (:mod:`.selfcheck`): each configuration is checked against the reference
once per process at its first use on a GPU; one that fails runs on the reference.

Backend and switches (:mod:`.backend`): ``enabled()`` (a GPU backend, MLX computing on
its GPU device (``on_gpu()``), and not ``MLX_KVQ_REFERENCE=1``), ``launcher()``, ``use_launcher(launch)`` (run the kernels on
another launcher, e.g. the tests' emulator), ``backend_name()``, ``num_cores()``. Kernel sources:
:mod:`.source`. Tunables are parameters of the ``*_launch`` functions (``nsplit``, ``nsg``,
``pf``, ``warps_per_core``, ...), with the module constants as defaults.
"""

from .args import mask_sig, param_array, rotates_in_kernel
from .backend import MLXLauncher, backend_name, enabled, launcher, num_cores, on_gpu, use_launcher
from .decode import (
    DECODE_BITS,
    MAX_QUERIES,
    WARPS_PER_CORE,
    decode_attention,
    decode_launch,
    decode_body,
    decode_plan,
    decode_run,
    decode_supports,
    is_decode,
)
from .latent import latent_attention, latent_launch, latent_supports
from .merge import merge_launch
from .packed import attention_launch, packed_attention, plan, supports
from .prefill import prefill_attention, prefill_launch, prefill_supports
from .quantize import quantize_append, quantize_flavor, quantize_launch, quantize_supported
from .source import KERNELS, compact, kernel_source, metal_kernel_args, read_source, source_dir
from .window import window_append, window_append_launch, window_append_supports
from . import selfcheck
