import mlx_kvq  # loads OpenBLAS before mlx.core

import pytest

from mlx_kvq.gguf import load_gguf
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
    from mlx_kvq.eval import to_fp32

    model, tokenizer = load_gguf(smollm_path)
    return to_fp32(model), tokenizer
