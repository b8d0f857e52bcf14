"""The KV cache report every command prints. Sizes are decimal (MB = 10^6 bytes, GB =
10^9), as mlx-lm's "Peak memory: ... GB"."""


def mb(n):
    return f"{n / 1e6:.2f} MB"


def _name(dtype):
    return str(dtype).split(".")[-1]


def cache_report(caches):
    """The KV line: bytes the tokens use, vs unquantized in the cache's real dtype for the
    same tokens, and bytes allocated; then a line saying how many tokens sit in the
    unquantized sinks and window when they make up a large part of the cache."""
    used = dense = tokens = kept = 0
    dtypes, store = set(), set()
    for c in caches:
        if hasattr(c, "dense_nbytes"):  # ours
            used, dense = used + c.used_nbytes(), dense + c.dense_nbytes()
            if c.dtype is not None:
                dtypes.add(_name(c.dtype))
                store.add(_name(c.dense_dtype))
                if not tokens:  # the first layer's counts (every layer holds the same tokens)
                    tokens = c.held()  # a rotating or chunked cache holds fewer than its offset
                    kept = tokens - c.n_packed
        elif getattr(c, "keys", None) is not None and hasattr(c, "offset"):
            n = c.keys[..., : c.offset, :].nbytes + c.values[..., : c.offset, :].nbytes
            used, dense = used + n, dense + n
            dtypes.add(_name(c.keys.dtype))
    held = sum(c.nbytes for c in caches)
    ratio = f" = {used / dense:.2f}x" if dense else ""
    line = (f"KV cache: {mb(used)} for the tokens held; unquantized ({'/'.join(sorted(dtypes)) or 'empty'}) "
            f"they would take {mb(dense)}{ratio} ({mb(held)} allocated)")
    if tokens and kept * 4 >= tokens:
        line += (f"\n  ({kept} of the {tokens} tokens are in the unquantized sinks and recent window "
                 f"({'/'.join(sorted(store))}), which dominate a short context; the ratio falls toward "
                 "the quantized format's as the context grows)")
    return line


def fp16_nbytes(cache):
    """What the tokens of our caches would take unquantized in float16 (0 if already float16)."""
    total = 0
    for c in cache:
        if hasattr(c, "dense_nbytes") and c.dtype is not None and c.dtype.size != 2:
            total += c.dense_nbytes() // c.dtype.size * 2
    return total
