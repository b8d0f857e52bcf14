"""Experiments behind the default cache config of each bit width.

Simulates the options of ``mlx_kvq.QuantizedKVCache`` with a fake-quantizing cache
(``SimCache``): it stores what the real cache would hold and returns the
dequantized keys/values to mlx-lm's ordinary attention, so any combination of
rotation, sinks, recent window, group size, key/value bits, per-channel keys and
the microscaling modes can be tried without writing its kernel first.

Usage (the tuning text is Northanger Abbey; the report text, Persuasion, is never
used here)::

    python benchmarks/fidelity_experiments.py --list
    python benchmarks/fidelity_experiments.py --groups 4bit 3bit --out results.jsonl

What a query sees (``--semantics``):

* ``decode`` (default): exactly what each token sees when it is generated one at
  a time: its own key and the ``window`` keys before it unquantized, the sinks
  unquantized, every other key quantized (per-channel keys: also the keys of the
  block not yet complete). Done with a patched attention that picks, per query and
  key, the fp or the fake-quantized score, so a 512-token chunk costs one pass.
* ``strict``: every token outside the sinks and the last ``window`` tokens of the
  cache is quantized, the current chunk's own tokens included: what mlx-lm's
  QuantizedKVCache does in a chunked prefill (the issue's baseline numbers).
* ``fresh``: the current chunk stays unquantized too, as mlx_kvq's cache does
  during a chunked prefill (its window holds ``window`` + one chunk).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mlx_kvq  # noqa: F401  (preloads OpenBLAS before mlx.core)

import mlx.core as mx

from mlx_kvq import bridge
from mlx_kvq import eval as ev
from mlx_kvq import format as quant
from mlx_kvq.bridge import KVCache
from mlx_kvq.cli.eval import load_model
from mlx_kvq.rotation import rotation


def fake_quant(x, bits, group, mode):
    """dequantize(quantize(x)) along the last axis, stored as fp16 like the real cache."""
    x16 = x.astype(mx.float16)
    return quant.dequantize(quant.quantize(x16, bits, group, mode), bits, group, mode, mx.float16)


def fake_quant_channels(x, bits, group, mode):
    """Per-channel quantization: groups of ``group`` tokens along the token axis."""
    B, H, T, D = x.shape
    y = x.reshape(B, H, T // group, group, D).swapaxes(-1, -2)
    y = fake_quant(y, bits, group, mode)
    return y.swapaxes(-1, -2).reshape(B, H, T, D)


class SimView:
    """What ``SimCache.update_and_fetch`` returns in ``decode`` semantics."""

    def __init__(self, cache, k, v, kq, vq, query_len):
        self.cache, self.k, self.v, self.kq, self.vq = cache, k, v, kq, vq
        self.q_start = cache.offset - query_len


def decode_attention(queries, view, scale):
    """Attention where query i sees key j unquantized iff a decoding step would.

    Scores and values come from the fake-quantized keys/values (which hold the sinks,
    and for per-channel keys the block still filling, unquantized); only the band of
    the last ``L + window`` keys is also scored unquantized and picked per query.
    """
    c = view.cache.cfg
    B, Hq, L, D = queries.shape
    Hk, T = view.k.shape[1], view.k.shape[2]
    rep = Hq // Hk
    s, w = c["sinks"], c["window"]
    lo = max(0, view.q_start - max(w, c["group"] if c["k_channel"] else 0) - 1)
    q = queries.astype(mx.float32).reshape(B, Hk, rep, L, D) * scale
    f32 = lambda x: x.astype(mx.float32)[:, :, None]
    kq, vq = f32(view.kq), f32(view.vq)
    k_band, v_band = f32(view.k[:, :, lo:]), f32(view.v[:, :, lo:])
    scores = q @ kq.swapaxes(-1, -2)
    band_fp = q @ k_band.swapaxes(-1, -2)
    i = mx.arange(view.q_start, view.q_start + L)[:, None]
    j = mx.arange(lo, T)[None]
    fp_v = (j < s) | (i - j <= w)
    fp_k = fp_v
    if c["k_channel"]:  # keys of the block still filling at step i stay fp
        g = c["group"]
        fp_k = fp_k | (j >= s + (i + 1 - s) // g * g)
    band = mx.where(fp_k, band_fp, scores[..., lo:])
    scores = mx.concatenate([scores[..., :lo], band], axis=-1) if lo else band
    scores = mx.where(mx.arange(T)[None] <= i, scores, -mx.inf)
    p = mx.softmax(scores, axis=-1)
    zero = mx.array(0.0, mx.float32)
    out = p @ vq + mx.where(fp_v, p[..., lo:], zero) @ (v_band - vq[:, :, :, lo:])
    return out.reshape(B, Hq, L, D).astype(queries.dtype)


def patch_attention(model):
    """Route attention over ``SimView`` to ``decode_attention`` in the model's modules."""
    bridge.add_route(SimView, lambda queries, view, scale, mask, sinks: decode_attention(queries, view, scale))
    bridge.patch(model)


