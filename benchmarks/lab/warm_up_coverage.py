"""Which kernel variants the server's first requests launch that ``serving.warm_up`` did not:
a recording launcher (no GPU needed; it returns zeros) notes every (kernel, template, input
dtypes) the warm-up launches, then a load like ``bench_server.py``'s (``--clients`` prompts of
``--tokens``, ``--batch`` prefilled together, the rest joining, ``--new`` tokens each) through
mlx-lm's ``BatchGenerator``, and prints the load's variants the warm-up missed. Each variant is a
compile (CUDA's JIT, a Metal pipeline) in the first request's time. A random model of
SmolLM2-135M's attention shape (9 heads, 3 KV heads of dim 64), ``--layers`` layers.

    MLX_KVQ_NUM_CU=132 python3 benchmarks/lab/warm_up_coverage.py --clients 16 --tokens 2048
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if not __package__:
    sys.path[:0] = [str(ROOT)]

import mlx_kvq  # noqa: E402,F401  (OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402

from mlx_kvq import kernels  # noqa: E402
from mlx_kvq.bridge import mlx_lm_batch_generator, serve_caches  # noqa: E402
from mlx_kvq.generation import serving  # noqa: E402


class Recording:
    def __init__(self, backend):
        self.seen = {}
        self.backend = backend  # the decode body and merge of this backend's launcher
        self.fused_merge = backend == "cuda" and kernels.backend.FUSED_MERGE

    def __call__(self, name, inputs, template, grid, threadgroup, shapes, dtypes):
        key = (name, tuple((k, str(v)) for k, v in template), tuple(str(x.dtype) for x in inputs))
        self.seen.setdefault(key, grid)
        return [mx.zeros(s, d) for s, d in zip(shapes, dtypes)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8, help="prompt concurrency")
    p.add_argument("--rows", type=int, default=32, help="decode concurrency")
    p.add_argument("--new", type=int, default=8)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--backend", default="cuda", choices=("cuda", "metal"))
    p.add_argument("--all", action="store_true", help="print every variant launched")
    a = p.parse_args(argv)
    from mlx_lm.models import llama
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=576, num_hidden_layers=a.layers, intermediate_size=64,
        num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, vocab_size=512,
        rope_theta=100000.0, tie_word_embeddings=True))
    mx.eval(model.parameters())
    serve_caches(model)
    warm, load = Recording(a.backend), Recording(a.backend)
    kernels.use_launcher(warm)
    serving.warm_up(model, prompts=a.batch, rows=a.rows)
    kernels.use_launcher(load)
    gen = mlx_lm_batch_generator()(model, prefill_batch_size=a.batch, prefill_step_size=2048,
                                   completion_batch_size=a.rows)
    prompts = mx.random.randint(0, 512, (a.clients, a.tokens)).tolist()
    gen.insert(prompts[: a.batch], max_tokens=[a.new] * a.batch)
    gen.next_generated()
    gen.insert(prompts[a.batch:], max_tokens=[a.new] * (a.clients - a.batch))
    done = 0
    while done < a.clients:
        done += sum(r.finish_reason is not None for r in gen.next_generated())
    gen.close()
    if a.all:
        for what, rec in (("warm-up", warm), ("load", load)):
            for name, template, dtypes in rec.seen:
                print(f"{what}: {name} {dtypes} {dict(template)}")
    missed = [k for k in load.seen if k not in warm.seen]
    print(f"warm-up: {len(warm.seen)} variants; load: {len(load.seen)}; missed by the warm-up: {len(missed)}")
    for name, template, dtypes in missed:
        near = [t for n, t, _ in warm.seen if n == name]
        diff = ""
        if near:  # the template entries that differ from the closest warmed variant
            best = min(near, key=lambda t: sum(x != y for x, y in zip(t, template)))
            diff = ", ".join(f"{k}={v} (warm {dict(best).get(k)})" for k, v in template if dict(best).get(k) != v)
        print(f"  {name} {dtypes}: {diff or dict(template)}")


if __name__ == "__main__":
    main()
