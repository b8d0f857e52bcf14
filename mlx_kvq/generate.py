"""``mlx_kvq.generate``: mlx-lm's generate with a quantized KV cache.

    mlx_kvq.generate --prompt "Why is the sky blue?" --kv-bits 4
    mlx_kvq.generate --model mlx-community/Llama-3.2-3B-Instruct-4bit -p - < question.txt
"""

import argparse
import sys

import mlx.core as mx

from .cache_prompt import continuation_tokens, load_document_cache
from .integration import make_prompt_cache

EXAMPLES = """examples:
  mlx_kvq.generate -p "Why is the sky blue?"                 # embedded SmolLM2, 4-bit KV
  mlx_kvq.generate -p "Hi" --k-bits 8 --v-bits 4             # 8-bit keys, 4-bit values
  mlx_kvq.generate --model mlx-community/Llama-3.2-3B-Instruct-4bit -p - < prompt.txt
  mlx_kvq.generate --prompt-cache-file doc.safetensors -p "Who signs the contract?"
"""


def add_kv_arguments(parser):
    """The KV-cache flags shared by every mlx_kvq command."""
    g = parser.add_argument_group("KV cache")
    g.add_argument("--kv-bits", type=int, default=4, help="bits for keys and values (default: 4)")
    g.add_argument("--k-bits", type=int, help="bits for keys (default: --kv-bits)")
    g.add_argument("--v-bits", type=int, help="bits for values (default: --kv-bits)")
    g.add_argument("--kv-group-size", type=int, help="group size: 32, 64 or 128 (default: 64)")
    g.add_argument(
        "--kv-mode", default="affine", help="affine (default), mxfp8, mxfp4 or nvfp4"
    )
    g.add_argument(
        "--quantized-kv-start", type=int, default=0,
        help="keep the cache in fp16 until it holds this many tokens (default: 0)",
    )
    g.add_argument("--kv-rotate", choices=["none", "k", "kv"], help="Hadamard-rotate keys (and values)")
    g.add_argument("--kv-sinks", type=int, help="first tokens kept in fp16")
    g.add_argument("--kv-window", type=int, help="most recent tokens kept in fp16")
    g.add_argument("--no-kv-quant", action="store_true", help="use mlx-lm's fp16 cache (for comparison)")


def cache_kwargs(args):
    """``make_prompt_cache`` keyword arguments from the KV flags (None: fp16)."""
    if args.no_kv_quant:
        return None
    rotate = {None: None, "none": False}.get(args.kv_rotate, args.kv_rotate)
    return dict(
        kv_bits=args.kv_bits, k_bits=args.k_bits, v_bits=args.v_bits,
        kv_group_size=args.kv_group_size, mode=args.kv_mode,
        quantized_kv_start=args.quantized_kv_start,
        rotate=rotate, sinks=args.kv_sinks, window=args.kv_window,
    )


def build_cache(model, kwargs):
    """The prompt cache for ``cache_kwargs`` output."""
    return make_prompt_cache(model, kv_bits=None) if kwargs is None else make_prompt_cache(model, **kwargs)


def expected_config(model, kwargs):
    """The config a cache file must carry to match these flags (None for fp16)."""
    if kwargs is None:
        return None
    for c in build_cache(model, kwargs):
        if hasattr(c, "config"):
            return c.config
    return None


def cache_report(caches):
    """One line: KV bytes the tokens use, vs unquantized for the same tokens, and bytes allocated."""
    used = fp16 = 0
    for c in caches:
        if hasattr(c, "dense_nbytes"):
            used, fp16 = used + c.used_nbytes(), fp16 + c.dense_nbytes()
        elif getattr(c, "keys", None) is not None and hasattr(c, "offset"):
            n = c.keys[..., : c.offset, :].nbytes + c.values[..., : c.offset, :].nbytes
            used, fp16 = used + n, fp16 + n
    held = sum(c.nbytes for c in caches)
    ratio = f" = {used / fp16:.2f}x" if fp16 else ""
    dtypes = {str(c.dtype if hasattr(c, "dense_nbytes") else c.keys.dtype).split(".")[-1]
              for c in caches if getattr(c, "keys", None) is not None}
    return (
        f"KV cache: {used / 2**20:.2f} MiB for the tokens held, unquantized "
        f"({'/'.join(sorted(dtypes)) or 'fp16'}) would take "
        f"{fp16 / 2**20:.2f} MiB{ratio} ({held / 2**20:.2f} MiB allocated)"
    )


def setup_arg_parser():
    p = argparse.ArgumentParser(
        prog="mlx_kvq.generate",
        description="Generate text with an mlx-lm model and a quantized KV cache.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="local path, Hugging Face repo or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompt", "-p", default="Hello", help="the prompt, or - to read it from stdin")
    p.add_argument("--max-tokens", "-m", type=int, default=256, help="maximum tokens to generate")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling top-p")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--system-prompt", help="system prompt for the chat template")
    p.add_argument("--ignore-chat-template", action="store_true", help="feed the prompt as is")
    p.add_argument("--prompt-cache-file", help="a cache file from mlx_kvq.cache_prompt: the prompt continues it")
    p.add_argument("--verbose", action="store_true", help="print the prompt and the cache config")
    add_kv_arguments(p)
    return p


def encode_prompt(tokenizer, prompt, system_prompt=None, ignore_chat_template=False):
    """Prompt token ids, through the chat template when the tokenizer has one."""
    if ignore_chat_template or not getattr(tokenizer, "chat_template", None):
        return tokenizer.encode(prompt)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def main(argv=None):
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from .models import load

    args = setup_arg_parser().parse_args(argv)
    try:
        kwargs = cache_kwargs(args)
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        if not prompt.strip():
            raise ValueError("The prompt is empty.")
        if args.seed is not None:
            mx.random.seed(args.seed)
        model, tokenizer = load(args.model)
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
    for response in stream_generate(
        model, tokenizer, tokens, max_tokens=args.max_tokens,
        sampler=make_sampler(args.temp, args.top_p), prompt_cache=cache,
    ):
        print(response.text, end="", flush=True)
    print()
    print("=" * 10)
    if response is not None:
        print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec")
        print(f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.3f} tokens-per-sec")
        print(f"Peak memory: {response.peak_memory:.3f} GB")
    print(cache_report(cache))


if __name__ == "__main__":
    main()
