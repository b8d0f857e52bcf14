"""``python -m mlx_kvq.eval``: fidelity of quantized KV caches against fp16.

    python -m mlx_kvq.eval --tokens 4096 --configs fp16 8 8/4 4 3 2 --needle

``--help`` documents the config syntax (``mlx_kvq.eval.configs``).
"""

import argparse
import json
import os
import sys

import mlx.core as mx

from .._blas import missing_warning
from ..eval.configs import CONFIG_HELP, ConfigError, parse_config
from ..eval.fidelity import _progress, evaluate
from ..eval.needle import NEEDLE, NEEDLE_DEPTHS, NEEDLE_MAX_TOKENS, needle_baseline_misses, needle_test
from ..eval.report import format_table
from ..eval.text import DEFAULT_CONFIGS, DEFAULT_TEXT, read_text, text_tokens
from ..models import load, to_fp32


def _depths(text):
    try:
        vals = [float(x) / 100 for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad depths {text!r}: expected percentages like 0,25,50,75,100"
        ) from None
    if not vals or any(not 0 <= v <= 1 for v in vals):
        raise argparse.ArgumentTypeError(f"depths must be percentages in 0..100, got {text!r}")
    return tuple(vals)


def _config_arg(text):
    try:
        parse_config(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _positive(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m mlx_kvq.eval",
        description="Measure the fidelity of quantized KV caches against the fp16 cache: "
        "perplexity, Δppl, KL(fp16 || quantized) per token, top-1 agreement, KV bytes "
        "per token, and (with --needle) needle-in-a-haystack recall.",
        epilog=CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--model", default=None,
                   help="model path, Hugging Face repo or .gguf file (default: the embedded "
                   "SmolLM2-135M-Instruct)")
    p.add_argument("--text", default=DEFAULT_TEXT,
                   help="UTF-8 text file (default: Persuasion by Jane Austen, shipped in mlx_kvq/data)")
    p.add_argument("--tokens", type=_positive, default=4096,
                   help="evaluate the first N tokens of the text (default 4096)")
    p.add_argument("--chunk", type=_positive, default=512,
                   help="prefill chunk size in tokens (default 512); mlx_kvq's cache attends "
                   "to a chunk's own tokens unquantized, so smaller chunks are closer to decoding")
    p.add_argument("--configs", nargs="+", type=_config_arg, default=DEFAULT_CONFIGS,
                   metavar="CONFIG", help=f"cache configs (default: {' '.join(DEFAULT_CONFIGS)})")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16", "model"],
                   default="float32",
                   help="run the model in this dtype (default float32: dequantized weights, fast on CPU; "
                   "auto: float32 on the CPU, the model's own on a GPU); "
                   "KV bytes are counted at 2 bytes per float either way")
    p.add_argument("--needle", action="store_true", help="also run the needle-in-a-haystack test")
    p.add_argument("--needle-tokens", type=_positive, default=2048,
                   help="haystack length in tokens (default 2048); cut so that the prompt and "
                   "the answer fit the model's context (e.g. 8192 gives a ~8.1k-token prompt "
                   "on the embedded model)")
    p.add_argument("--needle-depths", type=_depths, default=NEEDLE_DEPTHS,
                   help="needle depths in percent (default 0,25,50,75,100)")
    p.add_argument("--needle-max-tokens", type=_positive, default=NEEDLE_MAX_TOKENS,
                   help=f"answer tokens at most (default {NEEDLE_MAX_TOKENS}); decoding stops "
                   "early at the end of the turn or once the passphrase is out")
    p.add_argument("--no-ppl", action="store_true", help="skip the perplexity/KL pass")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def load_model(path, dtype="float32"):
    """Load a model and tokenizer with ``mlx_kvq.models.load`` and set its dtype."""
    warning = missing_warning()
    if warning:
        print(warning, file=sys.stderr)
    model, tokenizer = load(path)
    if dtype == "auto":  # as the other commands: float32 on the CPU, the model's own on a GPU
        dtype = "float32" if mx.default_device() == mx.cpu else "model"
    if dtype == "float32":
        to_fp32(model)
    elif dtype in ("float16", "bfloat16"):
        model.set_dtype(getattr(mx, dtype))
    return model, tokenizer


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    # check the text before loading a model
    try:
        read_text(args.text)
    except (OSError, ValueError) as e:
        p.error(str(e))
    progress = None if args.quiet else sys.stderr
    _progress(f"[eval] loading {args.model or 'the embedded SmolLM2-135M-Instruct'}", progress)
    try:
        model, tokenizer = load_model(args.model, args.dtype)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        p.error(f"could not load the model: {e}")
    try:
        return _run(args, model, tokenizer, progress)
    except ConfigError as e:
        p.error(str(e))
    except ValueError as e:  # e.g. a group size that does not divide this model's head_dim
        p.error(f"{type(e).__name__}: {e}")


def _run(args, model, tokenizer, progress):
    """The measurements of :func:`main`; prints the table, writes the JSON."""
    result = {
        "model": args.model or "embedded SmolLM2-135M-Instruct",
        "text": os.path.abspath(args.text),
        "chunk": args.chunk,
        "dtype": args.dtype,
        "device": str(mx.default_device()),
    }
    rows = needle_rows = None
    if not args.no_ppl:
        tokens = text_tokens(tokenizer, args.text, args.tokens)
        if tokens.shape[0] < args.tokens:
            _progress(f"[eval] the text has only {tokens.shape[0]} tokens", progress)
        rows = evaluate(model, tokens, args.configs, chunk=args.chunk, progress=progress)
        result["tokens"] = int(tokens.shape[0])
        result["results"] = rows
    if args.needle:
        ctx = text_tokens(tokenizer, args.text, args.needle_tokens)
        needle_rows = needle_test(
            model, tokenizer, ctx.tolist(), args.configs, args.needle_depths,
            chunk=args.chunk, max_tokens=args.needle_max_tokens, progress=progress,
        )
        result["needle"] = needle_rows

    if rows:
        print(f"{result['model']} | {os.path.basename(args.text)} | {result['tokens']} tokens | "
              f"chunk {args.chunk} | {args.dtype} | {result['device']}")
        print(format_table(rows, needle_rows))
        if result["tokens"] <= args.chunk:
            print(f"warning: no token attended to a quantized key or value: the {result['tokens']} tokens fit in one "
                  f"--chunk of {args.chunk}, and a chunk attends to its own tokens unquantized, so the rows above "
                  "measure the unquantized cache (bytes/token included); use more --tokens than --chunk "
                  "(e.g. --tokens 4096 --chunk 512)")
    if needle_rows:
        for r in needle_rows:
            marks = " ".join(
                f"{float(d):.0%}:{'ok' if hit else 'MISS'}" for d, hit in r["hits"].items()
            )
            print(f"{r['config']:<18} needle recall {r['recall']:.0%}  ({marks})")
        print(f"needle: {NEEDLE!r} in {needle_rows[0]['context_tokens']} prompt tokens at depths "
              + ", ".join(f"{d:.0%}" for d in args.needle_depths))
        misses = needle_baseline_misses(needle_rows)
        if misses:
            print("warning: fp16 itself missed the needle at depth "
                  + ", ".join(f"{float(d):.0%}" for d in misses)
                  + ": there the test says nothing about the quantized caches (the model "
                  "misses it without quantization; a shorter --needle-tokens is within its reach)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
