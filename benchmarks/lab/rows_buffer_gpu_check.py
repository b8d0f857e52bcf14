"""The rows of float16 tiny models batched (mlx-lm's BatchGenerator, requests joining and
leaving) with the rows in one buffer and kept apart, against each request alone: the first
token that differs and the alone run's top-2 log-prob gap there (a near tie: < 0.1).

    python3 benchmarks/lab/rows_buffer_gpu_check.py minicpm3 deepseek_v3
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests" / "cache"), str(ROOT / "tests"), str(ROOT)]

import mlx.core as mx  # noqa: E402
from test_rows_cache import alone, batch_run  # noqa: E402

from mlx_kvq.cache import RowsBuffer  # noqa: E402


def run(name, apart):
    gather = RowsBuffer.gather
    if apart:
        RowsBuffer.gather = classmethod(lambda cls, rows: None)
    try:
        model, kv, prompts, got = batch_run(name, mx.float16)
        for i, (toks, p) in enumerate(zip(got, prompts)):
            if toks is None:
                continue
            ref, lps = alone(model, p, 12, kv, 16, logprobs=True)
            if toks == ref:
                print(f"{name} {'apart' if apart else 'buffer'} request {i}: equal")
                continue
            j = next(k for k, (a, b) in enumerate(zip(toks, ref)) if a != b)
            top = mx.sort(lps[j].astype(mx.float32))[-2:].tolist()
            print(f"{name} {'apart' if apart else 'buffer'} request {i}: differs at {j}, alone's top-2 gap {top[1] - top[0]:.3f}")
    finally:
        RowsBuffer.gather = gather


for name in sys.argv[1:]:
    for apart in (False, True):
        run(name, apart)
