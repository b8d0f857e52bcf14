"""``mlx_kvq.plan``: how long a context fits in memory, for fp16 and quantized KV caches.

    mlx_kvq.plan                                   # the embedded model, this machine's RAM
    mlx_kvq.plan --model mlx-community/Llama-3.2-3B-Instruct-4bit --memory 16GB
    mlx_kvq.plan --model model.gguf --context 32768
    mlx_kvq.plan --model DIR --ranks 2 --shard pipeline   # per Mac, the model split over 2 (mlx.launch)
"""

import sys

from ..models.memory import (BITS, kv_bytes, label, load_spec, machine_memory, max_context, plan,
                             shard_spec)
from .args import command_parser, memory_size, ranged

EXAMPLES = """examples:
  mlx_kvq.plan                                       # embedded SmolLM2, this machine's RAM
  mlx_kvq.plan --model mlx-community/Llama-3.2-3B-Instruct-4bit --memory 16GB
  mlx_kvq.plan --model ~/models/gemma-3-4b-it --context 65536
  mlx_kvq.plan --model model.gguf --memory 8GB --plot memory.png
  mlx_kvq.plan --model ~/models/Qwen2.5-72B-Instruct-4bit --ranks 4 --shard tensor --memory 64GB
"""




def format_table(spec, rows, memory, context=None, reserve=0):
    gb = lambda b: f"{b / 1e9:.2f} GB"
    limit = spec.config.get("max_position_embeddings")
    lines = [
        f"model: {spec.name}",
        f"weights: {gb(spec.weight_bytes)} (from {spec.weights_from}); memory budget: {gb(memory)}"
        + (f", {gb(reserve)} reserved" if reserve else "")
        + (f"; model context: {limit} tokens" if limit else ""),
    ]
    if context:
        lines.append(f"{'cache':<6} {'KV/token':>10} {'KV at ' + str(context):>16} {'with weights':>14}  fits")
        for r in rows:
            lines.append(
                f"{r['cache']:<6} {r['bytes_per_token'] / 1e3:>8.1f}kB {gb(r['kv_bytes']):>16} "
                f"{gb(r['total_bytes']):>14}  {'yes' if r['fits'] else 'no'}"
            )
    else:
        lines.append(f"{'cache':<6} {'KV/token':>10} {'longest context':>16} {'usable (model max)':>19}")
        for r in rows:
            lines.append(
                f"{r['cache']:<6} {r['bytes_per_token'] / 1e3:>8.1f}kB {r['max_context']:>16,} "
                f"{r['usable_context']:>19,}"
            )
    return "\n".join(lines)


def write_plot(path, spec, memory, reserve=0):
    """Memory (weights + KV) against context for each cache config, with the budget."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install matplotlib") from None
    limit = spec.config.get("max_position_embeddings") or 131072
    top = max(limit, max_context(spec.config, max(1, memory - spec.weight_bytes - reserve), 2))
    xs = [int(top * i / 200) for i in range(1, 201)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for bits in BITS:
        ax.plot(xs, [(spec.weight_bytes + kv_bytes(spec.config, x, bits)) / 1e9 for x in xs], label=label(bits))
    ax.axhline((memory - reserve) / 1e9, color="k", ls="--", label="budget")
    if spec.config.get("max_position_embeddings"):
        ax.axvline(limit, color="gray", ls=":", label="model context")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("weights + KV cache (GB)")
    ax.set_title(spec.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def setup_arg_parser():
    p = command_parser("mlx_kvq.plan", "The longest context that fits in memory for fp16, 8, 4, 3 and 2-bit KV caches "
        "(weights included), or the memory a given context takes.", EXAMPLES)
    p.add_argument("--model", help="model directory, config.json, .gguf file or Hugging Face repo (default: embedded SmolLM2)")
    p.add_argument("--memory", type=memory_size, help="memory budget with its unit: 16GB (10^9 bytes) or 16GiB (2^30) (default: this machine's RAM)")
    p.add_argument("--reserve", type=memory_size(0), default=0, help="memory kept for everything else, e.g. 2GB (default: 0)")
    p.add_argument("--context", type=ranged(int, 1), help="report the memory this many tokens take instead")
    p.add_argument("--plot", metavar="PNG", help="also plot memory against context to this PNG file")
    p.add_argument("--ranks", type=ranged(int, 1), default=1,
                   help="processes (Macs) the model is split over with mlx.launch: the plan is per rank, "
                   "--memory each one's (default: 1)")
    p.add_argument("--shard", choices=["tensor", "pipeline"], default="tensor",
                   help="how --ranks split the model: tensor (each rank a share of every layer's heads, the "
                   "default) or pipeline (each rank a slice of the layers)")
    return p


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    try:
        spec = load_spec(args.model)
        if args.ranks > 1:
            spec = shard_spec(spec, args.ranks, args.shard)
        memory = args.memory or machine_memory()
        rows = plan(spec, memory, args.context, args.reserve)
        print(format_table(spec, rows, memory, args.context, args.reserve))
        if args.plot:
            write_plot(args.plot, spec, memory, args.reserve)
            print(f"plot written to {args.plot}")
    except (ValueError, FileNotFoundError, RuntimeError, ImportError, OSError) as e:
        sys.exit(f"mlx_kvq.plan: error: {e}")


if __name__ == "__main__":
    main()
