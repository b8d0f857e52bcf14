"""Quantized caches under MLX's distributed generation: two ring processes on this
machine (``mlx.launch``), tensor and pipeline parallel, against the single-process run.

``mlx.launch`` exits 0 even when a rank fails, so each rank writes a result file and the
test requires every one of them.
"""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import distributed_rank as ranks  # noqa: E402

SCRIPT = Path(__file__).parent / "distributed_rank.py"
SPLITS = ("tensor/qwen2", "pipeline/qwen2")
N = 2


def free_ports(n):
    """A first port of ``n`` consecutive free ones (the ring backend listens on port + rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + n > 65535:
            continue
        try:
            held = []
            for p in range(first, first + n):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no free ports")


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
    # the configs differ: the tokens follow the cache
    assert single["kv8"]["tokens"] != single["kv4"]["tokens"]
