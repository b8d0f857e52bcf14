"""Check and time the packed-KV attention kernels on the GPU.

    python benchmarks/bench_attention.py --check          # correctness only
    python benchmarks/bench_attention.py --check --time   # both (default)
    python benchmarks/bench_attention.py --sweep          # NSG / split sweep at 64k, 128k
    python benchmarks/bench_attention.py --prefill 512:16384,512:65536  # prefill chunks (L:keys)

Shape: Llama-3-8B attention, Hq=32, Hkv=8, D=128, B=1, L=1 (decode).
Baseline: fp16 mx.fast.scaled_dot_product_attention over the same number of keys.
Reference for correctness: fp32 attention over mx.dequantize'd K/V (scales upcast).
Times: median over repeats after warm-up; each repeat evaluates `--inner` calls
on different query arrays in one mx.eval and reports the time per call.
"""

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "kernels"))

import mlx.core as mx  # noqa: E402

from emulator.reference import reference_attention, rel_err  # noqa: E402
from mlx_kvq import kernels  # noqa: E402

COPY_BW = 3.0e12  # measured device-to-device copy on the H100 (bytes read + written)


def make(B, Hkv, rep, L, D, C, kb, vb, gs, mode, dtype, seed):
    mx.random.seed(seed)
    q = mx.random.normal((B, Hkv * rep, L, D)).astype(dtype)
    k = (mx.random.normal((B, Hkv, C, D)) * 1.5 + 0.2).astype(dtype)
    v = mx.random.normal((B, Hkv, C, D)).astype(dtype)
    kp = tuple(mx.quantize(k, group_size=gs, bits=kb, mode=mode))
    vp = tuple(mx.quantize(v, group_size=gs, bits=vb, mode=mode))
    mx.eval(q, kp, vp)
    del k, v
    return q, kp, vp


