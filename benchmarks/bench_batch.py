"""Many prompts at once: peak memory and KV bytes for fp16 vs 8/4/2-bit caches.

    python benchmarks/bench_batch.py                      # 200 prompts, then 64 at 4 bits vs fp16
    python benchmarks/bench_batch.py --prompts 50 --max-tokens 4 --configs fp16,4
    python benchmarks/bench_batch.py --check-prompts 0 --json batch.json   # rows also as JSON

Runs ``mlx_kvq.batch_generate`` on the embedded SmolLM2-135M-Instruct (weights
dequantized to float32 on the CPU, where quantized matmuls are slow; ``--dtype model``
keeps them). KV bytes are those of the tokens held (padding included, as in mlx-lm's
``BatchKVCache``) and those allocated; fp16 means mlx-lm's own batch cache. A float32
model stores keys, values and scales in float32: the "as fp16 model" columns count those
at 2 bytes, which is what the same run stores with a float16 model (packed words unchanged).
"""

import mlx_kvq  # noqa: F401  (OpenBLAS before mlx.core)

import argparse
import json
import os
import platform
import time

import mlx.core as mx

from mlx_kvq.batch import batch_generate
from mlx_kvq.cache_prompt import prepare_model
from mlx_kvq.models import load

DATA = os.path.join(os.path.dirname(mlx_kvq.__file__), "data", "persuasion.txt")


def make_prompts(n):
    """``n`` questions about sentences of *Persuasion*, of varied lengths."""
    text = open(DATA).read().split("Chapter 1", 1)[1]
    sentences = [s.strip().replace("\n", " ") for s in text.split(".") if 40 < len(s.strip()) < 300]
    asks = ["Summarize in five words:", "Who is this about?", "Rewrite simply:", "What happens here?"]
    return [f"{asks[i % len(asks)]} {sentences[i]}." for i in range(n)]


