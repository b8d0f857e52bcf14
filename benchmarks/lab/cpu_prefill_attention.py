"""Where a prompt's prefill goes on the CPU: one random prompt through the embedded model
(float32 weights) with the 4-bit cache, in steps; the total, the time inside the cache's
attention (each call synced before and after) and the minor page faults, per run:

    python3 benchmarks/lab/cpu_prefill_attention.py --tokens 2048 --step 512 [--streams 1] [--mlx-ops]
        [--block-elements 1048576 --block-keys 512 --cache-mib 256]
"""

import argparse
import resource
import time

import mlx_kvq  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx

import mlx_kvq.bridge as bridge
from mlx_kvq.cache import KVView
from mlx_kvq.kernels import cpu
from mlx_kvq.models import default_model_path, load, prepare_model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048, help="prompt tokens (default: 2048)")
    p.add_argument("--step", type=int, default=512, help="prefill step (default: 512)")
    p.add_argument("--runs", type=int, default=3, help="runs after one warm-up (default: 3)")
    p.add_argument("--streams", type=int,
                   help="CPU streams for the attention (default: the package's, one per core up to 4)")
    p.add_argument("--block-elements", type=int, help="attention.reference.BLOCK_ELEMENTS (a power of 2)")
    p.add_argument("--block-keys", type=int, help="attention.reference.BLOCK_KEYS")
    p.add_argument("--cache-mib", type=int, help="MLX's buffer cache limit (mx.set_cache_limit), MiB")
    p.add_argument("--cpu", action="store_true", help="on the CPU device (a machine with a GPU)")
    p.add_argument("--random", action="store_true", help="a random-weight model of SmolLM2's shape")
    p.add_argument("--mlx-ops", action="store_true", help="the attention through MLX ops (the CPU body off)")
    a = p.parse_args(argv)
    if a.mlx_ops:
        cpu.applies = lambda *x, **y: False
    if a.cpu:
        mx.set_default_device(mx.cpu)
    from mlx_kvq.attention import reference, streams
    reference.BLOCK_ELEMENTS = a.block_elements or reference.BLOCK_ELEMENTS
    reference.BLOCK_KEYS = a.block_keys or reference.BLOCK_KEYS
    if a.cache_mib is not None:
        streams._cache_checked.append(True)
        mx.set_cache_limit(a.cache_mib << 20)
    if a.streams:
        streams.MAX_STREAMS = a.streams
    if a.random:
        from server_prefill import random_model
        model = random_model()
    else:
        model, _ = load(default_model_path())
        prepare_model(model)
    mx.random.seed(0)
    prompt = mx.random.randint(0, 49000, (1, a.tokens))
    attend, spent = bridge.ROUTES[KVView], [0.0]

    def timed(q, view, **kw):
        mx.eval(q)
        t = time.perf_counter()
        out = attend(q, view, **kw)
        mx.eval(out)
        spent[0] += time.perf_counter() - t
        return out

    bridge.ROUTES[KVView] = timed
    print(f"package: {mlx_kvq.__file__}")
    for run in range(a.runs + 1):
        cache = bridge.make_prompt_cache(model, kv_bits=4)
        spent[0], faults = 0.0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        for i in range(0, a.tokens, a.step):
            model(prompt[:, i : i + a.step], cache=cache)
            mx.eval([c.state for c in cache])
        total = time.perf_counter() - t
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        print(f"{'warm-up' if run == 0 else f'run {run}':8s} total {total:6.2f} s  attention {spent[0]:6.2f} s  "
              f"page faults {faults}", flush=True)


if __name__ == "__main__":
    main()
