"""The safety net: each kernel configuration is checked once per process, at its first
use, against a reference on a tiny problem.

A *configuration* is what selects a distinct kernel instantiation (the template
arguments: dtypes, head dim, bits, group size, mask kind, rotation flags, ...). The
first call of a configuration runs the kernel on a tiny problem and evaluates it
(``mx.eval``: MLX compiles custom kernels at their first evaluation, so a compile error
surfaces here) against the reference: the fp32 attention over the dequantized keys for
``decode``/``packed``, ``mx.quantize`` bit for bit for ``quantize_append``, the host
path's rotate-and-cast for ``window_append``. A compile error, an exception or a
mismatch disables that configuration with one :class:`KernelCheckWarning` naming it and
``MLX_KVQ_REFERENCE=1``; that call and later ones take the reference / host path.

Who is checked: the backend's own launcher (Metal, CUDA). A launcher set by
``use_launcher`` (the tests' emulator) only with ``MLX_KVQ_SELFCHECK=1`` or inside
:func:`forced`; ``MLX_KVQ_SELFCHECK=0`` turns the checks off.

:func:`results` lists every verdict of this process; :func:`record` checks a configuration
now (``mlx_kvq.doctor`` checks the common ones and prints them all).
"""

import os
import time
import warnings
from contextlib import contextmanager

import mlx.core as mx
import numpy as np

from .. import format as fmt
from ..rotation import rotate
from .args import mask_kind
from .backend import MLXLauncher

ATTENTION_TOL = 2e-2  # relative error of out; the kernels round scores and values to fp16
LSE_TOL = 2e-2


class KernelCheckWarning(RuntimeWarning):
    """A kernel configuration failed its self-check and runs on the reference path."""


_RESULTS = {}  # (launcher, family, config) -> result dict
_FORCE = [0]


def applies(launch):
    """Whether configurations are checked on ``launch`` (see the module doc)."""
    mode = os.environ.get("MLX_KVQ_SELFCHECK", "")
    if mode == "0":
        return False
    return mode == "1" or _FORCE[0] > 0 or isinstance(launch, MLXLauncher)


@contextmanager
def forced():
    """Check every launcher's configurations, the use_launcher ones too (the doctor)."""
    _FORCE[0] += 1
    try:
        yield
    finally:
        _FORCE[0] -= 1


def describe(config):
    return " ".join(f"{k}={getattr(v, 'name', None) or _name(v)}" for k, v in config)


def _name(v):
    return str(v).replace("mlx.core.", "")


def verdict(launch, family, config, check):
    """True: the kernel may run this configuration. ``check()`` (run once per launcher and
    configuration) evaluates the tiny problem and returns None, or what is wrong."""
    r = _RESULTS.get((launch, family, config))
    if r is None:
        if not applies(launch):
            return True
        r = record(launch, family, config, check)
    return r["ok"]


def record(launch, family, config, check):
    """The verdict on ``config`` as a dict (``family``, ``config``, ``ok``, ``why``, ``ms``),
    checked now if it was not yet (whatever :func:`applies` says); warns when it fails."""
    key = (launch, family, config)
    r = _RESULTS.get(key)
    if r is not None:
        return r
    t0 = time.perf_counter()
    try:
        why = check()
    except Exception as e:  # compile errors surface at mx.eval
        text = str(e).strip()
        why = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]
    r = _RESULTS[key] = dict(
        family=family, config=describe(config), ok=why is None, why=why or "",
        ms=round(1e3 * (time.perf_counter() - t0), 1),
    )
    if why is not None:
        warnings.warn(
            f"mlx-kvq: the {family} kernel failed its self-check for {r['config']} ({why}). "
            "This configuration runs on the reference path from now on (same results, slower). "
            "MLX_KVQ_REFERENCE=1 runs everything on the reference path; please report this "
            "with the output of mlx_kvq.doctor.",
            KernelCheckWarning,
            stacklevel=3,
        )
    return r


def results(launch=None):
    """Every verdict of this process (on ``launch`` only, if given): dicts ``family``,
    ``config``, ``ok``, ``why``, ``ms``."""
    return [dict(r) for k, r in _RESULTS.items() if launch is None or k[0] is launch]


def reset():
    """Forget every verdict (tests; the decode setups cached by launch shapes keep theirs:
    use a new launcher object to check again)."""
    _RESULTS.clear()
    _FAST.clear()


