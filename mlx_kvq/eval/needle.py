"""Needle in a haystack: a passphrase hidden at several depths of a long text, asked for."""

import time

import mlx.core as mx

from ..generation.prefill import prefill
from ..models.info import context_length
from .configs import BASELINE, make_cache
from .text import encode
from .fidelity import _progress


NEEDLE = "The secret passphrase is 'violet-harbor-42'."
NEEDLE_ANSWER = "violet-harbor-42"
NEEDLE_QUESTION = "What is the secret passphrase? Answer with the passphrase only."
NEEDLE_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
NEEDLE_MAX_TOKENS = 32  # answer tokens: "The secret passphrase given in the text is '...'" is ~20


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
    """Prefill ``prompt_ids`` through ``cache`` in chunks (all but the last token, as
    ``mlx_lm.generate_step`` does), then decode greedily from the last token.

    Stops at an ``eos`` id, after ``max_tokens``, or when ``stop(ids)`` is true.
    """
    prefill(model, prompt_ids, cache, chunk, hold_last=True)
    logits = model(mx.array([list(prompt_ids)[-1:]], dtype=mx.int32), cache=cache)
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
    model's context, ``context_length``). Each answer is decoded greedily until the
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
    limit = context_limit or context_length(model)
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
