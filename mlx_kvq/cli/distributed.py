"""The commands under ``mlx.launch``: ``--pipeline`` (mlx-lm's flag), loading this rank's
share of the model, rank 0 alone printing, and the KV bytes of every rank.

    mlx.launch -n 2 --backend ring -- -m mlx_kvq.generate --model DIR -p "Hi"
"""

import os
import sys

import mlx.core as mx

from ..generation.distributed import by_rank_line, kv_bytes_by_rank, rank_file, rank_files
from ..models import load_sharded
from .args import cache_file_name, existing_cache_file
from .args import load_model as load_whole


def add_distributed_arguments(parser):
    parser.add_argument(
        "--pipeline", action="store_true",
        help="under mlx.launch: give each rank a slice of the layers (pipeline parallel) "
        "instead of a share of every layer's heads (tensor parallel, the default)")


def world():
    """``(rank, size)`` of this process (``(0, 1)`` outside mlx.launch)."""
    group = mx.distributed.init()
    return group.rank(), group.size()


def seed(value=None):
    """Seed the sampler, with one seed for all ranks (rank 0's when ``value`` is None):
    every rank samples the next token itself and they must agree."""
    rank, size = world()
    if size > 1 and value is None:
        mine = int(mx.random.randint(0, 1 << 30, ()).item()) if rank == 0 else 0
        value = int(mx.distributed.all_sum(mx.array(mine), stream=mx.cpu).item())
    if value is not None:
        mx.random.seed(value)


def load_model(args, path=None):
    """``(model, tokenizer)``: the whole model from the model flags (``path`` instead of
    ``--model``: :func:`.args.load_model`), or this rank's share under mlx.launch. Ranks
    other than 0 print nothing on stdout."""
    rank, size = world()
    if size == 1:
        return load_whole(args, path)
    if path is not None:
        raise ValueError("--draft-model does not run under mlx.launch: split models take no draft model.")
    if rank:
        sys.stdout = open(os.devnull, "w")
    return load_sharded(args.model, "pipeline" if args.pipeline else "tensor")


def prompt_cache_file(path):
    """The prompt-cache file ``path`` names (mlx-lm's ``.safetensors`` added where the name
    lacks it) once this process's file is there (this rank's under mlx.launch); a clear
    error otherwise, naming the per-rank files where only those exist."""
    p = cache_file_name(path)
    if world()[1] == 1 and not p.exists() and rank_files(p):
        raise FileNotFoundError(f"Prompt cache file not found: {path} (found {', '.join(rank_files(p))}: "
                                "run under mlx.launch as they were made)")
    existing_cache_file(own_cache_file(p))
    return str(p)


def log():
    """Where progress and reports go: stderr on rank 0, nowhere on the others."""
    return sys.stderr if world()[0] == 0 else None


def own_cache_file(path):
    """This rank's prompt-cache file for ``path`` (``path`` outside mlx.launch)."""
    rank, size = world()
    return rank_file(path, rank, size)


def rank_report(cache):
    """A line with every rank's KV bytes and their total ('' for one process); a
    collective: every rank calls it."""
    per_rank = kv_bytes_by_rank(cache)
    return "" if len(per_rank) == 1 else by_rank_line("KV cache", per_rank)
