"""Where the NaN of tiny random float16 deepseek_v2 / minicpm3 comes from (the 9-token request
of ``rows_buffer_gpu_check.py``, run alone): each model in float16 and float32, with
(a) mlx-lm's own fp16 cache (``KVCache``), (b) no cache (``model(tokens)``), (c) mlx-kvq's cache
(the kv config of ``batch_run``), (c-ref) the same with ``MLX_KVQ_REFERENCE=1``. (a) and (b)
run before mlx-kvq patches the model's module, then again after (a', b'). Runs as
``generate_step`` does: the prompt but its last token in one chunk, then the last token, then
11 greedy steps. Where a float16 run is non-finite, every module call (and the model's
``scaled_dot_product_attention``) is traced: the first output that is not finite, the largest
|value| on the way, the attention scores in float32 (> 65504 overflows float16) and MLX's
sdpa on the CPU on the same inputs.

    python3 benchmarks/lab/fp16_nan_gpu_check.py [deepseek_v2 minicpm3]
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests" / "cache"), str(ROOT / "tests"), str(ROOT)]

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from helpers import tiny  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models import cache as lm_cache  # noqa: E402
from test_rows_cache import alone, batch_run, prompt  # noqa: E402

from mlx_kvq.bridge import make_prompt_cache, serve_caches  # noqa: E402

KV = dict(kv_bits=4, kv_group_size=32, window=8)  # batch_run's kv config
PROMPT = [t % 64 for t in prompt(9, 1)]  # batch_run's request 1 (9 tokens)
N_NEW = 12
F16_MAX = 65504.0


def build(name, dtype):
    m = tiny(name)
    if dtype is not mx.float32:
        m.set_dtype(dtype)
    mx.eval(m.parameters())
    return m


def lm_kv_cache(model):
    """mlx-lm's own caches (``KVCache``), also once ``serve_caches`` gave the model a
    ``make_cache`` that returns mlx-kvq's."""
    mk = vars(model).pop("make_cache", None)
    try:
        return lm_cache.make_prompt_cache(model)
    finally:
        if mk is not None:
            model.make_cache = mk


def run_cached(model, cache):
    """generate_step's order: prompt[:-1], prompt[-1:], then greedy steps. Returns the tokens,
    per step whether the log-probs are finite, and the first step's top-2 gap."""
    toks, finite, gaps = [], [], []
    model(mx.array(PROMPT[:-1])[None], cache=cache)
    mx.eval([c.state for c in cache])
    y = mx.array(PROMPT[-1:])
    for _ in range(N_NEW):
        logits = model(y[None], cache=cache)[:, -1, :].astype(mx.float32)
        lp = (logits - mx.logsumexp(logits, keepdims=True)).squeeze(0)
        t = mx.argmax(lp)
        mx.eval(t, lp)
        finite.append(bool(mx.all(mx.isfinite(lp)).item()))
        top = mx.sort(lp)[-2:].tolist()
        gaps.append(top[1] - top[0])
        toks.append(t.item())
        y = t.reshape(1)
    return toks, finite, gaps, [type(c).__name__ for c in cache][:1]


def run_generate_step(model, cache):
    """As ``test_rows_cache.alone`` does: mlx-lm's ``generate_step`` (prefill chunks of 16,
    its own stream, log-probs in the model's dtype)."""
    out = list(generate_step(mx.array(PROMPT), model, max_tokens=N_NEW, prompt_cache=cache, prefill_step_size=16))
    toks = [t for t, _ in out]
    finite = [bool(mx.all(mx.isfinite(lp)).item()) for _, lp in out]
    top = mx.sort(out[0][1].astype(mx.float32))[-2:].tolist()
    return toks, finite, [top[1] - top[0]], [type(c).__name__ for c in cache][:1]


def run_nocache(model, toks):
    """Full forward of the prompt + generated tokens, no cache: per position finite, the
    prompt's last position's top token and gap."""
    seq = PROMPT + toks[:-1]
    logits = model(mx.array(seq)[None]).astype(mx.float32)[0]
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    fin = mx.all(mx.isfinite(lp), axis=-1).tolist()
    last = lp[len(PROMPT) - 1]
    top = mx.sort(last)[-2:].tolist()
    gen = mx.argmax(lp[len(PROMPT) - 1:], axis=-1).tolist()
    return fin, gen, top[1] - top[0]


