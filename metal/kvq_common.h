// kvq_common.h -- helpers shared by the mlx-kvq kernel bodies.
//
// Written in the Metal dialect that MLX's own kernels use.  A backend prelude
// (prelude_metal.h, prelude_cuda.h, or tests/emulator/prelude_emu.h) comes first
// and supplies: uint/ushort/uchar/ulong, uint4, KVQ_FUNC (function qualifier),
// KVQ_UNROLL (a full-unroll pragma), kvq_as_float(uint), kvq_div(float, float)
// (IEEE division), and the simd_* / threadgroup_barrier API.
//
// Packed format (mx.quantize along the last axis, little-endian bit stream):
// element i of a row occupies bits [i*BITS, (i+1)*BITS) of the row's bytes,
// the row being D*BITS/32 uint32 words.  Quantization modes:
//   MODE 0 affine: value = scale * q + bias       (scale/bias in the model dtype)
//   MODE 1 mxfp4 : value = e2m1(q) * e8m0(scale)  (group 32)
//   MODE 2 nvfp4 : value = e2m1(q) * e4m3(scale)  (group 16)
//   MODE 3 mxfp8 : value = e4m3(q) * e8m0(scale)  (group 32)

#define KVQ_MODE_AFFINE 0
#define KVQ_MODE_MXFP4 1
#define KVQ_MODE_NVFP4 2
#define KVQ_MODE_MXFP8 3

// Code `IDX` (compile-time after unrolling) of a row held in registers.
template <int BITS, int NW>
KVQ_FUNC uint kvq_code(const thread uint* w, int idx) {
  const int bit = idx * BITS;
  const int wi = bit >> 5;
  const int sh = bit & 31;
  uint c = w[wi] >> sh;
  if (sh + BITS > 32) {
    c |= w[wi + 1] << (32 - sh);
  }
  return c & ((1u << BITS) - 1u);
}

// Integer code (< 2^23) -> float without an int->float conversion
// instruction (those run at a quarter of the FMA rate on NVIDIA GPUs):
// 2^23 + c is exact in fp32, so subtracting 2^23 gives c exactly.
KVQ_FUNC float kvq_u2f(uint c) {
  return kvq_as_float(0x4B000000u | c) - 8388608.0f;
}

// One group (GS codes of BITS = 2, 4 or 8 bits, whole words) of a packed row, dequantized
// (scale * code + bias, fp32) into threadgroup memory.
template <int BITS, int GS>
KVQ_FUNC void kvq_dequant_group(const device uint* row, float sc, float bi, KVQ_TGP(float) dst) {
  for (int w = 0; w < GS * BITS / 32; w++) {
    const uint word = row[w];
    KVQ_UNROLL
    for (int c = 0; c < 32 / BITS; c++) {
      dst[w * (32 / BITS) + c] = sc * kvq_u2f((word >> (c * BITS)) & ((1u << BITS) - 1u)) + bi;
    }
  }
}

// fp4 e2m1 code -> float
KVQ_FUNC float kvq_e2m1(uint c) {
  uint e = (c >> 1) & 3u;
  uint m = c & 1u;
  float v = (e == 0u) ? 0.5f * float(m) : kvq_as_float(((e + 126u) << 23) | (m << 22));
  return (c & 8u) ? -v : v;
}

// fp8 e4m3 code -> float (NaN code 0x7f/0xff is never produced by mx.quantize)
KVQ_FUNC float kvq_e4m3(uint c) {
  uint e = (c >> 3) & 15u;
  uint m = c & 7u;
  float v = (e == 0u) ? float(m) * 0.001953125f : kvq_as_float(((e + 120u) << 23) | (m << 20));
  return (c & 128u) ? -v : v;
}

// e8m0 scale byte -> float (s == 0 decodes to 2^-127 as in MLX)
KVQ_FUNC float kvq_e8m0(uint s) {
  return kvq_as_float(s == 0u ? 0x00400000u : (s << 23));
}

template <int MODE>
KVQ_FUNC float kvq_scale_value(uint s) {
  if (MODE == KVQ_MODE_NVFP4) {
    return kvq_e4m3(s);
  }
  return kvq_e8m0(s);
}

// float value of a code (before the group scale) in a microscaling mode
template <int MODE>
KVQ_FUNC float kvq_fp_code(uint c) {
  if (MODE == KVQ_MODE_MXFP8) {
    return kvq_e4m3(c);
  }
  return kvq_e2m1(c);
}

