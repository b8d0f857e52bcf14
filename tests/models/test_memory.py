"""mlx_kvq.plan: bytes per token, longest context, weights, configs from files, the CLI."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import pytest

from mlx_kvq.models import memory as plan
from mlx_kvq.cache import QuantizedKVCache, cache_options

LLAMA_8B = {  # Llama-3.1-8B's config.json (the fields that matter)
    "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
    "max_position_embeddings": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


def test_fp16_bytes_per_token_by_hand():
    # 32 layers x 8 kv heads x (128 + 128) dims x 2 bytes = 128 KiB per token
    assert plan.kv_bytes(LLAMA_8B, 1000) == 1000 * 32 * 8 * 256 * 2


def test_quantized_bytes_match_the_cache(smollm):
    """The plan's KV bytes equal what a filled QuantizedKVCache uses (4 sinks in fp16)."""
    model, _ = smollm
    spec = plan.load_spec(None)
    for bits in (8, 4, 2):
        n = 300
        c = QuantizedKVCache(bits)
        k = mx.random.normal((1, 3, n, 64)).astype(mx.float16)
        c.update_and_fetch(k, k)
        c.flush()
        per_layer = c.used_nbytes()
        assert plan.kv_bytes(spec.config, n, bits) == per_layer * spec.config["num_hidden_layers"]
    assert spec.config["num_hidden_layers"] == len(model.layers)


@pytest.mark.parametrize("extra", [dict(k_bits=8, v_bits=4), dict(sinks=0, window=64), dict(mode="mxfp4"),
                                   dict(quantized_kv_start=1000), dict(kv_group_size=32)])
def test_bytes_with_the_kv_options_match_the_cache(extra):
    """``kv_bytes`` with ``make_prompt_cache``'s KV options equals what a cache made with
    them holds for the same tokens (an unquantized start: fp16 until it is reached)."""
    config = dict(num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=3, head_dim=64)
    n = 300
    c = QuantizedKVCache(**cache_options(4, **extra))
    k = mx.random.normal((1, 3, n, 64)).astype(mx.float16)
    c.update_and_fetch(k, k)
    c.flush()
    extra = dict(extra)
    assert plan.kv_bytes(config, n, 4, extra.pop("kv_group_size", None), **extra) == c.used_nbytes()


def test_longest_context_fits_and_one_more_does_not():
    budget = 20 * 2**30 - 16 * 10**9
    for bits in plan.BITS:
        n = plan.max_context(LLAMA_8B, budget, bits)
        assert plan.kv_bytes(LLAMA_8B, n, bits) <= budget < plan.kv_bytes(LLAMA_8B, n + 1, bits)
    rows = plan.plan(plan.ModelSpec("llama", LLAMA_8B, 16 * 10**9, "files"), memory=20 * 2**30)
    ctx = {r["cache"]: r["max_context"] for r in rows}
    assert ctx["fp16"] < ctx["8-bit"] < ctx["4-bit"] < ctx["3-bit"] < ctx["2-bit"]
    assert 3.3 < ctx["4-bit"] / ctx["fp16"] < 3.7  # 4-bit group 64 at head_dim 128: 0.28x bytes


def test_sliding_window_layers_are_capped():
    gemma = dict(LLAMA_8B, sliding_window=1024, sliding_window_pattern=6, num_hidden_layers=12)
    full = plan.kv_bytes(dict(gemma, sliding_window=None), 100_000)
    capped = plan.kv_bytes(gemma, 100_000)
    assert capped == full * 2 / 12 + 10 * 1024 * 8 * 256 * 2


