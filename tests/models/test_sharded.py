"""``load_sharded`` in one process (a group of 1): mlx-lm's load options reach its
``sharded_load``, and GGUF files answer ``return_config`` with an empty config."""

from helpers import tiny_qwen2_dir
from mlx_kvq.models import load_sharded, sharding


def test_load_options_reach_mlx_lms_sharded_load(tmp_path, smollm):
    path = tiny_qwen2_dir(tmp_path / "qwen2", smollm[1])
    model, tokenizer, config = load_sharded(path, "pipeline", return_config=True,
                                            tokenizer_config={"chat_template": "{{ messages }}"})
    assert config["model_type"] == "qwen2" and tokenizer.chat_template == "{{ messages }}"
    assert sharding(model) == {"sharding": "pipeline", "rank": 0, "world_size": 1}
    model, tokenizer = load_sharded(path)
    assert sharding(model)["sharding"] == "tensor" and tokenizer.chat_template != "{{ messages }}"


def test_a_gguf_file_has_an_empty_config(smollm_path):
    model, _, config = load_sharded(smollm_path, return_config=True)
    assert config == {} and sharding(model)["sharding"] == "tensor"
