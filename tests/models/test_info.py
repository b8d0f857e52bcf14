"""``models.info.context_length``: the positions a model's config states, extended by the
RoPE scalings that extend them, as vLLM counts them."""

from types import SimpleNamespace

import pytest

from mlx_kvq.models import context_length


@pytest.mark.parametrize("config, expected", [
    (dict(max_position_embeddings=8192), 8192),
    (dict(max_position_embeddings=4096, rope_scaling={"type": "linear", "factor": 4.0}), 16384),
    (dict(max_position_embeddings=4096, rope_scaling={"rope_type": "dynamic", "factor": 2.0}), 8192),
    (dict(max_position_embeddings=32768,
          rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}), 131072),
    (dict(max_position_embeddings=65536,
          rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16384}), 65536),
    (dict(max_position_embeddings=131072, rope_scaling={"rope_type": "llama3", "factor": 8.0}), 131072),
    (dict(max_position_embeddings=131072, rope_scaling={"type": "longrope", "factor": 32.0}), 131072),
    (dict(max_position_embeddings=2048, rope_scaling={"type": "linear", "factor": 1.0}), 2048),
    (dict(model_type="gemma3_text", max_position_embeddings=131072,
          rope_scaling={"rope_type": "linear", "factor": 8.0}), 131072),
    (dict(context_length=1024), 1024),
    (dict(hidden_size=64), None),
    (dict(max_position_embeddings=0), None),
], ids=["plain", "linear", "dynamic", "yarn", "yarn-original", "llama3", "longrope", "factor-1", "gemma3",
        "context-length", "none", "zero"])
def test_context_length(config, expected):
    assert context_length(SimpleNamespace(args=SimpleNamespace(**config))) == expected


def test_a_model_without_args_has_no_context_length():
    assert context_length(object()) is None