# ------------------------------------------------------------------ comparisons
def _attention_mismatch(out, lse, ro, rl, tol=ATTENTION_TOL):
    mx.eval(out, lse, ro, rl)
    if tuple(out.shape) != tuple(ro.shape):
        return f"output shape {tuple(out.shape)}, expected {tuple(ro.shape)}"
    o = np.array(out.astype(mx.float32))
    r = np.array(ro.astype(mx.float32))
    if not np.isfinite(o).all():
        return "non-finite output"
    err = float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-30))
    if not err < tol:
        return f"relative error {err:.3g} against the reference (tolerance {tol:g})"
    if lse is not None:
        a, b = np.array(lse), np.array(rl)
        if not (np.isinf(a) == np.isinf(b)).all():
            return "log-sum-exp: empty rows differ from the reference"
        fin = np.isfinite(b)
        if fin.any() and not np.abs(a[fin] - b[fin]).max() < LSE_TOL:
            return "log-sum-exp differs from the reference"
    return None


def _dense_reference(q, k, v, scale, q_start, causal, mask):
    """fp32 attention of q (B, Hq, L, D) over k, v (B, Hkv, N, D): (out, lse)."""
    B, Hq, L, D = q.shape
    rep = Hq // k.shape[1]
    k, v = mx.repeat(k, rep, axis=1), mx.repeat(v, rep, axis=1)
    s = (q.astype(mx.float32) * scale) @ k.swapaxes(-1, -2)
    N = k.shape[2]
    if causal:
        s = mx.where(mx.arange(N)[None] <= mx.arange(q_start, q_start + L)[:, None], s, -mx.inf)
    if mask is not None:
        s = mx.where(mask, s, -mx.inf) if mask.dtype == mx.bool_ else s + mask.astype(mx.float32)
    lse = mx.logsumexp(s, axis=-1)
    return mx.softmax(s, axis=-1) @ v, lse


