"""Many prompts at once: peak memory and KV bytes for fp16 vs 8/4/2-bit caches.

    python benchmarks/bench_batch.py                      # 200 prompts, then 64 at 4 bits vs fp16
    python benchmarks/bench_batch.py --prompts 50 --max-tokens 4 --configs fp16,4
    python benchmarks/bench_batch.py --check-prompts 0 --json batch.json   # rows also as JSON
    python benchmarks/bench_batch.py --prompts 64 --prompt-tokens 1024 --check-prompts 0  # long prompts
    python benchmarks/bench_batch.py --prompts 8 --prompt-tokens 256 --configs 4 --verify 8

Prompts: by default short questions about single sentences of *Persuasion* (~40-120
tokens with the chat template); with ``--prompt-tokens N`` each prompt is one of four
instructions followed by a different slice of N tokens of the novel (consecutive,
non-overlapping slices while the text lasts), so the prompt holds N tokens plus the
instruction and the chat template (re-encoding a slice may shift its length by a token or
two; the per-run line shows the range). ``--verify K`` runs the first K prompts of each
config alone (``mlx_lm.generate_step`` with the same cache config) and checks that their
greedy tokens equal the batch's.

Runs ``mlx_kvq.batch_generate`` on the embedded SmolLM2-135M-Instruct (weights
dequantized to float32 on the CPU, where quantized matmuls are slow; ``--dtype model``
keeps them). KV bytes are those of the tokens held (padding included, as in mlx-lm's
``BatchKVCache``) and those allocated; fp16 means mlx-lm's own batch cache. mlx-lm's cache
of a float32 model stores keys and values in float32: the "as fp16 model" columns count
float32 arrays at 2 bytes, which is what the same run stores with a float16 model (packed
words unchanged). The quantized cache keeps its window, sinks and scales in float16 for a
float32 model (``QuantizedKVCache.store_dtype``; float32 only once a value overflows float16),
so its two columns agree.
"""

import mlx_kvq  # noqa: F401  (OpenBLAS before mlx.core)

import argparse
import json
import os
import platform
import time

import mlx.core as mx

from mlx_kvq.cache import RowsKVCache
from mlx_kvq.generation import batch_generate
from mlx_kvq.models import prepare_model
from mlx_kvq.models import load

DATA = os.path.join(os.path.dirname(mlx_kvq.__file__), "data", "persuasion.txt")
ASKS = ["Summarize in five words:", "Who is this about?", "Rewrite simply:", "What happens here?"]


def make_prompts(n, tokenizer=None, prompt_tokens=None):
    """``n`` questions about *Persuasion*.

    Without ``prompt_tokens``: about single sentences, of varied lengths. With it: each
    about a different slice of ``prompt_tokens`` tokens of the novel (``tokenizer``'s
    tokens; consecutive slices, overlapping only when ``n`` of them do not fit).
    """
    text = open(DATA).read().split("Chapter 1", 1)[1]
    if not prompt_tokens:
        sentences = [s.strip().replace("\n", " ") for s in text.split(".") if 40 < len(s.strip()) < 300]
        return [f"{ASKS[i % len(ASKS)]} {sentences[i]}." for i in range(n)]
    ids = tokenizer.encode(text.strip())
    if prompt_tokens > len(ids):
        raise SystemExit(f"--prompt-tokens {prompt_tokens}: the text has only {len(ids)} tokens")
    stride = prompt_tokens if n * prompt_tokens <= len(ids) else (len(ids) - prompt_tokens) // max(n - 1, 1)
    if stride < 1:
        raise SystemExit(f"{n} prompts of {prompt_tokens} tokens: not enough text for distinct slices")
    chunks = [tokenizer.decode(ids[i * stride : i * stride + prompt_tokens]).strip() for i in range(n)]
    return [f"{ASKS[i % len(ASKS)]}\n\n{c}" for i, c in enumerate(chunks)]


def _size(arrays, as_fp16):
    """Bytes of ``arrays``; float32 ones counted at 2 bytes per element with ``as_fp16``."""
    half = lambda a: as_fp16 and a.dtype == mx.float32
    return sum(a.nbytes // 2 if half(a) else a.nbytes for a in arrays if a is not None)


def _arrays(x):
    """The arrays in a (nested) cache state."""
    if isinstance(x, mx.array):
        return [x]
    return [a for y in x for a in _arrays(y)] if isinstance(x, (tuple, list)) else []


def kv_bytes(caches):
    """``(used, allocated, used16, allocated16)`` bytes of a batch prompt cache; the last two:
    what the same cache takes for a float16 model (float32 keys, values, scales and biases at
    half the bytes; packed words unchanged)."""
    out = [0, 0, 0, 0]
    for c in caches:
        if isinstance(c, RowsKVCache):
            held = _arrays(c.state)  # in decode: the rows' shared buffer (before the rows leave it)
            used = []
            for r in c.rows:  # each row's own arrays (taken out of the buffer)
                n = r.n_packed
                used += [a[:, :, :n] for a in (r.packed_keys or ()) + (r.packed_values or ())]
                used += [r.sink_keys, r.sink_values, r.window_keys, r.window_values]
        else:  # mlx-lm BatchKVCache
            used = [c.keys[..., : c.size(), :], c.values[..., : c.size(), :]]
            held = [c.keys, c.values]
        for i, half in enumerate((False, True)):
            out[2 * i] += _size(used, half)
            out[2 * i + 1] += _size(held, half)
    return tuple(out)


def parse_config(spec):
    """'fp16', '4', or '2w0' (2 bits, recent window of 0 tokens) -> make_prompt_cache kwargs."""
    if spec == "fp16":
        return dict(kv_bits=None)
    bits, _, window = spec.partition("w")
    return dict(kv_bits=int(bits), window=int(window) if window else None)


def alone(model, tokenizer, prompt, max_tokens, **kv):
    """Greedy tokens of ``prompt`` run alone through mlx-lm (EOS and after dropped)."""
    from mlx_lm.generate import generate_step

    cache = mlx_kvq.make_prompt_cache(model, **kv)
    out = []
    for t, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens, prompt_cache=cache):
        t = t if isinstance(t, int) else t.item()
        if t in tokenizer.eos_token_ids:
            break
        out.append(t)
    return out


