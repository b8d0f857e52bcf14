"""``mlx_kvq.summarize``: summarize (or question) a long document with a quantized KV cache.

    mlx_kvq.summarize report.md
    mlx_kvq.summarize contract.pdf --instruction "List the obligations of each party."

The document is prefilled through the quantized cache in steps (progress on stderr),
then the answer streams on stdout. A document longer than the model's context is
summarized chunk by chunk, then the chunk summaries are summarized (map-reduce).
The prompt follows ``mlx_kvq.cache_prompt``'s convention, so ``--prompt-cache-file``
reuses a document cached by it.
"""

import argparse
import sys
from dataclasses import dataclass, field

import mlx.core as mx

from .cache_prompt import (
    Progress,
    add_dtype_argument,
    check_kv,
    prepare_model,
    context_length,
    document_tokens,
    load_document_cache,
    prefill,
    question_tokens,
    read_document,
)

INSTRUCTION = "Summarize the document above in a few sentences."
REDUCE = (
    "The text above gathers the answers for consecutive parts of one long document. "
    "Combine them into one answer to this request: {instruction}"
)

EXAMPLES = """examples:
  mlx_kvq.summarize report.md
  mlx_kvq.summarize contract.pdf --instruction "List the obligations of each party."
  mlx_kvq.summarize book.txt --kv-bits 2 --max-tokens 400
  mlx_kvq.cache_prompt report.md --prompt-cache-file r.safetensors && \\
  mlx_kvq.summarize --prompt-cache-file r.safetensors --instruction "What are the risks?"
"""


@dataclass
class Summary:
    """The answer, the cache of the last pass, and how the document was split."""

    text: str
    cache: list = field(repr=False)
    chunks: int = 1
    prompt_tokens: int = 0


def _generate(model, tokenizer, cache, tokens, max_tokens, out):
    """Stream a greedy answer after ``tokens`` (continuing ``cache``); returns the text."""
    from mlx_lm import stream_generate

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
    from .generate import build_cache

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


# -- CLI ---------------------------------------------------------------------------
def setup_arg_parser():
    from .generate import add_kv_arguments

    p = argparse.ArgumentParser(
        prog="mlx_kvq.summarize",
        description="Summarize or question a long document with a quantized KV cache.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("document", nargs="?", help=".txt/.md file, .pdf (needs pypdf), or - for stdin")
    p.add_argument("--model", help="local path, Hugging Face repo or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--instruction", default=INSTRUCTION, help=f"what to do with the document (default: {INSTRUCTION!r})")
    p.add_argument("--max-tokens", "-m", type=int, default=512, help="maximum tokens of the answer (default: 512)")
    p.add_argument("--prefill-step", type=int, default=512, help="tokens per prefill step (default: 512)")
    p.add_argument("--prompt-cache-file", help="a document cache from mlx_kvq.cache_prompt (instead of a document)")
    p.add_argument("--context", type=int, help="token budget per pass (default: the model's context length)")
    add_dtype_argument(p)
    add_kv_arguments(p)
    return p


def main(argv=None):
    from .generate import cache_kwargs, cache_report, expected_config
    from .models import load

    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    if (args.document is None) == (args.prompt_cache_file is None):
        parser.error("give a document or --prompt-cache-file (one of them)")
    try:
        for name in ("max_tokens", "prefill_step"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1.")
        kv = check_kv(cache_kwargs(args))
        document = read_document(args.document) if args.document else None
        model, tokenizer = load(args.model)
        prepare_model(model, args.dtype)
        if document is None:
            expect = expected_config(model, kv)
            result = summarize_cached(model, tokenizer, args.prompt_cache_file, args.instruction,
                                      max_tokens=args.max_tokens, kv=expect, out=sys.stdout)
        else:
            expected_config(model, kv)  # check the KV flags before the long prefill
            result = summarize(model, tokenizer, document, args.instruction,
                               max_tokens=args.max_tokens, kv=kv, prefill_step=args.prefill_step,
                               context=args.context, progress=sys.stderr, out=sys.stdout)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError, OSError) as e:
        sys.exit(f"mlx_kvq.summarize: error: {e}")
    print("=" * 10, file=sys.stderr)
    passes = f" in {result.chunks} parts + a combining pass" if result.chunks > 1 else ""
    print(f"Document: {result.prompt_tokens} tokens{passes}", file=sys.stderr)
    print(f"Peak memory: {mx.get_peak_memory() / 1e9:.3f} GB", file=sys.stderr)
    print(cache_report(result.cache), file=sys.stderr)
    fp16 = fp16_nbytes(result.cache)
    if fp16:
        print(f"(an fp16 cache would take {fp16 / 2**20:.2f} MiB for the same tokens)", file=sys.stderr)


def fp16_nbytes(cache):
    """What the tokens of our caches would take unquantized in fp16 (0 if already fp16)."""
    total = 0
    for c in cache:
        if hasattr(c, "dense_nbytes") and c.dtype is not None and c.dtype.size != 2:
            total += c.dense_nbytes() // c.dtype.size * 2
    return total


if __name__ == "__main__":
    main()
