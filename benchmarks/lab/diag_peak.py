"""Diagnostic for the 8-bit peak-memory question (BENCHMARKS.md, end to end): prefill a
32k prompt through a 4-layer Llama-3-8B-shaped model chunk by chunk and print, per cache
config, the peak above the weights of each chunk (and of the last step's logits).

    python3 benchmarks/lab/diag_peak.py [LAYERS [CONFIG-NAME-PREFIX]]
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: bench_generate
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

import mlx_kvq  # noqa: E402
from bench_generate import LLAMA3_8B, random_model  # noqa: E402

CONFIGS = [
    ("fp16", None),
    ("8 rot=- s0", dict(kv_bits=8)),
    ("8 rot=- s4", dict(kv_bits=8, sinks=4)),
    ("8 rot=kv s0", dict(kv_bits=8, rotate="kv")),
    ("4 rot=kv s4", dict(kv_bits=4)),
    ("4 rot=- s0", dict(kv_bits=4, rotate=False, sinks=0)),
]
model = random_model(layers=int(sys.argv[1]) if len(sys.argv) > 1 else 4)
weights = sum(v.nbytes for _, v in nn.utils.tree_flatten(model.parameters()))
prompt = mx.random.randint(0, LLAMA3_8B["vocab_size"], (32768,))
only = sys.argv[2] if len(sys.argv) > 2 else ""
for name, kw in CONFIGS:
    if not name.startswith(only):
        continue
    cache = (mlx_kvq.make_prompt_cache(model, kv_bits=None) if kw is None
             else mlx_kvq.make_prompt_cache(model, kv_group_size=64, **kw))
    mx.synchronize()
    mx.clear_cache()
    peaks = []
    t0 = time.perf_counter()
    for a in range(0, 32768 - 2048, 2048):
        mx.reset_peak_memory()
        model(prompt[a : a + 2048][None], cache=cache)
        mx.eval([c.state for c in cache])
        peaks.append((mx.get_peak_memory() - weights) / 2**30)
    mx.reset_peak_memory()
    logits = model(prompt[-2048:][None], cache=cache)[:, -1]
    mx.eval(logits)
    last = (mx.get_peak_memory() - weights) / 2**30
    kv = sum(c.nbytes for c in cache) / 2**30
    window = sum(c._wk.nbytes + c._wv.nbytes for c in cache if getattr(c, "_wk", None) is not None) / 2**30
    print(f"{name:12} {time.perf_counter() - t0:6.1f} s  chunk peaks GiB "
          + " ".join(f"{p:.2f}" for p in peaks) + f"  last {last:.2f}  kv {kv:.3f} (of which window buffers {window:.3f})", flush=True)