def check_dequantize():
    """mx.dequantize on this backend vs a numpy decode of the same packed data."""
    mx.random.seed(0)
    x = mx.random.normal((4, 256)).astype(mx.float16)
    worst = 0.0
    for bits in (2, 3, 4, 5, 6, 8):
        w, s, b = mx.quantize(x, group_size=64, bits=bits)
        by = np.array(w).view(np.uint8)
        bb = np.unpackbits(by, axis=-1, bitorder="little").reshape(4, 256, bits)
        q = (bb * (1 << np.arange(bits))).sum(-1).reshape(4, -1, 64)
        ref = q * np.array(s.astype(mx.float32))[..., None] + np.array(b.astype(mx.float32))[..., None]
        got = np.array(
            mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=64,
                          bits=bits, dtype=mx.float32)
        ).reshape(4, -1, 64)
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def check(args):
    rows = []
    ok = True
    print(f"dequantize vs numpy (max abs err, fp32 scales): {check_dequantize():.3g}")
    cases = [
        # name, B, Hkv, rep, L, D, n, kb, vb, gs, mode, dtype, nsplit, mask, causal
        ("dec 4/4 g64 1k", 1, 8, 4, 1, 128, 1000, 4, 4, 64, "affine", mx.float16, None, None, True),
        ("dec 8/8 g64 5k split", 1, 8, 4, 1, 128, 5003, 8, 8, 64, "affine", mx.bfloat16, None, None, True),
        ("dec 8/4 g32 L4", 2, 2, 4, 4, 128, 777, 8, 4, 32, "affine", mx.float16, 3, None, True),
        ("dec 3/6 g64 D64", 1, 4, 2, 1, 64, 901, 3, 6, 64, "affine", mx.float16, None, None, True),
        ("dec 5/2 g128 D256", 1, 2, 2, 2, 256, 300, 5, 2, 128, "affine", mx.float16, None, None, True),
        ("dec 4/4 D96", 1, 2, 7, 1, 96, 450, 4, 4, 32, "affine", mx.float16, None, None, True),
        ("dec mxfp4", 1, 8, 4, 1, 128, 2000, 4, 4, 32, "mxfp4", mx.bfloat16, None, None, True),
        ("dec nvfp4 D80", 1, 2, 4, 1, 80, 600, 4, 4, 16, "nvfp4", mx.float16, None, None, True),
        ("dec mxfp8", 1, 8, 4, 1, 128, 2000, 8, 8, 32, "mxfp8", mx.float16, None, None, True),
        ("dec boolmask B3", 3, 8, 4, 1, 128, 1500, 4, 4, 64, "affine", mx.float16, None, "bool", False),
        ("dec addmask", 2, 2, 4, 2, 128, 300, 4, 4, 64, "affine", mx.float16, None, "add", True),
        ("prefill 4/4 L300", 1, 8, 4, 300, 128, 1200, 4, 4, 64, "affine", mx.float16, None, None, True),
        ("prefill 8/4 L77 D64", 2, 2, 2, 77, 64, 500, 8, 4, 32, "affine", mx.bfloat16, None, None, True),
        ("prefill mask L40", 2, 2, 2, 40, 128, 200, 4, 4, 64, "affine", mx.float16, None, "bool", False),
    ]
    for (name, B, Hkv, rep, L, D, n, kb, vb, gs, mode, dt, nsplit, mk, causal) in cases:
        if args.emu:  # CPU dry run of this script under the emulator: tiny shapes
            Hkv, L, n = min(Hkv, 1), min(L, 9), min(n, 70)
        q, kp, vp = make(B, Hkv, rep, L, D, (n + 44) // 8 * 8, kb, vb, gs, mode, dt, seed=n)
        mask = None
        if mk == "bool":
            mask = mx.random.uniform(shape=(B, 1, L, n)) > 0.25
        elif mk == "add":
            mask = (mx.random.normal((B, Hkv * rep, L, n)) * 2).astype(mx.float16)
        kw = dict(k_bits=kb, v_bits=vb, group_size=gs, mode=mode, scale=D**-0.5,
                  q_start=n - L, k_start=0, causal=causal, mask=mask)
        assert kernels.supports(q, kp, vp, kb, vb, gs, mode, mask), name
        out, lse = kernels.attention_launch(kernels.launcher(), q, kp, vp, n, nsplit=nsplit, **kw)
        with mx.stream(mx.cpu):  # fp32 on the CPU: no TF32 in the reference
            ro, rl = reference_attention(q, kp, vp, n, **kw)
        mx.eval(out, lse, ro, rl)
        o = np.array(out)
        nan = bool(np.isnan(o).any() or np.isnan(np.array(lse)).any())
        e = rel_err(out, ro)
        le = float(mx.max(mx.abs(lse - rl)))
        good = (not nan) and e < 1e-3 and le < 1e-3
        ok &= good
        plan = kernels.plan(B, Hkv, rep, L, D, n, None, nsplit)
        vpf = kernels.packed.DEFAULT_VPF and kernels.packed.vpf_ok(vb, D)
        rows.append((name + (" pf" if vpf else ""), e, le, plan[5], "ok" if good else "FAIL"))
    # quantize-append: bit-identical to mx.quantize on this backend
    qrows = []
    for bits in (() if args.skip_quant else (2, 3, 4, 5, 6, 8)):
        for gs in (32, 64, 128):
            for dt in (mx.float16, mx.bfloat16):
                mx.random.seed(bits * gs)
                x = (mx.random.normal((2, 8, 5, 128)) * 3).astype(dt)
                x = mx.concatenate([x, -mx.abs(x[:, :, :1]), mx.full((2, 8, 1, 128), 0.25, dt)], 2)
                if args.emu and (bits, gs) != (4, 64):
                    continue
                # the rounding of mx.quantize where MLX computes: round half away from zero on GPUs, half to
                # even on the CPU (under --emu): bf16 inputs land exactly half-way often enough that the
                # GPU flavour against the CPU's mx.quantize differs at those ties (18 elements at 4-bit g64)
                got = kernels.quantize_launch(kernels.launcher(), x, bits=bits, group_size=gs,
                                              flavor=kernels.quantize_flavor())
                want = mx.quantize(x, group_size=gs, bits=bits)
                mism = 0
                for a, b in zip(got, want):
                    if a.dtype != mx.uint32:
                        a, b = a.view(mx.uint16), b.view(mx.uint16)
                    mism += int(mx.sum(a != b))
                qrows.append((bits, gs, str(dt).split(".")[-1], mism))
    bad = [r for r in qrows if r[3]]
    ok &= not bad
    # quantize_append through the public API (slice_update into the buffers)
    bufs = tuple(mx.quantize(mx.zeros((1, 8, 64, 128), mx.float16), group_size=64, bits=4))
    x = mx.random.normal((1, 8, 3, 128)).astype(mx.float16)
    new = kernels.quantize_append(x, bufs, 10, bits=4, group_size=64, mode="affine")
    want = mx.quantize(x, group_size=64, bits=4)
    app_ok = all(
        bool(mx.all(a[:, :, 10:13] == b)) and bool(mx.all(a[:, :, :10] == c[:, :, :10]))
        for a, b, c in zip(new, want, bufs)
    )
    ok &= app_ok
    print("\n== correctness (rel err of out vs fp32 reference; max |lse diff|) ==")
    print(f"{'case':24s} {'rel_err':>10s} {'lse_err':>10s} {'splits':>6s}")
    for r in rows:
        print(f"{r[0]:24s} {r[1]:10.2e} {r[2]:10.2e} {r[3]:6d}  {r[4]}")
    print(f"quantize kernel vs mx.quantize: {len(qrows)} (bits,gs,dtype) cases, "
          f"mismatching elements: {sum(r[3] for r in qrows)} {bad[:6]}")
    print(f"quantize_append into buffers: {'ok' if app_ok else 'FAIL'}")
    return ok


def sanitize():
    """Small launches of every kernel, for compute-sanitizer (memcheck/racecheck)."""
    L_ = kernels.launcher()
    for (B, Hkv, rep, L, D, n, kb, vb, gs, mode, nsplit, mk) in [
        (1, 2, 4, 1, 128, 300, 4, 4, 64, "affine", None, None),
        (2, 1, 2, 3, 64, 301, 3, 8, 32, "affine", 3, "bool"),
        (1, 1, 2, 20, 128, 70, 8, 4, 64, "affine", None, "add"),
        (1, 2, 2, 1, 80, 90, 4, 4, 16, "nvfp4", 2, None),
    ]:
        q, kp, vp = make(B, Hkv, rep, L, D, n + 5 + (n % 2), kb, vb, gs, mode, mx.float16, seed=n)
        mask = None
        if mk == "bool":
            mask = mx.random.uniform(shape=(B, 1, L, n)) > 0.3
        elif mk == "add":
            mask = mx.random.normal((B, Hkv * rep, L, n)).astype(mx.float16)
        out, lse = kernels.attention_launch(
            L_, q, kp, vp, n, k_bits=kb, v_bits=vb, group_size=gs, mode=mode, scale=0.1,
            q_start=n - L, k_start=0, causal=True, mask=mask, nsplit=nsplit)
        mx.eval(out, lse)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))
    from test_kernels import make_view

    for (B, Hkv, rep, L, D, n, ns, nw, kb, vb, gs, mk, pf, rot) in [
        (1, 2, 4, 1, 128, 300, 4, 20, 4, 4, 64, None, 1, "kv"),
        (2, 1, 2, 3, 64, 301, 0, 7, 2, 4, 32, "bool", 2, "k"),
        (1, 2, 12, 1, 128, 170, 2, 0, 8, 8, 64, "add", 0, None),
        (1, 1, 2, 1, 256, 0, 4, 33, 4, 8, 32, None, 1, "kv"),
    ]:
        q, kp, vp, sinks, window = make_view(B, Hkv, rep, L, D, n, ns, nw, k_bits=kb, v_bits=vb,
                                             group_size=gs, dtype=mx.float16, seed=n)
        total = ns + n + nw
        mask = None
        if mk == "bool":
            mask = mx.random.uniform(shape=(B, 1, L, total)) > 0.3
        elif mk == "add":
            mask = mx.random.normal((B, Hkv * rep, L, total)).astype(mx.float16)
        out, lse = kernels.decode_launch(L_, q, kp, vp, n, sinks, window, k_bits=kb, v_bits=vb, group_size=gs,
                                         scale=0.1, q_start=total - L, causal=True, mask=mask, pf=pf,
                                         rotate_q=bool(rot), rotate_out=rot == "kv",
                                         out_dtype=mx.float16 if rot else mx.float32)
        mx.eval(out, lse)
    x = mx.random.normal((1, 2, 3, 128)).astype(mx.bfloat16)
    mx.eval(kernels.quantize_launch(L_, x, bits=3, group_size=64, flavor=1))
    from test_kernels import WINDOW_CASES, window_case

    for case in WINDOW_CASES:
        wk, wv, k, v, nw, rk, rv = window_case(case, seed=3)
        mx.eval(kernels.window_append_launch(L_, wk, wv, k, v, nw, rk, rv))
    mx.synchronize()
    print("sanitize run done")


