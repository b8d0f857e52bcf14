"""A prompt batch's first chunk attended in one call (``attention.rows.fresh_rows``) against row
by row, alternated in one process after the server's warm-up: mlx-lm's ``BatchGenerator`` as
``server_prefill.py`` runs it (a random-weight llama of SmolLM2-135M's shape, the generator in a
thread), the first 8 rows' first tokens and the whole run, median seconds:

    python3 benchmarks/lab/rows_one_call.py --runs 4 --vary 0,40
"""

import argparse
import statistics
import sys
import threading
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2]))
sys.path.append(str(Path(__file__).resolve().parent))

import mlx_kvq  # noqa: E402,F401
import mlx.core as mx  # noqa: E402

from mlx_kvq.attention import rows  # noqa: E402
from mlx_kvq.bridge import serve_caches  # noqa: E402
from mlx_kvq.generation import serving  # noqa: E402
from server_prefill import random_model, run  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vary", default="0", help="comma-separated: prompt i is tokens - (i * 7) %% (vary + 1) long")
    a = p.parse_args(argv)
    a.batch, a.step, a.new, a.profile = 8, 2048, 32, False
    model = random_model()
    serve_caches(model)
    print(f"warm-up {serving.warm_up(model)} s", flush=True)
    for vary in map(int, a.vary.split(",")):
        compare(model, a, vary)


def compare(model, a, vary):
    mx.random.seed(0)
    prompts = mx.random.randint(100, 40000, (a.prompts, a.tokens)).tolist()
    prompts = [q[: a.tokens - (i * 7) % (vary + 1)] for i, q in enumerate(prompts)]
    one_call = rows.one_call_prefill
    times = {"one call": [], "row by row": []}

    def go(name):
        rows.one_call_prefill = one_call if name == "one call" else (lambda L: False)
        out = {}

        def gen():
            out.update(run(model, prompts, a, mx.default_stream(mx.default_device())))
            mx.clear_streams()

        t = threading.Thread(target=gen)
        t.start()
        t.join()
        times[name].append((sorted(out["firsts"])[min(7, len(prompts) - 1)], out["wall"]))

    for name in times:  # one of each before timing
        go(name)
    for name in times:
        times[name].clear()
    for _ in range(a.runs):
        for name in times:
            go(name)
    for name, ts in times.items():
        firsts, walls = zip(*ts)
        print(f"vary {vary:3d}, {name:10s}: first 8 rows' first tokens {statistics.median(firsts):.3f} s "
              f"({', '.join(f'{x:.3f}' for x in firsts)}), run {statistics.median(walls):.3f} s "
              f"({', '.join(f'{x:.2f}' for x in walls)})", flush=True)


if __name__ == "__main__":
    main()
