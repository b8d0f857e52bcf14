import mlx_kvq  # loads OpenBLAS before mlx.core

import os
import shutil

import pytest

from mlx_kvq.models.gguf import load_gguf
from mlx_kvq.models import default_model_path


@pytest.fixture(scope="session")
def smollm_path():
    """The embedded SmolLM2-135M-Instruct GGUF (downloaded once into the cache dir)."""
    return default_model_path()


@pytest.fixture(scope="session")
def smollm(smollm_path):
    """``(model, tokenizer)`` of the embedded model, weights kept packed (Q4_1, 8-bit embedding)."""
    return load_gguf(smollm_path)


@pytest.fixture(scope="session")
def fast_smollm(smollm_path):
    """A separate copy of the embedded model with float32 weights (fast prefill on CPU)."""
    from mlx_kvq.models import to_fp32

    model, tokenizer = load_gguf(smollm_path)
    return to_fp32(model), tokenizer


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    """The CPU emulator of the kernels' Metal execution model, as a kernel launcher."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler for the emulator")
    from emulator.emu import EmuLauncher

    # pad_strides: attention inputs arrive as strided views into larger garbage-
    # filled buffers, as slices of a preallocated cache would
    return EmuLauncher(tmp_path_factory.mktemp("kvq_emu"), pad_strides=True)


@pytest.fixture
def run_kernels_on():
    """``run_kernels_on(launch)``: the kernels run on ``launch`` (and ``kernels.enabled()``)
    for the rest of the test, whatever the backend."""
    from mlx_kvq import kernels

    previous = []

    def use(launch):
        previous.append(kernels.use_launcher(launch))

    yield use
    if previous:
        kernels.use_launcher(previous[0])