def run(model, tokenizer, prompts, bits, max_tokens, verify=0):
    from mlx_kvq.generation import encode_prompt

    kv = parse_config(bits)
    lengths = [len(encode_prompt(tokenizer, p)) for p in prompts]
    mx.clear_cache()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    r = batch_generate(model, tokenizer, prompts, max_tokens=max_tokens, **kv)
    used, alloc, used16, alloc16 = kv_bytes(r.caches)
    name = bits if bits == "fp16" else f"{bits.split('w')[0]}-bit" + (f" window {bits.split('w')[1]}" if "w" in bits else "")
    row = dict(
        cache=name, prompts=len(prompts), tokens=r.caches[0].size(), used=used, alloc=alloc,
        used16=used16, alloc16=alloc16,
        peak=mx.get_peak_memory(), seconds=time.perf_counter() - tic,
        prompt_tokens_min=min(lengths), prompt_tokens_max=max(lengths),
        new_tokens=sum(len(t) for t in r.token_ids),
    )
    token_ids = r.token_ids
    del r
    if verify:
        bad = [i for i, p in enumerate(prompts[:verify])
               if alone(model, tokenizer, encode_prompt(tokenizer, p), max_tokens, **kv) != token_ids[i]]
        row.update(verified=min(verify, len(prompts)), mismatches=bad)
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
    p.add_argument("--prompts", type=int, default=200, help="prompts generated at once (default: 200)")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens generated per prompt (default: 8)")
    p.add_argument("--configs", default="fp16,8,4,2,2w0", help="fp16, bits, or bits + w + recent window (2w0)")
    p.add_argument("--check-prompts", type=int, default=64, help="prompts of the 4-bit vs fp16 check (0: skip)")
    p.add_argument("--prompt-tokens", type=int, default=0, metavar="N",
                   help="prompts of N tokens of the novel plus an instruction (default 0: short sentences)")
    p.add_argument("--verify", type=int, default=0, metavar="K",
                   help="check the first K prompts of each config against running them alone")
    p.add_argument("--dtype", choices=["auto", "model", "float32"], default="auto", help="compute dtype (as the commands' --dtype)")
    p.add_argument("--json", metavar="PATH", help="also write the rows (a list of dicts, bytes and seconds) to PATH")
    args = p.parse_args()
    model, tokenizer = load(None)
    prepare_model(model, args.dtype)
    weights = sum(v.nbytes for _, v in __import__("mlx.utils").utils.tree_flatten(model.parameters()))
    print(f"device: {mx.default_device()} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores), weights {weights / 2**20:.1f} MiB")
    jobs = [(args.prompts, b) for b in args.configs.split(",")]
    jobs += [(args.check_prompts, b) for b in ("fp16", "4")] if args.check_prompts else []
    if args.prompt_tokens:
        print(f"prompts: {args.prompt_tokens} tokens of {os.path.basename(DATA)} each, plus an instruction")
    rows = []
    prompts = {}
    for n, b in jobs:
        if n not in prompts:
            prompts[n] = make_prompts(n, tokenizer, args.prompt_tokens)
        rows.append(run(model, tokenizer, prompts[n], b, args.max_tokens, args.verify))
        r = rows[-1]
        check = ""
        if args.verify:
            check = (f", {r['verified']} alone: " +
                     (f"MISMATCH {r['mismatches']}" if r["mismatches"] else "same tokens"))
        print(f"{r['cache']}, {n} prompts of {r['prompt_tokens_min']}-{r['prompt_tokens_max']} tokens: "
              f"KV {r['used16'] / 2**20:.1f} MiB (as fp16 model), "
              f"peak {r['peak'] / 2**20:.0f} MiB, {r['seconds']:.0f} s{check}", flush=True)
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
    if any(r.get("mismatches") for r in rows):
        raise SystemExit("batch outputs differ from running the prompts alone (see MISMATCH above)")


if __name__ == "__main__":
    main()
