"""A cache's saved ``state``: its header and the checks a state passes before a cache takes it.

The state (what mlx-lm's ``save_prompt_cache`` writes) is a JSON header, the offset, the
packed token count and the arrays of the three runs. The header carries a digest (sha256)
of the config, the dims, the counts and every array's shape and dtype, so that a file whose
metadata was changed after saving is refused. The array bytes are not in it: hashing them
costs about as much as writing the file (sha256 0.93x, crc32 0.51x of
``mx.save_safetensors`` for a 51 MiB 4-bit cache, 2-core CPU, to the page cache), and
changed bytes of the right shape give wrong values, never a crash.
"""

import hashlib
import json

import mlx.core as mx

from .. import format as fmt
from .defaults import whole

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
NAMES = ("keys", "values", "sink_keys", "sink_values", "window_keys", "window_values")


def _arrays(v):
    """The state's arrays by name (packed runs as tuples), in the order of ``NAMES``."""
    return dict(zip(NAMES, v[3:9]))


def _describe(arrays):
    one = lambda x: [list(x.shape), str(x.dtype)] if isinstance(x, mx.array) else repr(type(x))
    return [[one(x) for x in a] if isinstance(a, (tuple, list)) else None if a is None else one(a)
            for a in arrays.values()]


def digest(head, arrays):
    """sha256 of the header ``head`` (without its digest) and the arrays' shapes and dtypes."""
    head = {k: x for k, x in head.items() if k != "digest"}
    text = json.dumps([head, _describe(arrays)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def header(config, dims, steps, offset, n_packed, arrays, wide=False):
    """The state's JSON header, with its digest (``wide``: a float32 model's cache that
    stores float32, ``QuantizedKVCache._widen``)."""
    head = {"config": config, "dims": dims, "steps": steps, "offset": offset, "n_packed": n_packed, "wide": wide}
    head["digest"] = digest(head, arrays)
    return json.dumps(head, sort_keys=True)


def read(v):
    """The header of state ``v``, after the checks that need no cache: its structure, the
    digest, the counts and dims. A ``ValueError`` saying what is wrong otherwise."""
    if not isinstance(v, (tuple, list)) or len(v) != 9 or not isinstance(v[0], str):
        raise ValueError("Not a mlx_kvq QuantizedKVCache state (was it saved by another cache class?).")
    try:
        head = json.loads(v[0])
    except json.JSONDecodeError:
        raise ValueError("The cache state's header is not JSON: the file is damaged.") from None
    if not isinstance(head, dict) or not isinstance(head.get("config"), dict):
        raise ValueError("The cache state's header has no config: the file is damaged.")
    if "digest" not in head:
        raise ValueError("The cache state has no digest: it was saved by an older mlx_kvq; "
                         "make the prompt cache file again.")
    arrays = _arrays(v)
    packed = 3 if head["config"].get("mode") == "affine" else 2
    for name, a in arrays.items():
        run = isinstance(a, (tuple, list))
        if (run and name not in ("keys", "values")) or (name in ("keys", "values") and a is not None and (
                not run or len(a) != packed)):
            raise ValueError(f"The cache state's {name} are missing arrays or hold others: the file is damaged.")
        for x in a if run else (a,):
            if (run or x is not None) and not isinstance(x, mx.array):
                raise ValueError(f"The cache state's {name} are missing or not arrays: the file is damaged.")
    if head["digest"] != digest(head, arrays):
        raise ValueError("The cache state does not match its digest: its config, dims, counts, "
                         "array shapes or dtypes were changed after it was saved.")
    for what, x in (("offset", v[1]), ("n_packed", v[2])):
        whole(f"the cache state's {what}", x)
        if x != head.get(what):
            raise ValueError(f"The cache state's {what} {x} differs from its header's {head.get(what)}.")
    dims = head.get("dims")
    if not isinstance(dims, list) or len(dims) != 4:
        raise ValueError(f"The cache state's dims {dims!r} are not [batch x heads, key dim, value dim, dtype].")
    if dims != [None] * 4:
        if dims[3] not in DTYPES:
            raise ValueError(f"The cache state's dtype {dims[3]!r} is not one of {sorted(DTYPES)}.")
        for i, d in enumerate(dims[:3]):
            whole(f"the cache state's dims[{i}]", d, 1)
    elif v[1]:
        raise ValueError("The cache state has an offset but no dims: the file is damaged.")
    return head


def schedule(head, offset):
    """``(steps, log)`` of the pack schedule in a header (see ``QuantizedKVCache.trim``)."""
    steps = head.get("steps")
    if not (isinstance(steps, list) and len(steps) == 2 and isinstance(steps[1], list)):
        raise ValueError(f"The cache state's pack schedule {steps!r} is not [steps, log].")
    log = []
    for e in steps[1]:
        if not (isinstance(e, list) and len(e) == 2):
            raise ValueError(f"The cache state's pack log entry {e!r} is not [offset, steps].")
        log.append((whole("a pack log offset", e[0], 1, offset), whole("a pack log step", e[1])))
    return whole("the cache state's steps", steps[0]), log


def check_arrays(cache, v, exact_offset=True):
    """Raise ``ValueError`` unless the arrays of state ``v`` are those of ``cache`` (its
    config and dims already set from the header): every run's shape and dtype from the
    bits, group size, dims and counts; sinks, packed and window tokens summing to the
    offset (``exact_offset`` False: at most the offset, for a cache that drops tokens)."""
    arrays = _arrays(v)
    if cache.kv_heads is None:  # never filled
        if any(a is not None for a in arrays.values()) or v[2]:
            raise ValueError("The cache state holds arrays but no dims: the file is damaged.")
        return
    f = cache.format
    pk, pv = f.padded_dim(cache.k_dim), f.padded_dim(cache.v_dim)
    dt = cache.store_dtype
    BH = cache.kv_heads
    first = next((a[0] if isinstance(a, (tuple, list)) else a for a in arrays.values() if a is not None), None)
    if first is None:
        if v[1] or v[2]:
            raise ValueError(f"The cache state holds no arrays but an offset of {v[1]}: the file is damaged.")
        return
    if first.ndim != 4 or first.shape[0] * first.shape[1] != BH:
        raise ValueError(f"The cache state's arrays are not (batch, heads, tokens, dim) with batch x heads = {BH}.")
    B, H = first.shape[:2]
    counts = {}

    def expect(name, a, dims, dtype):
        if a is None:
            return 0
        if a.ndim != 4 or a.shape[:2] != (B, H) or a.shape[3] != dims or a.dtype != dtype:
            raise ValueError(f"The cache state's {name} has shape {a.shape} and dtype {a.dtype}; the cache's "
                             f"config and dims need ({B}, {H}, tokens, {dims}) {dtype}.")
        return a.shape[2]

    for name, bits, d in (("keys", f.k_bits, pk), ("values", f.v_bits, pv)):
        p = arrays[name]
        if p is None:
            counts[name] = 0
            continue
        specs = fmt.packed_dims(d, bits, f.group_size, f.mode)
        if not isinstance(p, (tuple, list)) or len(p) != len(specs):
            raise ValueError(f"The cache state's packed {name} are not {len(specs)} arrays for mode {f.mode!r}.")
        n = {expect(f"packed {name}[{i}]", a, size, dtype or dt) for i, (a, (size, dtype)) in enumerate(zip(p, specs))}
        if len(n) != 1:
            raise ValueError(f"The cache state's packed {name} arrays hold different token counts {sorted(n)}.")
        counts[name] = n.pop()
    # unquantized runs: the model's dtype, or the scales' (a float32 model's file may hold
    # float16 ones: the state setter casts them to the model's)
    for name, d in (("sink_keys", pk), ("sink_values", pv), ("window_keys", pk), ("window_values", pv)):
        a = arrays[name]
        counts[name] = expect(name, a, d, dt if a is not None and a.dtype == dt else cache.dense_dtype)
    n, s, w = counts["keys"], counts["sink_keys"], counts["window_keys"]
    if (counts["values"], counts["sink_values"], counts["window_values"]) != (n, s, w) or n != v[2]:
        raise ValueError(f"The cache state's keys and values hold different token counts {counts}, "
                         f"or the packed run not its n_packed {v[2]}.")
    if s > cache.sinks or (s < cache.sinks and s != v[1]):
        raise ValueError(f"The cache state holds {s} sink tokens; its config keeps {cache.sinks}.")
    if s + n + w != v[1] and (exact_offset or s + n + w > v[1]):
        raise ValueError(f"The cache state holds {s} + {n} + {w} tokens (sinks, packed, window); "
                         f"its offset is {v[1]}.")
