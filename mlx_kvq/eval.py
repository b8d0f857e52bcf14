"""Fidelity of quantized KV caches: perplexity, KL, top-1 agreement, bytes, needle recall.

Python::

    from mlx_kvq.eval import evaluate, needle_test, parse_config
    rows = evaluate(model, tokens, ["fp16", "8", "4", "4:g32:plain"])

Command line (``python -m mlx_kvq.eval --help`` documents the config syntax)::

    python -m mlx_kvq.eval --tokens 4096 --configs fp16 8 8/4 4 3 2 --needle

Every config is compared with the fp16 baseline, mlx-lm's own
``make_prompt_cache(model)``. The text is fed through each cache in chunks
(``model(tokens[None, a:b], cache=cache)``), all caches in lock-step, so only one
chunk of log-probabilities per cache is alive at a time.
"""

import argparse
import json
import math
import os
import sys
import time

import mlx.core as mx  # the package's __init__ has preloaded OpenBLAS by now
from mlx.utils import tree_map_with_path

from .quant import MODES

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DEFAULT_TEXT = os.path.join(DATA_DIR, "persuasion.txt")
TUNING_TEXT = os.path.join(DATA_DIR, "northanger_abbey.txt")
DEFAULT_CONFIGS = ["fp16", "8", "8/4", "4", "3", "2"]

NEEDLE = "The secret passphrase is 'violet-harbor-42'."
NEEDLE_ANSWER = "violet-harbor-42"
NEEDLE_QUESTION = "What is the secret passphrase? Answer with the passphrase only."
NEEDLE_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
NEEDLE_MAX_TOKENS = 32  # answer tokens: "The secret passphrase given in the text is '...'" is ~20

BASELINE = "fp16"
BITS = MODES["affine"][0]
GROUPS = MODES["affine"][1]
ROTATIONS = {"rk": "k", "rkv": "kv", "r0": False}

CONFIG_HELP = """\
cache configs (each is one string; options are separated by ':'):
  fp16            the baseline: mlx-lm's own make_prompt_cache(model), always run
                  (it holds the model's dtype: float32 with the default --dtype)
  B               B-bit keys and values, B in {bits}; the library's defaults
                  for that width (rotation, sinks, window, group size)
  K/V             K-bit keys, V-bit values, e.g. 8/4
  mxfp8 mxfp4 nvfp4   MLX's microscaling formats (fixed group sizes 32/32/16)
options after the first field:
  gN              group size N (affine: {groups}; mxfp*: 32, nvfp4: 16)
  sN              keep the first N tokens (attention sinks) in fp16
  wN              keep the most recent N tokens in fp16
  rk | rkv | r0   Hadamard-rotate keys | keys and values | nothing
  plain           no rotation, sinks or window (plain group-wise quantization)
  mlxlm:B[:gN]    mlx-lm's own QuantizedKVCache (B bits for keys and values,
                  group size N, default 64): the plain group-wise reference
examples: 4   8/4   4:g32   3:rkv:s4   2:w128:s4   4:g64:plain   mlxlm:4:g64
""".format(bits=", ".join(map(str, BITS)), groups=", ".join(map(str, GROUPS)))


class ConfigError(ValueError):
    """A cache config string that cannot be parsed."""


# ---------------------------------------------------------------- configs


def _int(text, what, spec):
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"bad {what} {text!r} in cache config {spec!r}: expected an integer") from None


def _bits(text, spec):
    b = _int(text, "bits", spec)
    if b not in BITS:
        raise ConfigError(
            f"unsupported bits {b} in cache config {spec!r}: choose one of {list(BITS)}"
        )
    return b


