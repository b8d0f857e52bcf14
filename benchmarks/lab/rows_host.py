"""Host time of a batched decode step through ``RowsKVCache`` (the server's batch cache):
building the step's graph (the model call, no evaluation) and the whole step, median ms,
for B rows of a random-weight llama of SmolLM2-135M's shape, against mlx-lm's fp16
``BatchKVCache``. On a GPU the kernels run; ``--stand-in`` (any device) runs the GPU path's
Python with a launcher that returns zeros, so that the CPU shows what a GPU host spends.

    python3 benchmarks/lab/rows_host.py --rows 0,1,16 [--stand-in] [--profile]
    python3 benchmarks/lab/rows_host.py --rows 16 --joins 8 [--stand-in]

``--joins N``: N requests join the running batch one at a time (a prefilled row ``extend``ed
into it, as ``BatchGenerator`` does), one decode step between joins: the median of a join plus
the step after it, and of the steps between.

``--rows 0``: one sequence in the single-row caches (mlx-kvq's ``QuantizedKVCache``, mlx-lm's
``KVCache``), as ``mlx_kvq.generate`` decodes.
"""

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

if not __package__:  # after $PYTHONPATH: another copy of the package can be timed
    sys.path.append(str(Path(__file__).resolve().parents[2]))

import mlx_kvq  # noqa: E402,F401  (OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402
from mlx_lm.models import cache as lm_cache  # noqa: E402
from mlx_lm.models import llama  # noqa: E402

from mlx_kvq.bridge import make_prompt_cache  # noqa: E402
from mlx_kvq.cache import RowsKVCache  # noqa: E402
from mlx_kvq.kernels import backend, decode, selfcheck  # noqa: E402


class StandIn:
    """A launcher whose outputs are zeros of the kernel's output shapes."""

    backend = "cuda"
    fused_merge = True

    def __call__(self, name, inputs, template, grid, threadgroup, shapes, dtypes):
        return [mx.zeros(s, d) for s, d in zip(shapes, dtypes)]


def stand_in():
    """Kernels on ``StandIn``, every configuration passing its self-check once, as on a GPU."""
    ok = lambda launch, family, config, check: selfcheck._RESULTS.setdefault((launch, family, config), {"ok": True})
    selfcheck.record = ok
    selfcheck.applies = decode.applies = lambda launch: True
    backend.use_launcher(StandIn())


def model_of_smollm2_shape(layers):
    m = llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=576, num_hidden_layers=layers, intermediate_size=1536,
        num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, vocab_size=49152,
        rope_theta=100000.0, tie_word_embeddings=True))
    m.set_dtype(mx.float16 if mx.default_device() == mx.gpu else mx.float32)
    mx.eval(m.parameters())
    return m


def batch(model, B, prompt, kvq):
    """B rows merged into the batch cache; B = 0: one row in the single-row cache."""
    rows = []
    for b in range(max(B, 1)):
        c = make_prompt_cache(model, 4) if kvq else lm_cache.make_prompt_cache(model)
        model(mx.random.randint(0, 1000, (1, prompt + 7 * b)), cache=c)
        mx.eval([x.state for x in c])
        rows.append(c)
    if B == 0:
        return rows[0]
    merge = RowsKVCache.merge if kvq else lambda cs: type(cs[0]).merge(cs)
    return [merge([r[i] for r in rows]) for i in range(len(rows[0]))]


def steps(model, cache, B, n, profile=False):
    y = mx.zeros((max(B, 1), 1), mx.int32)
    builds, totals = [], []
    pr = cProfile.Profile() if profile else None
    for _ in range(n):
        t0 = time.perf_counter()
        if pr:
            pr.enable()
        out = model(y, cache=cache)
        if pr:
            pr.disable()
        t1 = time.perf_counter()
        mx.eval(out, [c.state for c in cache])
        totals.append(time.perf_counter() - t0)
        builds.append(t1 - t0)
    if pr:
        pstats.Stats(pr).sort_stats("tottime").print_stats("mlx_kvq", 30)
    return statistics.median(builds[2:]) * 1e3, statistics.median(totals[2:]) * 1e3


def joins(model, cache, B, n, prompt, kvq):
    """Median ms of a join (``extend`` of one prefilled row, then the next decode step) and of
    a decode step between joins, over ``n`` joins into ``B`` running rows."""
    joined, between = [], []
    state = lambda: [c.state for c in cache]
    for i in range(n):
        t0 = time.perf_counter()
        mx.eval(model(mx.zeros((B + i, 1), mx.int32), cache=cache), state())
        between.append(time.perf_counter() - t0)
        new = batch(model, 1, prompt + 3 * i, kvq)
        mx.eval([c.state for c in new])
        t0 = time.perf_counter()
        for c, nc in zip(cache, new):
            c.extend(nc)
        mx.eval(model(mx.zeros((B + i + 1, 1), mx.int32), cache=cache), state())
        joined.append(time.perf_counter() - t0)
    return statistics.median(joined) * 1e3, statistics.median(between[1:]) * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="0,1,16")
    p.add_argument("--prompt", type=int, default=300)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--stand-in", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--joins", type=int, default=0, help="requests joining the batch one at a time")
    a = p.parse_args(argv)
    if a.stand_in:
        stand_in()
    model = model_of_smollm2_shape(a.layers)
    print(f"# mlx_kvq from {Path(mlx_kvq.__file__).parent}; {mx.default_device()}{' (stand-in launcher)' if a.stand_in else ''}, {a.layers} layers, "
          f"prompts {a.prompt}+7b, median of {a.steps - 2} decode steps (ms)")
    if a.joins:
        print("| rows | fp16 join + step | fp16 step | kvq-4 join + step | kvq-4 step |")
        for B in (int(x) for x in a.rows.split(",")):
            fp = joins(model, batch(model, B, a.prompt, False), B, a.joins, a.prompt, False)
            kv = joins(model, batch(model, B, a.prompt, True), B, a.joins, a.prompt, True)
            print(f"| {B}+{a.joins} | {fp[0]:.1f} | {fp[1]:.1f} | {kv[0]:.1f} | {kv[1]:.1f} |", flush=True)
        return
    print("| rows | fp16 build | fp16 step | kvq-4 build | kvq-4 step | kvq-4 build per row-layer (us) |")
    for B in (int(x) for x in a.rows.split(",")):
        fb, fs = steps(model, batch(model, B, a.prompt, False), B, a.steps)
        kb, ks = steps(model, batch(model, B, a.prompt, True), B, a.steps, a.profile)
        row = f"| {B or 'single'} | {fb:.2f} | {fs:.2f} | {kb:.2f} | {ks:.2f} | {(kb - fb) * 1e3 / (max(B, 1) * a.layers):.1f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