// Bytes [u*BITS, u*BITS + BITS) of a row = the 8 codes of elements 8u..8u+7,
// returned as a 64-bit little-endian integer.
template <int BITS>
KVQ_FUNC ulong kvq_load_octet(const device uint* row, int u) {
  if (BITS == 4) {
    return ulong(row[u]);
  } else if (BITS == 8) {
    return ulong(row[2 * u]) | (ulong(row[2 * u + 1]) << 32);
  } else if (BITS == 2) {
    const device ushort* r16 = (const device ushort*)row;
    return ulong(r16[u]);
  } else {
    const device uchar* r8 = (const device uchar*)row + u * BITS;
    ulong v = 0;
    KVQ_UNROLL
    for (int i = 0; i < BITS; i++) {
      v |= ulong(r8[i]) << (8 * i);
    }
    return v;
  }
}

// Load a K row of NW words into registers, 4 words at a time when VW == 4
// (rows 16-byte aligned).
template <int NW, int VW>
KVQ_FUNC void kvq_load_row(const device uint* p, thread uint* r) {
  if (VW == 4) {
    const device uint4* p4 = (const device uint4*)p;
    KVQ_UNROLL
    for (int i = 0; i < NW / 4; i++) {
      uint4 v = p4[i];
      r[4 * i] = v.x;
      r[4 * i + 1] = v.y;
      r[4 * i + 2] = v.z;
      r[4 * i + 3] = v.w;
    }
  } else {
    KVQ_UNROLL
    for (int i = 0; i < NW; i++) {
      r[i] = p[i];
    }
  }
}

// N consecutive words into registers with the widest aligned vector loads
// (uint4 when N % 4 == 0, uint2 when N % 2 == 0): p must be aligned to them.
template <int N>
KVQ_FUNC void kvq_load_words(const device uint* p, thread uint* r) {
  if (N % 4 == 0) {
    KVQ_UNROLL
    for (int i = 0; i < N / 4; i++) {
      const uint4 v = ((const device uint4*)p)[i];
      r[4 * i] = v.x;
      r[4 * i + 1] = v.y;
      r[4 * i + 2] = v.z;
      r[4 * i + 3] = v.w;
    }
  } else if (N % 2 == 0) {
    KVQ_UNROLL
    for (int i = 0; i < N / 2; i++) {
      const uint2 v = ((const device uint2*)p)[i];
      r[2 * i] = v.x;
      r[2 * i + 1] = v.y;
    }
  } else {
    KVQ_UNROLL
    for (int i = 0; i < N; i++) {
      r[i] = p[i];
    }
  }
}

// The words holding octet u of a row, loaded without combining them (so the
// loads can stay in flight): BITS 2 -> lo = 16 bits, 4 -> lo, 8 -> lo, hi.
template <int BITS>
KVQ_FUNC void kvq_load_octet_raw(const device uint* row, int u, thread uint& lo, thread uint& hi) {
  if (BITS == 4) {
    lo = row[u];
    hi = 0u;
  } else if (BITS == 8) {
    lo = row[2 * u];
    hi = row[2 * u + 1];
  } else {
    const device ushort* r16 = (const device ushort*)row;
    lo = uint(r16[u]);
    hi = 0u;
  }
}

// NB bits (16, 32, 64 or 128) of a packed row from bit `bit0` (a multiple of NB) into
// registers: one ushort, uint, uint2 or uint4 load (the row 16-byte aligned).
template <int NB>
KVQ_FUNC void kvq_load_bits(const device uint* row, int bit0, thread uint* r) {
  if (NB == 16) {
    r[0] = uint(((const device ushort*)row)[bit0 / 16]);
  } else {
    kvq_load_words<NB / 32>(row + bit0 / 32, r);
  }
}

// ---- the unnormalized Walsh-Hadamard transform of one row of D = 32 * E
// values spread over a simdgroup, lane holding dims [lane * E, lane * E + E):
// acc <- acc H (H the D x D Sylvester Hadamard matrix).  Butterflies of stride
// < E in registers, larger strides across lanes (partner lane = lane ^ (h / E)).
// The cache's rotation is R = diag(signs) H / sqrt(D): x R = ((x * signs) H) /
// sqrt(D), x R^T = ((x H) / sqrt(D)) * signs.  Every lane must call it.
template <int E>
KVQ_FUNC void kvq_fwht_lanes(thread float* acc, uint lane) {
  KVQ_UNROLL
  for (int h = 1; h < E; h <<= 1) {
    KVQ_UNROLL
    for (int e = 0; e < E; e++) {
      if ((e & h) == 0) {
        const float x0 = acc[e];
        const float x1 = acc[e + h];
        acc[e] = x0 + x1;
        acc[e + h] = x0 - x1;
      }
    }
  }
  for (int m = 1; m < 32; m <<= 1) {
    KVQ_UNROLL
    for (int e = 0; e < E; e++) {
      const float other = simd_shuffle_xor(acc[e], uint(m));
      acc[e] = (lane & uint(m)) ? other - acc[e] : acc[e] + other;
    }
  }
}