def overhead(args):
    """Where the fixed per-call cost comes from (CUDA): a trivial kernel fed
    (a) a params array made from a Python list each call, (b) a cached one,
    (c) the ints carried in the shape of a broadcast view (no buffer at all)."""
    be = kernels.backend_name()
    mk = mx.fast.cuda_kernel if be == "cuda" else mx.fast.metal_kernel
    src = "if (threadgroup_position_in_grid.x == 0 && thread_index_in_threadgroup == 0) out[0] = float(params[0]) + x[0];"
    src_shape = "if (threadgroup_position_in_grid.x == 0 && thread_index_in_threadgroup == 0) out[0] = float(carrier_shape[0] + carrier_shape[3]) + x[0];"
    hdr = kernels.read_source("prelude_cuda.h" if be == "cuda" else "prelude_metal.h")
    k1 = mk(name="ovh1", input_names=["x", "params"], output_names=["out"], source=src, header=hdr)
    k2 = mk(name="ovh2", input_names=["x", "carrier"], output_names=["out"], source=src_shape,
            header=hdr, ensure_row_contiguous=False)
    x = mx.ones((1,), mx.float32)
    cached = mx.array(list(range(14)), dtype=mx.int32)
    zero = mx.zeros((1,), mx.uint8)
    mx.eval(x, cached, zero)
    cnt = [0]

    def fresh(_):
        cnt[0] += 1
        p = mx.array([cnt[0]] + list(range(13)), dtype=mx.int32)
        return k1(inputs=[x, p], grid=(32, 1, 1), threadgroup=(32, 1, 1),
                  output_shapes=[(1,)], output_dtypes=[mx.float32])[0]

    def cache(_):
        return k1(inputs=[x, cached], grid=(32, 1, 1), threadgroup=(32, 1, 1),
                  output_shapes=[(1,)], output_dtypes=[mx.float32])[0]

    def shape(_):
        cnt[0] += 1
        c = mx.broadcast_to(zero.reshape(1, 1, 1, 1), (cnt[0] % 1000 + 1, 7, 9, 11))
        return k2(inputs=[x, c], grid=(32, 1, 1), threadgroup=(32, 1, 1),
                  output_shapes=[(1,)], output_dtypes=[mx.float32])[0]

    r = shape(0)
    mx.eval(r)
    print("shape-carrier kernel result (expect %d):" % (cnt[0] % 1000 + 1 + 11 + 1), float(r))
    qs = [None]
    print("\n== per-call cost of a trivial custom kernel (10 calls per eval) ==")
    for nm, f in (("fresh params array", fresh), ("cached params array", cache), ("shape carrier", shape)):
        t, sp = timeit(f, qs, 20, 10)
        print(f"{nm:22s} {t * 1e3:8.1f} us")


def ncu_target(bits):
    """A few identical 128k-key decode calls, for Nsight Compute."""
    B, Hkv, rep, D, n = 1, 8, 4, 128, 131072
    q, kp, vp = make(B, Hkv, rep, 1, D, n, bits, bits, 64, "affine", mx.float16, seed=1)
    for _ in range(4):
        out = kernels.attention_launch(
            kernels.launcher(), q, kp, vp, n, k_bits=bits, v_bits=bits, group_size=64,
            mode="affine", scale=D**-0.5, q_start=n - 1, k_start=0, causal=True)
        mx.eval(out)
    mx.synchronize()


def ncu_decode_target(bits):
    """A few identical 128k-key calls of the tensor-core decode kernel, for Nsight Compute."""
    B, Hkv, rep, D, n = 1, 8, 4, 128, 131072
    q, kp, vp = make(B, Hkv, rep, 1, D, n, bits, bits, 64, "affine", mx.float16, seed=1)
    for _ in range(4):
        out = kernels.decode_launch(
            kernels.launcher(), q, kp, vp, n, None, None, k_bits=bits, v_bits=bits, group_size=64,
            scale=D**-0.5, q_start=n - 1, causal=True)
        mx.eval(out)
    mx.synchronize()