class SimCache(KVCache):
    """Fake-quantizing KV cache; ``cfg`` keys as in ``config()`` below."""

    def __init__(self, cfg, semantics="strict"):
        super().__init__()
        self.cfg = cfg
        self.semantics = semantics
        self.parts_k = []  # fake-quantized tokens [sinks, sinks + nq), fp16
        self.parts_v = []
        self.nq = 0

    def _fq(self, x, which):
        c = self.cfg
        bits = c["k_bits"] if which == "k" else c["v_bits"]
        rot = c["rotate"] == "kv" or (c["rotate"] == "k" and which == "k")
        if rot:
            R = rotation(x.shape[-1])
            x = x.astype(mx.float32) @ R
        if which == "k" and c["k_channel"]:
            y = fake_quant_channels(x, bits, c["group"], c["mode"])
        else:
            y = fake_quant(x, bits, c["group"], c["mode"])
        if rot:
            y = (y.astype(mx.float32) @ R.T).astype(mx.float16)
        return y

    def update_and_fetch(self, keys, values):
        if self.semantics == "decode":
            return self._decode_update(keys, values)
        prev = self.offset
        k, v = super().update_and_fetch(keys.astype(mx.float16), values.astype(mx.float16))
        c = self.cfg
        s, w = c["sinks"], c["window"]
        last = prev if self.semantics == "fresh" else self.offset
        end = max(s, last - w)
        if c["k_channel"]:  # whole blocks of tokens only; the rest stays fp16
            end = s + (end - s) // c["group"] * c["group"]
        self._quantize_upto(k, v, s, end)
        qe = s + self.nq
        ks = [k[:, :, :s]] + self.parts_k + [k[:, :, qe:]]
        vs = [v[:, :, :s]] + self.parts_v + [v[:, :, qe:]]
        out_k = mx.concatenate([x for x in ks if x.shape[2]], axis=2)
        out_v = mx.concatenate([x for x in vs if x.shape[2]], axis=2)
        return out_k.astype(keys.dtype), out_v.astype(values.dtype)


    def _quantize_upto(self, k, v, s, end):
        """Fake-quantize the tokens from the last quantized one up to ``end`` (sinks ``s`` stay)."""
        start = s + self.nq
        if end > start:
            self.parts_k.append(self._fq(k[:, :, start:end], "k"))
            self.parts_v.append(self._fq(v[:, :, start:end], "v"))
            if len(self.parts_k) > 1:
                self.parts_k = [mx.concatenate(self.parts_k, axis=2)]
                self.parts_v = [mx.concatenate(self.parts_v, axis=2)]
            mx.eval(self.parts_k, self.parts_v)
            self.nq = end - s

    def _decode_update(self, keys, values):
        """Fake-quantize every token once (whole blocks for per-channel keys)."""
        k, v = super().update_and_fetch(keys.astype(mx.float16), values.astype(mx.float16))
        c, s = self.cfg, self.cfg["sinks"]
        end = self.offset
        if c["k_channel"]:
            end = s + max(0, end - s) // c["group"] * c["group"]
        self._quantize_upto(k, v, s, end)
        qe = s + self.nq
        kq = mx.concatenate([x for x in [k[:, :, :s]] + self.parts_k + [k[:, :, qe:]] if x.shape[2]], axis=2)
        # values are per token: quantize the tail that per-channel keys leave fp
        tail_v = v[:, :, qe:]
        if tail_v.shape[2] and c["k_channel"]:
            tail_v = self._fq(tail_v, "v")
        vq = mx.concatenate([x for x in [v[:, :, :s]] + self.parts_v + [tail_v] if x.shape[2]], axis=2)
        view = SimView(self, k, v, kq, vq, keys.shape[2])
        return view, view


