"""The cache's defaults, the checks of its options, and the one mapping from options and
saved configs to the constructor's arguments."""

import operator

ROTATE = (None, "k", "kv")
MAX_TOKENS = (1 << 30) - 1  # token counts and positions: the kernels carry them in 30 bits


def whole(name, value, low=0, high=MAX_TOKENS):
    """``value`` as a plain ``int`` in ``[low, high]`` (numpy integers too), else a
    ``ValueError`` that names ``name`` and the value (``4.0``, ``"4"``, ``True``, ``[4]``)."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    v = operator.index(value)
    if not low <= v <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {v}.")
    return v


def default_options(k_bits, v_bits, mode="affine"):
    """The group size, rotation, sinks and window a format gets unless told otherwise.

    Chosen on SmolLM2-135M-Instruct, 4096 tokens, token-by-token decode semantics
    (benchmarks/FIDELITY.md): a 32-token unquantized window does most of the work,
    Hadamard rotation roughly halves what is left, group 32 is needed below 4 bits
    (at 4 bits group 64 meets the targets and keeps the cache at ~0.28x of fp16).
    """
    low = min(k_bits, v_bits)
    if mode != "affine":
        rotate = "kv" if low <= 4 else None
        return {"group_size": None, "rotate": rotate, "sinks": 4 if rotate else 0, "window": 32}
    if low >= 8:
        return {"group_size": 64, "rotate": None, "sinks": 0, "window": 32}
    window = {2: 256, 3: 64}.get(low, 32)
    return {"group_size": 32 if low <= 3 else 64, "rotate": "kv", "sinks": 4, "window": window}




def cache_options(kv_bits=4, *, k_bits=None, v_bits=None, kv_group_size=None, mode="affine",
                  quantized_kv_start=0, rotate=None, sinks=None, window=None):
    """``QuantizedKVCache`` keyword arguments from ``make_prompt_cache``'s options (mlx-lm's
    names), or None where they ask for no quantization (``kv_bits``, ``k_bits`` and
    ``v_bits`` all None)."""
    if kv_bits is None and k_bits is None and v_bits is None:
        return None
    return dict(
        bits=kv_bits if kv_bits is not None else (k_bits or v_bits),
        group_size=kv_group_size, k_bits=k_bits, v_bits=v_bits, mode=mode,
        rotate=rotate, sinks=sinks, window=window, start=quantized_kv_start,
    )


def init_kwargs(config):
    """``QuantizedKVCache`` keyword arguments that rebuild a cache from its ``config``."""
    return dict(
        bits=config["k_bits"], group_size=config["group_size"], k_bits=config["k_bits"],
        v_bits=config["v_bits"], mode=config["mode"], rotate=config["rotate"] or False,
        sinks=config["sinks"], window=config["window"], start=config["start"],
    )