def fmt_cached(label, r):
    toks, fin, gaps, kind = r
    bad = [i for i, f in enumerate(fin) if not f]
    state = "FINITE" if not bad else f"NaN/inf from step {bad[0]} ({len(bad)}/{len(fin)} steps)"
    return f"  {label:<42} {kind[0]:<18} {state:<34} first gap {gaps[0]:.3f}  tokens {toks}"


def fmt_nocache(label, r):
    fin, gen, gap = r
    bad = [i for i, f in enumerate(fin) if not f]
    state = "FINITE" if not bad else f"NaN/inf at positions {bad[:6]}{'...' if len(bad) > 6 else ''}"
    return f"  {label:<42} {'-':<18} {state:<34} first gap {gap:.3f}  argmax {gen}"


# ---------------------------------------------------------------- tracing


class Trace:
    """Wrap the ``__call__`` of every module class of ``model`` and its module's
    ``scaled_dot_product_attention``; record (step, name, inputs, outputs) in call order."""

    def __init__(self, model):
        self.model, self.rec, self.step = model, [], "?"
        self.names = {id(m): n or "<root>" for n, m in model.named_modules()}
        self.classes = {type(m) for _, m in model.named_modules()}
        self.saved = {}

    def __enter__(self):
        for cls in self.classes:
            if "__call__" in cls.__dict__:
                orig = cls.__dict__["__call__"]
                self.saved[cls] = orig
                cls.__call__ = self._wrap(orig)
        self.mod = sys.modules[type(self.model).__module__]
        self.sdpa = self.mod.scaled_dot_product_attention
        trace = self

        def sdpa(queries, keys, values, cache=None, scale=1.0, mask=None, **kw):
            out = trace.sdpa(queries, keys, values, cache=cache, scale=scale, mask=mask, **kw)
            trace.rec.append((trace.step, "  sdpa", dict(q=queries, k=keys, v=values, mask=mask,
                                                          scale=scale), out))
            return out

        sdpa.mlx_kvq_original = self.sdpa  # so that mlx-kvq's patch() does not wrap it again
        self.mod.scaled_dot_product_attention = sdpa
        return self

    def __exit__(self, *a):
        for cls, orig in self.saved.items():
            cls.__call__ = orig
        self.mod.scaled_dot_product_attention = self.sdpa

    def _wrap(self, orig):
        trace = self

        def call(m, *args, **kwargs):
            out = orig(m, *args, **kwargs)
            ins = {f"arg{i}": a for i, a in enumerate(args) if isinstance(a, mx.array)}
            trace.rec.append((trace.step, trace.names.get(id(m), type(m).__name__), ins, out))
            if m is trace.model:
                trace.step = f"call{int(trace.step[4:]) + 1}"
            return out

        return call


def arrays(x):
    if isinstance(x, mx.array):
        return [x]
    if isinstance(x, (tuple, list)):
        return [a for y in x for a in arrays(y)]
    return []


def stat(a):
    if a.dtype not in (mx.float16, mx.bfloat16, mx.float32):
        return True, 0.0
    a32 = a.astype(mx.float32)
    fin = bool(mx.all(mx.isfinite(a32)).item())
    mx_abs = mx.max(mx.where(mx.isfinite(a32), mx.abs(a32), 0)).item()
    return fin, mx_abs


