"""Where a run of prompt batches spends its time: mlx-lm's ``BatchGenerator`` as the server
runs it (a random-weight llama of SmolLM2-135M's shape), each ``next()`` call synced and
timed, with the time inside ``PromptProcessingBatch.prompt`` / ``.generate`` and the cache's
``finalize`` apart; prompts of equal length (``--vary 0``) against different lengths (a
right-padded prompt batch). ``--fp16``: mlx-lm's own caches, to tell the cache's part from
mlx-lm's.

    python3 benchmarks/lab/prompt_batch_timeline.py --prompts 16 --tokens 2048 --vary 0,40
"""

import argparse
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

if not __package__:
    sys.path.append(str(Path(__file__).resolve().parents[2]))
    sys.path.append(str(Path(__file__).resolve().parent))

import mlx_kvq  # noqa: E402,F401  (OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402
import importlib  # noqa: E402

from mlx_kvq.bridge import mlx_lm_batch_generator, serve_caches  # noqa: E402
from mlx_kvq.generation import serving  # noqa: E402
from server_prefill import random_model  # noqa: E402

mlx_gen = importlib.import_module("mlx_lm.generate")  # the module: the package exports a function of its name

SPENT = defaultdict(float)


SYNC = [True]


def sync():
    if SYNC[0]:
        mx.synchronize()


def timed(owner, name, label):
    """``owner.name`` synced before and after (unless ``--no-sync``: host time only), its time
    added to ``SPENT[label]``."""
    f = getattr(owner, name)

    def wrapper(*args, **kw):
        sync()
        t = time.perf_counter()
        out = f(*args, **kw)
        sync()
        SPENT[label] += time.perf_counter() - t
        return out

    setattr(owner, name, wrapper)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--new", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--step", type=int, default=2048)
    p.add_argument("--vary", default="0,40")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--no-sync", action="store_true", help="no syncs between calls, as the server runs")
    a = p.parse_args(argv)
    SYNC[0] = not a.no_sync
    model = random_model()
    if not a.fp16:
        serve_caches(model)
        print(f"warm-up {serving.warm_up(model)} s", flush=True)
    timed(mlx_gen.PromptProcessingBatch, "prompt", "prompt()")
    timed(mlx_gen.PromptProcessingBatch, "generate", "generate()")
    timed(mlx_gen.GenerationBatch, "next", "decode next()")
    for run in range(a.runs + 1):
        for vary in map(int, a.vary.split(",")):
            out = {}
            th = threading.Thread(target=lambda: out.update(go(model, a, vary)))
            th.start()
            th.join()
            if run:
                report(a, vary, out)


def go(model, a, vary):
    mx.random.seed(0)
    prompts = mx.random.randint(100, 40000, (a.prompts, a.tokens)).tolist()
    prompts = [q[: a.tokens - (i * 7) % (vary + 1)] for i, q in enumerate(prompts)]
    gen = mlx_lm_batch_generator()(model, max_tokens=a.new, prefill_batch_size=a.batch,
                                   prefill_step_size=a.step, completion_batch_size=32,
                                   stream=mx.default_stream(mx.default_device()))
    SPENT.clear()
    calls, done = [], 0
    tic = time.perf_counter()
    gen.insert(prompts, max_tokens=[a.new] * len(prompts))
    while done < len(prompts):
        t = time.perf_counter()
        before = dict(SPENT)
        pr, rs = gen.next()
        sync()
        done += sum(1 for r in rs if r.finish_reason)
        parts = {k: v - before.get(k, 0.0) for k, v in SPENT.items() if v - before.get(k, 0.0) > 1e-3}
        calls.append((t - tic, time.perf_counter() - t, len(pr), len(rs), parts))
    wall = time.perf_counter() - tic
    gen.close()
    mx.clear_streams()
    return dict(calls=calls, wall=wall, spent=dict(SPENT))


def report(a, vary, out):
    print(f"--- {'fp16' if a.fp16 else 'kvq-4'} vary {vary}: run {out['wall']:.3f} s; "
          + ", ".join(f"{k} {v:.3f}" for k, v in out["spent"].items()), flush=True)
    for at, dt, npr, nrs, parts in out["calls"]:
        if dt > 0.02:
            print(f"  @{at:6.3f} {dt:6.3f} s  prompt responses {npr:2d} decode responses {nrs:2d}  "
                  + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()), flush=True)


if __name__ == "__main__":
    main()
