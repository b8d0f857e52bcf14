"""Decode ms/token of the embedded model (float32 weights) with and without the float16
overflow check a float32 model's cache makes per update (QuantizedKVCache._widen).

    python3 benchmarks/lab/f32_overflow_check.py
"""
import time, mlx.core as mx
import mlx_kvq
from mlx_kvq.models.gguf import load_gguf
from mlx_kvq.models import default_model_path, to_fp32
from mlx_kvq import format as fmt
model, tok = load_gguf(default_model_path()); model = to_fp32(model)
real = fmt.overflows
prompt = mx.array(tok.encode("The quick brown fox jumps over the lazy dog. " * 4))[None]
def run(check):
    fmt.overflows = real if check else (lambda xs, d: False)
    cache = mlx_kvq.make_prompt_cache(model, kv_bits=4)
    logits = model(prompt, cache=cache); mx.eval(logits)
    y = mx.argmax(logits[:, -1:], axis=-1)
    t0 = time.perf_counter()
    for _ in range(16):
        logits = model(y, cache=cache)
        y = mx.argmax(logits[:, -1:], axis=-1)
        mx.eval(y)
    return (time.perf_counter() - t0) / 16 * 1e3
print("loaded", flush=True)
res = {True: [], False: []}
for i in range(3):
    for c in (False, True):
        res[c].append(run(c))
for c in (False, True):
    print("check" if c else "no check", "ms/token min %.2f median %.2f" % (min(res[c]), sorted(res[c])[len(res[c])//2]), [round(x,1) for x in res[c]])
