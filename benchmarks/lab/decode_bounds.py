"""Bounds of the decode kernel: what its loads alone and its arithmetic alone cost.

Writes copies of the source tree whose ``metal/sdpa_decode.metal`` is cut down, then
(``--run``) times each copy's 128k-key decode launch in its own process, GPU-bound
(``bench_attention.py --variants``; independent calls, graphs built first):

  full              the kernel as it is
  loads             the packed warps load every block (words, scales, biases) and fold
                    the words into one value: no dequantization, no mma, no softmax
  compute           everything but the loads in the block loop (the next block is this
                    one's words XOR the block index, so the loop cannot be hoisted)
  fixed             neither: launch, query prologue, loop skeleton, combine, merge
  fixed_noloop      fixed without the packed warps' block loop (no iterations)
  interleaved       warps take every P-th block instead of one contiguous range
  loads_interleaved, loads_noscales (scale/bias loads replaced by 1.0),
  loads_interleaved_noscales

    python3 benchmarks/lab/decode_bounds.py --out /tmp/bounds --run [--variants 4:1:8]

The compute and fixed cuts remove the loads of PF=1 (one block loaded ahead, the default
at long contexts) only: time them with pf 1 in ``--variants``.

The cuts are text substitutions on the kernel source; an assertion fails if the
kernel has changed so that one no longer applies. The copies are for timing only:
their results are wrong by design.
"""

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# name -> (cut: 0 none, 1 loads only, 2 compute only, 3 neither, 4 no loop; interleaved; no scale loads)
VARIANTS = {
    "full": (0, False, False),
    "loads": (1, False, False),
    "compute": (2, False, False),
    "fixed": (3, False, False),
    "fixed_noloop": (4, False, False),
    "interleaved": (0, True, False),
    "loads_interleaved": (1, True, False),
    "loads_noscales": (1, False, True),
    "loads_interleaved_noscales": (1, True, True),
}

_NEXT_LOAD = "        KVQ_LOAD_BLOCK(blk + 16, nkr0, nkr1, nks0, nkb0, nks1, nkb1, nvr, nvsc, nvbi);\n"
_NO_LOAD = """#if KVQ_CUT >= 2
        for (int x = 0; x < KWL; x++) { nkr0[x] = kr0[x] ^ uint(blk); nkr1[x] = kr1[x] ^ uint(blk); }
        for (int x = 0; x < KSG; x++) { nks0[x] = ks0f[x]; nkb0[x] = kb0f[x]; nks1[x] = ks1f[x]; nkb1[x] = kb1f[x]; }
        for (int i = 0; i < 4; i++) {
          for (int x = 0; x < VWL; x++) nvr[i][x] = vr[i][x] ^ uint(blk);
          nvsc[i] = vsc[i]; nvbi[i] = vbi[i];
        }
#else
"""
_COMPUTE = "    // ---- S^T (16 keys x 8 rows) = K Q^T"
_FOLD = """#if KVQ_CUT == 1 || KVQ_CUT >= 3
    if (!dns) {
      for (int x = 0; x < KWL; x++) fold ^= kr0[x] ^ kr1[x];
      for (int i = 0; i < 4; i++) { for (int x = 0; x < VWL; x++) fold ^= vr[i][x]; foldf += float(vsc[i]) + float(vbi[i]); }
      for (int x = 0; x < KSG; x++) foldf += float(ks0f[x]) + float(kb0f[x]) + float(ks1f[x]) + float(kb1f[x]);
    } else
#endif
    {
"""
_SHIFT = "    if (PF > 0 && !dns) {  // shift the prefetched blocks down"
_RANGE = ("const int kbeg = dense ? 0 : metal::min(w * kps, n);\n"
          "const int kend = dense ? ns + nw : (w < P ? metal::min(n, (w + 1) * kps) : kbeg);\n")
_INTERLEAVED = ("const int kbeg = dense ? 0 : (w < P ? 16 * w : n);\nconst int kend = dense ? ns + nw : n;\n"
                "const int kstep = dense ? 16 : 16 * P;\n")
