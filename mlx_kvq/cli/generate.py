"""``mlx_kvq.generate``: mlx-lm's generate with a quantized KV cache.

    mlx_kvq.generate --prompt "Why is the sky blue?" --kv-bits 4
    mlx_kvq.generate --model mlx-community/Llama-3.2-3B-Instruct-4bit -p - < question.txt
"""

import sys

import mlx.core as mx

from ..bridge import cache_config, make_sampler, stream_generate
from ..generation import build_cache, continuation_tokens, encode_prompt, load_document_cache
from ..models import fit_to_context, prepare_model
from .args import (add_dtype_argument, add_kv_arguments, add_model_arguments, cache_kwargs, check_kv, command_parser,
                   json_object, prompt_cache_config, ranged, str2bool)
from .distributed import add_distributed_arguments, load_model, own_cache_file, prompt_cache_file, rank_report, seed
from .report import cache_report

EXAMPLES = """examples:
  mlx_kvq.generate -p "Why is the sky blue?"                 # embedded SmolLM2, 4-bit KV
  mlx_kvq.generate -p "Hi" --k-bits 8 --v-bits 4             # 8-bit keys, 4-bit values
  mlx_kvq.generate --model mlx-community/Llama-3.2-3B-Instruct-4bit -p - < prompt.txt
  mlx_kvq.generate --prompt-cache-file doc.safetensors -p "Who signs the contract?"
"""


