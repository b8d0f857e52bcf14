"""``mlx_kvq.summarize``: summarize (or question) a long document with a quantized KV cache.

    mlx_kvq.summarize report.md
    mlx_kvq.summarize contract.pdf --instruction "List the obligations of each party."

Progress goes to stderr, the answer streams on stdout (``mlx_kvq.generation.summaries``
says how long documents are split). ``--prompt-cache-file`` reuses a document cached by
``mlx_kvq.cache_prompt``.
"""

import sys

import mlx.core as mx

from ..generation.documents import read_document
from ..generation.summaries import INSTRUCTION, summarize, summarize_cached
from ..bridge import make_logits_processors
from ..models import prepare_model
from .args import (add_dtype_argument, add_kv_arguments, add_model_arguments, add_prefill_step_argument, cache_kwargs,
                   check_kv, command_parser, expected_config, prompt_cache_config, ranged)
from .distributed import add_distributed_arguments, load_model, log, own_cache_file, prompt_cache_file, rank_report
from .report import cache_report, fp16_nbytes, mb

EXAMPLES = """examples:
  mlx_kvq.summarize report.md
  mlx_kvq.summarize contract.pdf --instruction "List the obligations of each party."
  mlx_kvq.summarize book.txt --kv-bits 2 --max-tokens 400 --repetition-penalty 1.2
  mlx_kvq.cache_prompt report.md --prompt-cache-file r.safetensors && \\
  mlx_kvq.summarize --prompt-cache-file r.safetensors --instruction "What are the risks?"
"""


# -- CLI ---------------------------------------------------------------------------
def setup_arg_parser():
    p = command_parser("mlx_kvq.summarize", "Summarize or question a long document with a quantized KV cache.", EXAMPLES)
    p.add_argument("document", nargs="?", help=".txt/.md file, .pdf (needs pypdf), or - for stdin")
    add_model_arguments(p)
    p.add_argument("--instruction", default=INSTRUCTION, help=f"what to do with the document (default: {INSTRUCTION!r})")
    p.add_argument("--max-tokens", "-m", type=ranged(int, 1), default=512,
                   help="maximum tokens of the answer (default: 512)")
    p.add_argument("--repetition-penalty", type=ranged(float, 1.0), default=None,
                   help="penalize repeated tokens (e.g. 1.2; mlx-lm's make_logits_processors) so a looping "
                   "answer stops (default: off)")
    p.add_argument("--repetition-context-size", type=ranged(int, 1), default=20,
                   help="recent tokens --repetition-penalty looks at (default: 20)")
    add_prefill_step_argument(p, 512)
    p.add_argument("--prompt-cache-file",
                   help="a document cache from mlx_kvq.cache_prompt instead of a document (its KV config is used)")
    p.add_argument("--context", type=ranged(int, 1), help="token budget per pass (default: the model's context length)")
    add_dtype_argument(p)
    add_kv_arguments(p)
    add_distributed_arguments(p)
    return p


def main(argv=None):
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    if (args.document is None) == (args.prompt_cache_file is None):
        parser.error("give a document or --prompt-cache-file (one of them)")
    try:
        kv = check_kv(cache_kwargs(args))
        if args.prompt_cache_file:
            args.prompt_cache_file = prompt_cache_file(args.prompt_cache_file)
            kv = prompt_cache_config(args, own_cache_file(args.prompt_cache_file))
        document = read_document(args.document) if args.document else None
        processors = (make_logits_processors(repetition_penalty=args.repetition_penalty,
                                             repetition_context_size=args.repetition_context_size)
                      if args.repetition_penalty else None)
        model, tokenizer = load_model(args)
        prepare_model(model, args.dtype)
        if document is None:
            result = summarize_cached(model, tokenizer, args.prompt_cache_file, args.instruction,
                                      max_tokens=args.max_tokens, kv=kv, out=sys.stdout,
                                      logits_processors=processors)
        else:
            expected_config(model, kv)  # check the KV flags before the long prefill
            result = summarize(model, tokenizer, document, args.instruction,
                               max_tokens=args.max_tokens, kv=kv, prefill_step=args.prefill_step,
                               context=args.context, progress=log(), out=sys.stdout,
                               logits_processors=processors)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError, OSError) as e:
        sys.exit(f"mlx_kvq.summarize: error: {e}")
    ranks = rank_report(result.cache)  # every rank takes part
    out = log()
    if out is None:
        return
    print("=" * 10, file=out)
    passes = f" in {result.chunks} parts + a combining pass" if result.chunks > 1 else ""
    print(f"Document: {result.prompt_tokens} tokens{passes}", file=out)
    stopped = " (stopped at --max-tokens)" if result.generation_tokens >= args.max_tokens else ""
    print(f"Generation: {result.generation_tokens} tokens, {result.generation_tps:.3f} tokens-per-sec{stopped}",
          file=out)
    print(f"Peak memory: {mx.get_peak_memory() / 1e9:.3f} GB", file=out)
    print(cache_report(result.cache), file=out)
    if ranks:
        print(ranks, file=out)
    fp16 = fp16_nbytes(result.cache)
    if fp16:
        print(f"(a float16 cache would take {mb(fp16)} for the same tokens)", file=out)


if __name__ == "__main__":
    main()
