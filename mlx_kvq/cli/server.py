"""``mlx_kvq.server``: mlx-lm's OpenAI-compatible server (``/v1/chat/completions``,
``/v1/completions``, ``/v1/models``, ``/health``) with quantized KV caches that batch
continuously. mlx-lm's flags, plus the KV flags of ``mlx_kvq.generate`` (default 4 bits).

    mlx_kvq.server --port 8080                      # the embedded SmolLM2, 4-bit KV
    mlx_kvq.server --model mlx-community/Llama-3.2-3B-Instruct-4bit --kv-bits 8
    mlx.launch -n 2 --backend ring -- python -m mlx_kvq.cli.server --model DIR [--pipeline]

Under ``mlx.launch`` every rank loads its share of the model and rank 0 serves HTTP
(:mod:`mlx_kvq.generation.serving`); the other ranks log only warnings and errors.
"""

import argparse
import faulthandler
import logging
import os
import signal
import socket
import sys

import mlx.core as mx

from ..bridge import mlx_lm_server_parser
from ..generation.serving import ModelProvider, run
from ..models import check_model_files, reads_gguf
from .args import (add_dtype_argument, add_kv_arguments, cache_kwargs, check_kv, json_object, memory_size,
                   mlx_lm_bytes, ranged)
from .distributed import world

EXAMPLES = """examples:
  mlx_kvq.server                                   # embedded SmolLM2-135M, 4-bit KV, port 8080
  mlx_kvq.server --k-bits 8 --v-bits 4 --prompt-cache-bytes 2GB
  mlx_kvq.server --model mlx-community/Llama-3.2-3B-Instruct-4bit --port 8000
  mlx.launch -n 2 --backend ring -- python -m mlx_kvq.cli.server --model DIR --pipeline
  curl localhost:8080/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "default_model", "messages": [{"role": "user", "content": "Hi"}]}'
"""


def setup_arg_parser():
    """mlx-lm's server parser with our KV flags in place of its ``--kv-bits``,
    ``--kv-group-size`` and ``--quantized-kv-start``, plus ``--max-kv-size`` and ``--dtype``."""
    p = mlx_lm_server_parser()
    p.prog = "mlx_kvq.server"
    p.description = "mlx-lm's OpenAI-compatible HTTP server with quantized KV caches that batch continuously."
    p.epilog = EXAMPLES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.allow_abbrev = False
    p.conflict_handler = "resolve"
    p.add_argument("--max-kv-size", type=ranged(int, 1),
                   help="a sliding-window cache of this many tokens (quantized, as mlx-lm's RotatingKVCache)")
    p.add_argument("--max-kv-memory", type=memory_size, metavar="SIZE",
                   help="KV cache memory for the requests running at once (e.g. 8GB): each is sized for its prompt "
                        "plus max_tokens; a request that does not fit waits, one that never could is refused")
    add_dtype_argument(p)
    add_kv_arguments(p)
    for a in p._actions:
        if a.dest == "model":
            a.help = "local path, Hugging Face repo or .gguf file (default: embedded SmolLM2-135M-Instruct)"
        if a.dest in RANGES:  # mlx-lm takes any number: out of range, requests hang or fail
            a.type = ranged(*RANGES[a.dest])
        if a.dest == "prompt_cache_bytes":  # mlx-lm's parser raises a traceback for '-5' or 'abc'
            a.type = mlx_lm_bytes
        if a.dest == "chat_template_args":  # mlx-lm's takes any JSON: a list fails every chat request
            a.type = json_object
        if a.dest == "prompt_concurrency":
            a.default = None
            a.help = (f"prompts prefilled together (default: {PROMPT_CONCURRENCY['gpu']} on a GPU, "
                      f"{PROMPT_CONCURRENCY['cpu']} on the CPU)")
    return p


# Prompts prefilled together, per device. On the CPU prefill is compute-bound: a batch of
# prompts is no faster than one at a time, and mlx-lm's prompt batch right-pads its rows to
# the longest chunk (a row with a few tokens left computes a whole step); one at a time, the
# issue's load (16 clients, 2k-token prompts, 64 new tokens, 2 cores) ran in 244 s against 273 s,
# first tokens at 115 s on average against 200 (benchmarks/lab/server_timeline.py).
PROMPT_CONCURRENCY = {"gpu": 8, "cpu": 1}


# mlx-lm's numeric flags and their ranges (a request's own sampling values have the same)
RANGES = {
    "port": (int, 0, 65535), "num_draft_tokens": (int, 0), "temp": (float, 0), "top_p": (float, 0, 1),
    "top_k": (int, 0), "min_p": (float, 0, 1), "max_tokens": (int, 1), "decode_concurrency": (int, 1),
    "prompt_concurrency": (int, 1), "prefill_step_size": (int, 1), "prompt_cache_size": (int, 0),
}


def device_defaults(args):
    """Fill in the flags whose default depends on the device (``--prompt-concurrency``)."""
    if args.prompt_concurrency is None:
        args.prompt_concurrency = PROMPT_CONCURRENCY["gpu" if mx.default_device() == mx.gpu else "cpu"]
    return args


def check_distributed(args):
    """``ValueError`` for what a model split over ranks cannot serve (before any rank loads)."""
    if args.draft_model or args.adapter_path:
        flag = "--draft-model" if args.draft_model else "--adapter-path"
        raise ValueError(f"{flag} does not run under mlx.launch: split models take no draft model or adapter.")
    if args.pipeline and reads_gguf(args.model):
        raise ValueError(f"{args.model or 'the embedded model'}: GGUF models load as mlx-lm's llama, which has no "
                         "pipeline split; run tensor parallel (without --pipeline) or use an mlx-lm model directory.")


def check_start(args, listen=True):
    """What mlx-lm's server finds only after it has started (in its generation thread, or
    as a traceback): the model, draft model and adapters are there and go together, and
    (``listen``: the rank that serves HTTP) the host and port can be listened on."""
    try:
        check_model_files(args.model, args.adapter_path, args.draft_model,
                          names=("--model", "--adapter-path", "--draft-model"))
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    if not listen:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as mlx-lm's HTTP server binds
            s.bind(address)
    except OSError as e:
        raise ValueError(f"cannot listen on --host {args.host} --port {args.port}: {e.strerror or e}") from None


def main(argv=None):
    """The command: serves until interrupted, then ends the process (exit status 0)."""
    args = setup_arg_parser().parse_args(argv)
    rank, size = world()
    try:
        kv = check_kv(cache_kwargs(args))
        check_start(args, listen=rank == 0)
    except ValueError as e:
        sys.exit(f"mlx_kvq.server: error: {e}")
    args.kv_bits = None  # mlx-lm's own KV quantization stays off: the caches are ours
    device_defaults(args)
    if size > 1:
        try:
            check_distributed(args)
        except ValueError as e:
            sys.exit(f"mlx_kvq.server: error: {e}")
    if hasattr(signal, "SIGUSR1"):  # kill -USR1 <pid>: every thread's stack to stderr (a server that hangs)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level if rank == 0 else max(level, logging.WARNING),
                        format="%(asctime)s - %(levelname)s - %(message)s")
    run(args.host, args.port, ModelProvider(args, kv, args.dtype))
    # MLX 0.32 frees a thread's streams at the thread's end only where the thread called
    # mx.clear_streams(); mlx-lm's generation thread does not, and the process then aborts
    # during finalization (std::terminate; 4 of 4 Ctrl-C stops after requests on a Linux CPU,
    # tests/cli/test_server.py::test_interrupt_stops_the_server_cleanly; plain mx.exp in a
    # thread does it too). Nothing is left to run: flush and leave without finalizing.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
