"""``mlx_kvq.cache_prompt``: prefill a document once, save its quantized cache, ask later.

    mlx_kvq.cache_prompt contract.txt --prompt-cache-file contract.safetensors
    mlx_kvq.cache_prompt --prompt "$(cat contract.txt)" --prompt-cache-file contract.safetensors
    mlx_kvq.generate --prompt-cache-file contract.safetensors -p "Who pays the deposit?"
    mlx_kvq.summarize --prompt-cache-file contract.safetensors

The prompt convention is ``mlx_kvq.generation.documents``'s.
"""

import sys
from pathlib import Path

import mlx.core as mx

from ..generation.documents import cache_document, document_tokens, read_document
from ..models import fit_to_context, prepare_model
from .args import (add_dtype_argument, add_kv_arguments, add_model_arguments, add_prefill_step_argument, cache_kwargs,
                   cache_file_name, check_kv, command_parser)
from .distributed import add_distributed_arguments, load_model, log, own_cache_file, rank_report
from .report import cache_report, mb

EXAMPLES = """examples:
  mlx_kvq.cache_prompt report.md --prompt-cache-file report.safetensors
  mlx_kvq.cache_prompt contract.pdf --prompt-cache-file c.safetensors --kv-bits 8
  mlx_kvq.cache_prompt --prompt "$(cat notes.txt)" --prompt-cache-file notes.safetensors
  cat notes.txt | mlx_kvq.cache_prompt --prompt - --prompt-cache-file notes.safetensors
  mlx_kvq.generate --prompt-cache-file report.safetensors -p "What are the key dates?"
"""


# -- CLI --------------------------------------------------------------------------
def setup_arg_parser():
    p = command_parser("mlx_kvq.cache_prompt", "Prefill a document once and save its quantized KV cache for later "
                       "questions (mlx_lm.cache_prompt's flags, plus the KV cache flags).", EXAMPLES)
    p.add_argument("document", nargs="?", help=".txt/.md file, .pdf (needs pypdf), or - for stdin "
                   "(or give the text with --prompt)")
    p.add_argument("--prompt", "-p", help="the document's text, or - to read it from stdin (as mlx_lm.cache_prompt)")
    p.add_argument("--prompt-cache-file", required=True,
                   help="the .safetensors file to write (.safetensors is added when missing)")
    add_model_arguments(p, eos_flag="--eos-token")
    p.add_argument("--system-prompt", help="system prompt for the chat template")
    add_prefill_step_argument(p, 512)
    add_dtype_argument(p)
    add_kv_arguments(p)
    add_distributed_arguments(p)
    return p


def output_path(text):
    """The file mlx-lm writes for ``text`` (it adds .safetensors), checked before the prefill."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise ValueError(f"--prompt-cache-file {text} is a directory; give a file name such as {path / 'doc.safetensors'}.")
    path = cache_file_name(path, reading=False)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--prompt-cache-file {text}: the directory {path.parent} does not exist.")
    return path


def main(argv=None):
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    if (args.document is None) == (args.prompt is None):
        parser.error("give a document file or --prompt (one of them)")
    try:
        kv = check_kv(cache_kwargs(args))
        path = output_path(args.prompt_cache_file)
        if args.prompt is not None:
            document = (sys.stdin.read() if args.prompt == "-" else args.prompt).strip()
            if not document:
                raise ValueError("The prompt is empty.")
        else:
            document = read_document(args.document)
        model, tokenizer = load_model(args)
        prepare_model(model, args.dtype)
        tokens, _ = document_tokens(tokenizer, document, args.system_prompt)
        try:  # a question and its answer are still to come after the document
            fit_to_context(model, len(tokens), 1)
        except ValueError as e:
            raise ValueError(f"{e} Use mlx_kvq.summarize, which splits long documents, or a shorter document.") from None
        cache = cache_document(
            model, tokenizer, document, path, model_name=args.model,
            system_prompt=args.system_prompt, kv=kv, prefill_step=args.prefill_step,
            source=args.document or "--prompt", progress=log(),
        )
    except (ValueError, FileNotFoundError, RuntimeError, ImportError, OSError) as e:
        sys.exit(f"mlx_kvq.cache_prompt: error: {e}")
    saved = Path(own_cache_file(path))
    print(f"Saved {len(tokens)} tokens to {saved} ({mb(saved.stat().st_size)})")
    print(f"Peak memory: {mx.get_peak_memory() / 1e9:.3f} GB")
    print(cache_report(cache))
    ranks = rank_report(cache)
    if ranks:
        print(ranks)


if __name__ == "__main__":
    main()
