"""Summarize (or question) a long document with a quantized KV cache.

The document is prefilled through the cache in steps, then the answer streams. A
document longer than the model's context is summarized chunk by chunk, then the chunk
summaries are summarized (map-reduce). The prompt follows ``documents``'s convention,
so a document cached by ``mlx_kvq.cache_prompt`` is reused as it is.
"""

import sys
from dataclasses import dataclass, field

from ..bridge import stream_generate
from ..models.info import context_length
from .documents import document_tokens, load_document_cache, question_tokens
from .prefill import Progress, build_cache, prefill

INSTRUCTION = "Summarize the document above in a few sentences."
REDUCE = (
    "The text above gathers the answers for consecutive parts of one long document. "
    "Combine them into one answer to this request: {instruction}"
)


@dataclass
class Summary:
    """The answer, the cache of the last pass, and how the document was split."""

    text: str
    cache: list = field(repr=False)
    chunks: int = 1
    prompt_tokens: int = 0
    generation_tokens: int = 0  # of the last pass
    generation_tps: float = 0.0


def _generate(model, tokenizer, cache, tokens, max_tokens, out, logits_processors=None):
    """Stream a greedy answer after ``tokens`` (continuing ``cache``); returns the text and
    the last mlx-lm response (its generation counts), or None."""
    text, r = "", None
    for r in stream_generate(model, tokenizer, tokens, max_tokens=max_tokens, prompt_cache=cache,
                             logits_processors=logits_processors):
        text += r.text
        if out:
            out.write(r.text)
            out.flush()
    if out:
        out.write("\n")
    return text, r


def _summary(text, last, cache, prompt_tokens):
    speed = (last.generation_tokens, last.generation_tps) if last is not None else (0, 0.0)
    return Summary(text, cache, 1, prompt_tokens, *speed)


def answer(model, tokenizer, document, instruction=INSTRUCTION, *, max_tokens=512, kv=None,
           prefill_step=512, progress=sys.stderr, out=None, label="prefill", logits_processors=None):
    """One pass: prefill ``document`` into a fresh cache, then answer ``instruction``
    (``logits_processors``: mlx-lm's, e.g. ``make_logits_processors(repetition_penalty=1.2)``)."""
    tokens, tail = document_tokens(tokenizer, document)
    cache = build_cache(model, kv)
    prefill(model, tokens, cache, prefill_step, Progress(len(tokens), progress, label))
    text, last = _generate(model, tokenizer, cache, question_tokens(tokenizer, instruction, tail), max_tokens, out,
                           logits_processors)
    return _summary(text, last, cache, len(tokens))


def split_document(tokenizer, document, chunk_tokens):
    """The document as texts of at most ``chunk_tokens`` tokens each (cut on token boundaries)."""
    ids = tokenizer.encode(document, add_special_tokens=False)
    return [tokenizer.decode(ids[a : a + chunk_tokens]) for a in range(0, len(ids), chunk_tokens)]


def room(tokenizer, instruction, max_tokens, context):
    """Document tokens that fit in ``context`` with the template, instruction and answer."""
    empty, tail = document_tokens(tokenizer, "")
    extra = len(empty) + len(question_tokens(tokenizer, instruction, tail)) + max_tokens
    return context - extra - 16  # a little slack for tokens merging at the joins


def summarize(model, tokenizer, document, instruction=INSTRUCTION, *, max_tokens=512, kv=None,
              prefill_step=512, context=None, progress=sys.stderr, out=None, logits_processors=None):
    """Answer ``instruction`` about ``document`` (default: summarize it).

    ``kv``: ``make_prompt_cache`` keyword arguments (``None``: fp16). ``context``: the
    token budget (default: the model's context length). A longer document is split into
    chunks that fit, each answered with a fresh cache, and the answers are combined.
    Text streams to ``out`` (a file) when given; progress goes to ``progress``.
    """
    context = context or context_length(model)
    tokens, tail = document_tokens(tokenizer, document)
    needed = len(tokens) + len(question_tokens(tokenizer, instruction, tail)) + max_tokens
    if context is None or needed <= context:
        return answer(model, tokenizer, document, instruction, max_tokens=max_tokens, kv=kv,
                      prefill_step=prefill_step, progress=progress, out=out, logits_processors=logits_processors)
    size = room(tokenizer, instruction, max_tokens, context)
    if size < 2 * max_tokens:
        raise ValueError(
            f"A context of {context} tokens leaves too little room for parts of the document "
            f"with --max-tokens {max_tokens} (each part must be longer than two answers); "
            "lower --max-tokens."
        )
    chunks = split_document(tokenizer, document, size)
    if progress:
        progress.write(
            f"The document takes {len(tokens)} tokens, more than the model's context "
            f"({context}): summarizing it in {len(chunks)} parts, then combining the answers.\n"
        )
    parts = []
    for i, chunk in enumerate(chunks):
        label = f"part {i + 1}/{len(chunks)}"
        r = answer(model, tokenizer, chunk, instruction, max_tokens=max_tokens, kv=kv,
                   prefill_step=prefill_step, progress=progress, label=label, logits_processors=logits_processors)
        parts.append(f"Part {i + 1}:\n{r.text.strip()}")
    notes = "\n\n".join(parts)
    result = summarize(model, tokenizer, notes, REDUCE.format(instruction=instruction),
                       max_tokens=max_tokens, kv=kv, prefill_step=prefill_step,
                       context=context, progress=progress, out=out, logits_processors=logits_processors)
    result.chunks = len(chunks) * result.chunks
    result.prompt_tokens = len(tokens)
    return result


def summarize_cached(model, tokenizer, path, instruction=INSTRUCTION, *, max_tokens=512, kv=False,
                     out=None, logits_processors=None):
    """Answer ``instruction`` about a document cached by ``mlx_kvq.cache_prompt``."""
    cache, meta = load_document_cache(path, model, expect=kv)
    if "tail" not in meta:
        raise ValueError(f"{path} is not a document cache made by mlx_kvq.cache_prompt.")
    tokens = question_tokens(tokenizer, instruction, meta["tail"])
    text, last = _generate(model, tokenizer, cache, tokens, max_tokens, out, logits_processors)
    return _summary(text, last, cache, int(meta.get("document_tokens", 0)))