def parse_config(spec):
    """Parse a config string into ``(backend, kwargs)``.

    ``backend`` is ``"fp16"`` (mlx-lm's KVCache), ``"mlxlm"`` (mlx-lm's
    QuantizedKVCache; kwargs ``bits``, ``group_size``) or ``"kvq"`` (kwargs for
    ``mlx_kvq.make_prompt_cache``). Raises ``ConfigError`` with a clear message.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"empty cache config {spec!r}; see --help for the syntax")
    spec = spec.strip()
    fields = spec.split(":")
    if fields[0].lower() in ("fp16", "fp", "none", "baseline"):
        if len(fields) > 1:
            raise ConfigError(f"the fp16 baseline takes no options: {spec!r}")
        return BASELINE, {}
    backend = "kvq"
    if fields[0].lower() == "mlxlm":
        backend = "mlxlm"
        fields = fields[1:]
        if not fields or not fields[0]:
            raise ConfigError(f"cache config {spec!r} needs bits after 'mlxlm:', e.g. mlxlm:4:g64")

    head, opts = fields[0].lower(), fields[1:]
    kw = {}
    if head in MODES and head != "affine":
        kw["kv_bits"], kw["mode"] = MODES[head][0][-1], head
    elif "/" in head:
        k, _, v = head.partition("/")
        kw["k_bits"], kw["v_bits"] = _bits(k, spec), _bits(v, spec)
    elif head.isdigit():
        kw["kv_bits"] = _bits(head, spec)
    else:
        raise ConfigError(
            f"cannot read {fields[0]!r} in cache config {spec!r}: expected bits (e.g. 4), "
            f"key/value bits (e.g. 8/4), a mode ({', '.join(m for m in MODES if m != 'affine')}) "
            "or fp16; see --help"
        )

    for opt in opts:
        o = opt.lower()
        if o in ROTATIONS:
            kw["rotate"] = ROTATIONS[o]
        elif o == "plain":
            kw.update(rotate=False, sinks=0, window=0)
        elif len(o) > 1 and o[0] in "gsw" and o[1:].lstrip("-").isdigit():
            n = int(o[1:])
            if o[0] == "g":
                kw["kv_group_size"] = n
            elif n < 0:
                raise ConfigError(f"{opt!r} in cache config {spec!r} must not be negative")
            else:
                kw["sinks" if o[0] == "s" else "window"] = n
        else:
            raise ConfigError(
                f"unknown option {opt!r} in cache config {spec!r}; valid options: gN (group size), "
                "sN (fp16 sink tokens), wN (fp16 recent window), rk/rkv/r0 (rotation), plain"
            )

    mode = kw.get("mode", "affine")
    if "kv_group_size" in kw:
        allowed = MODES[mode][1]
        if kw["kv_group_size"] not in allowed:
            raise ConfigError(
                f"unsupported group size {kw['kv_group_size']} in cache config {spec!r}: "
                f"mode {mode} allows {', '.join(map(str, allowed))}"
            )

    if backend == "mlxlm":
        if "kv_bits" not in kw or set(kw) - {"kv_bits", "kv_group_size"}:
            raise ConfigError(
                f"mlx-lm's QuantizedKVCache takes bits and a group size only (e.g. mlxlm:4:g64), "
                f"not {spec!r}"
            )
        return backend, {"bits": kw["kv_bits"], "group_size": kw.get("kv_group_size", 64)}
    return backend, kw


def make_cache(model, spec):
    """Build the per-layer cache list for a config string."""
    from . import integration

    backend, kw = parse_config(spec)
    if backend == BASELINE:
        return integration.make_prompt_cache(model, kv_bits=None)
    if backend == "mlxlm":
        return integration.mlx_lm_quantized_cache(model, **kw)
    return integration.make_prompt_cache(model, **kw)


def _arrays(obj, depth=0):
    """Arrays with a token axis (ndim >= 3) held by ``obj``, recursively."""
    if isinstance(obj, mx.array):
        return [obj] if obj.ndim >= 3 else []
    if depth > 3:
        return []
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    else:
        return []
    return [a for x in items for a in _arrays(x, depth + 1)]


def layer_bytes(c, fp_bytes=2):
    """Bytes one layer's cache uses for the tokens it holds (not its preallocated room).

    Counts the arrays with a token axis (axis -2) among the cache's attributes, up
    to ``offset`` tokens each (``n_packed`` for the packed buffers of mlx_kvq's
    cache). Floating-point arrays count ``fp_bytes`` per element, so a run with
    an fp32 model on CPU reports what the cache holds with an fp16 model;
    ``fp_bytes=None`` counts them as stored. Falls back to the cache's ``nbytes``.
    """
    offset = int(getattr(c, "offset", 0) or 0)
    packed = getattr(c, "n_packed", None)
    total, seen = 0, set()
    for attr, value in (vars(c).items() if hasattr(c, "__dict__") else ()):
        used = packed if packed is not None and attr in ("keys", "values") else offset
        for a in _arrays(value):
            if id(a) in seen:
                continue
            seen.add(id(a))
            t = min(a.shape[-2], used)
            per = a.size // a.shape[-2] if a.shape[-2] else 0
            if fp_bytes and mx.issubdtype(a.dtype, mx.floating):
                total += t * per * fp_bytes
            else:
                total += t * per * a.itemsize
    if not seen:
        return int(getattr(c, "nbytes", 0))
    return total


def cache_bytes(cache, fp_bytes=2):
    """Bytes a per-layer cache list uses for its tokens (see :func:`layer_bytes`)."""
    return sum(layer_bytes(c, fp_bytes) for c in cache)


def describe_cache(cache):
    """The settings of the first layer cache that has any (a dict), else its class name."""
    for c in cache:
        cfg = getattr(c, "config", None)
        if isinstance(cfg, dict):
            return dict(cfg)
    for c in cache:
        if hasattr(c, "bits"):
            return {"class": type(c).__name__, "bits": c.bits, "group_size": c.group_size}
    return {"class": type(cache[0]).__name__} if cache else {}


def _legend(rows):
    out = []
    for r in rows:
        cfg = r.get("cache") or {}
        if "k_bits" in cfg:
            bits = cfg["k_bits"] if cfg["k_bits"] == cfg["v_bits"] else f"{cfg['k_bits']}/{cfg['v_bits']}"
            out.append(
                f"  {r['config']:<16} = {bits} bits, {cfg.get('mode', 'affine')}, group {cfg.get('group_size')}, "
                f"rotate {cfg.get('rotate') or 'none'}, sinks {cfg.get('sinks')}, window {cfg.get('window')}"
            )
    return out


# ---------------------------------------------------------------- text and model


def read_text(path):
    """Read a UTF-8 text file, with clear errors for missing or empty files."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"text file not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"text file is a directory: {path}")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"text file is empty: {path}")
    return text


