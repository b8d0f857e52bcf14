"""Where a decode step's time goes: one Llama-3-8B-shaped attention layer (4-bit weights)
over a filled cache, per cache config.

For each config it times, median over ``--steps`` decode steps after warm-up:
  host   building the step's graph (Python + MLX op construction, nothing evaluated)
  step   building and evaluating it (``mx.eval``, synchronous)
  update the cache's ``update_and_fetch`` of one token, evaluated
  sdpa   the attention alone over the filled cache (fp16: ``mx.fast.scaled_dot_product_attention``)
A decode step of the whole model costs about layers x max(host, GPU time) since
mlx-lm overlaps graph building with the GPU (``generate_step`` uses ``async_eval``).

    python3 benchmarks/lab/profile_decode_step.py --context 32768
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: bench_generate

import mlx.core as mx  # noqa: E402
from mlx_lm.models import cache as lm_cache  # noqa: E402

import mlx_kvq  # noqa: E402
from mlx_kvq.attention import quantized_sdpa  # noqa: E402
from bench_generate import random_model  # noqa: E402

CONFIGS = {
    "fp16": None,
    "kvq-8": dict(kv_bits=8),
    "kvq-4": dict(kv_bits=4),
    "kvq-4-norot": dict(kv_bits=4, rotate=False),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--configs", default=",".join(CONFIGS))
    args = p.parse_args(argv)
    mx.random.seed(0)
    model = random_model(layers=1)
    attn = model.layers[0].self_attn
    print(f"device: {mx.default_device()}  mlx {mx.__version__}  context {args.context}", flush=True)
    print(f"{'config':12} {'host ms':>8} {'step ms':>8} {'update ms':>9} {'sdpa ms':>9}")
    for name in args.configs.split(","):
        kw = CONFIGS[name]
        cache = lm_cache.make_prompt_cache(model) if kw is None else mlx_kvq.make_prompt_cache(model, **kw)
        c = cache[0]
        H, D = attn.n_kv_heads, attn.head_dim
        k = mx.random.normal((1, H, args.context, D)).astype(mx.float16)
        c.update_and_fetch(k, k * 0.5)
        mx.eval(c.state)
        x = mx.random.normal((1, 1, 4096)).astype(mx.float16)
        host, step = [], []
        for i in range(args.steps + 10):
            t0 = time.perf_counter()
            y = attn(x, mask=None, cache=c)
            t1 = time.perf_counter()
            mx.eval(y, c.state)
            t2 = time.perf_counter()
            if i >= 10:
                host.append(t1 - t0)
                step.append(t2 - t0)
        med = lambda t: statistics.median(t) * 1e3
        q = mx.random.normal((1, attn.n_heads, 1, D)).astype(mx.float16)
        parts = {"update": [], "sdpa": []}
        for i in range(args.steps + 10):
            t0 = time.perf_counter()
            view, _ = c.update_and_fetch(k[:, :, :1], k[:, :, :1])
            mx.eval(c.state)
            t1 = time.perf_counter()
            if kw is None:
                y = mx.fast.scaled_dot_product_attention(q, *view_kv(c), scale=D**-0.5)
            else:
                y = quantized_sdpa(q, view, scale=D**-0.5)
            mx.eval(y)
            t2 = time.perf_counter()
            if i >= 10:
                parts["update"].append(t1 - t0)
                parts["sdpa"].append(t2 - t1)
        print(f"{name:12} {med(host):8.3f} {med(step):8.3f} {med(parts['update']):9.3f} {med(parts['sdpa']):9.3f}",
              flush=True)


def view_kv(c):
    return c.keys[:, :, : c.offset], c.values[:, :, : c.offset]


if __name__ == "__main__":
    main()