def decode_variants(args, sizes):
    """GPU-bound ms of the decode kernel (+ merge) for launch variants "nsg:pf:wpc"
    (warps per threadgroup, blocks loaded ahead, warps per GPU core), 4- and 8-bit g64."""
    B, Hkv, rep, D = 1, 8, 4, 128
    L_ = kernels.launcher()
    variants = [tuple(int(x) for x in v.split(":")) for v in args.variants.split(",")]
    print(f"\n== decode variants, GPU-bound ms (graphs built first), Hq=32 Hkv=8 D=128 ==")
    for n in sizes:
        qs, _ = fp16_baseline(args, B, Hkv, rep, 1, D, n)
        for bits in (4, 8):
            q0, kp, vp = make(B, Hkv, rep, 1, D, n, bits, bits, 64, "affine", mx.float16, seed=1)
            line = []
            for nsg, pf, wpc in variants:
                kw = dict(k_bits=bits, v_bits=bits, group_size=64, scale=D**-0.5, q_start=n - 1, causal=True,
                          nsg=nsg, pf=pf, rotate_q=args.rotq, rotate_out=args.rotq, warps_per_core=wpc)
                t, _ = timeit(lambda q: kernels.decode_launch(L_, q, kp, vp, n, None, None, **kw), qs,
                              args.reps, args.inner, prebuilt=True)
                line.append(f"{nsg}:{pf}:{wpc} {t:.4f}")
            print(f"{n:7d} {bits}-bit{' rot' if args.rotq else ''}  sdpa {args.sdpa_prebuilt:.4f} | " + "  ".join(line), flush=True)


def decode_parts(args):
    """128k keys, 4-bit: the decode kernel alone (partials) and the merge alone, per split plan."""
    B, Hkv, rep, D, n = 1, 8, 4, 128, 131072
    for bits in (4, 8):
        decode_parts_bits(args, B, Hkv, rep, D, n, bits)


def decode_parts_bits(args, B, Hkv, rep, D, n, bits):
    q, kp, vp = make(B, Hkv, rep, 1, D, n, bits, bits, 64, "affine", mx.float16, seed=1)
    qs = [q] + [mx.random.normal(q.shape).astype(mx.float16) for _ in range(3)]
    mx.eval(qs)
    L_ = kernels.launcher()
    print(f"\n== 128k keys, {bits}-bit g64: decode kernel alone / merge alone (ms) ==")
    for nsg, wpc, pf in [(4, 8, 0), (4, 8, 1), (4, 8, 2), (4, 16, 2), (2, 8, 2), (4, 12, 1)]:
        if True:
            kw = dict(k_bits=bits, v_bits=bits, group_size=64, scale=D**-0.5, q_start=n - 1, causal=True, nsg=nsg, pf=pf,
                      warps_per_core=wpc)
            t_dec, _ = timeit(lambda q: kernels.decode_launch(L_, q, kp, vp, n, None, None, merge=False, **kw),
                              qs, args.reps, args.inner)
            o, l = kernels.decode_launch(L_, q, kp, vp, n, None, None, merge=False, **kw)
            mx.eval(o, l)
            t_merge, _ = timeit(lambda _: kernels.merge_launch(L_, o, l, (B, Hkv * rep, 1, D)),
                                qs, args.reps, args.inner)
            t_all, _ = timeit(lambda q: kernels.decode_launch(L_, q, kp, vp, n, None, None, **kw),
                              qs, args.reps, args.inner)
            print(f"{bits}-bit pf {int(pf)} nsg {nsg} warps/core {wpc:2d} partials {o.shape[0]:4d}: decode {t_dec:.4f} merge {t_merge:.4f} "
                  f"both {t_all:.4f}")


def timeit(fn, qs, reps, inner, prebuilt=False):
    """Median ms per call of ``inner`` calls evaluated together (and the spread). The
    graphs are built inside the timed region (the host cost of a call counts), or,
    ``prebuilt``, before it: then the time is the GPU's (dispatch overlaps it)."""
    for i in range(3):
        mx.eval([fn(qs[j % len(qs)]) for j in range(inner)])
    mx.synchronize()
    ts = []
    for r in range(reps):
        if prebuilt:
            outs = [fn(qs[j % len(qs)]) for j in range(inner)]
        t0 = time.perf_counter()
        mx.eval(outs if prebuilt else [fn(qs[j % len(qs)]) for j in range(inner)])
        mx.synchronize()
        ts.append((time.perf_counter() - t0) / inner)
    return statistics.median(ts) * 1e3, (max(ts) - min(ts)) * 1e3


def timeit_chain(fn, q0, reps, inner):
    """Median ms per call of ``inner`` calls where each call's query is the previous
    call's output (as a model's layers are chained), graphs built before the timed
    region: the latency of a launch, which overlapping independent calls hide."""
    def build():
        q = q0
        for _ in range(inner):
            out = fn(q)
            q = (out[0] if isinstance(out, (tuple, list)) else out).astype(q0.dtype)
        return q
    for _ in range(3):
        mx.eval(build())
    ts = []
    for _ in range(reps):
        y = build()
        t0 = time.perf_counter()
        mx.eval(y)
        mx.synchronize()
        ts.append((time.perf_counter() - t0) / inner)
    return statistics.median(ts) * 1e3