_SCALE_LOADS = ["ksp[uint(key0_ * kss + gi)]", "kbp[uint(key0_ * kbs + gi)]", "ksp[uint(key1_ * kss + gi)]",
                "kbp[uint(key1_ * kbs + gi)]", "vsp[uint(vk_ * vss + vg_)]", "vbp[uint(vk_ * vbs + vg_)]"]


def _sub(text, old, new):
    if old not in text:
        raise AssertionError(f"sdpa_decode.metal changed: {old.strip()[:60]!r} not found")
    return text.replace(old, new)


def cut(text, mode, interleaved, noscales):
    """The decode kernel's text cut down as one variant describes."""
    t = f"#define KVQ_CUT {mode}\n" + text
    t = _sub(t, "float m[2] = {NEG_INF, NEG_INF};", "uint fold = 0u; float foldf = 0.0f;\nfloat m[2] = {NEG_INF, NEG_INF};")
    t = _sub(t, _NEXT_LOAD, _NO_LOAD + _NEXT_LOAD + "#endif\n")
    t = _sub(t, _COMPUTE, _FOLD + _COMPUTE)
    t = _sub(t, _SHIFT, "    }\n" + _SHIFT)
    t = _sub(t, "for (int blk = kbeg; blk < kend;", "for (int blk = kbeg; blk < (KVQ_CUT == 4 && !dns ? kbeg : kend);")
    t = _sub(t, "#undef KVQ_LOAD_BLOCK", "o[0][0] += float(fold & 1u) * 1e-30f + foldf * 1e-30f;\n#undef KVQ_LOAD_BLOCK")
    if interleaved:
        t = _sub(t, _RANGE, _INTERLEAVED)
        for old, new in [("kbeg + 16", "kbeg + kstep"), ("blk + 32", "blk + 2 * kstep"),
                         ("blk + 16, nkr0", "blk + kstep, nkr0"), ("blk += 16)", "blk += kstep)")]:
            t = _sub(t, old, new)
    if noscales:
        for old in _SCALE_LOADS:
            t = _sub(t, old, "S(1.0f)")
    return t


def write_trees(out, names):
    """One tree per variant of ``names`` under ``out`` (copies of this checkout's package,
    kernels, benchmarks and tests); returns {name: path}."""
    src = (ROOT / "metal" / "sdpa_decode.metal").read_text()
    trees = {}
    for name in names:
        mode, inter, nosc = VARIANTS[name]
        d = Path(out) / name
        shutil.rmtree(d, ignore_errors=True)
        for part in ("mlx_kvq", "metal", "benchmarks", "tests"):
            shutil.copytree(ROOT / part, d / part, ignore=shutil.ignore_patterns("results", "__pycache__"))
        (d / "metal" / "sdpa_decode.metal").write_text(cut(src, mode, inter, nosc))
        trees[name] = d
    return trees


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for the cut-down trees")
    p.add_argument("--run", action="store_true", help="time every tree (needs the GPU)")
    p.add_argument("--variants", default="4:1:8", help="bench_attention --variants (nsg:pf:wpc,...)")
    p.add_argument("--sizes", default="131072")
    p.add_argument("--only", default="", help="comma list of variant names (default: all)")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(VARIANTS)
    for name in names:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    trees = write_trees(args.out, names)
    print(f"trees in {args.out}: {', '.join(names)}", flush=True)
    if not args.run:
        return 0
    for name in names:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(trees[name]), os.environ.get("PYTHONPATH", "")]))
        r = subprocess.run([sys.executable, "benchmarks/bench_attention.py", "--variants", args.variants,
                            "--sizes", args.sizes], cwd=trees[name], env=env, capture_output=True, text=True)
        lines = [ln for ln in r.stdout.splitlines() if "bit" in ln and "|" in ln]
        if r.returncode or not lines:
            print(f"{name}: failed\n{r.stderr[-2000:]}", flush=True)
            continue
        for ln in lines:
            print(f"{name:27s} {ln.strip()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
