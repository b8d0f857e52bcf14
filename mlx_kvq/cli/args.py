"""What every command shares: its parser, range-checked number flags, the model and
tokenizer flags, the KV cache flags and ``--dtype``, and what they turn into."""

import argparse
import json
import os
import sys
from pathlib import Path

from .._blas import missing_warning
from ..bridge import cache_config, load_prompt_cache, parse_mlx_lm_size
from ..cache import QuantizedKVCache, cache_options
from ..generation.prefill import build_cache
from ..models import load, reads_gguf
from ..models.memory import parse_size


def command_parser(prog, description, examples=None):
    """A command's parser: no abbreviated flags (``--prompt`` is never taken for
    ``--prompt-cache-file``), the examples after the flags."""
    return argparse.ArgumentParser(prog=prog, description=description, epilog=examples,
                                   formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)


def memory_size(text_or_low=1):
    """An argparse type for a memory size with its unit ('16GB', '512MiB'), at least 1 byte;
    ``memory_size(0)`` is the type that also takes zero."""
    if not isinstance(text_or_low, str):
        return lambda text: _memory_size(text, text_or_low)
    return _memory_size(text_or_low, 1)


def _memory_size(text, low):
    try:
        size = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if size < low:
        what = "a memory budget must be positive" if low else "a memory size cannot be negative"
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
    return size


def mlx_lm_bytes(text):
    """An argparse type for a byte count as mlx-lm reads one (``--prompt-cache-bytes``: bytes,
    or with M, G, MB, GB), or with any unit :func:`memory_size` takes (2GiB); not negative."""
    try:
        return parse_mlx_lm_size(text)
    except Exception:  # mlx-lm's parser raises decimal's and KeyError for what it does not read
        return _memory_size(text, 0)


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


def str2bool(text):
    """mlx-lm's booleans: ``True``/``T``/``true``/``1`` or ``False``/``F``/``false``/``0``."""
    value = {"true": True, "t": True, "1": True, "yes": True, "false": False, "f": False, "0": False, "no": False}
    if text.lower() not in value:
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return value[text.lower()]


def json_object(text):
    """An argparse ``type``: a JSON object (``--chat-template-config``)."""
    try:
        v = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"enable_thinking\": false}}', got {text!r}")
    return v


