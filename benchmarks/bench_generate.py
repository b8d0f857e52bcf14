"""End-to-end generate with a Llama-3-8B-shaped random-weight model (4-bit weights), or a
real model (``--model embedded`` or a path/repo: ``mlx_kvq.load``, float32 weights on the CPU).

For each KV config: prefill a long prompt in chunks through mlx-lm's ``generate_step``, then
decode greedily. Reports prefill tokens/s, decode tokens/s (median step after warm-up), peak
memory above the weights, and KV bytes. Run on a GPU:

    python benchmarks/bench_generate.py --context 32768 --new 64 --json out.json --plot out.png
    mlx_kvq.bench generate --context 32768 --new 64      # the same, installed

``--json`` writes ``{"meta": {command, device, versions, date}, "rows": [one per config]}``;
``--plot`` a PNG of the ``--plot-y`` columns per config (default: the memory columns).

Configs: ``fp16`` (mlx-lm KVCache), ``mlx-lm-8``/``mlx-lm-4`` (mlx-lm's QuantizedKVCache via
``kv_bits``), ``kvq-8``/``kvq-4``/... (mlx_kvq). A config that fails is reported, not fatal.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__:  # mlx_kvq.benchmarks.bench_generate (python -m mlx_kvq.bench generate)
    from .report import plot, require_matplotlib, write_json
else:  # python3 benchmarks/bench_generate.py: the repository's mlx_kvq, and report.py beside this
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from report import plot, require_matplotlib, write_json

import mlx_kvq  # noqa: E402  (OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models import cache as lm_cache  # noqa: E402
from mlx_lm.models import llama  # noqa: E402

LLAMA3_8B = dict(
    model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
    num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, vocab_size=128256,
    rope_theta=500000.0, tie_word_embeddings=False,
)


def random_model(layers=None):
    """Llama-3-8B shape, random weights, 4-bit group-64 weights, fp16 activations."""
    args = dict(LLAMA3_8B)
    if layers:
        args["num_hidden_layers"] = layers
    model = llama.Model(llama.ModelArgs(**args))
    model.set_dtype(mx.float16)
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    return model


def make_cache(model, name):
    """(cache, extra generate_step kwargs) for a config name."""
    if name == "fp16":
        return lm_cache.make_prompt_cache(model), {}
    if name.startswith("mlx-lm-"):
        return lm_cache.make_prompt_cache(model), dict(kv_bits=int(name[7:]), kv_group_size=64, quantized_kv_start=0)
    if name.startswith("kvq-"):
        return mlx_kvq.make_prompt_cache(model, kv_bits=int(name[4:]), kv_group_size=64), {}
    raise ValueError(f"unknown config {name!r}")


def run(model, name, context, new, chunk):
    cache, extra = make_cache(model, name)
    prompt = mx.random.randint(0, model.args.vocab_size, (context,))
    weights = sum(v.nbytes for _, v in nn.utils.tree_flatten(model.parameters()))
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    steps = generate_step(prompt, model, prompt_cache=cache, prefill_step_size=chunk, **extra)
    next(steps)
    t1 = time.perf_counter()
    times = []
    for _ in range(new - 1):
        a = time.perf_counter()
        next(steps)
        times.append(time.perf_counter() - a)
    decode = statistics.median(times[3:] if len(times) > 8 else times)
    kv = sum(c.nbytes for c in cache)
    return dict(
        config=name, context=context, new_tokens=new,
        prefill_tok_s=context / (t1 - t0), decode_tok_s=1 / decode,
        peak_above_weights_gib=(mx.get_peak_memory() - weights) / 2**30,
        kv_gib=kv / 2**30,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=32768, help="prompt tokens (default: 32768)")
    p.add_argument("--new", type=int, default=64, help="tokens decoded after the prompt (default: 64)")
    p.add_argument("--chunk", type=int, default=2048, help="prefill step in tokens (default: 2048)")
    p.add_argument("--layers", type=int, help="fewer layers for a quick run")
    p.add_argument("--model", help="'embedded' (SmolLM2-135M) or a model path/repo instead of the random 8B shape")
    p.add_argument("--configs", default="fp16,mlx-lm-8,mlx-lm-4,kvq-8,kvq-4",
                   help="comma list: fp16, mlx-lm-<bits> (mlx-lm's cache), kvq-<bits> (default: %(default)s)")
    p.add_argument("--json", metavar="PATH", help="write the rows and the run's meta data here")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of the --plot-y columns per config here")
    p.add_argument("--plot-y", default="peak_above_weights_gib,kv_gib",
                   help="columns to plot (default: %(default)s; also prefill_tok_s, decode_tok_s)")
    args = p.parse_args(argv)
    if args.plot:
        require_matplotlib()
    mx.random.seed(0)
    if args.model:
        model, _ = mlx_kvq.load(None if args.model == "embedded" else args.model)
        mlx_kvq.models.prepare_model(model)  # float32 weights on the CPU
    else:
        model = random_model(args.layers)
    print(f"device: {mx.default_device()}  mlx {mx.__version__}", flush=True)
    rows = []
    for name in args.configs.split(","):
        try:
            rows.append(run(model, name, args.context, args.new, args.chunk))
        except Exception as e:  # mlx-lm's quantized path crashes on CUDA: report it
            rows.append(dict(config=name, error=f"{type(e).__name__}: {str(e)[:200]}"))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        write_json(rows, args.json, dict(args=vars(args)))
    print(f"\n{'config':10} {'prefill tok/s':>14} {'decode tok/s':>13} {'peak-weights GiB':>17} {'KV GiB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['config']:10} failed: {r['error']}")
        else:
            print(f"{r['config']:10} {r['prefill_tok_s']:14.1f} {r['decode_tok_s']:13.1f} "
                  f"{r['peak_above_weights_gib']:17.2f} {r['kv_gib']:8.2f}")
    if args.plot:
        ys = args.plot_y.split(",")
        units = {"GiB" if y.endswith("_gib") else "tokens/s" if y.endswith("_tok_s") else y for y in ys}
        unit = units.pop() if len(units) == 1 else None
        layers = args.layers or LLAMA3_8B["num_hidden_layers"]
        shape = args.model or f"{layers}-layer Llama-3-8B shape"
        plot(rows, "config", ys, args.plot, f"generate, {args.context}-token prompt, {shape}", ylabel=unit)


if __name__ == "__main__":
    main()