def decode_chain(args, sizes):
    """Chained (dependent) decode calls, GPU-bound: fp16 sdpa against the default
    decode launch at 4 and 8 bits, with and without the in-kernel rotations; with
    ``--chain-parts``, 4-bit with rotations taken apart: the two-launch merge, the
    decode kernel alone (no merge; the next query is partial 0), PF=0 and PF=1."""
    B, Hkv, rep, D = 1, 8, 4, 128
    L_ = kernels.launcher()
    two = copy.copy(L_)  # the same kernels, the merge as a second launch
    two.fused_merge = False
    print("\n== chained decode calls (each query = the previous output), GPU-bound ms per call ==")
    for n in sizes:
        mx.random.seed(n)
        q0 = mx.random.normal((B, Hkv * rep, 1, D)).astype(mx.float16)
        kf = mx.random.normal((B, Hkv, n, D)).astype(mx.float16)
        vf = mx.random.normal((B, Hkv, n, D)).astype(mx.float16)
        mx.eval(q0, kf, vf)
        t16 = timeit_chain(lambda q: mx.fast.scaled_dot_product_attention(q, kf, vf, scale=D**-0.5), q0,
                           args.reps, args.inner)
        for wpc in args.wpc:
            line = [f"{n:7d} keys, {wpc:2d} warps/core: fp16 sdpa {t16:.4f}"]
            for bits in (4, 8):
                _, kp, vp = make(B, Hkv, rep, 1, D, n, bits, bits, 64, "affine", mx.float16, seed=1)
                runs = [(f"{bits}-bit", dict(rotate_q=False, rotate_out=False)),
                        (f"{bits}-bit+rot", dict(rotate_q=True, rotate_out=True))]
                if args.chain_parts:
                    runs = runs[1:] + [(f"{bits}b two launches", dict(rotate_q=True, rotate_out=True, fused=False)),
                                       (f"{bits}b decode only", dict(rotate_q=True, merge=False)),
                                       (f"{bits}b PF=0", dict(rotate_q=True, rotate_out=True, pf=0)),
                                       (f"{bits}b PF=1", dict(rotate_q=True, rotate_out=True, pf=1))]
                for label, extra in runs:
                    kw = dict(k_bits=bits, v_bits=bits, group_size=64, scale=D**-0.5, q_start=n - 1, causal=True,
                              out_dtype=mx.float16, warps_per_core=wpc, **{"pf": args.pf, **extra})
                    launch = L_ if kw.pop("fused", True) else two

                    def fn(q):
                        out = kernels.decode_launch(launch, q, kp, vp, n, None, None, **kw)
                        return out[0][0].reshape(q.shape) if not kw.get("merge", True) else out
                    t = timeit_chain(fn, q0, args.reps, args.inner)
                    line.append(f"{label} {t:.4f} ({t16 / t:.2f}x)")
            print("  ".join(line), flush=True)


def decode_bodies_chain(args, sizes):
    """Chained decode calls (GPU-bound, as ``--chain``) of the two decode bodies, "simd"
    (metal/sdpa_decode_simd.metal) and "mma" (metal/sdpa_decode.metal), against fp16 sdpa
    over the same number of keys: Hq 32 / Hkv 8 / D 128, B 1, L 1, a view of 4 sinks, a
    packed run and a 32-key window (n keys in all), affine 8/4/2 bits, group 64; the view and
    queries in ``--dtype`` (bfloat16: the mma body's WIDE instantiation, which checks every
    block of keys for values beyond fp16)."""
    B, Hkv, rep, D, ns, nw = 1, 8, 4, 128, 4, 32
    dt = getattr(mx, args.dtype)
    L_ = kernels.launcher()
    try:
        info = mx.device_info()
        dev = info.get("device_name", info.get("name", "?"))
    except Exception:
        dev = "?"
    print(f"\n== decode bodies, chained calls, GPU-bound ms per call (median of {args.reps} x {args.inner}) ==")
    print(f"backend {kernels.backend_name()} device {dev} mlx {mx.__version__} cores {kernels.num_cores()} "
          f"view {args.dtype}")
    for n in sizes:
        mx.random.seed(n)
        q0 = mx.random.normal((B, Hkv * rep, 1, D)).astype(dt)
        kf = mx.random.normal((B, Hkv, n, D)).astype(dt)
        vf = mx.random.normal((B, Hkv, n, D)).astype(dt)
        sinks = tuple(mx.random.normal((B, Hkv, ns, D)).astype(dt) for _ in range(2))
        window = tuple(mx.random.normal((B, Hkv, nw, D)).astype(dt) for _ in range(2))
        mx.eval(q0, kf, vf, sinks, window)
        t16 = timeit_chain(lambda q: mx.fast.scaled_dot_product_attention(q, kf, vf, scale=D**-0.5), q0,
                           args.reps, args.inner)
        line = [f"{n:7d} keys: {args.dtype} sdpa {t16:.4f}"]
        npk = n - ns - nw
        for bits in (8, 4, 2):
            _, kp, vp = make(B, Hkv, rep, 1, D, npk, bits, bits, 64, "affine", dt, seed=1)
            runs = [("simd", dict(ku=v[0], pf=v[1], dpl=v[2] or None, warps_per_core=v[3]),
                     f"simd ku{v[0]}pf{v[1]}d{v[2] or 'def'}w{v[3]}") for v in args.simd_variants]
            for body, extra, label in runs + [("mma", {}, "mma")]:
                kw = dict(k_bits=bits, v_bits=bits, group_size=64, scale=D**-0.5, q_start=n - 1, causal=True,
                          out_dtype=dt, body=body, **extra)
                t = timeit_chain(lambda q: kernels.decode_launch(L_, q, kp, vp, npk, sinks, window, **kw), q0,
                                 args.reps, args.inner)
                line.append(f"{bits}b {label} {t:.4f} ({t16 / t:.2f}x)")
        print("  ".join(line), flush=True)