def add_model_arguments(parser, eos_flag="--extra-eos-token"):
    """``--model`` and mlx-lm's model/tokenizer flags (``--adapter-path``,
    ``--trust-remote-code``, extra EOS tokens: ``--extra-eos-token`` in generate,
    ``--eos-token`` in cache_prompt, as in mlx-lm)."""
    parser.add_argument("--model", help="local path, Hugging Face repo or .gguf file "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter-path", help="trained LoRA adapter weights and config (mlx-lm models only)")
    parser.add_argument("--trust-remote-code", action="store_true", help="trust remote code of the tokenizer")
    parser.add_argument(eos_flag, dest="extra_eos_token", nargs="+", default=(), metavar="TOKEN",
                        help="more tokens that end generation")


def load_model(args, path=None):
    """``(model, tokenizer)`` from the model flags (``path`` instead of ``--model`` when given)."""
    path = args.model if path is None else path
    warning = missing_warning()
    if warning:
        print(warning, file=sys.stderr)
    kwargs = {}
    if getattr(args, "adapter_path", None):
        if reads_gguf(path):
            raise ValueError(f"--adapter-path applies to mlx-lm models only, not to the GGUF model "
                             f"{path or '(embedded)'}.")
        if not os.path.exists(args.adapter_path):
            raise FileNotFoundError(f"--adapter-path not found: {args.adapter_path}")
        kwargs["adapter_path"] = args.adapter_path
    if getattr(args, "trust_remote_code", False) and not reads_gguf(path):
        kwargs["tokenizer_config"] = {"trust_remote_code": True}
    model, tokenizer = load(path, **kwargs)
    for token in getattr(args, "extra_eos_token", ()):
        tokenizer.add_eos_token(token)
    return model, tokenizer


# The KV flags default to None so that a prompt-cache file's config can fill them;
# without a file these are the defaults (mlx_kvq's, see cache_options).
KV_DEFAULTS = {"kv_bits": 4, "kv_mode": "affine", "quantized_kv_start": 0}
# flag -> the config key of QuantizedKVCache.config it sets
KV_FLAGS = {
    "kv_bits": ("--kv-bits", ("k_bits", "v_bits")), "k_bits": ("--k-bits", ("k_bits",)),
    "v_bits": ("--v-bits", ("v_bits",)), "kv_group_size": ("--kv-group-size", ("group_size",)),
    "kv_mode": ("--kv-mode", ("mode",)), "quantized_kv_start": ("--quantized-kv-start", ("start",)),
    "kv_rotate": ("--kv-rotate", ("rotate",)), "kv_sinks": ("--kv-sinks", ("sinks",)),
    "kv_window": ("--kv-window", ("window",)),
}


def add_kv_arguments(parser):
    """The KV-cache flags shared by every mlx_kvq command."""
    g = parser.add_argument_group("KV cache (a --prompt-cache-file brings its own: these flags may then be left out)")
    bits = ranged(int, 1, 8)
    g.add_argument("--kv-bits", type=bits, help="bits for keys and values: 2, 3, 4, 5, 6 or 8 (default: 4)")
    g.add_argument("--k-bits", type=bits, help="bits for keys (default: --kv-bits)")
    g.add_argument("--v-bits", type=bits, help="bits for values (default: --kv-bits)")
    g.add_argument("--kv-group-size", type=ranged(int, 1), help="group size: 32, 64 or 128 (default: 64; 32 below 4 bits)")
    g.add_argument("--kv-mode", help="affine (default), mxfp8, mxfp4 or nvfp4")
    g.add_argument(
        "--quantized-kv-start", type=ranged(int, 0),
        help="keep the cache unquantized until it holds this many tokens (default: 0)",
    )
    g.add_argument("--kv-rotate", choices=["none", "k", "kv"], help="Hadamard-rotate keys (and values)")
    g.add_argument("--kv-sinks", type=ranged(int, 0), help="first tokens kept unquantized")
    g.add_argument("--kv-window", type=ranged(int, 0), help="most recent tokens kept unquantized")
    g.add_argument("--no-kv-quant", action="store_true",
                   help="mlx-lm's unquantized cache, in the model's compute dtype (float32 with --dtype float32, "
                   "the CPU default), for comparison")


def cache_kwargs(args):
    """``make_prompt_cache`` keyword arguments from the KV flags (None: unquantized), with
    ``max_kv_size`` where the command has ``--max-kv-size``."""
    size = getattr(args, "max_kv_size", None)
    extra = {} if size is None else {"max_kv_size": size}
    if args.no_kv_quant:
        return dict(kv_bits=None, **extra) if extra else None
    flag = lambda name: KV_DEFAULTS.get(name) if getattr(args, name) is None else getattr(args, name)
    kv_bits = flag("kv_bits") if args.kv_bits is not None or args.k_bits is None or args.v_bits is None else None
    rotate = {None: None, "none": False}.get(args.kv_rotate, args.kv_rotate)
    return dict(
        kv_bits=kv_bits, k_bits=args.k_bits, v_bits=args.v_bits,
        kv_group_size=args.kv_group_size, mode=flag("kv_mode"),
        quantized_kv_start=flag("quantized_kv_start"),
        rotate=rotate, sinks=args.kv_sinks, window=args.kv_window, **extra,
    )


def prompt_cache_config(args, path):
    """The KV config of the prompt-cache file ``path`` (None: unquantized), read before the
    model loads; ``ValueError`` naming the flag and the file's value where a KV flag
    contradicts it."""
    path = existing_cache_file(path)
    config = cache_config(load_prompt_cache(path))
    if config is None:
        given = [v[0] for k, v in KV_FLAGS.items() if getattr(args, k) is not None]
        if given:
            raise ValueError(f"{given[0]} contradicts {path}: it holds no mlx_kvq quantized cache (an unquantized "
                             "one, or mlx-lm's own); leave the KV flags out.")
        return None
    if args.no_kv_quant:
        raise ValueError(f"--no-kv-quant contradicts {path}: it holds a {config['k_bits']}/{config['v_bits']}-bit "
                         "(keys/values) cache (leave the KV flags out).")
    for name, (flag, keys) in KV_FLAGS.items():
        value = getattr(args, name)
        if value is None:
            continue
        if name == "kv_rotate":
            value = None if value == "none" else value
        keys = [k for k in keys if not (name == "kv_bits" and getattr(args, k) is not None)]  # --k/v-bits say it
        if name == "kv_bits" and any(config[k] != value for k in keys):
            raise ValueError(f"--kv-bits {value} contradicts {path}: it was saved with {config['k_bits']}-bit keys "
                             f"and {config['v_bits']}-bit values (leave --kv-bits out to use the file's).")
        for key in keys:
            if config[key] != value:
                shown = "none" if key == "rotate" and config[key] is None else config[key]
                raise ValueError(f"{flag} {getattr(args, name)} contradicts {path}: it was saved with "
                                 f"{key} {shown} (leave {flag} out to use the file's).")
    return config


def cache_file_name(path, reading=True):
    """The file a prompt-cache name ``path`` stands for: mlx-lm writes it with ``.safetensors``
    added where the name lacks it; reading, ``path`` itself where it exists."""
    p = Path(path).expanduser()
    if p.suffix != ".safetensors" and not (reading and p.exists()):
        p = p.with_name(p.name + ".safetensors")
    return p


def existing_cache_file(path):
    """The file ``path`` names (:func:`cache_file_name`) if it is a file; else a clear error
    (missing, a directory)."""
    p = cache_file_name(path)
    if p.is_dir():
        shown = path if p == Path(path).expanduser() else f"{path} ({p})"
        raise ValueError(f"--prompt-cache-file {shown} is a directory, not a prompt cache file.")
    if not p.is_file():
        raise FileNotFoundError(f"Prompt cache file not found: {path}")
    return str(p)


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
        help="compute dtype: float32 dequantizes the weights (much faster on CPU); model: the weights' "
        "own dtype; auto: float32 when running on the CPU, else the model's (default)",
    )


def add_prefill_step_argument(parser, default):
    """mlx-lm's ``--prefill-step-size`` (``--prefill-step`` is the same flag)."""
    parser.add_argument("--prefill-step-size", "--prefill-step", dest="prefill_step", type=ranged(int, 1),
                        default=default, help=f"prompt tokens per prefill step (default: {default})")
