"""``mlx_kvq.cache_prompt``: prefill a document once, save its quantized cache, ask later.

    mlx_kvq.cache_prompt contract.txt --prompt-cache-file contract.safetensors
    mlx_kvq.generate --prompt-cache-file contract.safetensors -p "Who pays the deposit?"
    mlx_kvq.summarize --prompt-cache-file contract.safetensors

The prompt convention is ``mlx_kvq.generation.documents``'s.
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx

from ..generation.documents import cache_document, document_tokens, read_document
from ..models import context_length, load, prepare_model
from .distributed import add_distributed_arguments, load_model, log, own_cache_file, rank_report
from .args import add_dtype_argument, add_kv_arguments, cache_kwargs, check_kv, command_parser
from .report import cache_report

EXAMPLES = """examples:
  mlx_kvq.cache_prompt report.md --prompt-cache-file report.safetensors
  mlx_kvq.cache_prompt contract.pdf --prompt-cache-file c.safetensors --kv-bits 8
  cat notes.txt | mlx_kvq.cache_prompt - --prompt-cache-file notes.safetensors
  mlx_kvq.generate --prompt-cache-file report.safetensors -p "What are the key dates?"
"""


# -- CLI --------------------------------------------------------------------------
def setup_arg_parser():
    p = command_parser("mlx_kvq.cache_prompt", "Prefill a document once and save its quantized KV cache for later questions.", EXAMPLES)
    p.add_argument("document", help=".txt/.md file, .pdf (needs pypdf), or - for stdin")
    p.add_argument("--prompt-cache-file", required=True, help="the .safetensors file to write")
    p.add_argument("--model", help="local path, Hugging Face repo or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--system-prompt", help="system prompt for the chat template")
    p.add_argument("--prefill-step", type=int, default=512, help="tokens per prefill step (default: 512)")
    add_dtype_argument(p)
    add_kv_arguments(p)
    add_distributed_arguments(p)
    return p


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    try:
        if args.prefill_step < 1:
            raise ValueError("--prefill-step must be at least 1.")
        kv = check_kv(cache_kwargs(args))
        document = read_document(args.document)
        model, tokenizer = load_model(args, load)
        prepare_model(model, args.dtype)
        tokens, _ = document_tokens(tokenizer, document, args.system_prompt)
        limit = context_length(model)
        if limit and len(tokens) > limit:
            raise ValueError(
                f"The document takes {len(tokens)} tokens; the model's context is {limit}. "
                "Use mlx_kvq.summarize, which splits long documents, or a shorter document."
            )
        cache = cache_document(
            model, tokenizer, document, args.prompt_cache_file, model_name=args.model,
            system_prompt=args.system_prompt, kv=kv, prefill_step=args.prefill_step,
            source=args.document, progress=log(),
        )
    except (ValueError, FileNotFoundError, RuntimeError, ImportError, OSError) as e:
        sys.exit(f"mlx_kvq.cache_prompt: error: {e}")
    path = own_cache_file(args.prompt_cache_file)
    size = Path(path).stat().st_size
    print(f"Saved {len(tokens)} tokens to {path} ({size / 2**20:.2f} MiB)")
    print(f"Peak memory: {mx.get_peak_memory() / 1e9:.3f} GB")
    print(cache_report(cache))
    ranks = rank_report(cache)
    if ranks:
        print(ranks)


if __name__ == "__main__":
    main()
