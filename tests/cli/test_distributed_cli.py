"""The commands' distributed bits in one process: ``--pipeline``, loading, the KV line per rank."""

import pytest

from mlx_kvq.cache import QuantizedKVCache
from mlx_kvq.cli import cache_prompt, distributed, generate, summarize


@pytest.mark.parametrize("command", [generate, summarize, cache_prompt])
def test_every_command_takes_pipeline(command):
    argv = ["doc.txt", "--prompt-cache-file", "f.safetensors"] if command is cache_prompt else []
    assert command.setup_arg_parser().parse_args(argv + ["--pipeline"]).pipeline
    assert not command.setup_arg_parser().parse_args(argv).pipeline


def test_one_process_loads_the_whole_model_and_reports_no_ranks(monkeypatch):
    assert distributed.world() == (0, 1)
    args = generate.setup_arg_parser().parse_args(["--model", "m", "--pipeline"])
    monkeypatch.setattr(distributed, "load_whole", lambda a, path=None: ("whole", path or a.model))
    assert distributed.load_model(args) == ("whole", "m")
    assert distributed.own_cache_file("doc.safetensors") == "doc.safetensors"
    c = QuantizedKVCache(4)
    assert distributed.rank_report([c]) == ""
    assert distributed.log() is not None