def encode(tokenizer, text):
    """Token ids of ``text`` (no special tokens), as a Python list."""
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        ids = tokenizer.encode(text)
    return list(ids)


def text_tokens(tokenizer, path, n_tokens=None):
    """The first ``n_tokens`` tokens of a text file as an ``mx.array``."""
    text = read_text(path)
    if n_tokens:
        text = text[: n_tokens * 8]  # ~4-5 chars per token; plenty
    ids = encode(tokenizer, text)
    if n_tokens:
        ids = ids[:n_tokens]
    if len(ids) < 2:
        raise ValueError(f"text file {path} has fewer than 2 tokens")
    return mx.array(ids, dtype=mx.int32)


def to_fp32(model):
    """Dequantize quantized layers and cast weights to float32 (fast on CPU, with OpenBLAS)."""
    from mlx import nn

    def dequant(_, m):
        if isinstance(m, nn.QuantizedLinear):
            w = mx.dequantize(
                m.weight, m.scales, m.get("biases"), m.group_size, m.bits,
                mode=getattr(m, "mode", "affine"),
            )
            out = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
            out.weight = w.astype(mx.float32)
            if "bias" in m:
                out.bias = m.bias.astype(mx.float32)
            return out
        if isinstance(m, nn.QuantizedEmbedding):
            w = mx.dequantize(
                m.weight, m.scales, m.get("biases"), m.group_size, m.bits,
                mode=getattr(m, "mode", "affine"),
            )
            out = nn.Embedding(w.shape[0], w.shape[1])
            out.weight = w.astype(mx.float32)
            return out
        return m

    leaves = tree_map_with_path(dequant, model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(leaves)
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


# ---------------------------------------------------------------- metrics


def _progress(msg, stream):
    if stream is not None:
        print(msg, file=stream, flush=True)


def evaluate(model, tokens, configs, chunk=512, progress=None, fp_bytes=2):
    """Perplexity, Δppl, KL, top-1 agreement and KV bytes/token for each config.

    ``tokens`` is a 1-D sequence of token ids; ``configs`` a list of config strings
    (see ``CONFIG_HELP``) or ``(name, cache_factory)`` pairs where
    ``cache_factory(model)`` returns a per-layer cache list. The fp16 baseline is
    always run (and listed first). Returns a list of dicts with keys ``config,
    tokens, ppl, dppl_pct, kl, top1, kv_bytes_per_token``. ``progress`` is a
    stream (e.g. ``sys.stderr``) for per-chunk progress, or None.

    Metrics cover the ``n - 1`` positions that have a next token: ``ppl`` is
    exp(mean NLL), ``kl`` the mean KL(fp16 || config) of the next-token
    distributions in nats, ``top1`` the fraction of positions whose argmax equals
    the baseline's. Bytes are measured after one more decoding step (see
    :func:`layer_bytes`), divided by the tokens held.

    Note: mlx_kvq's cache attends to a chunk's own tokens unquantized, so the
    numbers depend on ``chunk``: a smaller chunk is closer to what decoding sees.
    """
    tokens = mx.array(tokens).astype(mx.int32).reshape(-1)
    n = tokens.shape[0]
    if n < 2:
        raise ValueError("need at least 2 tokens to evaluate")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")

    entries = [(BASELINE, lambda m: make_cache(m, BASELINE))]
    for c in configs:
        if isinstance(c, str):
            parse_config(c)  # fail early, before any compute
            if parse_config(c)[0] == BASELINE:
                continue
            entries.append((c, lambda m, c=c: make_cache(m, c)))
        else:
            name, factory = c
            entries.append((name, factory))
    caches = [factory(model) for _, factory in entries]

    nll = [0.0] * len(entries)
    kl = [0.0] * len(entries)
    agree = [0] * len(entries)
    count = 0
    t0 = time.perf_counter()
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        targets = tokens[a + 1 : b + 1]  # the last chunk has one target fewer
        m = targets.shape[0]
        base_lp = base_top = None
        for i, cache in enumerate(caches):
            logits = model(tokens[None, a:b], cache=cache)[0].astype(mx.float32)
            if m == 0:  # the last token has no next token to score
                mx.eval(logits)
                continue
            lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            lp = lp[:m]
            top = mx.argmax(lp, axis=-1)
            tnll = -mx.take_along_axis(lp, targets[:, None], axis=-1).sum()
            if i == 0:
                base_lp, base_top = lp, top
                mx.eval(base_lp, base_top, tnll)
                nll[0] += tnll.item()
                agree[0] += m
                continue
            tkl = (mx.exp(base_lp) * (base_lp - lp)).sum()
            tagree = (top == base_top).sum()
            mx.eval(tnll, tkl, tagree)
            nll[i] += tnll.item()
            kl[i] += tkl.item()
            agree[i] += tagree.item()
        count += m
        el = time.perf_counter() - t0
        _progress(f"[eval] {b}/{n} tokens, {len(entries)} caches, {el:.1f}s", progress)

    # One decoding step more, so caches that keep the last chunk unquantized until
    # the next update (mlx_kvq's) hold what they hold while generating.
    nxt = tokens[None, n - 1 :]
    for cache in caches:
        mx.eval(model(nxt, cache=cache))
    held = n + 1

    rows = []
    base_ppl = math.exp(nll[0] / count)
    for i, (name, _) in enumerate(entries):
        ppl = math.exp(nll[i] / count)
        rows.append(
            {
                "config": name,
                "tokens": int(n),
                "ppl": ppl,
                "dppl_pct": 100.0 * (ppl / base_ppl - 1.0),
                "kl": kl[i] / count,
                "top1": agree[i] / count,
                "kv_bytes_per_token": cache_bytes(caches[i], fp_bytes) / held,
                "cache": describe_cache(caches[i]),
            }
        )
    return rows


# ---------------------------------------------------------------- needle in a haystack


def insert_needle(text, depth, needle=NEEDLE):
    """``text`` with ``needle`` as a paragraph of its own at ``depth`` (0..1) of it.

    The needle goes at the paragraph break (a blank line) nearest to the depth (depth 0:
    the first one), or, with none within 1,500 characters, after the next sentence end:
    never inside a sentence or a hard-wrapped line, where a small model reads it as part
    of the prose around it.
    """
    text = text.strip()
    # depth 0 is the first paragraph break, not the first character: at the very start of
    # the user turn the embedded model recalls the needle over ~1k fewer tokens
    pos = max(round(depth * len(text)), 1)
    if pos < len(text):
        breaks = [i for i in (text.rfind("\n\n", 0, pos), text.find("\n\n", pos)) if i != -1]
        near = min(breaks, key=lambda i: abs(i - pos)) if breaks else -1
        if near != -1 and abs(near - pos) <= 1500:
            pos = near
        else:
            ends = [i for i in (text.find(". ", pos), text.find(".\n", pos)) if i != -1]
            if ends and min(ends) - pos < 1500:
                pos = min(ends) + 1
    before, after = text[:pos].rstrip(), text[pos:].lstrip()
    return "\n\n".join(part for part in (before, needle, after) if part)


def needle_prompt(tokenizer, context_ids, depth, needle=NEEDLE, question=NEEDLE_QUESTION):
    """Token ids of a chat prompt with ``needle`` inserted at ``depth`` (0..1) of the context.

    The needle is a paragraph of its own at a paragraph break near the depth (see
    :func:`insert_needle`); the question follows the document, in the same user turn.
    """
    haystack = insert_needle(tokenizer.decode(list(context_ids)), depth, needle)
    content = f"{haystack}\n\n{question}"
    messages = [{"role": "user", "content": content}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if isinstance(ids, str):
            ids = encode(tokenizer, ids)
        return list(ids)
    return encode(tokenizer, f"{content}\nAnswer:")  # a base model without a chat template


def recalled(answer, passphrase=NEEDLE_ANSWER):
    """True if ``answer`` holds ``passphrase``, ignoring case and whitespace (quotes,
    punctuation and words around it are fine; a misspelt passphrase is not)."""
    def squash(t):
        return "".join(t.lower().split())

    return squash(passphrase) in squash(answer)


def model_context(model):
    """The model's context length (``max_position_embeddings`` of its args), or None."""
    args = getattr(model, "args", None)
    for name in ("max_position_embeddings", "context_length", "max_seq_len"):
        v = getattr(args, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def fit_haystack(tokenizer, context_ids, limit, reserve=NEEDLE_MAX_TOKENS):
    """The longest prefix of ``context_ids`` whose needle prompt plus ``reserve`` answer
    tokens fits in ``limit`` tokens (all of it when it already fits)."""
    ids = list(context_ids)
    for _ in range(8):
        longest = max(len(needle_prompt(tokenizer, ids, d)) for d in (0.0, 0.5, 1.0))
        over = longest + reserve - limit
        if over <= 0:
            return ids
        ids = ids[: max(len(ids) - over - 4, 0)]
    return ids


def generate_greedy(model, prompt_ids, cache, max_tokens=24, chunk=512, eos=(), stop=None):
    """Prefill ``prompt_ids`` through ``cache`` in chunks, then decode greedily.

    Stops at an ``eos`` id, after ``max_tokens``, or when ``stop(ids)`` is true.
    """
    prompt = mx.array(prompt_ids, dtype=mx.int32)
    n = prompt.shape[0]
    for a in range(0, n, chunk):
        logits = model(prompt[None, a : min(a + chunk, n)], cache=cache)
    out = []
    tok = mx.argmax(logits[0, -1].astype(mx.float32))
    for _ in range(max_tokens):
        t = tok.item()
        if t in eos:
            break
        out.append(t)
        if stop is not None and stop(out):
            break
        logits = model(mx.array([[t]], dtype=mx.int32), cache=cache)
        tok = mx.argmax(logits[0, -1].astype(mx.float32))
    return out


def _eos_ids(tokenizer):
    ids = set()
    for attr in ("eos_token_ids", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is None:
            continue
        ids.update(v if isinstance(v, (list, set, tuple)) else [v])
    return ids


def needle_test(model, tokenizer, context_tokens, configs, depths=NEEDLE_DEPTHS,
                chunk=512, max_tokens=NEEDLE_MAX_TOKENS, progress=None, context_limit=None):
    """Needle-in-a-haystack recall per config.

    ``context_tokens``: token ids of the haystack text, cut (from the end) so that the
    prompt and ``max_tokens`` answer tokens fit in ``context_limit`` tokens (default: the
    model's context, :func:`model_context`). Each answer is decoded greedily until the
    end-of-turn token, ``max_tokens``, or the passphrase (:func:`recalled`).

    Returns a list of dicts ``{config, context_tokens, haystack_tokens, recall, answers:
    {depth: answer}, hits: {depth: bool}}`` (depths as ``f"{d:g}"``); ``recall`` is the
    fraction of depths whose answer holds the passphrase. The fp16 row comes first: a
    depth that fp16 itself misses says nothing about a quantized cache.
    """
    entries = []
    for c in [BASELINE] + [c for c in configs if c != BASELINE]:
        if isinstance(c, str):
            entries.append((c, lambda m, c=c: make_cache(m, c)))
        else:
            entries.append(c)
    limit = context_limit or model_context(model)
    context_tokens = list(context_tokens)
    if limit:
        fitted = fit_haystack(tokenizer, context_tokens, limit, max_tokens)
        if len(fitted) < len(context_tokens):
            _progress(
                f"[needle] haystack cut to {len(fitted)} tokens so that prompt + {max_tokens} "
                f"answer tokens fit the {limit}-token context",
                progress,
            )
        context_tokens = fitted
    prompts = {d: needle_prompt(tokenizer, context_tokens, d) for d in depths}
    eos = _eos_ids(tokenizer)

    def found(ids):  # stop as soon as the passphrase is out
        return recalled(tokenizer.decode(ids))

    rows = []
    for name, factory in entries:
        answers, hits = {}, {}
        for d in depths:
            t0 = time.perf_counter()
            ids = generate_greedy(model, prompts[d], factory(model), max_tokens, chunk, eos, found)
            ans = tokenizer.decode(ids).strip()
            answers[f"{d:g}"] = ans
            hits[f"{d:g}"] = recalled(ans)
            _progress(
                f"[needle] {name} depth {d:.0%}: {'found' if hits[f'{d:g}'] else 'MISSED'} "
                f"{ans!r} ({time.perf_counter() - t0:.1f}s)",
                progress,
            )
        rows.append(
            {
                "config": name,
                "context_tokens": len(prompts[depths[0]]),
                "haystack_tokens": len(context_tokens),
                "recall": sum(hits.values()) / len(depths),
                "answers": answers,
                "hits": hits,
            }
        )
    return rows


def needle_baseline_misses(needle_rows):
    """The depths (as ``f"{d:g}"`` keys) at which the fp16 row missed the passphrase."""
    for r in needle_rows or []:
        if r["config"] == BASELINE:
            return [d for d, hit in r.get("hits", {}).items() if not hit]
    return []


# ---------------------------------------------------------------- report and CLI


def format_table(rows, needle_rows=None):
    """A plain-text table of :func:`evaluate` rows (and needle recall, if given)."""
    recall = {r["config"]: r["recall"] for r in needle_rows or []}
    head = f"{'config':<18} {'ppl':>9} {'Δppl':>8} {'KL':>8} {'top-1':>7} {'bytes/tok':>10}"
    if needle_rows:
        head += f" {'needle':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (
            f"{r['config']:<18} {r['ppl']:>9.3f} {r['dppl_pct']:>+7.2f}% {r['kl']:>8.4f} "
            f"{100 * r['top1']:>6.1f}% {r['kv_bytes_per_token']:>10.0f}"
        )
        if needle_rows:
            line += f" {recall[r['config']]:>7.0%}" if r["config"] in recall else f" {'-':>7}"
        lines.append(line)
    legend = _legend(rows)
    if legend:
        lines += ["configs as built:"] + legend
    return "\n".join(lines)


def _depths(text):
    try:
        vals = [float(x) / 100 for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad depths {text!r}: expected percentages like 0,25,50,75,100"
        ) from None
    if not vals or any(not 0 <= v <= 1 for v in vals):
        raise argparse.ArgumentTypeError(f"depths must be percentages in 0..100, got {text!r}")
    return tuple(vals)


def _config_arg(text):
    try:
        parse_config(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _positive(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m mlx_kvq.eval",
        description="Measure the fidelity of quantized KV caches against the fp16 cache: "
        "perplexity, Δppl, KL(fp16 || quantized) per token, top-1 agreement, KV bytes "
        "per token, and (with --needle) needle-in-a-haystack recall.",
        epilog=CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=None,
                   help="model path, Hugging Face repo or .gguf file (default: the embedded "
                   "SmolLM2-135M-Instruct)")
    p.add_argument("--text", default=DEFAULT_TEXT,
                   help="UTF-8 text file (default: Persuasion by Jane Austen, shipped in mlx_kvq/data)")
    p.add_argument("--tokens", type=_positive, default=4096,
                   help="evaluate the first N tokens of the text (default 4096)")
    p.add_argument("--chunk", type=_positive, default=512,
                   help="prefill chunk size in tokens (default 512); mlx_kvq's cache attends "
                   "to a chunk's own tokens unquantized, so smaller chunks are closer to decoding")
    p.add_argument("--configs", nargs="+", type=_config_arg, default=DEFAULT_CONFIGS,
                   metavar="CONFIG", help=f"cache configs (default: {' '.join(DEFAULT_CONFIGS)})")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "model"],
                   default="float32",
                   help="run the model in this dtype (default float32: dequantized weights, "
                   "fast on CPU); KV bytes are counted at 2 bytes per float either way")
    p.add_argument("--needle", action="store_true", help="also run the needle-in-a-haystack test")
    p.add_argument("--needle-tokens", type=_positive, default=2048,
                   help="haystack length in tokens (default 2048); cut so that the prompt and "
                   "the answer fit the model's context (e.g. 8192 gives a ~8.1k-token prompt "
                   "on the embedded model)")
    p.add_argument("--needle-depths", type=_depths, default=NEEDLE_DEPTHS,
                   help="needle depths in percent (default 0,25,50,75,100)")
    p.add_argument("--needle-max-tokens", type=_positive, default=NEEDLE_MAX_TOKENS,
                   help=f"answer tokens at most (default {NEEDLE_MAX_TOKENS}); decoding stops "
                   "early at the end of the turn or once the passphrase is out")
    p.add_argument("--no-ppl", action="store_true", help="skip the perplexity/KL pass")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def load_model(path, dtype="float32"):
    """Load a model and tokenizer with ``mlx_kvq.models.load`` and set its dtype."""
    from .models import load

    model, tokenizer = load(path)
    if dtype == "float32":
        to_fp32(model)
    elif dtype in ("float16", "bfloat16"):
        model.set_dtype(getattr(mx, dtype))
    return model, tokenizer


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    # check the text before loading a model
    try:
        read_text(args.text)
    except (OSError, ValueError) as e:
        p.error(str(e))
    progress = None if args.quiet else sys.stderr
    _progress(f"[eval] loading {args.model or 'the embedded SmolLM2-135M-Instruct'}", progress)
    try:
        model, tokenizer = load_model(args.model, args.dtype)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        p.error(f"could not load the model: {e}")
    try:
        return _run(args, model, tokenizer, progress)
    except ConfigError as e:
        p.error(str(e))
    except ValueError as e:  # e.g. a group size that does not divide this model's head_dim
        p.error(f"{type(e).__name__}: {e}")


def _run(args, model, tokenizer, progress):
    """The measurements of :func:`main`; prints the table, writes the JSON."""
    result = {
        "model": args.model or "embedded SmolLM2-135M-Instruct",
        "text": os.path.abspath(args.text),
        "chunk": args.chunk,
        "dtype": args.dtype,
        "device": str(mx.default_device()),
    }
    rows = needle_rows = None
    if not args.no_ppl:
        tokens = text_tokens(tokenizer, args.text, args.tokens)
        if tokens.shape[0] < args.tokens:
            _progress(f"[eval] the text has only {tokens.shape[0]} tokens", progress)
        rows = evaluate(model, tokens, args.configs, chunk=args.chunk, progress=progress)
        result["tokens"] = int(tokens.shape[0])
        result["results"] = rows
    if args.needle:
        ctx = text_tokens(tokenizer, args.text, args.needle_tokens)
        needle_rows = needle_test(
            model, tokenizer, ctx.tolist(), args.configs, args.needle_depths,
            chunk=args.chunk, max_tokens=args.needle_max_tokens, progress=progress,
        )
        result["needle"] = needle_rows

    if rows:
        print(f"{result['model']} | {os.path.basename(args.text)} | {result['tokens']} tokens | "
              f"chunk {args.chunk} | {args.dtype} | {result['device']}")
        print(format_table(rows, needle_rows))
    if needle_rows:
        for r in needle_rows:
            marks = " ".join(
                f"{float(d):.0%}:{'ok' if hit else 'MISS'}" for d, hit in r["hits"].items()
            )
            print(f"{r['config']:<18} needle recall {r['recall']:.0%}  ({marks})")
        print(f"needle: {NEEDLE!r} in {needle_rows[0]['context_tokens']} prompt tokens at depths "
              + ", ".join(f"{d:.0%}" for d in args.needle_depths))
        misses = needle_baseline_misses(needle_rows)
        if misses:
            print("warning: fp16 itself missed the needle at depth "
                  + ", ".join(f"{float(d):.0%}" for d in misses)
                  + ": there the test says nothing about the quantized caches (the model "
                  "misses it without quantization; a shorter --needle-tokens is within its reach)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
