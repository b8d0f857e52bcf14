"""Roofline of the decode bodies on Apple GPUs: bytes and arithmetic per key and KV head,
and the speedup over fp16 sdpa they allow, per chip (metal/README.md, "Roofline").

Arithmetic is counted in lane operations (an FMA, a shuffle, a conversion, an integer op:
one each), against a chip's FP32 rate / 2 (an FMA is two flops of the published TFLOP/s).
fp16 sdpa is taken at its memory bound (its arithmetic is below it on every chip listed).

    python3 benchmarks/lab/decode_roofline.py [--D 128 --gs 64]
"""

import argparse
import math

# (chip, GB/s, FP32 TFLOP/s). Bandwidth: Apple's spec pages. FP32: Apple's announcements for
# M1/M2 (M1 2.6, M1 Pro 5.2, M1 Max 10.4, M2 3.6, M2 Pro 6.8, M2 Max 13.6); M3/M4: Apple
# publishes none, these are cores x 128 lanes x 2 x clock estimates (~), as in issue 17.
CHIPS = [
    ("M1", 68, 2.6), ("M1 Pro", 200, 5.2), ("M1 Max", 400, 10.4),
    ("M2", 100, 3.6), ("M2 Pro", 200, 6.8), ("M2 Max", 400, 13.6),
    ("M3", 100, 4.1), ("M3 Pro", 150, 7.4), ("M3 Max", 400, 14.2),
    ("M4", 120, 4.3), ("M4 Pro", 273, 9.2), ("M4 Max", 546, 17.0),
]
# the lent GPU running the simd body through the CUDA prelude (NVIDIA's H200 SXM figures:
# 4.8 TB/s, 67 FP32 TFLOP/s without tensor cores)
H200 = ("H200", 4800, 67.0)


def bytes_per_key(D, bits, gs, scale_bytes=2):
    """K and V of one key of one KV head: codes plus a scale and a bias per group."""
    if bits == 16:
        return 2 * D * 2
    return 2 * (D * bits // 8 + 2 * (D // gs) * scale_bytes)


def simd_ops(D, R, DPL=None):
    """sdpa_decode_simd per key and KV head (rows R = rep * L of one tile, DPL dims per lane;
    default as kernels.decode.simd_tile: 16 up to 4 rows, else 8)."""
    DPL = DPL or (16 if R <= 4 or D // 8 > 32 else 8)
    KL = D // DPL
    qk = R * D + 2 * R * KL                 # dot products on codes, scale and bias per row and lane
    red = 2 * R * KL * int(math.log2(KL))   # shuffle + add per reduction step
    kcodes = 3 * D                          # shift, mask, convert
    vdeq = 4 * D                            # shift, mask, convert, FMA
    soft = 8 * R * KL                       # mask/causal select, max test, exp2, sum (every lane of the key)
    pv = R * D
    return qk + red + kcodes + vdeq + soft + pv


def mma_ops_metal(D, R):
    """sdpa_decode's kvq_mma_16816 where it is not an instruction (Metal): per call and
    lane 32 shuffles, 64 fp16->fp32 conversions, 64 FMAs; one call per key (D/16 QK and
    D/16 PV calls per 16 keys), any R <= 8; plus dequantization as fp16 pairs and softmax."""
    return 160 * 32 * (D // 16) * 2 // 16 + 3 * D + 64


def matrix8_ops(D, R):
    """simdgroup_matrix<float, 8, 8> tiles: S^T (8 keys x 8 rows) and O^T (D x 8 rows), D/8
    multiply-accumulates each per 8 keys (512 FMAs each, at the FMA rate on M1-M4), rows
    padded to 8; dequantization as the simd body; softmax on 64 elements per 8 keys."""
    return 2 * D * 8 * -(-R // 8) + 7 * D + 8 * 8


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--gs", type=int, default=64)
    a = ap.parse_args()
    D, gs = a.D, a.gs
    print(f"D {D}, group {gs}: bytes per key and KV head")
    for bits in (16, 8, 4, 2):
        print(f"  {bits:2d}-bit {bytes_per_key(D, bits, gs)}")
    print("lane ops per key and KV head (rows R = rep * L):")
    for R in (1, 4, 8):
        print(f"  R={R}: simd (DPL 8) {simd_ops(D, R, 8)}  simd (DPL 16) {simd_ops(D, R, 16)}  "
              f"mma-on-Metal {mma_ops_metal(D, R)}  8x8 matrix {matrix8_ops(D, R)}")
    print("\nbound speedup over fp16 sdpa (fp16 at its memory bound), R = 4 (GQA 4:1, L = 1):")
    print("| chip | GB/s | TFLOP/s | " + " | ".join(f"{b}-bit simd / mma" for b in (8, 4, 2)) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in (8, 4, 2)) + " |")
    for chip, bw, tf in CHIPS:
        cells = [f"{bound(D, gs, bits, bw, tf, simd_ops(D, 4)):.2f} / {bound(D, gs, bits, bw, tf, mma_ops_metal(D, 4)):.2f}"
                 for bits in (8, 4, 2)]
        print(f"| {chip} | {bw} | {tf} | " + " | ".join(cells) + " |")
    chip, bw, tf = H200
    print(f"\n{chip} ({bw} GB/s, {tf} FP32 TFLOP/s), the simd body at R = 4: "
          + ", ".join(f"{b}-bit {bound(D, gs, b, bw, tf, simd_ops(D, 4)):.2f}x" for b in (8, 4, 2)))


def bound(D, gs, bits, bw, tf, ops):
    """The speedup over fp16 sdpa that ``ops`` lane operations per key allow at ``bits``."""
    t16 = bytes_per_key(D, 16, gs) / (bw * 1e9)
    return t16 / max(bytes_per_key(D, bits, gs) / (bw * 1e9), ops / (tf * 1e12 / 2))


if __name__ == "__main__":
    main()
