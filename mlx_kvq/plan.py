"""``mlx_kvq.plan``: how long a context fits in memory, for fp16 and quantized KV caches.

    mlx_kvq.plan                                   # the embedded model, this machine's RAM
    mlx_kvq.plan --model mlx-community/Llama-3.2-3B-Instruct-4bit --memory 16GB
    mlx_kvq.plan --model model.gguf --context 32768

Weights count too: their bytes come from the model's .safetensors/.gguf file sizes when
the files are at hand, else from a parameter count estimated from the config. KV bytes
per token come from ``mlx_kvq.quant.bytes_per_token`` with the cache defaults (group
size 64, the sinks and recent window kept in fp16; see ``mlx_kvq.cache.default_options``).
"""

import argparse
import json
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from . import quant
from .cache import default_options

BITS = [None, 8, 4, 3, 2]  # None: fp16

EXAMPLES = """examples:
  mlx_kvq.plan                                       # embedded SmolLM2, this machine's RAM
  mlx_kvq.plan --model mlx-community/Llama-3.2-3B-Instruct-4bit --memory 16GB
  mlx_kvq.plan --model ~/models/gemma-3-4b-it --context 65536
  mlx_kvq.plan --model model.gguf --memory 8GB --plot memory.png
"""


@dataclass
class ModelSpec:
    """What the plan needs to know about a model."""

    name: str
    config: dict
    weight_bytes: int
    weights_from: str  # "files" or "parameter count"


