"""``mlx_kvq.server`` under ``mlx.launch``: 2 ring processes on this machine serve a tiny
float32 qwen2 directory (random weights, the embedded model's tokenizer) split tensor or
pipeline parallel; rank 0 answers over HTTP, and its greedy completions equal
``stream_generate`` in one process with the same 4-bit cache. Rank 0's log gives both
ranks' prompt-cache bytes.

``mlx.launch`` exits 0 even when a rank fails: the test judges by the answers (rank 0
answers only when rank 1 runs the same forward passes) and the per-rank log line.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import mlx_kvq
from helpers import free_ports, tiny_qwen2_dir
from mlx_kvq.bridge import stream_generate
from mlx_kvq.cli.server import check_distributed, setup_arg_parser

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["The lighthouse keeper counted the ships", "Seven blue kites over the harbour"]
TOKENS = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm):
    return tiny_qwen2_dir(tmp_path_factory.mktemp("srv") / "qwen2", smollm[1])


@pytest.fixture(scope="module")
def single(model_dir):
    """``{prompt: (text, KiB)}``: each prompt's greedy completion in one process with a fresh
    4-bit cache (the server's default) and the bytes that cache uses at the end."""
    model, tokenizer = mlx_kvq.load(str(model_dir))
    out = {}
    for prompt in PROMPTS:
        cache = mlx_kvq.make_prompt_cache(model, kv_bits=4)
        text = "".join(r.text for r in stream_generate(model, tokenizer, tokenizer.encode(prompt),
                                                         max_tokens=TOKENS, prompt_cache=cache))
        out[prompt] = text, sum(c.used_nbytes() for c in cache) / 1024
    return out


def complete(port, prompt):
    body = json.dumps({"model": "default_model", "prompt": prompt, "max_tokens": TOKENS, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def healthy(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module", params=["tensor", "pipeline"])
def launched(request, model_dir):
    """``(http_port, log)``: 2 ring ranks serving ``model_dir`` split as the param says (rank
    0 on ``http_port``); ``log()`` is what the ranks have written so far."""
    if shutil.which("mlx.launch") is None:
        pytest.skip("mlx.launch is not installed")
    ring = free_ports(3)  # 3 consecutive free ports: the ring listens on 2, rank 0's HTTP on the third
    http = ring + 2
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    path = model_dir.parent / f"{request.param}.log"
    with open(path, "w") as out:
        proc = subprocess.Popen(
            ["timeout", "120", "mlx.launch", "-n", "2", "--backend", "ring", "--starting-port", str(ring),
             sys.executable, "-m", "mlx_kvq.cli.server", "--model", str(model_dir), "--port", str(http),
             "--log-level", "INFO", *(["--pipeline"] if request.param == "pipeline" else [])],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    log = path.read_text
    try:
        deadline = time.time() + 90
        while not healthy(http):
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"the 2-rank server did not start:\n{log()[-4000:]}")
            time.sleep(0.3)
        yield http, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def per_rank_lines(log, n):
    """The KiB of each rank in rank 0's first ``n`` prompt-cache lines (waiting for them)."""
    deadline = time.time() + 10
    while True:
        lines = re.findall(r"Prompt cache per rank: ([\d., ]+) KiB; total", log())
        if len(lines) >= n or time.time() > deadline:
            return [[float(x) for x in line.split(", ")] for line in lines]
        time.sleep(0.2)


def test_two_ranks_serve_the_single_process_completions(single, launched):
    """Over 2 ranks (tensor: 1 of the 2 KV heads each; pipeline: 2 of the 4 layers) every
    completion equals the single process's, the third from both ranks' prompt caches; each
    rank's prompt cache holds half the single-process bytes of the finished requests."""
    port, log = launched
    for prompt in PROMPTS + PROMPTS[:1]:
        r = complete(port, prompt)
        assert r["usage"]["completion_tokens"] == TOKENS, r
        assert r["choices"][0]["text"] == single[prompt][0], prompt
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    # rank 0 logs the line as a request starts: the bytes of the requests finished before it
    lines = per_rank_lines(log, 3)
    assert len(lines) == 3, log()[-4000:]
    assert lines[0] == [0.0, 0.0]
    finished = [single[PROMPTS[0]][1], single[PROMPTS[0]][1] + single[PROMPTS[1]][1]]
    for line, kib in zip(lines[1:], finished):
        assert all(abs(rank - kib / 2) <= 0.05 * kib / 2 for rank in line), (lines, finished)
    assert "ERROR" not in log(), log()[-4000:]


@pytest.mark.parametrize("argv, message", [
    (["--draft-model", "d"], "--draft-model does not run under mlx.launch"),
    (["--adapter-path", "a"], "--adapter-path does not run under mlx.launch"),
    (["--pipeline"], "the embedded model: GGUF models load as mlx-lm's llama, which has no pipeline split"),
])
def test_what_a_split_model_cannot_serve(argv, message):
    with pytest.raises(ValueError, match=message):
        check_distributed(setup_arg_parser().parse_args(argv))
    check_distributed(setup_arg_parser().parse_args([]))  # tensor parallel, the embedded model
