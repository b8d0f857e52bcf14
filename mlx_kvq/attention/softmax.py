"""The softmax of the attention paths written with MLX ops (the CPU's, and the GPUs' reference).

On the CPU MLX's ``mx.exp`` takes 14.5-25 ns a float32 element (the Linux wheel on a 2-core
AMD EPYC, two runs), most of a prefill's attention there. ``exp`` computes it as a compiled
polynomial in 3.3-6.9 ns for arrays up to 1M elements, with a relative error of 8e-8 against float64
(``mx.exp``'s: 3.9e-6): ``python3 benchmarks/lab/cpu_exp.py``. From 2M elements on it is
slower than ``mx.exp`` (24-31 ns against 16-20: its intermediate arrays fault their pages
in), so larger arrays and GPUs keep ``mx.exp``."""

import mlx.core as mx

EXP_ELEMENTS = 1 << 20  # the largest array the polynomial takes
LOG2E = 1.4426950408889634
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 in two parts: x - n ln 2 exact for |n| < 2**9
# e**r - 1 - r over |r| <= ln 2 / 2, divided by r**2 (Cephes' expf)
POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def _exp_parts(x):
    """``e**x = p * 2**n`` for float32 ``x <= 88``: ``p`` and the float32 bits of ``2**n``
    (int32). Below -88, ``2**n`` is 0: ``e**-inf`` is 0, as softmax's hidden keys need."""
    x = mx.maximum(x, -88.0)
    n = mx.floor(x * LOG2E + 0.5)
    r = x - n * LN2_HI - n * LN2_LO
    p = POLY[0]
    for c in POLY[1:]:
        p = p * r + c
    p = p * r * r + r + 1.0
    return p, (n.astype(mx.int32) + 127) << 23


_compiled_parts = mx.compile(_exp_parts, shapeless=True)  # a bit cast cannot be shapeless: outside


def exp(x):
    """``e**x`` for softmax's shifted float32 scores (``x <= 0``, or -inf): the polynomial on
    the CPU up to ``EXP_ELEMENTS``, ``mx.exp`` elsewhere and for other dtypes. NaN stays NaN."""
    if x.dtype != mx.float32 or x.size > EXP_ELEMENTS or mx.default_device() != mx.cpu:
        return mx.exp(x)
    p, bits = _compiled_parts(x)
    return p * bits.view(mx.float32)


def softmax(scores, sinks=None):
    """Softmax over the last axis of float32 ``scores`` where a row may see no key (its
    weights are 0), with ``sinks``' per-head logits (or None) in every denominator."""
    m = scores.max(axis=-1, keepdims=True)
    if sinks is not None:
        m = mx.maximum(m, sinks.astype(mx.float32).reshape(1, -1, 1, 1))
    m = mx.where(m > -mx.inf, m, 0.0)
    p = exp(scores - m)
    l = p.sum(axis=-1, keepdims=True)
    if sinks is not None:
        l = l + mx.exp(sinks.astype(mx.float32).reshape(1, -1, 1, 1) - m)
    return p / mx.where(l > 0, l, 1.0)
