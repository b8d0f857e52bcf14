"""The bytes a cache uses for the tokens it holds, whatever its class."""

import mlx.core as mx


def _arrays(obj, depth=0):
    """Arrays with a token axis (ndim >= 3) held by ``obj``, recursively."""
    if isinstance(obj, mx.array):
        return [obj] if obj.ndim >= 3 else []
    if depth > 3:
        return []
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    else:
        return []
    return [a for x in items for a in _arrays(x, depth + 1)]


def layer_bytes(c, fp_bytes=2):
    """Bytes one layer's cache uses for the tokens it holds (not its preallocated room).

    Counts the arrays with a token axis (axis -2) among the cache's attributes, up
    to ``offset`` tokens each (``n_packed`` for the packed buffers of mlx_kvq's
    cache). Floating-point arrays count ``fp_bytes`` per element, so a run with
    an fp32 model on CPU reports what the cache holds with an fp16 model;
    ``fp_bytes=None`` counts them as stored. Falls back to the cache's ``nbytes``.
    """
    offset = int(getattr(c, "offset", 0) or 0)
    packed = getattr(c, "n_packed", None)
    total, seen = 0, set()
    for attr, value in (vars(c).items() if hasattr(c, "__dict__") else ()):
        if attr == "_after":  # what mlx_kvq's cache state depends on (pipeline ranks), not tokens
            continue
        used = packed if packed is not None and attr in ("packed_keys", "packed_values") else offset
        for a in _arrays(value):
            if id(a) in seen:
                continue
            seen.add(id(a))
            t = min(a.shape[-2], used)
            per = a.size // a.shape[-2] if a.shape[-2] else 0
            if fp_bytes and mx.issubdtype(a.dtype, mx.floating):
                total += t * per * fp_bytes
            else:
                total += t * per * a.itemsize
    if not seen:
        return int(getattr(c, "nbytes", 0))
    return total


def cache_bytes(cache, fp_bytes=2):
    """Bytes a per-layer cache list uses for its tokens (see :func:`layer_bytes`)."""
    return sum(layer_bytes(c, fp_bytes) for c in cache)


def describe_cache(cache):
    """The settings of the first layer cache that has any (a dict), else its class name."""
    for c in cache:
        cfg = getattr(c, "config", None)
        if isinstance(cfg, dict):
            return dict(cfg)
    for c in cache:
        if hasattr(c, "bits"):
            return {"class": type(c).__name__, "bits": c.bits, "group_size": c.group_size}
    return {"class": type(cache[0]).__name__} if cache else {}