class _Rand:
    """Inputs from numpy's generator: the check leaves MLX's global random state alone."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def normal(self, shape):
        return mx.array(self.rng.standard_normal(shape).astype(np.float32))

    def uniform(self, shape):
        return mx.array(self.rng.random(shape).astype(np.float32))


def _mask(rnd, kind, dtype, B, Hq, L, N):
    if kind == 0:
        return None
    keep = rnd.uniform((B, Hq, L, N)) < 0.8
    keep = keep | (mx.arange(N) == N - 1)  # every row sees a key
    if kind == 1:
        return keep
    return (mx.where(keep, 0.0, -1e4) + 0.5 * rnd.normal((B, Hq, L, N))).astype(dtype)


def _packed_pair(rnd, B, Hkv, C, D, k_bits, v_bits, gs, mode, sdt):
    """Packed K/V whose scales have dtype ``sdt`` (affine), or uint8 scales (mx modes)."""
    dt = sdt if sdt in fmt.FLOATS else mx.float16
    k = (rnd.normal((B, Hkv, C, D)) * 1.5 + 0.3).astype(dt)
    v = rnd.normal((B, Hkv, C, D)).astype(dt)
    kp, vp = fmt.quantize(k, k_bits, gs, mode), fmt.quantize(v, v_bits, gs, mode)
    deq = lambda p, bits: fmt.dequantize(p, bits, gs, mode, mx.float32)
    return kp, vp, deq(kp, k_bits), deq(vp, v_bits)


# ------------------------------------------------------------------ the checks
def check_decode(launch, run, t, rep, L, rotate_out, out_dtype):
    """The decode instantiation of template ``t`` (a dict) on a tiny view: 2 sinks, a
    packed run over ``NSG`` splits, 3 window rows in a 6-row buffer."""
    rnd = _Rand(7)
    B, Hkv, D, nsg = 1, 1, t["D"], t["NSG"]
    Hq = Hkv * rep
    n, ns, nw = 32 * nsg, 2, 3
    N = ns + n + nw
    kp, vp, kd, vd = _packed_pair(rnd, B, Hkv, n + 8, D, t["KB"], t["VB"], t["GS"], "affine", t["S"])
    dense = lambda m: rnd.normal((B, Hkv, m, D)).astype(t["DT"])
    sk, sv, wk, wv = dense(ns), dense(ns), dense(nw + 3), dense(nw + 3)
    q = rnd.normal((B, Hq, L, D)).astype(t["T"])
    mask = _mask(rnd, t["MASK"], t["MT"], B, Hq, L, N)
    scale = D**-0.5
    out, lse = run(
        launch, q, kp, vp, n, (sk, sv), (wk, wv), k_bits=t["KB"], v_bits=t["VB"], group_size=t["GS"],
        scale=scale, q_start=N - L, causal=t["CAUSAL"], mask=mask, nsplit=nsg, nsg=nsg, pf=t["PF"],
        rotate_q=t["ROTQ"], rotate_out=rotate_out, out_dtype=out_dtype, nw=nw,
        body="simd" if "KU" in t else "mma", ku=t.get("KU"), dpl=t.get("DPL"),
    )
    cat = lambda a, b, c: mx.concatenate([a.astype(mx.float32), b[:, :, :n], c[:, :, :nw].astype(mx.float32)], 2)
    qf = q.astype(mx.float32)
    if t["ROTQ"]:
        qf = rotate(qf)
    ro, rl = _dense_reference(qf, cat(sk, kd, wk), cat(sv, vd, wv), scale, N - L, t["CAUSAL"], mask)
    if rotate_out:
        ro = rotate(ro, inverse=True)
    if out.dtype != out_dtype:
        return f"output dtype {out.dtype}, expected {out_dtype}"
    return _attention_mismatch(out, lse, ro, rl)


def check_packed(launch, run, q_dtype, s_dtype, D, k_bits, v_bits, gs, mode, rep, L, mask_kind, mask_dtype, causal):
    """sdpa_packed (+ its merge) on a tiny packed run split in two."""
    rnd = _Rand(8)
    B, Hkv, n = 1, 1, 96
    kp, vp, kd, vd = _packed_pair(rnd, B, Hkv, n + 8, D, k_bits, v_bits, gs, mode, s_dtype)
    q = rnd.normal((B, Hkv * rep, L, D)).astype(q_dtype)
    mask = _mask(rnd, mask_kind, mask_dtype, B, Hkv * rep, L, n)
    scale = D**-0.5
    out, lse = run(
        launch, q, kp, vp, n, k_bits=k_bits, v_bits=v_bits, group_size=gs, mode=mode, scale=scale,
        q_start=n - L, k_start=0, causal=causal, mask=mask, nsplit=2,
    )
    ro, rl = _dense_reference(q, kd[:, :, :n], vd[:, :, :n], scale, n - L, causal, mask)
    return _attention_mismatch(out, lse, ro, rl)


def check_latent(launch, run, q_dtype, s_dtype, D, bits, gs, rep, L, mask_kind, mask_dtype, causal):
    """sdpa_latent (+ its merge) on a tiny packed run split in two, the keys as values."""
    rnd = _Rand(11)
    B, Hkv, n = 1, 1, 40
    kp, _, kd, _ = _packed_pair(rnd, B, Hkv, n + 8, D, bits, bits, gs, "affine", s_dtype)
    q = rnd.normal((B, Hkv * rep, L, D)).astype(q_dtype)
    mask = _mask(rnd, mask_kind, mask_dtype, B, Hkv * rep, L, n)
    scale = D**-0.5
    out, lse = run(launch, q, kp, n, bits=bits, group_size=gs, scale=scale, q_start=n - L, k_start=0,
                   causal=causal, mask=mask, nsplit=2)
    ro, rl = _dense_reference(q, kd[:, :, :n], kd[:, :, :n], scale, n - L, causal, mask)
    return _attention_mismatch(out, lse, ro, rl)


def check_quantize(launch, run, dtype, D, bits, gs, flavor):
    """quantize_append's kernel against ``mx.quantize``, bit for bit."""
    rnd = _Rand(9)
    x = (rnd.normal((1, 2, 3, D)) * 2).astype(dtype)
    x = mx.concatenate([x, -mx.abs(x[:, :, :1]), mx.full((1, 2, 1, D), 0.5, dtype)], axis=2)
    got = run(launch, x, bits=bits, group_size=gs, flavor=flavor)
    want = fmt.quantize(x, bits, gs, "affine")
    mx.eval(got, want)
    for name, a, b in zip(("words", "scales", "biases"), got, want):
        if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
            return f"{name}: {a.dtype}{tuple(a.shape)}, mx.quantize gives {b.dtype}{tuple(b.shape)}"
        bits_of = lambda z: np.array(z.view(mx.uint16) if z.dtype in (mx.float16, mx.bfloat16) else z)
        diff = int((bits_of(a) != bits_of(b)).sum())
        if diff:
            return f"{name}: {diff} of {a.size} differ from mx.quantize"
    return None


