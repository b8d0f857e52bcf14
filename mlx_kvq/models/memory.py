"""How long a context fits in memory, for fp16 and quantized KV caches (``mlx_kvq.plan``).

Weights count too: their bytes come from the model's .safetensors/.gguf file sizes when
the files are at hand, else from a parameter count estimated from the config. KV bytes
per token come from ``mlx_kvq.format.bytes_per_token`` with the cache defaults (group
size 64, the sinks and recent window kept in fp16; see ``mlx_kvq.cache.default_options``).
"""

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .. import format
from ..cache import cache_options, default_options
from .embedded import EMBEDDED_MODEL, default_model_path
from .gguf import gguf_config, read_metadata

BITS = [None, 8, 4, 3, 2]  # None: fp16

@dataclass
class ModelSpec:
    """What the plan needs to know about a model."""

    name: str
    config: dict
    weight_bytes: int
    weights_from: str  # "files" or "parameter count"


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
        return _spec(name, gguf_config(read_metadata(path)), path.stat().st_size)
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


def parameter_count(config):
    """``(all, embeddings and head)``: parameter counts estimated from the config."""
    h, n = config["hidden_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    dk, dv = head_dims(config)
    ffn = config.get("intermediate_size") or 4 * h
    vocab = config.get("vocab_size") or 32000
    experts = config.get("num_local_experts") or config.get("num_experts") or 1
    layer = h * (heads * dk + kv * (dk + dv)) + heads * dv * h + 3 * h * ffn * experts
    embedding = vocab * h * (1 if config.get("tie_word_embeddings", True) else 2)
    return n * layer + embedding, embedding


def estimate_weight_bytes(config):
    """Bytes of the weights from a parameter count estimated from the config."""
    params = parameter_count(config)[0]
    q = config.get("quantization") or {}
    if q.get("bits"):
        per = q["bits"] / 8 + 4 / q.get("group_size", 64)
    else:
        per = {"float32": 4}.get(config.get("torch_dtype"), 2)
    return int(params * per)


def shard_spec(spec, ranks, shard="tensor"):
    """The ``ModelSpec`` of the largest share one of ``ranks`` processes holds under
    mlx-lm's split (``sharded_load``).

    tensor: every layer with ``1/ranks`` of the attention heads and KV heads (which
    ``ranks`` must divide) and of the layers' weights; pipeline: the layers of the rank
    with the most KV bytes (the low ranks get the extra layers). Both keep the embeddings
    and the head whole on every rank.
    """
    if shard not in ("tensor", "pipeline"):
        raise ValueError(f"shard must be tensor or pipeline, got {shard!r}.")
    if not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"ranks must be a whole number of at least 1, got {ranks!r}.")
    config = dict(spec.config)
    layers = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    dk, dv = head_dims(config)
    config.update(head_dim=dk, v_head_dim=dv)
    params, embedding = parameter_count(config)
    embed = spec.weight_bytes * embedding / params
    if shard == "tensor":
        if heads % ranks or kv % ranks:
            raise ValueError(f"{spec.name} has {heads} attention heads and {kv} KV heads: tensor parallel "
                             f"over {ranks} ranks needs both divisible by {ranks}.")
        config.update(num_attention_heads=heads // ranks, num_key_value_heads=kv // ranks)
        share = 1 / ranks
    else:
        if ranks > layers:
            raise ValueError(f"{spec.name} has {layers} layers: it cannot be split over {ranks} ranks.")
        windows = layer_windows(config)
        base, extra = divmod(layers, ranks)
        sizes = [base + (r < extra) for r in range(ranks)]
        ends = [sum(sizes[r:]) for r in range(ranks)]  # rank r holds the layers before ends[r]
        parts = [windows[e - k:e] for e, k in zip(ends, sizes)]
        full = lambda part: (sum(w is None for w in part), len(part), sum(w or 0 for w in part))
        mine = max(parts, key=full)
        config.update(num_hidden_layers=len(mine), layer_types=[
            "full_attention" if w is None else "sliding_attention" for w in mine])
        config.pop("sliding_window_pattern", None)
        share = len(mine) / layers
    weights = int(embed + (spec.weight_bytes - embed) * share)
    return ModelSpec(f"{spec.name} (largest share of {ranks} ranks, {shard} parallel)", config, weights,
                     spec.weights_from)


def kv_bytes(config, tokens, bits=None, group_size=None, dense_bytes=2, **kv):
    """KV cache bytes of one sequence of ``tokens`` tokens: unquantized where ``bits`` and
    ``kv`` ask for no quantization, else ``bits`` with ``make_prompt_cache``'s other KV options
    ``kv`` (``k_bits``, ``v_bits``, ``mode``, ``sinks``, ``window``, ``quantized_kv_start``,
    ``max_kv_size``; the cache's defaults where not given). Unquantized tokens take
    ``dense_bytes`` per element (the model's dtype: 2, or 4 for a float32 model). An
    unquantized start counts while it lasts: the result is the most the cache holds on the
    way to ``tokens``."""
    kv = {k: v for k, v in kv.items() if v is not None}
    size = kv.pop("max_kv_size", None)
    kv.pop("kv_bits", None)
    opts = cache_options(bits, kv_group_size=group_size, **kv)
    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    dk, dv = head_dims(config)
    unquantized = lambda n: n * heads * dense_bytes * (dk + dv)
    if opts is not None:
        kb, vb, mode = opts["k_bits"] or opts["bits"], opts["v_bits"] or opts["bits"], opts["mode"]
        dflt = default_options(kb, vb, mode)
        g = opts["group_size"] or dflt["group_size"] or format.default_group_size(mode)
        dense_max = sum(dflt[k] if opts[k] is None else opts[k] for k in ("sinks", "window"))
        pad = lambda d: -(-d // g) * g
        packed = heads * (format.bytes_per_token(pad(dk), kb, g, mode) + format.bytes_per_token(pad(dv), vb, g, mode))
    total = 0
    for window in layer_windows(config):
        n = tokens if window is None else min(tokens, window)
        n = n if size is None else min(n, size)
        if opts is None:
            total += unquantized(n)
            continue
        dense = min(n, dense_max)
        total += max(unquantized(dense) + (n - dense) * packed, unquantized(min(n, opts["start"] or 0)))
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
    """'16GB', '512MiB', '8e9B' -> bytes. The unit is required (a bare '16' is an error,
    not 16 bytes); GB is 10^9 bytes, GiB 2^30."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?B)\s*", str(text), re.I)
    if not m:
        hint = f" (did you mean {text}GB or {text}GiB?)" if re.fullmatch(r"\s*[0-9.]+\s*", str(text)) else ""
        raise ValueError(f"not a memory size with a unit: {text!r}{hint}; e.g. 16GB, 512MiB")
    try:
        value = float(m.group(1))
    except ValueError:
        raise ValueError(f"not a memory size: {text!r} (e.g. 16GB, 512MiB)") from None
    if not 0 <= value < 1e30:
        raise ValueError(f"a memory size must be finite and not negative, got {text!r}")
    if m.group(3).lower() == "ib" and not m.group(2):
        raise ValueError(f"not a memory size: {text!r} (e.g. 16GB, 512MiB)")
    scale = 1024 if m.group(3).lower() == "ib" else 1000
    power = "KMGT".index(m.group(2).upper()) + 1 if m.group(2) else 0
    return int(value * scale**power)


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
