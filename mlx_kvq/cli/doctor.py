"""``mlx_kvq.doctor``: what to paste into a bug report.

    mlx_kvq.doctor                     # everything: versions, kernel self-checks, timings, context
    mlx_kvq.doctor --quick --json doctor.json
    mlx_kvq.doctor --model mlx-community/Llama-3.2-3B-Instruct-4bit --no-bench

It prints the device and the MLX, mlx-lm and mlx-kvq versions; the self-check verdict of
the common kernel configurations (see ``mlx_kvq.kernels.selfcheck``); decode attention
time against MLX's fp16 ``scaled_dot_product_attention`` (Hq 32, Hkv 8, D 128, medians of
chained calls after a warm-up); one prefill chunk's time and peak memory through
``quantized_sdpa``; and the longest context that fits for a model (``mlx_kvq.plan``).
On the CPU the GPU kernels are not used: the timings are of the CPU body
(``kernels/cpu_attention.cpp``, Linux) or else the reference path, at smaller sizes unless
``--sizes`` says otherwise.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import mlx.core as mx

from .. import kernels
from ..attention import quantized_sdpa
from ..cache import QuantizedKVCache, default_options
from ..kernels import cpu, selfcheck

HQ, HKV, D = 32, 8, 128
BITS = (8, 4, 2)
GPU_SIZES, CPU_SIZES, QUICK_SIZES = (4096, 16384, 65536), (1024, 4096), (1024,)
GPU_PREFILL, CPU_PREFILL = (2048, 16384), (512, 2048)  # (chunk, cache tokens)

# the common configurations the self-check table covers (each also checked at first use)
DECODE_CONFIGS = [(b, g, dt, d) for b in BITS for g in (64, 32) for dt in ("float16", "bfloat16") for d in (64, 128)]
QUANTIZE_CONFIGS = [(b, g, dt, 128) for b in BITS for g in (64, 32) for dt in ("float16", "bfloat16")]
WINDOW_CONFIGS = [(dt, d, rot) for dt in ("float16", "bfloat16") for d in (64, 128) for rot in (None, "kv")]
LATENT_CONFIGS = [(b, 64, dt, 512) for b in (4, 8) for dt in ("float16", "bfloat16")]  # MLA's 512-wide latent


def _version(dist):
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return "not installed"


def environment():
    be = kernels.backend_name()
    env = {
        "device": str(mx.default_device()),
        "backend": be or "cpu",
        "kernels": _kernel_state(),
        "cpu_body": _cpu_body_state(),
        "mlx": getattr(mx, "__version__", "?"),
        "mlx_lm": _version("mlx-lm"),
        "mlx_kvq": _version("mlx-kvq"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "switches": {k: v for k, v in os.environ.items() if k.startswith("MLX_KVQ_")},
    }
    try:
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        env["device_info"] = {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in info.items()}
    except Exception:
        pass
    return env


def _cpu_body_state():
    """The CPU attention body (``kernels.cpu``): built (its vector width), off, or why not."""
    if os.environ.get("MLX_KVQ_REFERENCE", "0") not in ("", "0"):
        return "off (MLX_KVQ_REFERENCE=1)"
    if sys.platform != "linux":
        return "not on this platform (Linux only)"
    lib = cpu.library()
    return f"built ({lib.kvq_cpu_vector_width()}-float vectors)" if lib else "not built (see the warning above)"


def _kernel_state():
    if kernels.enabled():
        return "used" if kernels.backend_name() and kernels.on_gpu() else "used (a launcher set by use_launcher)"
    if os.environ.get("MLX_KVQ_REFERENCE", "0") not in ("", "0"):
        return "off (MLX_KVQ_REFERENCE=1)"
    if kernels.backend_name():
        return "not used: MLX computes on the CPU device"
    return "not used on this backend (CPU)"


def _dtype(name):
    return getattr(mx, name)


def self_checks():
    """The verdict on each common configuration: dicts family, config, ok, why, ms,
    with ``what`` naming it in the doctor's words; [] where the kernels are not used."""
    if not kernels.enabled():
        return []
    launch = kernels.launcher()
    rows = []

    def add(what, case):
        with selfcheck.forced():
            r = dict(selfcheck.record(launch, *case))
        r["what"] = what
        rows.append(r)

    for bits, gs, dt, d in DECODE_CONFIGS:
        opts = default_options(bits, bits)
        rot = opts["rotate"]
        what = f"decode {bits}-bit g{gs} {dt} D{d}" + (f" rotate={rot}" if rot else "")
        dtype = _dtype(dt)
        if _decode_applies(dtype, d, bits, gs):
            t = selfcheck.decode_template(dtype, d, bits, bits, gs, rotate_q=bool(rot))
            add(what, selfcheck.decode_case(launch, kernels.decode_launch, t, HQ // HKV, 1, rot == "kv", dtype))
        else:  # this format takes the packed kernel
            add(what + " (packed kernel)", selfcheck.packed_case(
                launch, kernels.attention_launch, dtype, dtype, d, bits, bits, gs, "affine", HQ // HKV, 1))
    if kernels.prefill.runs_on(launch):  # prefill chunks of layers too large to copy
        for bits, gs, dt, d in DECODE_CONFIGS:
            rot = default_options(bits, bits)["rotate"]
            q_dtype = mx.float32 if rot else _dtype(dt)  # rotated queries are float32
            add(f"prefill {bits}-bit g{gs} {dt} D{d}", selfcheck.prefill_case(
                launch, kernels.prefill_launch, q_dtype, _dtype(dt), d, bits, bits, gs, HQ // HKV, True))
    if kernels.latent.runs_on(launch):  # MLA decode over the latent
        for bits, gs, dt, d in LATENT_CONFIGS:  # float32 queries (rotated), the model's additive RoPE scores
            add(f"latent {bits}-bit g{gs} {dt} D{d}", selfcheck.latent_case(
                launch, kernels.latent_launch, mx.float32, _dtype(dt), d, bits, gs, 128, 1,
                mx.zeros((1, 1, 1, 1), _dtype(dt))))
    for bits, gs, dt, d in QUANTIZE_CONFIGS:
        add(f"quantize_append {bits}-bit g{gs} {dt} D{d}", selfcheck.quantize_case(
            launch, kernels.quantize_launch, _dtype(dt), d, bits, gs, kernels.quantize_flavor()))
    for dt, d, rot in WINDOW_CONFIGS:
        add(f"window_append {dt} D{d}" + (f" rotate={rot}" if rot else ""),
            selfcheck.window_case(launch, kernels.window_append_launch, _dtype(dt), _dtype(dt), d, bool(rot), rot == "kv"))
    seen = {(r["family"], r["config"]) for r in rows}
    for r in selfcheck.results(launch):  # configurations this process used besides the common ones
        if (r["family"], r["config"]) not in seen:
            rows.append(dict(r, what=f"{r['family']} (used)"))
    return rows


def _decode_applies(dtype, d, bits, gs):
    q = mx.zeros((1, HQ, 1, d), dtype)
    k = tuple(mx.quantize(mx.zeros((1, HKV, 1, d), dtype), group_size=gs, bits=bits))
    return kernels.decode_supports(q, k, k, dtype, bits, bits, gs, "affine", None)


# ------------------------------------------------------------------ timings
def _median_ms(step, x, chain, warmup, iters, repeats):
    """Median over ``repeats`` of the time per call of ``chain`` chained calls of ``step``."""
    for _ in range(warmup):
        mx.eval(step(x))
    times = []
    for _ in range(repeats):
        y = x
        mx.eval(y)
        t0 = time.perf_counter()
        for _ in range(chain):
            y = step(y)  # the output is the next call's query: calls run one after another
        mx.eval(y)
        times.append((time.perf_counter() - t0) / chain)
        del y
    return 1e3 * statistics.median(times)


def _filled_cache(bits, keys, values):
    cache = QuantizedKVCache(bits=bits)
    n = keys.shape[2]
    cache.update_and_fetch(keys[:, :, : n - 1], values[:, :, : n - 1])
    view, _ = cache.update_and_fetch(keys[:, :, n - 1 :], values[:, :, n - 1 :])  # packs the chunk
    return cache, view


def decode_timings(sizes, chain, repeats, dtype=mx.float16):
    rows = []
    scale = D**-0.5
    for n in sizes:
        mx.random.seed(n)
        k = mx.random.normal((1, HKV, n, D)).astype(dtype)
        v = mx.random.normal((1, HKV, n, D)).astype(dtype)
        q = mx.random.normal((1, HQ, 1, D)).astype(dtype)
        mx.eval(k, v, q)
        row = {"keys": n}
        sdpa = lambda x: mx.fast.scaled_dot_product_attention(x, k, v, scale=scale)
        row["fp16_sdpa_ms"] = round(_median_ms(sdpa, q, chain, 2, chain, repeats), 4)
        for bits in BITS:
            cache, view = _filled_cache(bits, k, v)
            mx.eval(view.packed[0], view.packed[1])
            step = lambda x: quantized_sdpa(x, view, scale=scale)
            row[f"kvq{bits}_ms"] = round(_median_ms(step, q, chain, 2, chain, repeats), 4)
        rows.append(row)
    return rows


def prefill_timing(chunk, past, repeats, dtype=mx.float16):
    """One ``chunk``-token prefill chunk's attention against ``past`` cached tokens (4-bit)."""
    mx.random.seed(1)
    k = mx.random.normal((1, HKV, past, D)).astype(dtype)
    cache, _ = _filled_cache(4, k, k)
    new = mx.random.normal((1, HKV, chunk, D)).astype(dtype)
    view, _ = cache.update_and_fetch(new, new)
    q = mx.random.normal((1, HQ, chunk, D)).astype(dtype)
    mx.eval(q, view.packed[0], new)
    del k
    times, peak = [], 0
    for i in range(repeats + 1):
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        t0 = time.perf_counter()
        mx.eval(quantized_sdpa(q, view, scale=D**-0.5, mask="causal"))
        if i:  # the first is the warm-up
            times.append(time.perf_counter() - t0)
        peak = max(peak, mx.get_peak_memory() - before)
    return {"chunk": chunk, "cache_tokens": past, "bits": 4, "ms": round(1e3 * statistics.median(times), 2),
            "peak_extra_mb": round(peak / 2**20, 1)}


def context_fits(model):
    """The longest context that fits this machine's memory per cache config, or why not."""
    from ..models.memory import load_spec, machine_memory, plan

    try:
        spec = load_spec(model)
        rows = plan(spec, machine_memory())
    except Exception as e:
        text = str(e).strip()
        return {"model": model or "embedded", "unavailable": f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"}
    return {"model": spec.name, "memory_bytes": machine_memory(), "weight_bytes": spec.weight_bytes,
            "rows": [{k: r[k] for k in ("cache", "max_context", "usable_context")} for r in rows]}


# ------------------------------------------------------------------ report
def format_report(rep):
    env = rep["environment"]
    lines = ["mlx-kvq doctor", ""]
    for k in ("device", "backend", "kernels", "cpu_body", "mlx", "mlx_lm", "mlx_kvq", "python", "platform"):
        lines.append(f"{k.replace('cpu_body', 'cpu body') + ':':<10} {env[k]}")
    if env["switches"]:
        lines.append(f"{'switches:':<10} " + " ".join(f"{k}={v}" for k, v in env["switches"].items()))
    lines += ["", "kernel self-checks"]
    if not rep["self_checks"]:
        lines.append(f"  kernels {env['kernels']}: nothing to check")
    for r in rep["self_checks"]:
        status = "pass" if r["ok"] else "FAIL"
        lines.append(f"  {status:<5} {r['what']:<44} {r['ms']:>8.1f} ms  {r['why']}")
        if not r["ok"]:
            lines.append(f"        {r['family']}: {r['config']}")
    if "decode" in rep:
        lines += ["", f"decode attention, ms per call (Hq {HQ}, Hkv {HKV}, D {D}, one query; {rep['bench_note']})"]
        head = f"  {'keys':>8} {'fp16 sdpa':>10}" + "".join(f" {f'kvq {b}-bit':>10}" for b in BITS)
        lines.append(head)
        for r in rep["decode"]:
            lines.append(f"  {r['keys']:>8} {r['fp16_sdpa_ms']:>10.3f}" + "".join(f" {r[f'kvq{b}_ms']:>10.3f}" for b in BITS))
    if "prefill" in rep:
        p = rep["prefill"]
        lines += ["", f"prefill chunk: {p['chunk']} tokens against {p['cache_tokens']} cached (4-bit): "
                  f"{p['ms']:.1f} ms, peak extra memory {p['peak_extra_mb']:.1f} MB"]
    c = rep.get("context")
    if c:
        lines += ["", f"longest context that fits ({c['model']})"]
        if "unavailable" in c:
            lines.append(f"  unavailable: {c['unavailable']}")
        else:
            lines.append(f"  memory {c['memory_bytes'] / 1e9:.1f} GB, weights {c['weight_bytes'] / 1e9:.2f} GB")
            for r in c["rows"]:
                lines.append(f"  {r['cache']:<6} {r['max_context']:>14,} tokens (usable {r['usable_context']:,})")
    return "\n".join(lines)


def _sizes(text):
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of key counts: {text!r} (e.g. 4096,16384)") from None


def setup_arg_parser():
    p = argparse.ArgumentParser(
        prog="mlx_kvq.doctor",
        description="Device, versions, kernel self-checks, decode/prefill timings and the longest context "
        "that fits: paste the output into a bug report.",
        allow_abbrev=False,
    )
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (under a minute on CPU)")
    p.add_argument("--sizes", type=_sizes, help="decode key counts, e.g. 4096,16384,65536 "
                   "(default: that on GPUs, 1024,4096 on the CPU)")
    p.add_argument("--chunk", type=int, help="prefill chunk tokens (default 2048 on GPUs, 512 on the CPU)")
    p.add_argument("--model", help="model for the context line (default: the embedded SmolLM2)")
    p.add_argument("--no-bench", action="store_true", help="skip the timings")
    p.add_argument("--no-context", action="store_true", help="skip the longest-context line")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    return p


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    rep = {"environment": environment(), "self_checks": self_checks()}
    if not args.no_bench:
        gpu = kernels.backend_name() is not None and kernels.on_gpu()
        sizes = args.sizes or (QUICK_SIZES if args.quick else GPU_SIZES if gpu else CPU_SIZES)
        chunk, past = GPU_PREFILL if gpu else CPU_PREFILL
        if args.quick:
            chunk, past = min(chunk, 256), min(past, 1024)
        chunk = args.chunk or chunk
        repeats, chain = (3, 4) if args.quick else (5, 10) if gpu else (3, 5)
        where = ("kernels" if kernels.enabled() else "the CPU body (kernels/cpu_attention.cpp)" if cpu.applies()
                 else "the reference path (kernels not used here)")
        rep["bench_note"] = f"{where}; medians of {repeats} runs of {chain} chained calls" + (
            "" if gpu or args.sizes else "; CPU: smaller sizes than on GPUs")
        rep["decode"] = decode_timings(sizes, chain, repeats)
        rep["prefill"] = prefill_timing(chunk, past, 2 if args.quick else 3)
    if not args.no_context:
        rep["context"] = context_fits(args.model)
    print(format_report(rep))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=1, default=str)
        print(f"\nJSON written to {args.json}")
    return rep


if __name__ == "__main__":
    main()