def test_weights_from_files_and_from_parameter_count(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    spec = plan.load_spec(str(tmp_path))
    assert spec.weights_from == "parameter count"
    assert 15e9 < spec.weight_bytes < 17e9  # ~8.0B parameters in bf16
    (tmp_path / "model.safetensors").write_bytes(b"0" * 1234)
    assert plan.load_spec(str(tmp_path)).weight_bytes == 1234
    q = dict(LLAMA_8B, quantization={"bits": 4, "group_size": 64})
    (tmp_path / "config.json").write_text(json.dumps(q))
    assert plan.load_spec(str(tmp_path / "config.json")).weight_bytes == 1234


def test_gguf_metadata(smollm_path):
    spec = plan.load_spec(str(smollm_path))
    c = spec.config
    assert (c["num_hidden_layers"], c["num_key_value_heads"], c["head_dim"]) == (30, 3, 64)
    assert c["max_position_embeddings"] == 8192
    assert spec.weight_bytes == os.path.getsize(smollm_path)


def test_parse_size():
    assert plan.parse_size("16GB") == 16 * 10**9
    assert plan.parse_size("512MiB") == 512 * 2**20
    assert plan.parse_size("1e9B") == 10**9
    assert plan.parse_size("0GB") == 0
    for bad in ("16", "1e9", "-1GB", "16XB", "1e99999GB", "GB", "16iB"):
        with pytest.raises(ValueError, match="memory size"):
            plan.parse_size(bad)


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mlx_kvq.cli.plan", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def test_cli_table_and_context(smollm_path):
    r = run("--memory", "0.2GB")
    assert r.returncode == 0, r.stderr
    for label in ("fp16", "8-bit", "4-bit", "3-bit", "2-bit", "longest context"):
        assert label in r.stdout
    r = run("--context", "8192", "--memory", "0.2GB")
    assert r.returncode == 0 and "KV at 8192" in r.stdout
    lines = {l.split()[0]: l for l in r.stdout.splitlines() if l.split() and l.split()[0] in ("fp16", "4-bit")}
    assert lines["fp16"].endswith("no") and lines["4-bit"].endswith("yes")


def test_cli_plot(tmp_path, smollm_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "p.png"
    r = run("--plot", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_errors(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = run("--model", "some-org/some-model", env=env)
    assert r.returncode != 0 and "Hugging Face Hub" in r.stderr and "Traceback" not in r.stderr
    r = run("--model", str(tmp_path / "nope.gguf"))
    assert r.returncode != 0 and "not found" in r.stderr
    (tmp_path / "config.json").write_text("{}")
    r = run("--model", str(tmp_path))
    assert r.returncode != 0 and "num_hidden_layers" in r.stderr
    r = run("--memory", "lots")
    assert r.returncode != 0 and "not a memory size" in r.stderr


# -- per rank, the model split over several processes (mlx.launch) -------------------


def test_tensor_parallel_ranks_hold_their_share_of_the_kv_heads():
    spec = plan.ModelSpec("llama-8b", LLAMA_8B, 16_000_000_000, "files")
    rank = plan.shard_spec(spec, 2, "tensor")
    # 32 layers x 4 of the 8 kv heads x (128 + 128) dims x 2 bytes
    assert plan.kv_bytes(rank.config, 1000) == 1000 * 32 * 4 * 256 * 2
    for bits in (8, 4, 2):
        assert plan.kv_bytes(rank.config, 5000, bits) * 2 == plan.kv_bytes(LLAMA_8B, 5000, bits)
    # the embedding and the head (2 x 128256 x 4096 of ~8.0e9 parameters) stay whole on every rank
    embed = 16e9 * 2 * 128256 * 4096 / plan.parameter_count(LLAMA_8B)[0]
    assert rank.weight_bytes == pytest.approx(embed + (16e9 - embed) / 2, rel=1e-6)
    rows = {r["cache"]: r["max_context"] for r in plan.plan(rank, 24e9)}
    alone = {r["cache"]: r["max_context"] for r in plan.plan(spec, 24e9)}
    assert all(rows[k] > 2 * alone[k] for k in rows)  # half the KV and a third of the weights less


def test_pipeline_ranks_hold_their_layers_and_the_largest_share_counts():
    spec = plan.ModelSpec("llama-8b", LLAMA_8B, 16_000_000_000, "files")
    rank = plan.shard_spec(spec, 3, "pipeline")  # 11, 11, 10 layers: the plan is for 11
    assert plan.kv_bytes(rank.config, 1000) == 1000 * 11 * 8 * 256 * 2
    # 6 layers, every 6th full attention, the others a 512-token window: of 2 ranks, rank 0
    # (the last 3 layers) holds the full one
    gemma = dict(LLAMA_8B, num_hidden_layers=6, sliding_window=512, sliding_window_pattern=6)
    rank = plan.shard_spec(plan.ModelSpec("g", gemma, 10**9, "files"), 2, "pipeline")
    per_layer = 8 * 256 * 2
    assert plan.kv_bytes(rank.config, 10_000) == (10_000 + 2 * 512) * per_layer


def test_splits_that_cannot_be_made_are_refused():
    spec = plan.ModelSpec("llama-8b", LLAMA_8B, 16_000_000_000, "files")
    with pytest.raises(ValueError, match="8 KV heads: tensor parallel over 3 ranks"):
        plan.shard_spec(spec, 3, "tensor")
    with pytest.raises(ValueError, match="32 layers: it cannot be split over 33 ranks"):
        plan.shard_spec(spec, 33, "pipeline")
    with pytest.raises(ValueError, match="shard must be tensor or pipeline, got 'data'"):
        plan.shard_spec(spec, 2, "data")


def test_cli_ranks(smollm_path):
    r = subprocess.run([sys.executable, "-m", "mlx_kvq.cli.plan", "--memory", "1GB", "--ranks", "3"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "largest share of 3 ranks, tensor parallel" in r.stdout
    r = subprocess.run([sys.executable, "-m", "mlx_kvq.cli.plan", "--ranks", "2", "--shard", "tensor"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "9 attention heads and 3 KV heads" in r.stderr
