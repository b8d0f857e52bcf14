"""Prompt processing as ``mlx_kvq.server`` runs it: mlx-lm's ``BatchGenerator`` over the
embedded model with mlx-kvq's 4-bit caches (``--fp16``: mlx-lm's), ``N`` prompts of ``T``
random tokens, ``--new`` tokens each; time to each first token, the median decode step and
peak memory, per ``prefill_batch_size`` (mlx-lm's ``--prompt-concurrency``) and
``prefill_step_size``. One config per process (peak RSS). Results:
``results/server_prefill_cpu.txt``, ``results/server_h200_16x2048.txt``.

    python3 benchmarks/lab/server_prefill.py --prompts 4 --tokens 2048 --batch 8 --step 2048
"""

import argparse
import resource
import sys
import time
from pathlib import Path

if not __package__:  # after $PYTHONPATH: another copy of the package can be timed
    sys.path.append(str(Path(__file__).resolve().parents[2]))

import mlx_kvq  # noqa: E402,F401  (OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402

from mlx_kvq.bridge import mlx_lm_batch_generator, serve_caches  # noqa: E402
from mlx_kvq.generation import serving  # noqa: E402
from mlx_kvq.models import default_model_path, load, prepare_model  # noqa: E402


def random_model():
    """A random-weight llama of SmolLM2-135M's shape (float32 on the CPU, float16 on GPUs)."""
    from mlx_lm.models import llama
    model = llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
        num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, vocab_size=49152,
        rope_theta=100000.0, tie_word_embeddings=True))
    model.set_dtype(mx.float32 if mx.default_device() == mx.cpu else mx.float16)
    mx.eval(model.parameters())
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8, help="prefill_batch_size")
    p.add_argument("--step", type=int, default=2048, help="prefill_step_size")
    p.add_argument("--fp16", action="store_true", help="mlx-lm's own caches")
    p.add_argument("--new", type=int, default=1, help="tokens generated per prompt")
    p.add_argument("--vary", type=int, default=0, help="prompt i is tokens - (i * 7) %% (vary + 1) long")
    p.add_argument("--profile", action="store_true", help="cProfile's top functions (cumulative)")
    p.add_argument("--thread", action="store_true",
                   help="the generator in a thread of its own, on that thread's stream (as the server runs it)")
    p.add_argument("--random", action="store_true",
                   help="a random-weight llama of SmolLM2-135M's shape instead of the embedded model")
    p.add_argument("--warm-up", action="store_true", help="serving.warm_up before the requests, as the server loads")
    p.add_argument("--skip", default="", help="lab only, to time what they cost (outputs may differ): "
                   "prefill-sync (the per-layer eval before a prefill chunk's attention), "
                   "widen (the float32 model's overflow check at each packing), "
                   "one-call-prefill (a prompt batch's first chunk attends row by row)")
    a = p.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))
    if "prefill-sync" in skip:
        from mlx_kvq.attention import prefill
        prefill.eval_now = lambda *x: None
    if "widen" in skip:
        from mlx_kvq.cache.quantized import QuantizedKVCache
        QuantizedKVCache._widen = lambda self, keys, values: None
    if "one-call-prefill" in skip:
        from mlx_kvq.attention import rows
        rows.one_call_prefill = lambda L: False
    if a.random:
        model = random_model()
    else:
        model, _ = load(default_model_path())
        prepare_model(model)  # float32 weights on the CPU, as the server loads them
    if not a.fp16:
        serve_caches(model)
        if a.warm_up:  # as the server does at load (serving.warm_up)
            print(f"warm-up: {serving.warm_up(model)} s, done at {time.time():.1f} (epoch)", flush=True)
    mx.random.seed(0)
    prompts = mx.random.randint(100, 40000, (a.prompts, a.tokens)).tolist()
    prompts = [p[: a.tokens - (i * 7) % (a.vary + 1)] for i, p in enumerate(prompts)]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {}
    if a.thread:
        import threading
        def generate():
            out.update(run(model, prompts, a, mx.default_stream(mx.default_device())))
            mx.clear_streams()  # MLX 0.32: a thread frees its streams itself, or the process aborts at exit

        t = threading.Thread(target=generate)
        t.start()
        t.join()
    else:
        out.update(run(model, prompts, a))
    wall, firsts, steps = out["wall"], out["firsts"], out["steps"]
    if steps:
        print(f"decode steps: median {1e3 * sorted(steps)[len(steps) // 2]:.1f} ms over {len(steps)}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{'fp16' if a.fp16 else 'kvq-4'}{' skip ' + a.skip if skip else ''} prompts {a.prompts}x{a.tokens} batch {a.batch} step {a.step}"
          f"{' (thread)' if a.thread else ''}: "
          f"{wall:.1f} s ({a.prompts * a.tokens / wall:.1f} prompt tok/s), first tokens at "
          f"{', '.join(f'{t:.2f}' for t in sorted(firsts))} s, MLX peak {mx.get_peak_memory() / 2**20:.0f} MiB, "
          f"RSS before {rss0:.0f} / peak {rss:.0f} MiB; package {Path(mlx_kvq.__file__).parent}", flush=True)


def run(model, prompts, a, stream=None):
    """Insert ``prompts`` and generate until each is done: wall time, first-token times, decode steps."""
    kw = {} if stream is None else {"stream": stream}
    gen = mlx_lm_batch_generator()(model, max_tokens=a.new, prefill_batch_size=a.batch,
                                   prefill_step_size=a.step, completion_batch_size=32, **kw)
    mx.reset_peak_memory()
    tic = time.perf_counter()
    if a.profile:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    gen.insert(prompts, max_tokens=[a.new] * len(prompts))
    firsts, done, steps, calls = [], 0, [], []
    while done < len(prompts):
        t = time.perf_counter()
        rs = gen.next_generated()
        calls.append((time.perf_counter() - t, len(rs), t - tic))
        done += sum(1 for r in rs if r.finish_reason)
        if len(firsts) < len(prompts):
            firsts.extend([time.perf_counter() - tic] * min(len(rs), len(prompts) - len(firsts)))
        else:
            steps.append(time.perf_counter() - t)
    wall = time.perf_counter() - tic
    if a.profile:
        prof.disable()
        import pstats
        pstats.Stats(prof).sort_stats("cumulative").print_stats(45)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    gen.close()
    slow = sorted(calls, reverse=True)[:6]
    print("slowest next_generated calls (s, responses, at s): "
          + ", ".join(f"{s:.3f} {n} @{at:.2f}" for s, n, at in slow), flush=True)
    return dict(wall=wall, firsts=firsts, steps=steps)


if __name__ == "__main__":
    main()