def packed_bytes(kp, vp, n):
    tot = 0
    for p in (kp, vp):
        for a in p:
            per_tok = a.nbytes // a.shape[2]
            tot += per_tok * n
    return tot


def fp16_baseline(args, B, Hkv, rep, L, D, n):
    """Four query arrays for n keys, and the time of fp16 sdpa over n random keys."""
    mx.random.seed(n)
    qs = [mx.random.normal((B, Hkv * rep, L, D)).astype(mx.float16) for _ in range(4)]
    kf = mx.random.normal((B, Hkv, n, D)).astype(mx.float16)
    vf = mx.random.normal((B, Hkv, n, D)).astype(mx.float16)
    mx.eval(qs, kf, vf)
    f = lambda q: mx.fast.scaled_dot_product_attention(q, kf, vf, scale=D**-0.5)
    t, _ = timeit(f, qs, args.reps, args.inner)
    args.sdpa_prebuilt = timeit(f, qs, args.reps, args.inner, prebuilt=True)[0]
    return qs, t


def bench(args, sizes, configs, variants=None):
    B, Hkv, rep, L, D = 1, 8, 4, 1, 128
    res = []
    for n in sizes:
        qs, t_sdpa = fp16_baseline(args, B, Hkv, rep, L, D, n)
        for (kb, vb, gs) in configs:
            q0, kp, vp = make(B, Hkv, rep, L, D, n, kb, vb, gs, "affine", mx.float16, seed=n + kb)
            nbytes = packed_bytes(kp, vp, n)

            def deq_sdpa(q):  # what a non-fused path does: dequantize, then fp16 sdpa
                k = mx.dequantize(*kp, group_size=gs, bits=kb, dtype=mx.float16)
                v = mx.dequantize(*vp, group_size=gs, bits=vb, dtype=mx.float16)
                return mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5)

            t_deq = None
            if args.deq:
                t_deq, _ = timeit(deq_sdpa, qs, args.reps, args.inner)
            for var in (variants or [dict()]):
                fn = lambda q: kernels.attention_launch(
                    kernels.launcher(), q, kp, vp, n, k_bits=kb, v_bits=vb, group_size=gs,
                    mode="affine", scale=D**-0.5, q_start=n - 1, k_start=0, causal=True, **var,
                )
                t, spread = timeit(fn, qs, args.reps, args.inner)
                plan = kernels.plan(B, Hkv, rep, L, D, n, var.get("nsg"), var.get("nsplit"))
                res.append(dict(n=n, cfg=f"{kb}/{vb} g{gs}", var=var, ms=t, spread=spread, vu=var.get("vu", kernels.packed.DEFAULT_VU),
                                vpf=int(bool(var.get("vpf", kernels.packed.DEFAULT_VPF))),
                                sdpa=t_sdpa, bw=nbytes / (t * 1e-3), nsplit=plan[5], nsg=plan[2],
                                deq=t_deq))
    return res


