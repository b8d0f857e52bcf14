"""Diagnostic for the open 8-bit peak-memory question (BENCHMARKS.md, end to end): prefill a
32k prompt through a 4-layer Llama-3-8B-shaped model and print, per cache config, how much
the first layer packed, its window, the peak above the weights and the KV bytes.
Not yet run on a GPU (no device time was left).

    python3 benchmarks/diag_peak.py
"""
import sys, os, time
sys.path.insert(0, "benchmarks")
import mlx.core as mx
import mlx_kvq
from bench_generate import random_model, LLAMA3_8B
from mlx_lm.generate import generate_step
import mlx.nn as nn
model = random_model(layers=4)
weights = sum(v.nbytes for _, v in nn.utils.tree_flatten(model.parameters()))
for name, kw in [("kvq-8", dict(kv_bits=8)), ("kvq-8 rkv s4", dict(kv_bits=8, rotate="kv", sinks=4)), ("kvq-4", dict(kv_bits=4)), ("kvq-8 no-qa", dict(kv_bits=8))]:
    if name.endswith("no-qa"):
        from mlx_kvq import kernels
        kernels.quantize_supported = lambda *a: False
    cache = mlx_kvq.make_prompt_cache(model, kv_group_size=64, **kw)
    prompt = mx.random.randint(0, LLAMA3_8B["vocab_size"], (32768,))
    mx.synchronize(); mx.clear_cache(); mx.reset_peak_memory()
    t0 = time.perf_counter()
    steps = generate_step(prompt, model, prompt_cache=cache, prefill_step_size=2048)
    next(steps)
    t1 = time.perf_counter()
    c = cache[0]
    print(name, "prefill s %.2f" % (t1 - t0), "n_packed", c.n_packed, "window", c._wn, "buf", None if c._wk is None else c._wk.shape,
          "peak-w GiB %.2f" % ((mx.get_peak_memory() - weights) / 2**30), "kv GiB %.3f" % (sum(x.nbytes for x in cache) / 2**30), flush=True)