def config(k_bits, v_bits=None, group=64, mode="affine", rotate=None, sinks=0, window=0,
           k_channel=False):
    return dict(k_bits=k_bits, v_bits=k_bits if v_bits is None else v_bits, group=group,
                mode=mode, rotate=rotate, sinks=sinks, window=window, k_channel=k_channel)


def name(c):
    bits = f"{c['k_bits']}" if c["k_bits"] == c["v_bits"] else f"{c['k_bits']}/{c['v_bits']}"
    if c["mode"] != "affine":
        bits = c["mode"] if c["k_bits"] == c["v_bits"] else f"{c['mode']}{bits}"
    parts = [bits, f"g{c['group']}"]
    if c["rotate"]:
        parts.append("r" + c["rotate"])
    if c["sinks"]:
        parts.append(f"s{c['sinks']}")
    if c["window"]:
        parts.append(f"w{c['window']}")
    if c["k_channel"]:
        parts.append("kchan")
    return ":".join(parts)


def bytes_per_token(c, n, layers, heads, d):
    """KV bytes per token of a config over ``n`` tokens (fp16 for everything unquantized)."""
    s, w = c["sinks"], c["window"]
    nq = max(0, n - s - w)
    if c["k_channel"]:
        nq = nq // c["group"] * c["group"]
    nfp = n - nq
    total = 0.0
    for which, bits in (("k", c["k_bits"]), ("v", c["v_bits"])):
        if which == "k" and c["k_channel"]:
            packed = nq * d * bits / 8 + (nq // c["group"]) * d * 4
        else:
            packed = nq * quant.bytes_per_token(d, bits, c["group"], c["mode"])
        total += packed + nfp * d * 2
    return total * layers * heads / n


GROUPS = {
    "baseline": [  # plain group-wise, as mlx-lm does it
        config(8, group=64), config(4, group=64), config(4, group=32),
        config(3, group=64), config(3, group=32), config(2, group=32),
    ],
    "8bit": [
        config(8, group=32), config(8, rotate="kv"), config(8, 4, rotate="kv", sinks=4),
        config(8, 4, group=32, rotate="kv", sinks=4),
    ],
    "4bit": [
        config(4, rotate="k"), config(4, rotate="kv"), config(4, group=32, rotate="kv"),
        config(4, rotate="kv", sinks=4), config(4, group=32, rotate="kv", sinks=4),
        config(4, group=32, sinks=4), config(4, group=32, rotate="kv", sinks=4, window=32),
    ],
    "3bit": [
        config(3, group=32, rotate="kv", sinks=4), config(3, group=64, rotate="kv", sinks=4),
        config(3, group=32, rotate="kv", sinks=4, window=32), config(3, group=32, rotate="kv", sinks=4, window=64),
        config(4, 3, group=32, rotate="kv", sinks=4),
    ],
    "2bit": [
        config(2, group=32, rotate="kv", sinks=4), config(2, group=32, rotate="kv", sinks=4, window=64),
        config(2, group=32, rotate="kv", sinks=4, window=128), config(4, 2, group=32, rotate="kv", sinks=4, window=128),
        config(3, 2, group=32, rotate="kv", sinks=4, window=64),
    ],
    "mx": [
        config(8, mode="mxfp8", group=32), config(4, mode="mxfp4", group=32),
        config(4, mode="nvfp4", group=16), config(4, mode="mxfp4", group=32, rotate="kv", sinks=4),
        config(4, mode="nvfp4", group=16, rotate="kv", sinks=4),
    ],
    "window": [  # round 2, after "4bit" showed the recent window matters most
        config(8, group=64), config(4, group=64, sinks=4, window=32),
        config(3, group=32, rotate="kv", sinks=4, window=64), config(3, group=32, rotate="kv", sinks=4, window=128),
        config(2, group=32, rotate="kv", sinks=4, window=128), config(2, group=32, rotate="kv", sinks=4, window=256),
        config(4, 2, group=32, rotate="kv", sinks=4, window=128),
    ],
    "window2": [
        config(8, group=64, window=32), config(8, group=32),
        config(4, group=64, rotate="kv", sinks=4, window=32),
        config(8, 4, group=32, rotate="kv", sinks=4, window=32),
        config(4, mode="mxfp4", group=32, rotate="kv", sinks=4, window=32),
        config(4, mode="nvfp4", group=16, rotate="kv", sinks=4, window=32),
    ],
    "report": [  # the recommended defaults, run on the held-out text
        config(8, group=64, window=32), config(8, 4, group=32, rotate="kv", sinks=4, window=32),
        config(4, group=32, rotate="kv", sinks=4, window=32), config(3, group=32, rotate="kv", sinks=4, window=64),
        config(2, group=32, rotate="kv", sinks=4, window=256),
    ],
    "report64": [  # the 4-bit default at group 64 (0.28x of fp16 instead of 0.31x), held-out text
        config(4, group=64, rotate="kv", sinks=4, window=32),
    ],
    "kchan": [  # per-channel keys (KIVI-style), values per token
        config(4, group=32, sinks=4, k_channel=True), config(2, group=32, sinks=4, window=64, k_channel=True),
    ],
}


def run(model, tokens, configs, chunk, semantics, out, label):
    args = model.args
    heads = args.num_key_value_heads
    d = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    layers = len(model.layers)
    entries = [
        (name(c), lambda m, c=c: [SimCache(c, semantics) for _ in range(len(m.layers))])
        for c in configs
    ]
    t0 = time.perf_counter()
    rows = ev.evaluate(model, tokens, entries, chunk=chunk, progress=sys.stderr)
    n = int(tokens.shape[0])
    for r, c in zip(rows[1:], configs):
        r["kv_bytes_per_token"] = bytes_per_token(c, n, layers, heads, d)
        r["cfg"] = c
    rows[0]["kv_bytes_per_token"] = 2 * 2 * d * layers * heads
    for r in rows:
        r.update(group=label, semantics=semantics, chunk=chunk)
    print(ev.format_table(rows), flush=True)
    print(f"({time.perf_counter() - t0:.0f}s)", flush=True)
    if out:
        with open(out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return rows


def markdown(path):
    """Markdown table of the rows in a JSON-lines file written with ``--out``."""
    lines = ["| group | semantics | config | ppl | Δppl | KL | top-1 | KV bytes/token |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    seen = set()
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    for r in rows:
        key = (r["config"], r["semantics"])
        if r["config"] == "fp16" and key in seen:
            continue
        seen.add(key)
        lines.append(
            f"| {r['group']} | {r['semantics']} | `{r['config']}` | {r['ppl']:.3f} | "
            f"{r['dppl_pct']:+.2f}% | {r['kl']:.4f} | {100 * r['top1']:.1f}% | "
            f"{r['kv_bytes_per_token']:.0f} |"
        )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--text", default=ev.TUNING_TEXT, help="text file to evaluate on")
    p.add_argument("--tokens", type=int, default=4096, help="tokens evaluated (default: 4096)")
    p.add_argument("--chunk", type=int, default=512, help="tokens per evaluation chunk (default: 512)")
    p.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS), help="experiment groups to run (default: all)")
    p.add_argument("--semantics", choices=["decode", "strict", "fresh"], default="decode", help="how the cache is filled (default: decode)")
    p.add_argument("--out", help="append result rows (JSON lines) to this file")
    p.add_argument("--list", action="store_true", help="list the configs and exit")
    p.add_argument("--table", metavar="JSONL", help="print a Markdown table of a results file and exit")
    p.add_argument("--random", action="store_true", help="tiny random-weight llama (smoke test)")
    args = p.parse_args()
    if args.table:
        print(markdown(args.table))
        return
    if args.list:
        for g in args.groups:
            print(g, " ".join(name(c) for c in GROUPS[g]))
        return
    if args.random:
        from mlx_kvq.bridge import llama

        mx.random.seed(0)
        model = llama.Model(llama.ModelArgs(
            model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=1000,
            head_dim=64, tie_word_embeddings=True))
        model.set_dtype(mx.float32)
        tokens = mx.random.randint(0, 1000, (args.tokens,))
    else:
        model, tok = load_model(args.model, "float32")
        tokens = ev.text_tokens(tok, args.text, args.tokens)
    patch_attention(model)
    print(f"text {os.path.basename(args.text)}, {tokens.shape[0]} tokens, chunk {args.chunk}, "
          f"semantics {args.semantics}, {mx.default_device()}", flush=True)
    for g in args.groups:
        run(model, tokens, GROUPS[g], args.chunk, args.semantics, args.out, g)


if __name__ == "__main__":
    main()
