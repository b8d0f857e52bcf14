"""Where a continuous batch's greedy tokens leave the same request's run alone, per cache
config (the configs of tests/cache/test_rows_cache.py, plus mlx-lm's own fp16 caches), and
the alone run's top-1 minus top-2 log-probability at that step: a near tie means the batched
model's other matmuls (M = rows, not 1) rounded differently, not that the cache differs.

    python3 benchmarks/lab/rows_gpu_divergence.py
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests" / "cache")]
sys.path.append(str(ROOT))  # after $PYTHONPATH: another copy of the package can be checked

import mlx_kvq  # noqa: E402,F401
import mlx.core as mx  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache as mlx_lm_cache  # noqa: E402

from mlx_kvq.bridge import make_prompt_cache, serve_caches  # noqa: E402
from mlx_kvq.cache import QuantizedKVCache  # noqa: E402
from test_rows_cache import KV, joining_and_leaving, prompt, tiny_model  # noqa: E402


def alone(model, tokens, n, kv, step):
    cache = make_prompt_cache(model, **kv) if kv is not None else mlx_lm_cache(model)
    out = list(generate_step(mx.array(tokens), model, max_tokens=n, prompt_cache=cache, prefill_step_size=step))
    return [t for t, _ in out], [lp for _, lp in out]


def main():
    print("device", mx.default_device(), "mlx", mx.__version__)
    n, step = QuantizedKVCache.flush_block + 10, 16
    prompts = [prompt(k, s) for s, k in enumerate([45, 9, 70, 33, 52])]
    for name, kv in list(KV.items()) + [("mlx-lm fp16", None)]:
        model = tiny_model()
        if kv is not None:
            serve_caches(model, **kv)
        rows = joining_and_leaving(model, prompts, n, step)[1]
        for i, (p, toks) in enumerate(zip(prompts, rows)):
            if toks is None:
                continue
            ref, lps = alone(model, p, n, kv, step)
            j = next((k for k, (a, b) in enumerate(zip(toks, ref)) if a != b), None)
            if j is None:
                print(f"{name:14s} row {i}: equal ({len(ref)} tokens)")
                continue
            top = mx.sort(lps[j].astype(mx.float32))[-2:].tolist()
            print(f"{name:14s} row {i}: differs from token {j} of {len(ref)}; alone there: top-1 minus top-2 "
                  f"log-prob {top[1] - top[0]:.2e}")


if __name__ == "__main__":
    main()
