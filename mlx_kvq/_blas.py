"""Load OpenBLAS before MLX on Linux.

MLX's Linux CPU wheel links a reference BLAS, which makes fp32 matmul ~19x slower
than it should be. Loading OpenBLAS globally *before* ``mlx.core`` is imported
makes MLX resolve its BLAS symbols to it. Set ``MLX_KVQ_NO_OPENBLAS=1`` to skip.
"""

import contextlib
import ctypes
import os
import sys

LIBRARIES = ("libopenblas.so.0", "libopenblas.so")


def load_openblas():
    """Return the loaded library name, or None (not Linux, too late, or not installed)."""
    if sys.platform != "linux" or os.environ.get("MLX_KVQ_NO_OPENBLAS"):
        return None
    if "mlx.core" in sys.modules:
        return None
    for name in LIBRARIES:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            return name
        except OSError:
            continue
    return None


OPENBLAS = load_openblas()
_LIB = ctypes.CDLL(OPENBLAS) if OPENBLAS else None


@contextlib.contextmanager
def single_threaded():
    """OpenBLAS on one thread inside the block (nothing where it is not loaded): for
    callers that run BLAS from several CPU streams at once. Call it with no BLAS work in
    flight (OpenBLAS's thread count is process-wide)."""
    if _LIB is None:
        yield
        return
    before = _LIB.openblas_get_num_threads()
    _LIB.openblas_set_num_threads(1)
    try:
        yield
    finally:
        _LIB.openblas_set_num_threads(before)

INSTALL = (
    "Debian/Ubuntu: sudo apt-get install libopenblas0; Fedora: sudo dnf install openblas; "
    "Arch: sudo pacman -S openblas; conda: conda install -c conda-forge libopenblas"
)


def missing_warning():
    """A one-line warning when MLX computes on a Linux CPU without OpenBLAS, else None."""
    if OPENBLAS or sys.platform != "linux" or os.environ.get("MLX_KVQ_NO_OPENBLAS"):
        return None
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return None
    return (
        "mlx_kvq: warning: OpenBLAS is not installed, so fp32 matmuls on the CPU run ~19x slower "
        f"({INSTALL}; MLX_KVQ_NO_OPENBLAS=1 hides this)"
    )
