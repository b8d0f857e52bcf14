"""What every command shares: its parser, range-checked number flags, the KV cache flags
and ``--dtype``, and what they turn into."""

import argparse

from ..cache import QuantizedKVCache, cache_options
from ..generation.prefill import build_cache


def command_parser(prog, description, examples=None):
    """A command's parser: no abbreviated flags (``--prompt`` is never taken for
    ``--prompt-cache-file``), the examples after the flags."""
    return argparse.ArgumentParser(prog=prog, description=description, epilog=examples,
                                   formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)


def ranged(kind, low=None, high=None):
    """An argparse ``type`` that takes a ``kind`` (int, float) in ``[low, high]``."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if v != v or (low is not None and v < low) or (high is not None and v > high):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return v

    parse.__name__ = kind.__name__
    return parse


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
    """``make_prompt_cache`` keyword arguments from the KV flags (None: fp16), with
    ``max_kv_size`` where the command has ``--max-kv-size``."""
    size = getattr(args, "max_kv_size", None)
    extra = {} if size is None else {"max_kv_size": size}
    if args.no_kv_quant:
        return dict(kv_bits=None, **extra) if extra else None
    rotate = {None: None, "none": False}.get(args.kv_rotate, args.kv_rotate)
    return dict(
        kv_bits=args.kv_bits, k_bits=args.k_bits, v_bits=args.v_bits,
        kv_group_size=args.kv_group_size, mode=args.kv_mode,
        quantized_kv_start=args.quantized_kv_start,
        rotate=rotate, sinks=args.kv_sinks, window=args.kv_window, **extra,
    )


def check_kv(kv):
    """Raise ``ValueError`` now (before loading a model) if the KV flags are not supported."""
    options = None if kv is None else cache_options(**{k: v for k, v in kv.items() if k != "max_kv_size"})
    if options is not None:
        QuantizedKVCache(**options)
    return kv


def expected_config(model, kwargs):
    """The config a cache file must carry to match these flags (None for fp16)."""
    if kwargs is None:
        return None
    for c in build_cache(model, kwargs):
        if hasattr(c, "config"):
            return c.config
    return None


def add_dtype_argument(parser):
    parser.add_argument(
        "--dtype", choices=["auto", "model", "float32"], default="auto",
        help="compute dtype: float32 dequantizes the weights (much faster on CPU); "
        "auto: float32 when running on the CPU (default)",
    )
