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


def _generate(model, tokenizer, cache, tokens, max_tokens, out):
    """Stream a greedy answer after ``tokens`` (continuing ``cache``); returns the text."""
    text = ""
    for r in stream_generate(model, tokenizer, tokens, max_tokens=max_tokens, prompt_cache=cache):
        text += r.text
        if out:
            out.write(r.text)
            out.flush()
    if out:
        out.write("\n")
    return text


def answer(model, tokenizer, document, instruction=INSTRUCTION, *, max_tokens=512, kv=None,
           prefill_step=512, progress=sys.stderr, out=None, label="prefill"):
    """One pass: prefill ``document`` into a fresh cache, then answer ``instruction``."""
    tokens, tail = document_tokens(tokenizer, document)
    cache = build_cache(model, kv)
    prefill(model, tokens, cache, prefill_step, Progress(len(tokens), progress, label))
    text = _generate(model, tokenizer, cache, question_tokens(tokenizer, instruction, tail), max_tokens, out)
    return Summary(text, cache, 1, len(tokens))


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
              prefill_step=512, context=None, progress=sys.stderr, out=None):
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
                      prefill_step=prefill_step, progress=progress, out=out)
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
                   prefill_step=prefill_step, progress=progress, label=label)
        parts.append(f"Part {i + 1}:\n{r.text.strip()}")
    notes = "\n\n".join(parts)
    result = summarize(model, tokenizer, notes, REDUCE.format(instruction=instruction),
                       max_tokens=max_tokens, kv=kv, prefill_step=prefill_step,
                       context=context, progress=progress, out=out)
    result.chunks = len(chunks) * result.chunks
    result.prompt_tokens = len(tokens)
    return result


def summarize_cached(model, tokenizer, path, instruction=INSTRUCTION, *, max_tokens=512, kv=False,
                     out=None):
    """Answer ``instruction`` about a document cached by ``mlx_kvq.cache_prompt``."""
    cache, meta = load_document_cache(path, model, expect=kv)
    if "tail" not in meta:
        raise ValueError(f"{path} is not a document cache made by mlx_kvq.cache_prompt.")
    tokens = question_tokens(tokenizer, instruction, meta["tail"])
    text = _generate(model, tokenizer, cache, tokens, max_tokens, out)
    return Summary(text, cache, 1, int(meta.get("document_tokens", 0)))