def _size(arrays, as_fp16):
    """Bytes of ``arrays``; float32 ones counted at 2 bytes per element with ``as_fp16``."""
    half = lambda a: as_fp16 and a.dtype == mx.float32
    return sum(a.nbytes // 2 if half(a) else a.nbytes for a in arrays if a is not None)


def kv_bytes(caches, as_fp16=False):
    """``(used, allocated)`` bytes of a batch prompt cache.

    ``as_fp16``: what the same cache takes for a float16 model (float32 keys, values,
    scales and biases at half the bytes; packed words unchanged).
    """
    used = alloc = 0
    for c in caches:
        if hasattr(c, "cache"):  # BatchQuantizedKVCache
            q, n = c.cache, c.cache.n_packed
            sinks = [q.sink_keys, q.sink_values]
            packed = list(q.keys or ()) + list(q.values or ())
            used += _size(sinks + [q.window_keys, q.window_values] + [a[:, :, :n] for a in packed], as_fp16)
            # the window's buffers (spare room included): what ``nbytes`` counts beyond the rest
            window = q.nbytes - _size(sinks + packed, False)
            alloc += _size(sinks + packed, as_fp16) + (window // 2 if as_fp16 and q.dtype == mx.float32 else window)
        else:  # mlx-lm BatchKVCache
            used += _size([c.keys[..., : c.size(), :], c.values[..., : c.size(), :]], as_fp16)
            alloc += _size([c.keys, c.values], as_fp16)
    return used, alloc


def parse_config(spec):
    """'fp16', '4', or '2w0' (2 bits, recent window of 0 tokens) -> make_prompt_cache kwargs."""
    if spec == "fp16":
        return dict(kv_bits=None)
    bits, _, window = spec.partition("w")
    return dict(kv_bits=int(bits), window=int(window) if window else None)


def run(model, tokenizer, prompts, bits, max_tokens):
    kv = parse_config(bits)
    mx.clear_cache()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    r = batch_generate(model, tokenizer, prompts, max_tokens=max_tokens, **kv)
    used, alloc = kv_bytes(r.caches)
    used16, alloc16 = kv_bytes(r.caches, as_fp16=True)
    name = bits if bits == "fp16" else f"{bits.split('w')[0]}-bit" + (f" window {bits.split('w')[1]}" if "w" in bits else "")
    row = dict(
        cache=name, prompts=len(prompts), tokens=r.caches[0].size(), used=used, alloc=alloc,
        used16=used16, alloc16=alloc16,
        peak=mx.get_peak_memory(), seconds=time.perf_counter() - tic,
    )
    del r
    return row


def table(rows, weights, dtype):
    mib = lambda b: f"{b / 2**20:.1f}"
    base = {r["prompts"]: r for r in rows if r["cache"] == "fp16"}
    out = [
        f"| cache | prompts | positions | KV used MiB ({dtype} model) | KV used MiB as fp16 model "
        "| vs fp16 | KV allocated MiB as fp16 model | peak MiB | peak - weights MiB | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = base.get(r["prompts"])
        ratio = f"{r['used16'] / b['used16']:.3f}x" if b else "-"
        out.append(
            f"| {r['cache']} | {r['prompts']} | {r['tokens']} | {mib(r['used'])} | {mib(r['used16'])} | "
            f"{ratio} | {mib(r['alloc16'])} | {mib(r['peak'])} | {mib(r['peak'] - weights)} | {r['seconds']:.0f} |"
        )
    return "\n".join(out)


def json_rows(rows, weights, dtype):
    """The table's rows as dicts: raw bytes, ``vs_fp16`` (KV used as fp16 model) and the model's dtype."""
    base = {r["prompts"]: r for r in rows if r["cache"] == "fp16"}
    out = []
    for r in rows:
        b = base.get(r["prompts"])
        out.append(dict(r, vs_fp16=r["used16"] / b["used16"] if b else None,
                        peak_minus_weights=r["peak"] - weights, weights=weights, dtype=dtype))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--configs", default="fp16,8,4,2,2w0", help="fp16, bits, or bits + w + recent window (2w0)")
    p.add_argument("--check-prompts", type=int, default=64, help="prompts of the 4-bit vs fp16 check (0: skip)")
    p.add_argument("--dtype", choices=["auto", "model", "float32"], default="auto")
    p.add_argument("--json", metavar="PATH", help="also write the rows (a list of dicts, bytes and seconds) to PATH")
    args = p.parse_args()
    model, tokenizer = load(None)
    prepare_model(model, args.dtype)
    weights = sum(v.nbytes for _, v in __import__("mlx.utils").utils.tree_flatten(model.parameters()))
    print(f"device: {mx.default_device()} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores), weights {weights / 2**20:.1f} MiB")
    jobs = [(args.prompts, b) for b in args.configs.split(",")]
    jobs += [(args.check_prompts, b) for b in ("fp16", "4")] if args.check_prompts else []
    rows = []
    for n, b in jobs:
        rows.append(run(model, tokenizer, make_prompts(n), b, args.max_tokens))
        r = rows[-1]
        print(f"{r['cache']}, {n} prompts: KV {r['used16'] / 2**20:.1f} MiB (as fp16 model), "
              f"peak {r['peak'] / 2**20:.0f} MiB, {r['seconds']:.0f} s", flush=True)
    dtype = str(model.model.norm.weight.dtype).split(".")[-1]
    print(table(rows, weights, dtype))
    if args.check_prompts:
        fp16, q4 = rows[-2], rows[-1]
        print(f"{args.check_prompts} prompts, 4-bit KV / fp16 KV = {q4['used16'] / fp16['used16']:.3f} "
              f"as an fp16 model stores them, {q4['used'] / fp16['used']:.3f} in {dtype} "
              "(must be <= 0.35)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(json_rows(rows, weights, dtype), f, indent=1)


if __name__ == "__main__":
    main()