def attention_detail(d, out):
    """Scores in float32, fp32 reference attention, MLX's sdpa on the CPU (same fp16 inputs)."""
    q, k, v, mask, scale = d["q"], d["k"], d["v"], d["mask"], d["scale"]
    lines = []
    if not all(isinstance(x, mx.array) for x in (q, k, v)):
        from mlx_kvq.cache import plain

        k, v, mask = plain(k), plain(v), plain(mask)
        lines.append(f"    (mlx-kvq views {type(d['k']).__name__}: below, the arrays they stand for)")
    lines.append(f"    q {q.shape} {q.dtype} max|q| {stat(q)[1]:.1f}; k {k.shape} max|k| {stat(k)[1]:.1f}; "
                 f"v max|v| {stat(v)[1]:.1f}; scale {scale:.4f}; mask {mask if isinstance(mask, str) else getattr(mask, 'shape', None)}")
    rep = q.shape[1] // k.shape[1]
    k32 = mx.repeat(k.astype(mx.float32), rep, axis=1)
    v32 = mx.repeat(v.astype(mx.float32), rep, axis=1)
    s = (q.astype(mx.float32) * scale) @ k32.swapaxes(-1, -2)
    qk_raw = q.astype(mx.float32) @ k32.swapaxes(-1, -2)
    L, S = q.shape[2], k.shape[2]
    if isinstance(mask, str) or (mask is None and L > 1):
        causal = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
        s = mx.where(causal, s, -mx.inf)
    elif isinstance(mask, mx.array):
        s = mx.where(mask, s, -mx.inf) if mask.dtype == mx.bool_ else s + mask.astype(mx.float32)
    fin_s = mx.where(mx.isfinite(s), mx.abs(s), 0)
    lines.append(f"    fp32 scores: max|scale*q.k| {mx.max(fin_s).item():.1f}  max|q.k| (unscaled) "
                 f"{mx.max(mx.abs(qk_raw)).item():.1f}  (> {F16_MAX:.0f} overflows float16)")
    ref = mx.softmax(s, axis=-1) @ v32
    o_fin, o_max = stat(out)
    err = mx.max(mx.abs(mx.where(mx.isfinite(out.astype(mx.float32)), out.astype(mx.float32), 0) - ref)).item()
    lines.append(f"    device sdpa out finite {o_fin} max {o_max:.2f}; fp32 ref finite {stat(ref)[0]}, "
                 f"max|dev - ref| over finite {err:.4f}")
    with mx.stream(mx.cpu):
        cpu = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        mx.eval(cpu)
    c_fin, c_max = stat(cpu)
    lines.append(f"    MLX sdpa on CPU (same inputs): finite {c_fin} max {c_max:.2f}")
    return lines


def locate(name, label, model, run):
    """Trace one non-finite run (``run(model)``): the first recorded output that is not finite.
    Steps are forward calls of the model: call0 is the prompt but its last token."""
    print(f"\n  trace of {name} {label}:")
    with Trace(model) as tr:
        tr.step = "call0"
        run(model)
    rec = tr.rec
    first = None
    peak = {}
    for idx, (step, n, ins, out) in enumerate(rec):
        outs = arrays(out)
        sts = [stat(o) for o in outs]
        for o, (f, mxa) in zip(outs, sts):
            peak[n] = max(peak.get(n, 0.0), mxa)
        if first is None and not all(f for f, _ in sts):
            first = idx
    top = sorted(peak.items(), key=lambda kv: -kv[1])[:6]
    peaks = "    largest |outputs| (finite part): " + ", ".join(f"{k.strip()} {v:.0f}" for k, v in top)
    if first is None:
        print("    every traced output finite")
        print(peaks)
        sd = [r for r in rec if r[1] == "  sdpa"]
        if sd:
            print(f"    last sdpa ({sd[-1][0]}):")
            for line in attention_detail(sd[-1][2], sd[-1][3]):
                print(line)
        return
    step, n, ins, out = rec[first]
    in_stats = {k: stat(v) for k, v in ins.items()} if n != "  sdpa" else {}
    print(f"    first non-finite output: step {step}, {n.strip()} (call #{first} of {len(rec)})")
    if in_stats:
        print("    its inputs (finite, max|x|): " + ", ".join(f"{k}=({f}, {m:.1f})" for k, (f, m) in in_stats.items()))
    print("    the 6 calls before it (step, name, out finite, max|out|):")
    for s2, n2, _, o2 in rec[max(0, first - 6):first]:
        st = [stat(o) for o in arrays(o2)]
        print(f"      {s2:<12} {n2.strip():<45} {all(f for f, _ in st)} {max(m for _, m in st):.1f}")
    if n == "  sdpa":
        for line in attention_detail(ins, out):
            print(line)
    else:
        sd = [(i, r) for i, r in enumerate(rec[:first + 1]) if r[0] == step and r[1] == "  sdpa"]
        if sd:
            i, (_, _, d2, o2) = sd[-1]
            print(f"    last sdpa of that step (call #{i}):")
            for line in attention_detail(d2, o2):
                print(line)
    print(peaks)


# ---------------------------------------------------------------- main