def bench_decode(args, sizes, configs):
    """The one-launch tensor-core decode kernel (kernels.decode_launch) against fp16
    sdpa and the fp32 packed kernel, over the packed run alone and over a full
    view (4 sinks + packed + 48-token window); correctness vs an fp32 CPU
    reference at the sizes <= 16384."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))
    from test_kernels import make_view, view_reference

    B, Hkv, rep, L, D = 1, 8, 4, 1, 128
    L_ = kernels.launcher()
    rows = []
    for n in sizes:
        qs, t_sdpa = fp16_baseline(args, B, Hkv, rep, L, D, n)
        for (kb, vb, gs) in configs:
            q0, kp, vp, sinks, window = make_view(B, Hkv, rep, L, D, n, 4, 48, k_bits=kb, v_bits=vb,
                                                  group_size=gs, dtype=mx.float16, seed=n + kb, C=n)
            nbytes = packed_bytes(kp, vp, n)
            fmt = dict(k_bits=kb, v_bits=vb, group_size=gs)
            err = None
            if n <= 16384:
                a = dict(scale=D**-0.5, q_start=n + 4 + 48 - 1, causal=True, mask=None)
                o, _ = kernels.decode_launch(L_, q0, kp, vp, n, sinks, window, **fmt, **a)
                with mx.stream(mx.cpu):
                    ro, _ = view_reference(q0, kp, vp, n, sinks, window, **fmt, **a)
                err = rel_err(o, ro)
            old = lambda q: kernels.attention_launch(
                L_, q, kp, vp, n, **fmt, mode="affine", scale=D**-0.5, q_start=n - 1, k_start=0, causal=True)
            t_old, _ = timeit(old, qs, args.reps, args.inner)
            for wpc in args.wpc:
                new = lambda q: kernels.decode_launch(
                    L_, q, kp, vp, n, None, None, **fmt, scale=D**-0.5, q_start=n - 1, causal=True, warps_per_core=wpc)
                t_new, spread = timeit(new, qs, args.reps, args.inner)
                view = lambda q: kernels.decode_launch(
                    L_, q, kp, vp, n, sinks, window, **fmt, scale=D**-0.5, q_start=n + 51, causal=True,
                    warps_per_core=wpc)
                t_view, _ = timeit(view, qs, args.reps, args.inner)
                t_gpu, _ = timeit(new, qs, args.reps, args.inner, prebuilt=True)
                P = kernels.decode_plan(B, Hkv, 1, n, warps_per_core=wpc)
                rows.append(dict(n=n, cfg=f"{kb}/{vb} g{gs}", wpc=wpc, splits=P, ms=t_new, spread=spread,
                                 view_ms=t_view, old_ms=t_old, sdpa=t_sdpa, bw=nbytes / (t_new * 1e-3), err=err,
                                 gpu_ms=t_gpu, sdpa_gpu=args.sdpa_prebuilt))
    print("\n== tensor-core decode kernel: Hq=32 Hkv=8 D=128 B=1 L=1, fp16 queries; ms per call (median) ==")
    print(f"{'keys':>7s} {'K/V bits':>10s} {'w/core':>6s} {'splits':>6s} {'packed ms':>10s} {'spread':>7s} "
          f"{'view ms':>8s} {'old ms':>8s} {'sdpa fp16':>10s} {'speedup':>8s} {'view spd':>8s} {'GB/s':>7s} "
          f"{'% copy':>7s} {'rel err':>8s} | {'prebuilt':>8s} {'sdpa':>7s} {'speedup':>7s} {'% copy':>6s}")
    for r in rows:
        print(f"{r['n']:7d} {r['cfg']:>10s} {r['wpc']:6d} {r['splits']:6d} {r['ms']:10.4f} {r['spread']:7.4f} "
              f"{r['view_ms']:8.4f} {r['old_ms']:8.4f} {r['sdpa']:10.4f} {r['sdpa'] / r['ms']:7.2f}x "
              f"{r['sdpa'] / r['view_ms']:7.2f}x {r['bw'] / 1e9:7.0f} {100 * r['bw'] / COPY_BW:6.1f}% "
              + (f"{r['err']:8.1e}" if r['err'] is not None else f"{'':8s}")
              + f" | {r['gpu_ms']:8.4f} {r['sdpa_gpu']:7.4f} {r['sdpa_gpu'] / r['gpu_ms']:6.2f}x "
              f"{100 * r['bw'] * r['ms'] / r['gpu_ms'] / COPY_BW:5.1f}%")
    return rows


def bench_prefill(args, shapes=((128, 4096), (1024, 4096))):
    """A prefill chunk at the end of the context, (L queries, n packed keys) per shape: the
    packed kernel (sdpa_packed), the simdgroup_matrix kernel (sdpa_prefill), the blocked
    reference (what a layer over the copy budget took before sdpa_prefill) and dequantize +
    fp16 sdpa (the copy path). ms per call, median of 5 x 2."""
    from mlx_kvq.attention.reference import packed_reference
    from mlx_kvq.cache.view import KVFormat

    B, Hkv, rep, D = 1, 8, 4, 128
    fmt = KVFormat(4, 4, 64, "affine", None)
    rows = []
    for (L, n) in shapes:
        q0, kp, vp = make(B, Hkv, rep, L, D, n, 4, 4, 64, "affine", mx.float16, seed=L)
        qs = [q0] + [mx.random.normal(q0.shape).astype(mx.float16) for _ in range(1)]
        mx.eval(qs)
        kw = dict(k_bits=4, v_bits=4, group_size=64, mode="affine", scale=D**-0.5, q_start=n - L, k_start=0,
                  causal=True)
        fk = lambda q: kernels.attention_launch(kernels.launcher(), q, kp, vp, n, **kw)
        fs = lambda q: kernels.prefill_launch(kernels.launcher(), q, kp, vp, n, **kw)
        fr = lambda q: packed_reference(q, kp, vp, n, fmt, scale=D**-0.5, q_start=n - L, k_start=0, causal=True,
                                        mask=None)
        def fd(q):
            k = mx.dequantize(*kp, group_size=64, bits=4)
            v = mx.dequantize(*vp, group_size=64, bits=4)
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask="causal")
        rows.append((L, n) + tuple(timeit(f, qs, 5, 2)[0] for f in (fk, fs, fr, fd)))
    print("\n== prefill chunk (Hq=32 Hkv=8 D=128, 4-bit K/V g64, causal, chunk at the end) ==")
    print(f"{'L':>5s} {'keys':>6s} {'sdpa_packed':>12s} {'sdpa_prefill':>13s} {'blocked ref':>12s} {'dequant+sdpa':>13s}")
    for L, n, tk, ts, tr, td in rows:
        print(f"{L:5d} {n:6d} {tk:12.3f} {ts:13.3f} {tr:12.3f} {td:13.3f}")


def print_bench(res):
    print("\n== decode timing: Hq=32 Hkv=8 D=128 B=1 L=1, fp16 queries; ms per call (median) ==")
    print(f"{'keys':>7s} {'K/V bits':>10s} {'nsg':>3s} {'vu':>2s} {'pf':>2s} {'splits':>6s} {'kernel ms':>10s} "
          f"{'spread':>7s} {'sdpa fp16':>10s} {'speedup':>8s} {'GB/s':>7s} {'% copy':>7s} "
          f"{'deq+sdpa':>9s}")
    for r in res:
        print(f"{r['n']:7d} {r['cfg']:>10s} {r['nsg']:3d} {r['vu']:2d} {r['vpf']:2d} {r['nsplit']:6d} {r['ms']:10.4f} "
              f"{r['spread']:7.4f} {r['sdpa']:10.4f} {r['sdpa'] / r['ms']:7.2f}x "
              f"{r['bw'] / 1e9:7.0f} {100 * r['bw'] / COPY_BW:6.1f}% "
              + (f"{r['deq']:9.4f}" if r.get("deq") else f"{'':9s}"))


def main():
    ap = argparse.ArgumentParser(description="Check and time the packed-KV attention kernels (a GPU, or --emu: a tiny CPU dry run under the kernel emulator, needs g++). With neither --check, --time nor --sweep: both --check and --time.")
    ap.add_argument("--check", action="store_true", help="correctness against an fp32 reference and mx.quantize")
    ap.add_argument("--time", action="store_true", help="time the kernels against fp16 sdpa")
    ap.add_argument("--sweep", action="store_true", help="time NSG / split variants at 64k and 128k keys")
    ap.add_argument("--reps", type=int, default=15, help="timed repeats; the median is reported (default: 15)")
    ap.add_argument("--inner", type=int, default=10, help="calls per timed repeat (default: 10)")
    ap.add_argument("--sizes", default="4096,16384,65536,131072", help="comma list of cache lengths in tokens to time")
    ap.add_argument("--emu", action="store_true", help="CPU dry run under the emulator")
    ap.add_argument("--skip-quant", action="store_true", help="--check: attention only")
    ap.add_argument("--sanitize", action="store_true", help="small launches for compute-sanitizer")
    ap.add_argument("--overhead", action="store_true", help="per-call cost micro-benchmark")
    ap.add_argument("--ncu", type=int, default=0, help="run 128k decode calls of this many bits for ncu")
    ap.add_argument("--decode", action="store_true", help="time the tensor-core decode kernel (sdpa_decode)")
    ap.add_argument("--parts", action="store_true", help="sdpa_decode alone and the merge alone, 128k keys")
    ap.add_argument("--ncu-decode", type=int, default=0, help="128k sdpa_decode calls of this many bits, for ncu")
    ap.add_argument("--variants", default="", help="decode variants nsg:pf:wpc,... (GPU-bound timing)")
    ap.add_argument("--chain", action="store_true", help="chained (dependent) decode calls, GPU-bound")
    ap.add_argument("--bodies", action="store_true", help="chained decode calls of the simd and mma bodies")
    ap.add_argument("--prefill", default="", help="time prefill chunks L:keys,... (the kernels, the blocked "
                    "reference, dequantize + sdpa)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"],
                    help="--bodies: the dtype of the view and the queries")
    ap.add_argument("--simd-variants", default="2:1:0",
                    help="--bodies: simd body variants keys per step:load ahead:dims per lane (0: default)"
                         "[:warps per GPU core], ...")
    ap.add_argument("--chain-parts", action="store_true", help="--chain: the 4-bit launch taken apart")
    ap.add_argument("--pf", type=int, default=None, help="--chain: blocks loaded ahead (default: by length)")
    ap.add_argument("--rotq", action="store_true", help="--variants: rotate queries and output in the kernels")
    ap.add_argument("--wpc", default="", help="--decode: warps per GPU core to try (comma list; "
                    "default: the library's WARPS_PER_CORE)")
    args = ap.parse_args()
    args.deq = False
    dflt = [kernels.decode.SIMD_KU[0], kernels.decode.SIMD_KU[1], 0, kernels.decode.WARPS_PER_CORE]
    args.simd_variants = [tuple(int(x) for x in v.split(":")) for v in args.simd_variants.split(",")]
    args.simd_variants = [v + tuple(dflt[len(v):]) for v in args.simd_variants]
    args.wpc = [int(x) for x in args.wpc.split(",")] if args.wpc else [kernels.WARPS_PER_CORE]
    if args.emu:
        import tempfile

        from emulator.emu import EmuLauncher

        emu = EmuLauncher(tempfile.mkdtemp())
        kernels.use_launcher(emu)
    if args.sanitize:
        sanitize()
        return 0
    if args.overhead:
        overhead(args)
        return 0
    if args.ncu:
        ncu_target(args.ncu)
        return 0
    if args.ncu_decode:
        ncu_decode_target(args.ncu_decode)
        return 0
    if args.bodies:
        decode_bodies_chain(args, [int(s) for s in args.sizes.split(",")])
        return 0
    if args.prefill:
        bench_prefill(args, [tuple(int(x) for x in s.split(":")) for s in args.prefill.split(",")])
        return 0
    if args.chain:
        decode_chain(args, [int(s) for s in args.sizes.split(",")])
        return 0
    if args.variants:
        decode_variants(args, [int(s) for s in args.sizes.split(",")])
        return 0
    if args.parts:
        decode_parts(args)
        return 0
    if args.decode:
        print("backend:", kernels.backend_name(), "mlx", mx.__version__, "cores", kernels.num_cores())
        bench_decode(args, [int(s) for s in args.sizes.split(",")], [(4, 4, 64), (8, 8, 64), (2, 2, 32)])
        return 0
    if not (args.check or args.time or args.sweep):
        args.check = args.time = True
    print("backend:", kernels.backend_name(), "mlx", mx.__version__, "cores", kernels.num_cores())
    ok = True
    if args.check:
        ok = check(args)
    if args.sweep:
        variants = [dict(nsg=4, nsplit=p, vu=u) for u in (0, 4, 2) for p in (33, 66, 132)]
        res = bench(args, [65536, 131072], [(4, 4, 64), (8, 8, 64)], variants)
        print_bench(res)
    if args.time:
        # fixed per-call cost: the smallest segment (one block of keys)
        small = bench(args, [32], [(4, 4, 64)])
        args.deq = True
        print(f"\nper-call floor (32 keys, 1 split): kernel {small[0]['ms']:.4f} ms, "
              f"sdpa fp16 {small[0]['sdpa']:.4f} ms")
        sizes = [int(s) for s in args.sizes.split(",")]
        res = bench(args, sizes, [(4, 4, 64), (8, 8, 64), (8, 4, 64)],
                    [dict(vpf=False), dict(vpf=True)])
        if not args.emu:
            bench_prefill(args)
        print_bench(res)
    print("\nCHECK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
