"""The KV cache line every command prints."""


def cache_report(caches):
    """One line: KV bytes the tokens use, vs unquantized for the same tokens, and bytes allocated."""
    used = fp16 = 0
    for c in caches:
        if hasattr(c, "dense_nbytes"):
            used, fp16 = used + c.used_nbytes(), fp16 + c.dense_nbytes()
        elif getattr(c, "keys", None) is not None and hasattr(c, "offset"):
            n = c.keys[..., : c.offset, :].nbytes + c.values[..., : c.offset, :].nbytes
            used, fp16 = used + n, fp16 + n
    held = sum(c.nbytes for c in caches)
    ratio = f" = {used / fp16:.2f}x" if fp16 else ""
    dtypes = {str(c.dtype if hasattr(c, "dense_nbytes") else c.keys.dtype).split(".")[-1]
              for c in caches if getattr(c, "keys", None) is not None}
    return (
        f"KV cache: {used / 2**20:.2f} MiB for the tokens held, unquantized "
        f"({'/'.join(sorted(dtypes)) or 'fp16'}) would take "
        f"{fp16 / 2**20:.2f} MiB{ratio} ({held / 2**20:.2f} MiB allocated)"
    )


def fp16_nbytes(cache):
    """What the tokens of our caches would take unquantized in fp16 (0 if already fp16)."""
    total = 0
    for c in cache:
        if hasattr(c, "dense_nbytes") and c.dtype is not None and c.dtype.size != 2:
            total += c.dense_nbytes() // c.dtype.size * 2
    return total