def check_window(launch, run, in_dtype, buf_dtype, D, rotate_k, rotate_v):
    """window_append against the host path (rotate in the input's dtype, cast, write)."""
    rnd = _Rand(10)
    B, H, C, nw = 1, 2, 6, 2
    bk, bv = (rnd.normal((B, H, C, D)).astype(buf_dtype) for _ in range(2))
    k, v = (rnd.normal((B, H, 1, D)).astype(in_dtype) for _ in range(2))
    ok, ov = run(launch, bk, bv, k, v, nw, rotate_k, rotate_v)
    for got, buf, new, rot in ((ok, bk, k, rotate_k), (ov, bv, v, rotate_v)):
        want = (rotate(new) if rot else new).astype(buf_dtype)
        mx.eval(got, want)
        if got.dtype != buf_dtype or tuple(got.shape) != tuple(buf.shape):
            return f"output {got.dtype}{tuple(got.shape)}, expected {buf_dtype}{tuple(buf.shape)}"
        g, b = np.array(got.astype(mx.float32)), np.array(buf.astype(mx.float32))
        if not (np.array_equal(g[:, :, :nw], b[:, :, :nw]) and np.array_equal(g[:, :, nw + 1 :], b[:, :, nw + 1 :])):
            return "rows outside the appended one changed"
        m = _attention_mismatch(got[:, :, nw : nw + 1], None, want, None, tol=1e-2)
        if m:
            return m
    return None


# ------------------------------------------------------------------ configurations
# Each ``*_case`` gives ``(family, config, check)`` for :func:`verdict` / :func:`record`;
# ``run`` is the family's launch function (``decode_launch``, ``attention_launch``,
# ``quantize_launch``, ``window_append_launch``: handed in, the families import this module).
def decode_case(launch, run, template, rep, L, rotate_out, out_dtype):
    """The decode instantiation ``template`` (its ``(name, value)`` list, as the launch
    builds it) with its merge's ``rotate_out`` / ``out_dtype``."""
    fused = bool(getattr(launch, "fused_merge", False))
    config = tuple(template) + (("ROTO", bool(rotate_out)), ("OT", out_dtype), ("FUSED", fused))
    t = dict(template)
    return "decode", config, lambda: check_decode(launch, run, t, rep, L, rotate_out, out_dtype)


def decode_template(q_dtype, D, k_bits, v_bits, group_size, *, scale_dtype=None, dense_dtype=None,
                    mask_kind=0, mask_dtype=mx.float32, causal=False, nsg=4, pf=0, rotate_q=False):
    """A decode template in the launch's order (``decode._decode_setup``), for the doctor."""
    return [
        ("T", q_dtype), ("S", scale_dtype or q_dtype), ("DT", dense_dtype or q_dtype), ("MT", mask_dtype),
        ("D", D), ("KB", k_bits), ("VB", v_bits), ("GS", group_size), ("MASK", mask_kind),
        ("CAUSAL", bool(causal)), ("NSG", nsg), ("PF", pf), ("ROTQ", bool(rotate_q)),
        ("WIDE", (scale_dtype or q_dtype) != mx.float16 or (dense_dtype or q_dtype) != mx.float16),
    ]


def packed_case(launch, run, q_dtype, s_dtype, D, k_bits, v_bits, group_size, mode, rep, L, mask=None, causal=False):
    rt = min(8, 1 << max(0, (rep * L - 1).bit_length()))
    mk, mdt = mask_kind(mask), None if mask is None else mask.dtype
    config = (("T", q_dtype), ("S", s_dtype), ("D", D), ("KB", k_bits), ("VB", v_bits), ("GS", group_size),
              ("MODE", mode), ("RT", rt), ("MASK", mk), ("MT", mdt), ("CAUSAL", bool(causal)))
    return "packed", config, lambda: check_packed(
        launch, run, q_dtype, s_dtype, D, k_bits, v_bits, group_size, mode, rep, L, mk, mdt, bool(causal))


CHECK_QUERIES = 12  # a prefill chunk's check: rows past a tile's end, each row seeing keys


def prefill_case(launch, run, q_dtype, s_dtype, D, k_bits, v_bits, group_size, rep, causal):
    config = (("T", q_dtype), ("S", s_dtype), ("D", D), ("KB", k_bits), ("VB", v_bits), ("GS", group_size),
              ("CAUSAL", bool(causal)))
    # CHECK_QUERIES queries of up to 4 heads, split keys
    return "prefill", config, lambda: check_packed(launch, run, q_dtype, s_dtype, D, k_bits, v_bits, group_size,
                                                   "affine", min(rep, 4), CHECK_QUERIES, 0, None, bool(causal))


