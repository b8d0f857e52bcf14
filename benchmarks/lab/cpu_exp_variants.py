"""Lab: rewrites of the CPU softmax's exp in two compiled kernels (a float-to-int round instead of
``mx.floor``, the bit cast between them, the 2**f polynomial by Estrin's scheme or Horner's)
against the package's exp (``cur``: until 2026-12-05 a Cody-Waite polynomial in 5-6 kernels,
since then the Horner rewrite) and ``mx.exp``: ns an element at the blocked reference's block
shapes, and their largest relative error against float64:

    python3 benchmarks/lab/cpu_exp_variants.py
"""

import time

import numpy as np

import mlx_kvq  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx

from mlx_kvq.attention.softmax import exp as cur_exp
def t(f, *a, n=21):
    for _ in range(3): mx.eval(f(*a))
    ts=[]
    for _ in range(n):
        s=time.perf_counter(); mx.eval(f(*a)); ts.append(time.perf_counter()-s)
    ts.sort(); return ts[len(ts)//2]
LOG2E=1.4426950408889634
fs=np.cos(np.pi*(np.arange(4000)+0.5)/4000)*0.5
def fit(deg):
    A=np.vstack([fs**i for i in range(deg+1)]).T; y=2.0**fs; w=1/y
    return [float(x) for x in np.linalg.lstsq(A*w[:,None], y*w, rcond=None)[0]]
C5=fit(5); C6=fit(6)
def k1(x):
    y = mx.where(x < -88.0, -88.0, x) * LOG2E
    bits = (127 - (0.5 - y).astype(mx.int32)) << 23
    nf = ((bits >> 23) - 127).astype(mx.float32)
    f = nf * -1.0 + y
    return f, bits
def k2(f, scale):
    c0,c1,c2,c3,c4,c5 = C5
    f2 = f * f
    return ((c0 + c1 * f) + f2 * ((c2 + c3 * f) + f2 * (c4 + c5 * f))) * scale
def k2h(f, scale):
    p = C5[5]
    for c in C5[4::-1]:
        p = p * f + c
    return p * scale
K1=mx.compile(k1, shapeless=True); K2=mx.compile(k2, shapeless=True); K2H=mx.compile(k2h, shapeless=True)
def v_new(x):
    f, bits = K1(x); return K2(f, bits.view(mx.float32))
def v_newh(x):
    f, bits = K1(x); return K2H(f, bits.view(mx.float32))
def v_k1(x): return K1(x)[0]
for shape in [(1,3,3,108,386),(1,3,3,113,512),(1,3,3,1,2048)]:
    s = mx.random.normal(shape)*5; m = s.max(-1, keepdims=True); x = s - m
    x = mx.where(mx.random.uniform(shape=shape) < 0.1, -mx.inf, x); x = mx.where(mx.random.uniform(shape=shape) < 0.05, -100.0, x); mx.eval(x)
    ref = np.exp(np.array(x, dtype=np.float64)); n = x.size
    for rep in range(2):
     for name, f in [("cur", cur_exp), ("new estrin", v_new), ("new horner", v_newh), ("k1 only", v_k1), ("mx.exp", mx.exp)]:
        out = np.array(f(x)); err = np.max(np.abs(out-ref)/np.maximum(ref,1e-30)) if name != "k1 only" else 0
        print(shape, name, "%.2f ns" % (t(f, x)*1e9/n), "rel err %.1e" % err, "zeros ok", bool(np.all(out[ref < 1e-38]==0)) )
print(C5)
