"""Generation over the ranks of ``mlx.launch``: each rank's prompt-cache file (and the
checks that it fits the run loading it), and the KV bytes of every rank.

Under ``n > 1`` ranks, a prompt-cache path ``doc.safetensors`` stands for the files
``doc.rank0-of-n.safetensors`` ... one per rank, each holding that rank's share of the
cache (its heads, or its layers) and ``rank``, ``world_size`` and ``sharding`` in its
metadata next to the model fingerprint.
"""

from pathlib import Path

import mlx.core as mx

from ..bridge import generation_stream
from ..models.sharded import sharding


def rank_path(path, model):
    """The file of ``model``'s rank for a prompt-cache ``path`` (``path`` for one process)."""
    s = sharding(model)
    return rank_file(path, s["rank"], s["world_size"])


def rank_file(path, rank, size):
    """The file of rank ``rank`` of ``size`` for a prompt-cache ``path``."""
    if size == 1:
        return str(path)
    p = Path(path)
    return str(p.with_name(f"{p.stem}.rank{rank}-of-{size}{p.suffix}"))


def shard_metadata(model):
    """What a prompt-cache file records about the split it was made under (strings)."""
    return {k: str(v) for k, v in sharding(model).items()}


def check_shard_metadata(path, metadata, model):
    """Raise ``ValueError`` unless the file was made by the same rank of the same split."""
    here = shard_metadata(model)
    there = {k: metadata.get(k, d) for k, d in (("sharding", "none"), ("rank", "0"), ("world_size", "1"))}
    if there != here:
        made = _describe(there)
        raise ValueError(
            f"{path} holds the cache of {made}, but this is {_describe(here)}. "
            "Load it with the same number of processes and sharding (--pipeline) it was made with.")


def missing_rank_file(path, model):
    """A clear error for a prompt-cache ``path`` this run has no file for: it names the
    files that exist for other splits."""
    p = Path(path)
    found = rank_files(path)
    if p.is_file():
        found.insert(0, p.name)
    wanted = Path(rank_path(path, model)).name
    if not found:
        return FileNotFoundError(f"Prompt cache file not found: {path} (this rank reads {wanted}).")
    return ValueError(
        f"{path}: this run ({_describe(shard_metadata(model))}) reads {wanted}, which does not exist; "
        f"found {', '.join(found)}. Load it with the number of processes and sharding it was made with.")


def rank_files(path):
    """The names of the per-rank files that exist for a prompt-cache ``path``."""
    p = Path(path)
    return sorted(f.name for f in p.parent.glob(f"{p.stem}.rank*-of-*{p.suffix}"))


def _describe(s):
    if s["world_size"] == "1":
        return "a single process"
    return f"rank {s['rank']} of {s['world_size']} ({s['sharding']} parallel)"


def kv_bytes_by_rank(cache, group=None):
    """Bytes every rank's cache uses for its tokens, as a list indexed by rank (all ranks
    must call it: it is a collective)."""
    group = group or mx.distributed.init()
    # mlx-lm computes a step ahead: it must finish on every rank before this collective
    mx.synchronize(generation_stream)
    used = sum(c.used_nbytes() if hasattr(c, "used_nbytes") else int(getattr(c, "nbytes", 0)) for c in cache)
    return ints_by_rank(used, group, stream=mx.cpu)


def ints_by_rank(value, group=None, stream=None):
    """Every rank's non-negative int ``value``, as a list indexed by rank (a collective: all
    ranks call it, in the same order as their other collectives on ``stream``)."""
    group = group or mx.distributed.init()
    if group.size() == 1:
        return [value]
    # as two int32 parts (high and low 20 bits): bytes can pass 2**31; each rank fills its row
    rows = [[0, 0]] * group.size()
    rows[group.rank()] = [value >> 20, value & ((1 << 20) - 1)]
    parts = mx.distributed.all_sum(mx.array(rows, dtype=mx.int32), group=group, stream=stream)
    return [int(hi) << 20 | int(lo) for hi, lo in parts.tolist()]


def by_rank_line(what, per_rank):
    """``"<what> per rank: a, b MiB; total c MiB over n ranks"`` for byte counts by rank (in
    KiB while every rank holds less than 1 MiB)."""
    unit, size = ("MiB", 2**20) if max(per_rank) >= 2**20 else ("KiB", 2**10)
    each = ", ".join(f"{b / size:.2f}" for b in per_rank)
    return f"{what} per rank: {each} {unit}; total {sum(per_rank) / size:.2f} {unit} over {len(per_rank)} ranks"