# -- reading configs ------------------------------------------------------------
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_gguf_metadata(path):
    """The key/value metadata of a GGUF file (tensors are not read)."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file.")
        version, _, n_kv = struct.unpack("<IQQ", f.read(20))
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is too old.")

        def string():
            (n,) = struct.unpack("<Q", f.read(8))
            return f.read(n).decode("utf-8", errors="replace")

        def value(t):
            if t in GGUF_SCALARS:
                fmt = "<" + GGUF_SCALARS[t]
                return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
            if t == 8:
                return string()
            if t == 9:
                sub, n = struct.unpack("<IQ", f.read(12))
                return [value(sub) for _ in range(n)]
            raise ValueError(f"{path}: unknown GGUF value type {t}.")

        meta = {}
        for _ in range(n_kv):
            key = string()
            (t,) = struct.unpack("<I", f.read(4))
            meta[key] = value(t)
    return meta


def gguf_config(meta):
    """An HF-style config dict from GGUF metadata."""
    arch = meta.get("general.architecture", "llama")
    get = lambda k, d=None: meta.get(f"{arch}.{k}", d)
    heads = get("attention.head_count")
    hidden = get("embedding_length")
    if heads is None or hidden is None:
        raise ValueError("The GGUF metadata lacks the attention head count or embedding length.")
    return {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length", hidden // heads),
        "v_head_dim": get("attention.value_length", None),
        "max_position_embeddings": get("context_length"),
        "sliding_window": get("attention.sliding_window"),
    }


def _fetch_config(repo):
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo, "config.json")
    except Exception as e:
        raise RuntimeError(
            f"Could not get config.json of {repo!r} from the Hugging Face Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Check the repo "
            "name and your network, or pass a local model directory, config.json or .gguf file."
        ) from None


def load_spec(model=None):
    """A ``ModelSpec`` from a .gguf file, a directory, a config.json, or a Hub repo id."""
    if model is None:
        from .models import EMBEDDED_MODEL, default_model_path

        path, name = default_model_path(), EMBEDDED_MODEL
    else:
        path, name = Path(model).expanduser(), str(model)
    if path.is_dir():
        if (path / "config.json").is_file():
            config = _read_json(path / "config.json")
            files = list(path.glob("*.safetensors"))
            return _spec(name, config, sum(f.stat().st_size for f in files))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ValueError(f"{path} holds no config.json and {len(ggufs)} .gguf files; pass one.")
        path = ggufs[0]
    if path.is_file():
        if path.suffix == ".json":
            files = list(path.parent.glob("*.safetensors"))
            return _spec(name, _read_json(path), sum(f.stat().st_size for f in files))
        return _spec(name, gguf_config(read_gguf_metadata(path)), path.stat().st_size)
    if str(model).startswith((".", "/", "~")) or str(model).endswith((".gguf", ".json")):
        raise FileNotFoundError(f"Model path not found: {model}")
    return _spec(name, _read_json(_fetch_config(str(model))), 0)


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"Cannot read {path}: {e}") from None


def _spec(name, config, weight_bytes):
    config = config.get("text_config", config) | {
        k: v for k, v in config.items() if k == "quantization"
    }
    for key in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
        if not isinstance(config.get(key), int):
            raise ValueError(f"The config of {name} has no {key}: not a transformer config this tool knows.")
    if weight_bytes:
        return ModelSpec(name, config, weight_bytes, "files")
    return ModelSpec(name, config, estimate_weight_bytes(config), "parameter count")


# -- sizes ------------------------------------------------------------------------
def head_dims(config):
    heads = config["num_attention_heads"]
    k = config.get("head_dim") or config["hidden_size"] // heads
    return k, config.get("v_head_dim") or k


def layer_windows(config):
    """Per layer: None for full attention, or the sliding window it keeps at most."""
    n = config["num_hidden_layers"]
    window = config.get("sliding_window")
    types = config.get("layer_types")
    if isinstance(types, list) and len(types) == n and window:
        return [window if t == "sliding_attention" else None for t in types]
    pattern = config.get("sliding_window_pattern")
    if pattern and window:
        return [None if (i + 1) % pattern == 0 else window for i in range(n)]
    return [None] * n


def estimate_weight_bytes(config):
    """Bytes of the weights from a parameter count estimated from the config."""
    h, n = config["hidden_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    dk, dv = head_dims(config)
    ffn = config.get("intermediate_size") or 4 * h
    vocab = config.get("vocab_size") or 32000
    experts = config.get("num_local_experts") or config.get("num_experts") or 1
    layer = h * (heads * dk + kv * (dk + dv)) + heads * dv * h + 3 * h * ffn * experts
    params = n * layer + vocab * h * (1 if config.get("tie_word_embeddings", True) else 2)
    q = config.get("quantization") or {}
    if q.get("bits"):
        per = q["bits"] / 8 + 4 / q.get("group_size", 64)
    else:
        per = {"float32": 4}.get(config.get("torch_dtype"), 2)
    return int(params * per)


def kv_bytes(config, tokens, bits=None, group_size=None):
    """KV cache bytes for ``tokens`` tokens with ``bits`` (None: fp16) and the cache defaults."""
    kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    dk, dv = head_dims(config)
    fp16 = lambda n: n * kv * 2 * (dk + dv)
    total = 0
    for window in layer_windows(config):
        n = tokens if window is None else min(tokens, window)
        if bits is None:
            total += fp16(n)
            continue
        opts = default_options(bits, bits)
        g = group_size or opts["group_size"]
        dense = min(n, opts["sinks"] + opts["window"])
        pad = lambda d: -(-d // g) * g
        packed = quant.bytes_per_token(pad(dk), bits, g) + quant.bytes_per_token(pad(dv), bits, g)
        total += fp16(dense) + (n - dense) * kv * packed
    return total


def max_context(config, budget, bits=None):
    """The most tokens whose KV cache fits in ``budget`` bytes (binary search)."""
    if kv_bytes(config, 1, bits) > budget:
        return 0
    lo, hi = 1, 1
    while kv_bytes(config, hi, bits) <= budget and hi < 1 << 40:
        lo, hi = hi, hi * 2
    if hi >= 1 << 40:
        return hi  # only sliding-window layers: any length fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if kv_bytes(config, mid, bits) <= budget else (lo, mid)
    return lo


def machine_memory():
    """This machine's RAM in bytes (Linux and macOS)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_size(text):
    """'16GB', '512MiB', '8e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 16GB, 512MiB)")
    scale = 1024 if m.group(3) and m.group(3).lower() == "ib" else 1000
    power = "KMGT".index(m.group(2).upper()) + 1 if m.group(2) else 0
    return int(float(m.group(1)) * scale**power)


def label(bits):
    return "fp16" if bits is None else f"{bits}-bit"


def plan(spec, memory=None, context=None, reserve=0):
    """Rows per cache config: bytes/token, longest context that fits, memory at ``context``."""
    memory = machine_memory() if memory is None else memory
    budget = memory - spec.weight_bytes - reserve
    limit = spec.config.get("max_position_embeddings")
    rows = []
    for bits in BITS:
        row = {"cache": label(bits), "bits": bits}
        row["bytes_per_token"] = kv_bytes(spec.config, 100_000, bits) / 100_000
        row["max_context"] = max_context(spec.config, budget, bits) if budget > 0 else 0
        row["usable_context"] = min(row["max_context"], limit) if limit else row["max_context"]
        if context:
            row["kv_bytes"] = kv_bytes(spec.config, context, bits)
            row["total_bytes"] = row["kv_bytes"] + spec.weight_bytes
            row["fits"] = row["total_bytes"] + reserve <= memory
        rows.append(row)
    return rows


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
                f"{r['cache']:<6} {r['bytes_per_token'] / 1024:>8.1f}KB {gb(r['kv_bytes']):>16} "
                f"{gb(r['total_bytes']):>14}  {'yes' if r['fits'] else 'no'}"
            )
    else:
        lines.append(f"{'cache':<6} {'KV/token':>10} {'longest context':>16} {'usable (model max)':>19}")
        for r in rows:
            lines.append(
                f"{r['cache']:<6} {r['bytes_per_token'] / 1024:>8.1f}KB {r['max_context']:>16,} "
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
    p = argparse.ArgumentParser(
        prog="mlx_kvq.plan",
        description="The longest context that fits in memory for fp16, 8, 4, 3 and 2-bit KV caches "
        "(weights included), or the memory a given context takes.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="model directory, config.json, .gguf file or Hugging Face repo (default: embedded SmolLM2)")
    p.add_argument("--memory", type=parse_size, help="memory budget, e.g. 16GB (default: this machine's RAM)")
    p.add_argument("--reserve", type=parse_size, default=0, help="memory kept for everything else, e.g. 2GB (default: 0)")
    p.add_argument("--context", type=int, help="report the memory this many tokens take instead")
    p.add_argument("--plot", metavar="PNG", help="also plot memory against context to this PNG file")
    return p


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    try:
        if args.context is not None and args.context < 1:
            raise ValueError("--context must be at least 1.")
        spec = load_spec(args.model)
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
