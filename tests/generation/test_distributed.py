"""Quantized caches under MLX's distributed generation: two ring processes on this
machine (``mlx.launch``), tensor and pipeline parallel, against the single-process run.

``mlx.launch`` exits 0 even when a rank fails, so each rank writes a result file and the
test requires every one of them.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import free_ports
from mlx_kvq.bridge import load_prompt_cache
from mlx_kvq.generation import cache_document, load_document_cache, rank_path
from mlx_kvq.models import mark_sharded, model_fingerprint

sys.path.insert(0, str(Path(__file__).parent))
import distributed_rank as ranks  # noqa: E402

SCRIPT = Path(__file__).parent / "distributed_rank.py"
SPLITS = ("tensor/qwen2", "pipeline/qwen2")
N = 2


def results(out_dir, n, log=""):
    """Every rank's result, or a failure naming the ranks that wrote none."""
    missing = [r for r in range(n) if not (Path(out_dir) / f"rank{r}.json").is_file()]
    if missing:
        pytest.fail(f"ranks {missing} of {n} wrote no result; mlx.launch output:\n{log[-4000:]}")
    return [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(n)]


def test_a_rank_without_a_result_fails(tmp_path):
    (tmp_path / "rank0.json").write_text("{}")
    with pytest.raises(pytest.fail.Exception, match=r"ranks \[1\] of 2 wrote no result"):
        results(tmp_path, 2, "[ring] connection to a peer was lost")


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    if shutil.which("mlx.launch") is None:
        pytest.skip("mlx.launch is not installed")
    out = tmp_path_factory.mktemp("ranks")
    cmd = ["timeout", "150", "mlx.launch", "-n", str(N), "--backend", "ring",
           "--starting-port", str(free_ports(N)), sys.executable, str(SCRIPT), str(out), *SPLITS]
    run = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)
    return results(out, N, run.stdout + run.stderr)


@pytest.mark.parametrize("split", SPLITS)
def test_every_rank_generates_the_single_process_tokens(launched, split):
    mode, arch = split.split("/")
    single = ranks.run(ranks.tiny(arch), ranks.SPLITS[split])
    for rank, result in enumerate(launched):
        assert result["world_size"] == N
        for config, alone in single.items():
            got = result[split][config]
            assert got["tokens"] == alone["tokens"], (split, config, rank)
            # tensor: every layer, its share of the heads; pipeline: its layers (2 of 4)
            assert got["layers"] == (alone["layers"] if mode == "tensor" else alone["layers"] // N)
            assert abs(got["kv_bytes"] - alone["kv_bytes"] / N) <= 0.05 * alone["kv_bytes"] / N
            assert got["kv_bytes_by_rank"] == [r[split][config]["kv_bytes"] for r in launched]
    # the configs differ: the tokens follow the cache
    assert single["kv8"]["tokens"] != single["kv4"]["tokens"]


# -- prompt-cache files per rank (no processes: the model is marked as a rank's share) --


@pytest.fixture
def as_rank(fast_smollm):
    """``as_rank(mode, rank, size)``: the model counts as that rank's share for the test."""
    model = fast_smollm[0]
    yield lambda *split: mark_sharded(model, *split)
    mark_sharded(model, "none", 0, 1)


def test_each_rank_writes_its_file_and_only_the_same_split_reads_it(fast_smollm, as_rank, tmp_path):
    model, tokenizer = fast_smollm
    path = tmp_path / "doc.safetensors"
    as_rank("tensor", 1, 2)
    cache_document(model, tokenizer, "The deposit is 300 euros.", path, kv={"kv_bits": 4}, progress=None)
    own = tmp_path / "doc.rank1-of-2.safetensors"
    assert own.is_file() and not path.exists() and rank_path(path, model) == str(own)
    _, meta = load_prompt_cache(str(own), return_metadata=True)
    assert (meta["rank"], meta["world_size"], meta["sharding"]) == ("1", "2", "tensor")
    assert meta["fingerprint"] == model_fingerprint(model)
    cache, _ = load_document_cache(path, model)
    assert cache[0].offset > 0
    as_rank("pipeline", 1, 2)  # same file name, another split
    with pytest.raises(ValueError, match=r"rank 1 of 2 \(tensor parallel\), but this is rank 1 of 2 \(pipeline"):
        load_document_cache(path, model)
    as_rank("tensor", 1, 4)
    with pytest.raises(ValueError, match=r"reads doc.rank1-of-4.safetensors, which does not exist; found doc.rank1-of-2"):
        load_document_cache(path, model)
    as_rank("none", 0, 1)
    with pytest.raises(ValueError, match="this run \\(a single process\\) reads doc.safetensors"):
        load_document_cache(path, model)


def test_a_single_process_file_is_refused_by_a_rank(fast_smollm, as_rank, tmp_path):
    model, tokenizer = fast_smollm
    path = tmp_path / "one.safetensors"
    cache_document(model, tokenizer, "The deposit is 300 euros.", path, kv={"kv_bits": 4}, progress=None)
    # a rank's file name holding a single process's cache
    as_rank("tensor", 0, 2)
    shutil.copy(path, rank_path(path, model))
    with pytest.raises(ValueError, match=r"holds the cache of a single process, but this is rank 0 of 2"):
        load_document_cache(path, model)
    as_rank("tensor", 1, 2)
    with pytest.raises(FileNotFoundError, match="this rank reads"):
        load_document_cache(tmp_path / "none.safetensors", model)