// ---- merging split partials: row `row` of o_part (nsplit, rows, D) / lse_part
// (nsplit, rows) (normalized out, natural-log lse) into out[row] (OT) / lse[row]
// by log-sum-exp, by one simdgroup; ROTO: times R^T (kvq_fwht_lanes, `rs` =
// 1 / sqrt(D), D a power of two >= 32).  CG: read the partials through L2
// (kvq_load_cg: they were written by other threadgroups of the same launch).
// The max and the sum of the lse run across lanes; the weighted sum of the
// partials takes up to 16 splits per step, so that their loads are in flight together
// (a merge's time is the latency of these loads: it is the tail of a decode).
template <bool CG>
KVQ_FUNC float kvq_ld(const device float* p, size_t i) {
  return CG ? kvq_load_cg(p + i) : p[i];
}
template <int D, typename OT, bool ROTO, bool CG>
KVQ_FUNC void kvq_merge_row(const device float* o_part, const device float* lse_part, int nsplit, size_t rows,
                            size_t row, uint lane, const device float* signs, float rs, device OT* out,
                            device float* lse) {
  float mx = -INFINITY;
  for (int s = int(lane); s < nsplit; s += 32) {
    mx = metal::max(mx, kvq_ld<CG>(lse_part, size_t(s) * rows + row));
  }
  mx = simd_max(mx);
  float den = 0.0f;
  if (mx != -INFINITY) {
    for (int s = int(lane); s < nsplit; s += 32) {
      den += metal::exp(kvq_ld<CG>(lse_part, size_t(s) * rows + row) - mx);
    }
  }
  den = simd_sum(den);
  // lane holds dims [lane * E, lane * E + E) with ROTO (the layout of kvq_fwht_lanes),
  // dims lane + 32 * e otherwise
  constexpr int E = D / 32 > 0 ? D / 32 : 1;
  // splits per step: their loads are issued together (64 floats per lane in flight);
  // the last step's missing splits weigh 0
  constexpr int SU = 64 / E < 16 ? 64 / E : 16;
  float acc[E];
  KVQ_UNROLL
  for (int e = 0; e < E; e++) {
    acc[e] = 0.0f;
  }
  const int dl = ROTO ? int(lane) * E : int(lane);
  const int de = ROTO ? 1 : 32;
  if (mx != -INFINITY && D % 32 == 0) {  // (ROTO has D a power of two >= 32)
    const float rden = 1.0f / den;
    for (int s = 0; s < nsplit; s += SU) {
      float w[SU];
      float x[SU][E];
      KVQ_UNROLL
      for (int u = 0; u < SU; u++) {
        const bool ok = s + u < nsplit;
        const size_t ls = size_t(ok ? s + u : s) * rows + row;
        w[u] = ok ? kvq_ld<CG>(lse_part, ls) : -INFINITY;
        KVQ_UNROLL
        for (int e = 0; e < E; e++) {
          x[u][e] = ok ? kvq_ld<CG>(o_part, ls * D + dl + e * de) : 0.0f;
        }
      }
      KVQ_UNROLL
      for (int u = 0; u < SU; u++) {
        const float wu = metal::exp(w[u] - mx) * rden;
        KVQ_UNROLL
        for (int e = 0; e < E; e++) {
          acc[e] += wu * x[u][e];
        }
      }
    }
  }
  if (ROTO) {
    kvq_fwht_lanes<E>(acc, lane);
    KVQ_UNROLL
    for (int e = 0; e < E; e++) {
      const int d = int(lane) * E + e;
      out[row * D + d] = OT(acc[e] * rs * signs[d]);
    }
  } else if (D % 32 == 0) {
    KVQ_UNROLL
    for (int e = 0; e < E; e++) {
      out[row * D + lane + 32 * e] = OT(acc[e]);
    }
  } else {  // D not a multiple of 32 (not used by the decode kernels): one dim at a time
    for (int d = int(lane); d < D; d += 32) {
      float a = 0.0f;
      if (mx != -INFINITY) {
        for (int s = 0; s < nsplit; s++) {
          const size_t ls = size_t(s) * rows + row;
          a += metal::exp(kvq_ld<CG>(lse_part, ls) - mx) / den * kvq_ld<CG>(o_part, ls * D + d);
        }
      }
      out[row * D + d] = OT(a);
    }
  }
  if (lane == 0) {
    lse[row] = mx != -INFINITY ? mx + metal::log(den) : -INFINITY;
  }
}

// Two stored scales (or biases) as an fp16 pair (a "h2", low half = lo); S is the
// scale dtype.  The CUDA prelude overloads __half (a byte permute, no conversions).
template <typename S>
KVQ_FUNC uint kvq_h2s(S lo, S hi) {
  return kvq_h2(float(lo), float(hi));
}