def setup_arg_parser():
    p = command_parser("mlx_kvq.generate", "Generate text with an mlx-lm model and a quantized KV cache "
                       "(mlx_lm.generate's flags, plus the KV cache flags).", EXAMPLES)
    add_model_arguments(p)
    p.add_argument("--prompt", "-p", default="Hello", help="the prompt, or - to read it from stdin")
    p.add_argument("--max-tokens", "-m", type=ranged(int, 1), default=256, help="maximum tokens to generate (default: 256)")
    p.add_argument("--temp", type=ranged(float, 0.0), default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=ranged(float, 0.0, 1.0), default=1.0, help="nucleus sampling top-p")
    p.add_argument("--top-k", type=ranged(int, 0), default=0, help="sample from the k likeliest tokens (0: all)")
    p.add_argument("--min-p", type=ranged(float, 0.0, 1.0), default=0.0,
                   help="drop tokens less likely than min-p times the likeliest (0: off)")
    p.add_argument("--min-tokens-to-keep", type=ranged(int, 1), default=1, help="tokens --min-p always keeps")
    p.add_argument("--xtc-probability", type=ranged(float, 0.0, 1.0), default=0.0,
                   help="probability of XTC sampling (exclude the top choices) at each token (0: off)")
    p.add_argument("--xtc-threshold", type=ranged(float, 0.0, 0.5), default=0.1,
                   help="probability a candidate needs for XTC to exclude it (0 to 0.5, default: 0.1)")
    p.add_argument("--prefill-step-size", type=ranged(int, 1), default=2048,
                   help="prompt tokens per prefill step (default: 2048)")
    p.add_argument("--max-kv-size", type=ranged(int, 1),
                   help="a sliding-window cache of this many tokens (quantized, as mlx-lm's RotatingKVCache)")
    p.add_argument("--seed", type=ranged(int, 0, 2**64 - 1), default=None, help="random seed")
    p.add_argument("--system-prompt", help="system prompt for the chat template")
    p.add_argument("--ignore-chat-template", action="store_true", help="feed the prompt as is")
    p.add_argument("--chat-template-config", type=json_object, default={},
                   help="more arguments for the chat template, as a JSON object")
    p.add_argument("--prompt-cache-file",
                   help="a cache file from mlx_kvq.cache_prompt: the prompt continues it (its KV config is used)")
    p.add_argument("--draft-model", help="a smaller model with the same tokenizer for speculative decoding")
    p.add_argument("--num-draft-tokens", type=ranged(int, 1), default=3,
                   help="tokens the draft model proposes per step (default: 3)")
    p.add_argument("--verbose", type=str2bool, default=True, metavar="{True,False}",
                   help="True (default): stream the text, then the speed, memory and KV cache report; "
                   "False: print only the text")
    add_dtype_argument(p)
    add_kv_arguments(p)
    add_distributed_arguments(p)
    return p


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    try:
        kwargs = check_kv(cache_kwargs(args))  # the flags and the file before the model loads
        if args.prompt_cache_file:
            if args.draft_model:
                raise ValueError("--draft-model cannot continue a --prompt-cache-file: the file holds no draft-model cache.")
            args.prompt_cache_file = prompt_cache_file(args.prompt_cache_file)
            kwargs = prompt_cache_config(args, own_cache_file(args.prompt_cache_file))
        prompt = args.prompt.replace("\\n", "\n").replace("\\t", "\t")  # mlx-lm's escapes
        prompt = sys.stdin.read() if prompt == "-" else prompt
        if not prompt.strip():
            raise ValueError("The prompt is empty.")
        seed(args.seed)
        model, tokenizer = load_model(args)
        prepare_model(model, args.dtype)
        draft = None
        if args.draft_model:
            draft, draft_tokenizer = load_model(args, args.draft_model)
            prepare_model(draft, args.dtype)
            if draft_tokenizer.vocab_size != tokenizer.vocab_size:
                raise ValueError(f"--draft-model {args.draft_model} has a vocabulary of {draft_tokenizer.vocab_size} "
                                 f"tokens; the model's has {tokenizer.vocab_size}.")
        meta = None
        if args.prompt_cache_file:
            cache, meta = load_document_cache(args.prompt_cache_file, model, expect=kwargs)
        else:
            cache = build_cache(model, kwargs)
        report = cache  # the draft model's caches follow the model's in the list mlx-lm takes
        if draft is not None:
            cache = cache + build_cache(draft, kwargs)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"mlx_kvq.generate: error: {e}")
    if meta is not None:  # continue the document convention of mlx_kvq.cache_prompt files
        tokens = continuation_tokens(tokenizer, prompt, meta, args.system_prompt, args.ignore_chat_template)
    else:
        tokens = encode_prompt(tokenizer, prompt, args.system_prompt, args.ignore_chat_template,
                               **args.chat_template_config)
    held = report[0].offset if meta is not None and report else 0  # the prompt cache file's tokens
    try:
        max_tokens = fit_to_context(model, held + len(tokens), args.max_tokens)
    except ValueError as e:
        sys.exit(f"mlx_kvq.generate: error: {e} Use mlx_kvq.summarize, which splits long documents, "
                 "or a shorter prompt.")
    if max_tokens < args.max_tokens:  # cut: the prompt and max_tokens fill the context
        print(f"mlx_kvq.generate: generating at most {max_tokens} tokens: the model's context is "
              f"{held + len(tokens) + max_tokens} tokens", file=sys.stderr)
    sampler = make_sampler(
        args.temp, args.top_p, args.min_p, args.min_tokens_to_keep, top_k=args.top_k,
        xtc_probability=args.xtc_probability, xtc_threshold=args.xtc_threshold,
        xtc_special_tokens=tokenizer.encode("\n") + list(tokenizer.eos_token_ids),
    )
    extra = {} if draft is None else {"draft_model": draft, "num_draft_tokens": args.num_draft_tokens}
    response, text = None, []
    if args.verbose:
        print("=" * 10)
    try:
        for response in stream_generate(
            model, tokenizer, tokens, max_tokens=max_tokens, sampler=sampler, prompt_cache=cache,
            prefill_step_size=args.prefill_step_size, **extra,
        ):
            if args.verbose:
                print(response.text, end="", flush=True)
            else:
                text.append(response.text)
    except ValueError as e:  # e.g. speculative decoding on a cache that cannot be trimmed
        sys.exit(f"mlx_kvq.generate: error: {e}")
    if not args.verbose:
        print("".join(text))
        return
    print()
    print("=" * 10)
    if response is not None:
        print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec")
        print(f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.3f} tokens-per-sec")
        print(f"Peak memory: {response.peak_memory:.3f} GB")
    print(f"KV cache config: {cache_config(report) or 'unquantized'}")
    print(cache_report(report))
    ranks = rank_report(report)
    if ranks:
        print(ranks)


if __name__ == "__main__":
    main()
