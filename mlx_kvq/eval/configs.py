"""Cache config strings of ``mlx_kvq.eval`` (``4``, ``8/4``, ``3:rkv:s4``, ``mlxlm:4``, ...)
and the caches they build."""

from ..bridge import make_prompt_cache, mlx_lm_quantized_cache
from ..format import MODES


BASELINE = "fp16"
BITS = MODES["affine"][0]
GROUPS = MODES["affine"][1]
ROTATIONS = {"rk": "k", "rkv": "kv", "r0": False}

CONFIG_HELP = """\
cache configs (each is one string; options are separated by ':'):
  fp16            the baseline: mlx-lm's own make_prompt_cache(model), always run
                  (it holds the model's dtype: float32 with the default --dtype)
  B               B-bit keys and values, B in {bits}; the library's defaults
                  for that width (rotation, sinks, window, group size)
  K/V             K-bit keys, V-bit values, e.g. 8/4
  mxfp8 mxfp4 nvfp4   MLX's microscaling formats (fixed group sizes 32/32/16)
options after the first field:
  gN              group size N (affine: {groups}; mxfp*: 32, nvfp4: 16)
  sN              keep the first N tokens (attention sinks) in fp16
  wN              keep the most recent N tokens in fp16
  rk | rkv | r0   Hadamard-rotate keys | keys and values | nothing
  plain           no rotation, sinks or window (plain group-wise quantization)
  mlxlm:B[:gN]    mlx-lm's own QuantizedKVCache (B bits for keys and values,
                  group size N, default 64): the plain group-wise reference
examples: 4   8/4   4:g32   3:rkv:s4   2:w128:s4   4:g64:plain   mlxlm:4:g64
""".format(bits=", ".join(map(str, BITS)), groups=", ".join(map(str, GROUPS)))


class ConfigError(ValueError):
    """A cache config string that cannot be parsed."""




def _int(text, what, spec):
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"bad {what} {text!r} in cache config {spec!r}: expected an integer") from None


def _bits(text, spec):
    b = _int(text, "bits", spec)
    if b not in BITS:
        raise ConfigError(
            f"unsupported bits {b} in cache config {spec!r}: choose one of {list(BITS)}"
        )
    return b


def parse_config(spec):
    """Parse a config string into ``(backend, kwargs)``.

    ``backend`` is ``"fp16"`` (mlx-lm's KVCache), ``"mlxlm"`` (mlx-lm's
    QuantizedKVCache; kwargs ``bits``, ``group_size``) or ``"kvq"`` (kwargs for
    ``mlx_kvq.make_prompt_cache``). Raises ``ConfigError`` with a clear message.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"empty cache config {spec!r}; see --help for the syntax")
    spec = spec.strip()
    fields = spec.split(":")
    if fields[0].lower() in ("fp16", "fp", "none", "baseline"):
        if len(fields) > 1:
            raise ConfigError(f"the fp16 baseline takes no options: {spec!r}")
        return BASELINE, {}
    backend = "kvq"
    if fields[0].lower() == "mlxlm":
        backend = "mlxlm"
        fields = fields[1:]
        if not fields or not fields[0]:
            raise ConfigError(f"cache config {spec!r} needs bits after 'mlxlm:', e.g. mlxlm:4:g64")

    head, opts = fields[0].lower(), fields[1:]
    kw = {}
    if head in MODES and head != "affine":
        kw["kv_bits"], kw["mode"] = MODES[head][0][-1], head
    elif "/" in head:
        k, _, v = head.partition("/")
        kw["k_bits"], kw["v_bits"] = _bits(k, spec), _bits(v, spec)
    elif head.isdigit():
        kw["kv_bits"] = _bits(head, spec)
    else:
        raise ConfigError(
            f"cannot read {fields[0]!r} in cache config {spec!r}: expected bits (e.g. 4), "
            f"key/value bits (e.g. 8/4), a mode ({', '.join(m for m in MODES if m != 'affine')}) "
            "or fp16; see --help"
        )

    for opt in opts:
        o = opt.lower()
        if o in ROTATIONS:
            kw["rotate"] = ROTATIONS[o]
        elif o == "plain":
            kw.update(rotate=False, sinks=0, window=0)
        elif len(o) > 1 and o[0] in "gsw" and o[1:].lstrip("-").isdigit():
            n = int(o[1:])
            if o[0] == "g":
                kw["kv_group_size"] = n
            elif n < 0:
                raise ConfigError(f"{opt!r} in cache config {spec!r} must not be negative")
            else:
                kw["sinks" if o[0] == "s" else "window"] = n
        else:
            raise ConfigError(
                f"unknown option {opt!r} in cache config {spec!r}; valid options: gN (group size), "
                "sN (fp16 sink tokens), wN (fp16 recent window), rk/rkv/r0 (rotation), plain"
            )

    mode = kw.get("mode", "affine")
    if "kv_group_size" in kw:
        allowed = MODES[mode][1]
        if kw["kv_group_size"] not in allowed:
            raise ConfigError(
                f"unsupported group size {kw['kv_group_size']} in cache config {spec!r}: "
                f"mode {mode} allows {', '.join(map(str, allowed))}"
            )

    if backend == "mlxlm":
        if "kv_bits" not in kw or set(kw) - {"kv_bits", "kv_group_size"}:
            raise ConfigError(
                f"mlx-lm's QuantizedKVCache takes bits and a group size only (e.g. mlxlm:4:g64), "
                f"not {spec!r}"
            )
        return backend, {"bits": kw["kv_bits"], "group_size": kw.get("kv_group_size", 64)}
    return backend, kw


def make_cache(model, spec):
    """Build the per-layer cache list for a config string."""
    backend, kw = parse_config(spec)
    if backend == BASELINE:
        return make_prompt_cache(model, kv_bits=None)
    if backend == "mlxlm":
        return mlx_lm_quantized_cache(model, **kw)
    return make_prompt_cache(model, **kw)
