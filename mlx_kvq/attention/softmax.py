"""The softmax of the attention paths written with MLX ops (the CPU's, and the GPUs' reference).

On the CPU MLX's ``mx.exp`` takes 14.5-25 ns a float32 element (the Linux wheel on a 2-core
AMD EPYC), most of a prefill's attention there. ``exp`` computes it in two compiled kernels
(a range reduction, then a polynomial in 2**f) in 2.9 ns for arrays up to 1M elements
(``python3 benchmarks/lab/cpu_exp.py``), with a relative error of at most 4.0e-6 against
float64 over [-100, 0] and 1.1e-6 over [-20, 0], as ``mx.exp``'s (3.9e-6, 1.0e-6). An earlier
polynomial (Cody-Waite reduction, Cephes' coefficients) erred by 8e-8 but took 5-6 kernels, each
with its host work: a 2048-token prompt's attention took 5.7-6.6 s with the two against 6.2-8.7
with it, totals 10.0-11.2 against 10.6-14.2 s (SmolLM2-135M, ``cpu_prefill_attention.py --step
2048``, 4 processes each alternated; ``benchmarks/lab/results/cpu_softmax_parts.txt``). From 2M
elements on it is no faster than ``mx.exp`` (its intermediate arrays fault their pages in), so
larger arrays and GPUs keep ``mx.exp``."""

import mlx.core as mx

EXP_ELEMENTS = 1 << 20  # the largest array the polynomial takes
LOG2E = 1.4426950408889634
# 2**f - 1 over |f| <= 1/2, divided by f: c5, ..., c1 (least squares in relative error, 1.0e-7)
POLY = (1.3218672481615686e-3, 9.67169793839837e-3, 5.5508929524512085e-2, 2.4022238002741114e-1,
        6.931468559416913e-1)


def _exp_reduce(x, shift):
    """``(x - shift) log2 e = n + f``, ``|f| <= 1/2``, for float32 ``x - shift <= 0``: ``f`` and
    the float32 bits of ``2**n`` (int32). Below -88, ``2**n`` is 0: ``e**-inf`` is 0, as
    softmax's hidden keys need. ``n`` is read back from the bits, so that MLX fuses it all,
    the shift included, into one kernel (a value used twice outside one chain of ops is a
    kernel of its own)."""
    x = x - shift
    y = mx.where(x < -88.0, -88.0, x) * LOG2E
    bits = (127 - (0.5 - y).astype(mx.int32)) << 23  # n = -int(0.5 - y), rounded to nearest
    n = ((bits >> 23) - 127).astype(mx.float32)
    return n * -1.0 + y, bits


def _exp_poly(f, scale):
    """``2**f * scale``."""
    p = POLY[0]
    for c in POLY[1:]:
        p = p * f + c
    return (p * f + 1.0) * scale


_reduce = mx.compile(_exp_reduce, shapeless=True)  # a bit cast cannot be shapeless: between the two
_poly = mx.compile(_exp_poly, shapeless=True)


def exp(x, shift=0.0):
    """``e**(x - shift)`` for softmax's float32 scores and their maximum (``x - shift <= 0``, or
    -inf): the polynomial on the CPU up to ``EXP_ELEMENTS``, with the shift in its first kernel
    (one op and one pass over the scores fewer: 45 blocks of a 2048-token chunk's layer with
    their max and sum, 52.9-59.7 against 52.8-61.1 ms, and over 15 runs 56.2-58.6 against
    59.1-61.1; ``python3 benchmarks/lab/cpu_exp_shift.py``), ``mx.exp``
    elsewhere and for other dtypes. NaN stays NaN."""
    if x.dtype != mx.float32 or x.size > EXP_ELEMENTS or mx.default_device() != mx.cpu:
        return mx.exp(x - shift)
    f, bits = _reduce(x, shift)
    return _poly(f, bits.view(mx.float32))


def softmax(scores, sinks=None):
    """Softmax over the last axis of float32 ``scores`` where a row may see no key (its
    weights are 0), with ``sinks``' per-head logits (or None) in every denominator."""
    m = scores.max(axis=-1, keepdims=True)
    if sinks is not None:
        m = mx.maximum(m, sinks.astype(mx.float32).reshape(1, -1, 1, 1))
    m = mx.where(m > -mx.inf, m, 0.0)
    p = exp(scores, m)
    l = p.sum(axis=-1, keepdims=True)
    if sinks is not None:
        l = l + mx.exp(sinks.astype(mx.float32).reshape(1, -1, 1, 1) - m)
    return p / mx.where(l > 0, l, 1.0)
