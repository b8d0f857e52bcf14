"""Fidelity of quantized KV caches against fp16: perplexity, KL, top-1 agreement, bytes.

Every config is compared with the fp16 baseline, mlx-lm's own
``make_prompt_cache(model)``. The text is fed through each cache in chunks
(``model(tokens[None, a:b], cache=cache)``), all caches in lock-step, so only one
chunk of log-probabilities per cache is alive at a time.
"""

import math
import time

import mlx.core as mx

from .kv_bytes import cache_bytes, describe_cache
from .configs import BASELINE, make_cache, parse_config


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
