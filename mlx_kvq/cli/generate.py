"""``mlx_kvq.generate``: mlx-lm's generate with a quantized KV cache.

    mlx_kvq.generate --prompt "Why is the sky blue?" --kv-bits 4
    mlx_kvq.generate --model mlx-community/Llama-3.2-3B-Instruct-4bit -p - < question.txt
"""

import argparse
import os
import sys

import mlx.core as mx

from ..bridge import make_sampler, stream_generate
from ..generation import build_cache, continuation_tokens, encode_prompt, load_document_cache, rank_files
from ..models import load
from .distributed import add_distributed_arguments, load_model, rank_report, seed, world
from .args import add_kv_arguments, cache_kwargs, check_kv, command_parser, expected_config, ranged
from .report import cache_report

EXAMPLES = """examples:
  mlx_kvq.generate -p "Why is the sky blue?"                 # embedded SmolLM2, 4-bit KV
  mlx_kvq.generate -p "Hi" --k-bits 8 --v-bits 4             # 8-bit keys, 4-bit values
  mlx_kvq.generate --model mlx-community/Llama-3.2-3B-Instruct-4bit -p - < prompt.txt
  mlx_kvq.generate --prompt-cache-file doc.safetensors -p "Who signs the contract?"
  mlx.launch -n 2 --backend ring -- python -m mlx_kvq.cli.generate --model DIR -p "Hi"   # 2 processes
"""


def setup_arg_parser():
    p = command_parser("mlx_kvq.generate", "Generate text with an mlx-lm model and a quantized KV cache.", EXAMPLES)
    p.add_argument("--model", help="local path, Hugging Face repo or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompt", "-p", default="Hello", help="the prompt, or - to read it from stdin")
    p.add_argument("--max-tokens", "-m", type=ranged(int, 1), default=256, help="maximum tokens to generate")
    p.add_argument("--temp", type=ranged(float, 0.0), default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=ranged(float, 0.0, 1.0), default=1.0, help="nucleus sampling top-p")
    p.add_argument("--top-k", type=ranged(int, 0), default=0, help="sample from the k likeliest tokens (0: all)")
    p.add_argument("--min-p", type=ranged(float, 0.0, 1.0), default=0.0,
                   help="drop tokens less likely than min-p times the likeliest (0: off)")
    p.add_argument("--min-tokens-to-keep", type=ranged(int, 1), default=1, help="tokens --min-p always keeps")
    p.add_argument("--prefill-step-size", type=ranged(int, 1), default=2048, help="prompt tokens per prefill step")
    p.add_argument("--max-kv-size", type=ranged(int, 1),
                   help="a sliding-window cache of this many tokens (quantized, as mlx-lm's RotatingKVCache)")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--system-prompt", help="system prompt for the chat template")
    p.add_argument("--ignore-chat-template", action="store_true", help="feed the prompt as is")
    p.add_argument("--prompt-cache-file", help="a cache file from mlx_kvq.cache_prompt: the prompt continues it")
    p.add_argument("--verbose", action="store_true", help="print the prompt and the cache config")
    add_kv_arguments(p)
    add_distributed_arguments(p)
    return p


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    try:
        kwargs = check_kv(cache_kwargs(args))  # the flags and the file before the model loads
        one = world()[1] == 1  # under mlx.launch each rank has its file: load_document_cache checks it
        if args.prompt_cache_file and one and not os.path.isfile(args.prompt_cache_file):
            ranks = rank_files(args.prompt_cache_file)
            made = f" (found {', '.join(ranks)}: run under mlx.launch as they were made)" if ranks else ""
            raise FileNotFoundError(f"Prompt cache file not found: {args.prompt_cache_file}{made}")
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        if not prompt.strip():
            raise ValueError("The prompt is empty.")
        seed(args.seed)
        model, tokenizer = load_model(args, load)
        expect = expected_config(model, kwargs)
        meta = None
        if args.prompt_cache_file:
            cache, meta = load_document_cache(args.prompt_cache_file, model, expect=expect)
        else:
            cache = build_cache(model, kwargs)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"mlx_kvq.generate: error: {e}")
    if meta is not None:  # continue the document convention of mlx_kvq.cache_prompt files
        tokens = continuation_tokens(tokenizer, prompt, meta, args.system_prompt, args.ignore_chat_template)
    else:
        tokens = encode_prompt(tokenizer, prompt, args.system_prompt, args.ignore_chat_template)
    if args.verbose:
        print(f"KV cache config: {expect or 'fp16'}", file=sys.stderr)
        print("=" * 10, file=sys.stderr)
    response = None
    sampler = make_sampler(args.temp, args.top_p, args.min_p, args.min_tokens_to_keep, top_k=args.top_k)
    for response in stream_generate(
        model, tokenizer, tokens, max_tokens=args.max_tokens, sampler=sampler, prompt_cache=cache,
        prefill_step_size=args.prefill_step_size,
    ):
        print(response.text, end="", flush=True)
    print()
    print("=" * 10)
    if response is not None:
        print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec")
        print(f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.3f} tokens-per-sec")
        print(f"Peak memory: {response.peak_memory:.3f} GB")
    print(cache_report(cache))
    ranks = rank_report(cache)
    if ranks:
        print(ranks)


if __name__ == "__main__":
    main()
