import os
import shutil

# Full float32 matmuls on GPUs (MLX's default is TF32 on CUDA and M5 GPUs): the tests that
# compare a batch's rows with the same requests alone then hold exactly, as on the CPU
# (benchmarks/lab/results/rows_tf32_h200.txt); before mlx.core is imported
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx_kvq  # noqa: E402  (loads OpenBLAS before mlx.core)
import pytest  # noqa: E402

from mlx_kvq.models.gguf import load_gguf  # noqa: E402
from mlx_kvq.models import default_model_path  # noqa: E402


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
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        if os.environ.get("MLX_KVQ_SKIP_EMULATOR"):
            pytest.skip(f"MLX_KVQ_SKIP_EMULATOR is set and there is no C++ compiler ({compiler})")
        pytest.fail(f"no C++ compiler ({compiler}) to build the kernel emulator, which ~114 kernel tests "
                    "run on: install g++ (sudo apt-get install g++), set CXX, or set MLX_KVQ_SKIP_EMULATOR=1 "
                    "to skip them", pytrace=False)
    from emulator.emu import EmuLauncher

    # pad_strides: attention inputs arrive as strided views into larger garbage-
    # filled buffers, as slices of a preallocated cache would
    return EmuLauncher(tmp_path_factory.mktemp("kvq_emu"), pad_strides=True)


def pytest_terminal_summary(terminalreporter):
    """Say loudly when the kernel tests were skipped for want of the emulator."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "MLX_KVQ_SKIP_EMULATOR" in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(
            f"WARNING: {len(skipped)} kernel tests were SKIPPED: no C++ compiler for the emulator "
            "(MLX_KVQ_SKIP_EMULATOR=1)", red=True, bold=True)


@pytest.fixture
def on_the_cpu_device():
    """MLX computing on the CPU device for the test, also on a machine with a GPU (the CPU's
    attention paths)."""
    import mlx.core as mx

    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(previous)


@pytest.fixture
def over_copy_budget(monkeypatch):
    """Every layer is over the GPU prefill path's copy budget, on a Metal backend: prefill
    chunks attend over the packed run (a kernel or the blocked reference), never a copy."""
    from mlx_kvq.attention import prefill

    monkeypatch.setattr(prefill.kernels, "backend_name", lambda: "metal")
    monkeypatch.setattr(prefill, "PREFILL_COPY_BYTES", {"metal": 1000})


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