// ---- the warp matrix op of sdpa_decode: c[0..3] += A * B over one
// simdgroup, A 16x16 and B 16x8 in fp16 (uint = two halves), C 16x8 fp32,
// in the register layout of CUDA's mma.sync.m16n8k16 (lane = 4 * gr + tq):
//   a0 = A[gr][2tq, 2tq+1]   a1 = A[gr+8][2tq, 2tq+1]
//   a2 = A[gr][2tq+8, +9]    a3 = A[gr+8][2tq+8, +9]
//   b0 = B[2tq, 2tq+1][gr]   b1 = B[2tq+8, +9][gr]
//   c  = C[gr][2tq], C[gr][2tq+1], C[gr+8][2tq], C[gr+8][2tq+1]
// CUDA runs it on tensor cores (prelude_cuda.h); elsewhere it is computed
// from shuffles (every lane of the simdgroup must call it).
#ifndef KVQ_NATIVE_MMA
KVQ_FUNC void kvq_mma_16816(thread float* c, uint a0, uint a1, uint a2, uint a3, uint b0, uint b1, uint lane) {
  const uint gr = lane >> 2;
  const uint tq = lane & 3u;
  float acc0 = c[0], acc1 = c[1], acc2 = c[2], acc3 = c[3];
  for (uint tt = 0; tt < 4; tt++) {
    const uint ra0 = simd_shuffle(a0, gr * 4 + tt);
    const uint ra1 = simd_shuffle(a1, gr * 4 + tt);
    const uint ra2 = simd_shuffle(a2, gr * 4 + tt);
    const uint ra3 = simd_shuffle(a3, gr * 4 + tt);
    const uint x0 = simd_shuffle(b0, 8 * tq + tt);      // column 2tq
    const uint x1 = simd_shuffle(b1, 8 * tq + tt);
    const uint y0 = simd_shuffle(b0, 8 * tq + 4 + tt);  // column 2tq + 1
    const uint y1 = simd_shuffle(b1, 8 * tq + 4 + tt);
    acc0 += kvq_h2lo(ra0) * kvq_h2lo(x0) + kvq_h2hi(ra0) * kvq_h2hi(x0) +
        kvq_h2lo(ra2) * kvq_h2lo(x1) + kvq_h2hi(ra2) * kvq_h2hi(x1);
    acc1 += kvq_h2lo(ra0) * kvq_h2lo(y0) + kvq_h2hi(ra0) * kvq_h2hi(y0) +
        kvq_h2lo(ra2) * kvq_h2lo(y1) + kvq_h2hi(ra2) * kvq_h2hi(y1);
    acc2 += kvq_h2lo(ra1) * kvq_h2lo(x0) + kvq_h2hi(ra1) * kvq_h2hi(x0) +
        kvq_h2lo(ra3) * kvq_h2lo(x1) + kvq_h2hi(ra3) * kvq_h2hi(x1);
    acc3 += kvq_h2lo(ra1) * kvq_h2lo(y0) + kvq_h2hi(ra1) * kvq_h2hi(y0) +
        kvq_h2lo(ra3) * kvq_h2lo(y1) + kvq_h2hi(ra3) * kvq_h2hi(y1);
  }
  c[0] = acc0;
  c[1] = acc1;
  c[2] = acc2;
  c[3] = acc3;
}
#endif

// 2^e as a float, exactly (e in [-126, 127]).
KVQ_FUNC float kvq_pow2(int e) {
  return kvq_as_float(uint(127 + e) << 23);
}

// A shift sh such that amax * 2^sh lies about 2^target (within a factor 4), in
// [-100, 100]; 0 for amax 0, inf or NaN.  Scaling by 2^sh is exact in fp32 and,
// between fp16 normals, in fp16: it moves a row of tiny or huge values into the
// range where fp16 fragments hold them at full precision.
KVQ_FUNC int kvq_pow2_shift(float amax, int target) {
  if (!(amax > 0.0f && amax < INFINITY)) {
    return 0;
  }
  const int e = int(metal::log(amax) * KVQ_LOG2E);
  const int sh = target - e;
  return sh < -100 ? -100 : (sh > 100 ? 100 : sh);
}

// The largest magnitude an affine group (scale sc, bias bi, `bits`-bit codes) holds:
// max(|bi|, |bi + (2^bits - 1) sc|), in fp32.
template <typename S>
KVQ_FUNC float kvq_group_absmax(S sc, S bi, int bits) {
  const float b0 = float(bi);
  const float b1 = b0 + float((1u << bits) - 1u) * float(sc);
  return metal::max(metal::abs(b0), metal::abs(b1));
}

// x, or 0 where x is inf or NaN (the cache stores a non-finite channel as 0).
KVQ_FUNC float kvq_finite_or_0(float x) {
  return metal::abs(x) < INFINITY ? x : 0.0f;
}