def latent_case(launch, run, q_dtype, s_dtype, D, bits, group_size, rep, L, mask=None, causal=False):
    mk, mdt = mask_kind(mask), None if mask is None else mask.dtype
    config = (("T", q_dtype), ("S", s_dtype), ("D", D), ("KB", bits), ("GS", group_size), ("MASK", mk),
              ("MT", mdt), ("CAUSAL", bool(causal)))
    # up to 20 rows: a whole tile of 16 and a partial one
    return "latent", config, lambda: check_latent(launch, run, q_dtype, s_dtype, D, bits, group_size,
                                                  min(rep, 20), min(L, CHECK_QUERIES), mk, mdt, bool(causal))


def quantize_case(launch, run, dtype, D, bits, group_size, flavor):
    config = (("T", dtype), ("D", D), ("BITS", bits), ("GS", group_size))
    return "quantize_append", config, lambda: check_quantize(launch, run, dtype, D, bits, group_size, flavor)


def window_case(launch, run, in_dtype, buf_dtype, D, rotate_k, rotate_v):
    config = (("IT", in_dtype), ("OT", buf_dtype), ("D", D), ("ROTK", bool(rotate_k)), ("ROTV", bool(rotate_v)))
    return "window_append", config, lambda: check_window(launch, run, in_dtype, buf_dtype, D, rotate_k, rotate_v)


# the hooks of the launch functions: True where the kernel may run
def decode_ok(launch, run, template, rep, L, rotate_out, out_dtype):
    return verdict(launch, *decode_case(launch, run, template, rep, L, rotate_out, out_dtype))


def packed_ok(launch, run, q, k_packed, k_bits, v_bits, group_size, mode, mask, causal):
    B, Hq, L, D = q.shape
    L = min(L, CHECK_QUERIES)  # a prefill chunk (over 8 queries) is checked on CHECK_QUERIES
    rep = Hq // k_packed[0].shape[1]
    fast = ("packed", launch, q.dtype, k_packed[1].dtype, D, k_bits, v_bits, group_size, mode, rep * L,
            None if mask is None else mask.dtype, bool(causal))
    return _fast(fast, launch, lambda: packed_case(
        launch, run, q.dtype, k_packed[1].dtype, D, k_bits, v_bits, group_size, mode, rep, L, mask, causal))


def prefill_ok(launch, run, q, k_packed, k_bits, v_bits, group_size, mode, causal):
    rep = q.shape[1] // k_packed[0].shape[1]
    fast = ("prefill", launch, q.dtype, k_packed[1].dtype, q.shape[-1], k_bits, v_bits, group_size, min(rep, 4),
            bool(causal))
    return _fast(fast, launch, lambda: prefill_case(
        launch, run, q.dtype, k_packed[1].dtype, q.shape[-1], k_bits, v_bits, group_size, rep, causal))


def latent_ok(launch, run, q, packed, bits, group_size, mask, causal):
    rep = q.shape[1] // packed[0].shape[1]
    fast = ("latent", launch, q.dtype, packed[1].dtype, q.shape[-1], bits, group_size, min(rep, 20),
            min(q.shape[2], CHECK_QUERIES), None if mask is None else mask.dtype, bool(causal))
    return _fast(fast, launch, lambda: latent_case(
        launch, run, q.dtype, packed[1].dtype, q.shape[-1], bits, group_size, rep, q.shape[2], mask, causal))


def quantize_ok(launch, run, dtype, D, bits, group_size, flavor):
    return _fast(("quantize", launch, dtype, D, bits, group_size, flavor), launch,
                 lambda: quantize_case(launch, run, dtype, D, bits, group_size, flavor))


def window_ok(launch, run, in_dtype, buf_dtype, D, rotate_k, rotate_v):
    return _fast(("window", launch, in_dtype, buf_dtype, D, bool(rotate_k), bool(rotate_v)), launch,
                 lambda: window_case(launch, run, in_dtype, buf_dtype, D, rotate_k, rotate_v))


_FAST = {}  # flat keys of the per-step hooks -> their verdict (decided ones only)


def _fast(key, launch, case):
    ok = _FAST.get(key)
    if ok is None:
        family, config, check = case()
        ok = verdict(launch, family, config, check)
        if (launch, family, config) in _RESULTS:
            _FAST[key] = ok
    return ok
