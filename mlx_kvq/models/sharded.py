"""Models split over the processes of ``mlx.launch``: mlx-lm's ``sharded_load`` for
mlx-lm models, ``model.shard`` for GGUF files, and what each rank holds.

Tensor parallel (``model.shard``): every rank keeps all layers and its share of the
attention heads (so its share of each layer's KV cache). Pipeline parallel
(``model.model.pipeline``): every rank keeps a slice of the layers and their caches.
"""

from pathlib import Path

import mlx.core as mx

from ..bridge import sharded_load
from .embedded import default_model_path
from .gguf import is_gguf, load_gguf

MODES = ("tensor", "pipeline")
_ATTR = "mlx_kvq_sharding"  # "mode rank size" on a model split by ``load_sharded``


def load_sharded(path_or_repo=None, mode="tensor", group=None, **load_kwargs):
    """``(model, tokenizer)`` with this rank's share of the model (``mode``: tensor or pipeline).
    ``load_kwargs`` go to mlx-lm's ``sharded_load`` for mlx-lm models (``tokenizer_config``,
    ``trust_remote_code``, ``return_config``: then ``(model, tokenizer, config)``, the
    config ``{}`` for GGUF files)."""
    if mode not in MODES:
        raise ValueError(f"sharding must be one of {', '.join(MODES)}, got {mode!r}.")
    group = group or mx.distributed.init()
    path = Path(path_or_repo).expanduser() if path_or_repo is not None else Path(default_model_path())
    gguf = path.is_file() and is_gguf(path)
    if gguf:
        loaded = _load_gguf_sharded(path, mode, group)
        if load_kwargs.get("return_config"):
            loaded += ({},)
    else:
        groups = {"pipeline_group": group} if mode == "pipeline" else {"tensor_group": group}
        try:
            loaded = sharded_load(str(path_or_repo), **groups, **load_kwargs)
        except ValueError as e:
            raise ValueError(f"cannot split {path_or_repo} over {group.size()} ranks ({mode} parallel): {e}") from None
    mark_sharded(loaded[0], mode, group.rank(), group.size())
    return loaded


def _load_gguf_sharded(path, mode, group):
    if mode == "pipeline":
        raise ValueError(
            f"{path}: GGUF models load as mlx-lm's llama, which has no pipeline split; "
            "run tensor parallel (without --pipeline) or use an mlx-lm model directory.")
    model, tokenizer = load_gguf(path)
    n, args = group.size(), model.args
    heads, kv_heads = args.num_attention_heads, args.num_key_value_heads or args.num_attention_heads
    if heads % n or kv_heads % n:
        raise ValueError(
            f"{path} has {heads} attention heads and {kv_heads} KV heads: tensor parallel over "
            f"{n} ranks needs both divisible by {n}.")
    model.shard(group)
    mx.eval(model.parameters())
    return model, tokenizer


def mark_sharded(model, mode, rank, size):
    """Record that ``model`` is rank ``rank``'s share of ``size`` (``mode`` parallel)."""
    # a string: an nn.Module keeps tuples among its children
    object.__setattr__(model, _ATTR, f"{mode} {rank} {size}")
    return model


def sharding(model):
    """``{"sharding": tensor|pipeline|none, "rank": r, "world_size": n}`` of a loaded model."""
    mode, rank, size = getattr(model, _ATTR, "none 0 1").split()
    return {"sharding": mode, "rank": int(rank), "world_size": int(size)}