def main(names):
    dev = mx.default_device()
    print(f"device {dev}, mlx {mx.__version__}; prompt {PROMPT}; kv {KV}")
    for name in names:
        print(f"\n== {name}")
        nonfinite = []
        models = {dt: build(name, dt) for dt in (mx.float16, mx.float32)}
        for dt, model in models.items():
            d = "float16" if dt == mx.float16 else "float32"
            r = run_cached(model, lm_kv_cache(model))
            print(fmt_cached(f"{d} (a) mlx-lm KVCache", r))
            if not all(r[1]) or TRACE_ALL:
                nonfinite.append((d, "(a) mlx-lm KVCache", model,
                                  lambda m: run_cached(m, lm_kv_cache(m))))
            r = run_generate_step(model, lm_kv_cache(model))
            print(fmt_cached(f"{d} (a) KVCache generate_step", r))
            if not all(r[1]):
                nonfinite.append((d, "(a) KVCache generate_step", model,
                                  lambda m: run_generate_step(m, lm_kv_cache(m))))
            n = run_nocache(model, r[0])
            print(fmt_nocache(f"{d} (b) no cache", n))
            if not all(n[0]) or TRACE_ALL:
                nonfinite.append((d, "(b) no cache", model, lambda m: mx.eval(m(mx.array(PROMPT)[None]))))
        # mlx-kvq patches the module's scaled_dot_product_attention now
        for dt, model in models.items():
            d = "float16" if dt == mx.float16 else "float32"
            model = serve_caches(model, **KV)
            r = run_cached(model, lm_kv_cache(model))
            print(fmt_cached(f"{d} (a') KVCache, patched", r))
            n = run_nocache(model, r[0])
            print(fmt_nocache(f"{d} (b') no cache, patched", n))
            for ref in ("0", "1"):
                os.environ["MLX_KVQ_REFERENCE"] = ref
                r = run_cached(model, make_prompt_cache(model, **KV))
                lab = "(c) mlx-kvq" if ref == "0" else "(c-ref) mlx-kvq REFERENCE=1"
                print(fmt_cached(f"{d} {lab}", r))
                g = run_generate_step(model, make_prompt_cache(model, **KV))
                print(fmt_cached(f"{d} {lab} generate_step", g))
                if not all(g[1]):
                    nonfinite.append((d, lab + " generate_step", model, ref,
                                      lambda m: run_generate_step(m, make_prompt_cache(m, **KV))))
                if not all(r[1]) or TRACE_ALL:
                    nonfinite.append((d, lab, model, ref, lambda m: run_cached(m, make_prompt_cache(m, **KV))))
            os.environ["MLX_KVQ_REFERENCE"] = "0"
        # exactly rows_buffer_gpu_check.py's path: batch_run (BatchGenerator) first, then alone()
        model, kv, prompts, got = batch_run(name, mx.float16)
        assert kv == KV and prompts[1] == PROMPT
        toks, lps = alone(model, PROMPT, N_NEW, kv, 16, logprobs=True)
        fin = [bool(mx.all(mx.isfinite(lp)).item()) for lp in lps]
        top = mx.sort(lps[0].astype(mx.float32))[-2:].tolist()
        print(fmt_cached("float16 (e) batch_run then alone()", (toks, fin, [top[1] - top[0]], ["mlx-kvq"])))
        print(f"  {'float16 (e) batched tokens, request 1':<42} {'rows':<18} {'':<34} {'':<15}  tokens {got[1]}")
        for i, (b, p) in enumerate(zip(got, prompts)):
            if b is None:
                continue
            ref, lp = alone(model, p, N_NEW, kv, 16, logprobs=True)
            nf = sum(not bool(mx.all(mx.isfinite(x)).item()) for x in lp)
            j = next((k for k, (x, y) in enumerate(zip(b, ref)) if x != y), None)
            gap = "" if j is None else (lambda t: f", alone's top-2 gap {t[1] - t[0]:.3f}")(
                mx.sort(lp[j].astype(mx.float32))[-2:].tolist())
            print(f"    request {i} ({len(p)} tokens): batched {'equal to alone' if j is None else f'differs at {j}'}"
                  f"{gap}; alone non-finite steps {nf}/{len(lp)}")
        if not all(fin):
            nonfinite.append(("float16", "(e) after batch_run, alone()", model,
                              lambda m: run_generate_step(m, make_prompt_cache(m, **KV))))
        seen = set()
        for d, lab, model, *ref, fn in nonfinite:
            if (d == "float16" or TRACE_ALL) and (d, lab) not in seen:
                seen.add((d, lab))
                os.environ["MLX_KVQ_REFERENCE"] = ref[0] if ref else "0"
                locate(name, f"{d} {lab}", model, fn)
        os.environ["MLX_KVQ_REFERENCE"] = "0"


TRACE_ALL = "--trace-all" in sys.argv  # trace every case (to try the tracer where all is finite)

if __name__ == "__main__":
    if "--cpu" in sys.argv:
        mx.set_default_device(mx.cpu)
    main([a for a in sys.argv[1:] if not a.startswith("--")] or ["deepseek_v2", "minicpm3"])
