// sdpa_decode_simd.metal -- decode attention over a whole QuantizedKVCache view
// (affine 2/4/8-bit packed run, unquantized sinks and window) in one launch,
// laid out for Apple GPUs in the manner of MLX's sdpa_vector / quantized qmv
// kernels: fp32 dot products on the ALUs and simd_shuffle_xor reductions, no
// matrix op.  Same inputs, outputs and positions as sdpa_decode.metal.
//
// Work split: as sdpa_decode -- simdgroup ("warp") w = part * NSG + sg takes
// packed split w < P, warp P the sinks and the window; one partial (normalized
// out, lse) per threadgroup, merged by sdpa_merge.  A threadgroup owns a tile of
// RT query rows of one KV head (rows = rep query heads x L positions), RT = R
// when R = rep * L <= 8, so that the K/V words of a KV head are read once for
// all its query rows (R > 8: ceil(R / 8) tiles, each reading them).
//
// Lanes: a key's D dims are spread over KL = D / DPL consecutive lanes (DPL
// dims each, one quantization group: GS >= 32 >= DPL); the simdgroup takes
// KPS = 32 / KL keys at a time, lane = slot * KL + part (slot: which of the KPS
// keys).  Every lane holds its DPL dims of the RT query rows (fp32, times the
// scale and log2 e) and of the RT output rows (fp32).  Per key and lane:
//   K: DPL codes (one 16..128-bit load), converted to float once; per row
//      dot = sum q_d c_d (DPL FMAs), score part = scale * dot + bias * sum q_d
//      (the group's scale and bias applied once per row, not per code);
//      the KL parts are summed by log2(KL) simd_shuffle_xor steps.
//   softmax: fp32, base 2, online, per slot (each slot its own running max and
//      sum, as MLX's sdpa_vector keeps one per simdgroup); the running max moves
//      only by more than a slack (one simd_any vote per loop step).
//   V: DPL codes dequantized once in fp32 (scale * c + bias), RT * DPL FMAs.
// A loop step takes KU keys per slot: their dot products first, then their reductions
// interleaved (KU * RT independent shuffle chains), one softmax update, then the values;
// with PF the next step's words and scales are loaded before this step's work.
// At the end the KPS slots are combined by shuffles, then the NSG simdgroups in
// threadgroup memory.
//
// Template: T, S, DT, MT, D, KB, VB, GS, MASK, CAUSAL, NSG, ROTQ as sdpa_decode;
// RT (rows per tile, <= 8), DPL (dims per lane: 8 or 16, D / DPL <= 32), KU (keys per
// slot and loop step), PF (load the next step's packed keys ahead: 0 or 1).
// Needs GS % DPL == 0, (DPL * KB) and (DPL * VB) in {16, 32, 64, 128} bits, rows of
// the packed buffers 16-byte aligned (mlx_kvq/kernels/decode.py checks).
// Inputs, carrier and outputs: as sdpa_decode.metal (T = threadgroups along x).
// Fused merge (KVQ_FUSED_MERGE, "sdpa_decode_simd_fused", CUDA only): as sdpa_decode.

constexpr float NEG_INF = -INFINITY;
constexpr int NT = NSG * 32;
constexpr int KL = D / DPL;          // lanes per key
constexpr int KPS = 32 / KL;         // keys per simdgroup step
constexpr int KNB = DPL * KB;        // key bits per lane and key
constexpr int VNB = DPL * VB;        // value bits per lane and key
constexpr int KNW = (KNB + 31) / 32; // words they take in registers
constexpr int VNW = (VNB + 31) / 32;
constexpr uint KMASK = (1u << KB) - 1u;
constexpr uint VMASK = (1u << VB) - 1u;
constexpr float RESCALE_SLACK_SIMD = 8.0f;  // log2 units (see the key loop)

const int n = (int(carrier_shape[0]) - 1) * 32768 + (int(carrier_shape[1]) - 1);
const int delta = int(long((int(carrier_shape[2]) - 1) * 65536 + (int(carrier_shape[3]) - 1)) - 2147483648l);
const int ns = int(carrier_shape[4]) - 1;
const int nw = int(carrier_shape[5]) - 1;
const int P = int(carrier_shape[6]) - 1;
const int B = int(q_shape[0]);
const int Hq = int(q_shape[1]);
const int L = int(q_shape[2]);
const int Hkv = int(kw_shape[1]);
const int rep = Hq / Hkv;
const int R = rep * L;
const int q_start = delta + ns;

const uint lane = thread_index_in_simdgroup;
const int slot = int(lane) / KL;
const int kpart = int(lane) % KL;
const int d0 = kpart * DPL;  // this lane's dims [d0, d0 + DPL)
const int sg = int(simdgroup_index_in_threadgroup);
const int tid = int(thread_index_in_threadgroup);
const int part = int(threadgroup_position_in_grid.x);
const int w = part * NSG + sg;
const int kvh = int(threadgroup_position_in_grid.y) % Hkv;
const int row0 = (int(threadgroup_position_in_grid.y) / Hkv) * RT;
const int b = int(threadgroup_position_in_grid.z);
const float qscale = fparams[0] * KVQ_LOG2E;

// this warp's keys: packed [kbeg, kend) or the dense keys [0, ns + nw)
const bool dense = (w == P);
const int kps = P > 0 ? ((n + P - 1) / P + 15) / 16 * 16 : 0;
const int kbeg = dense ? 0 : metal::min(w * kps, n);
const int kend = dense ? ns + nw : (w < P ? metal::min(n, (w + 1) * kps) : kbeg);

// rows of the tile: head, position
int rhead[RT];
int rpos[RT];
bool rok[RT];
KVQ_UNROLL
for (int r = 0; r < RT; r++) {
  const int row = row0 + r;
  rok[r] = row < R;
  rhead[r] = kvh * rep + (rok[r] ? row / L : 0);
  rpos[r] = q_start + (rok[r] ? row % L : 0);
}

const device uint* kwp = kvq_opaque(kw + size_t(b) * size_t(kw_strides[0]) + size_t(kvh) * size_t(kw_strides[1]));
const device S* ksp = kvq_opaque(ks + size_t(b) * size_t(ks_strides[0]) + size_t(kvh) * size_t(ks_strides[1]));
const device S* kbp = kvq_opaque(kb + size_t(b) * size_t(kb_strides[0]) + size_t(kvh) * size_t(kb_strides[1]));
const device uint* vwp = kvq_opaque(vw + size_t(b) * size_t(vw_strides[0]) + size_t(kvh) * size_t(vw_strides[1]));
const device S* vsp = kvq_opaque(vs + size_t(b) * size_t(vs_strides[0]) + size_t(kvh) * size_t(vs_strides[1]));
const device S* vbp = kvq_opaque(vb + size_t(b) * size_t(vb_strides[0]) + size_t(kvh) * size_t(vb_strides[1]));
const int kws = int(kw_strides[2]), kss = int(ks_strides[2]), kbs = int(kb_strides[2]);
const int vws = int(vw_strides[2]), vss = int(vs_strides[2]), vbs = int(vb_strides[2]);
const int gi = d0 / GS;  // this lane's quantization group
size_t mst0 = 0, mst1 = 0, mst2 = 0, mst3 = 0;
if (MASK != 0) {
  mst0 = mask_shape[0] == 1 ? 0 : size_t(mask_strides[0]);
  mst1 = mask_shape[1] == 1 ? 0 : size_t(mask_strides[1]);
  mst2 = mask_shape[2] == 1 ? 0 : size_t(mask_strides[2]);
  mst3 = mask_shape[3] == 1 ? 0 : size_t(mask_strides[3]);
}

// The tile's query rows through threadgroup memory (rows past R are zeros), rotated
// when ROTQ as in sdpa_decode (kvq_fwht_lanes, 1 / sqrt(D) in fparams[0]).
threadgroup float q_tg[RT * D];
for (int r = sg; r < RT; r += NSG) {  // a row per simdgroup
  const int row = row0 + r;
  const int qr_ = row < R ? row : 0;
  const device T* qrow = q + size_t(b) * size_t(q_strides[0]) + size_t(kvh * rep + qr_ / L) * size_t(q_strides[1]) +
      size_t(qr_ % L) * size_t(q_strides[2]);
  if (ROTQ) {
    constexpr int E = D / 32 > 0 ? D / 32 : 1;
    float acc[E];
    KVQ_UNROLL
    for (int e = 0; e < E; e++) {
      const int d = int(lane) * E + e;
      acc[e] = row < R ? float(qrow[d]) * signs[d] : 0.0f;
    }
    kvq_fwht_lanes<E>(acc, lane);
    KVQ_UNROLL
    for (int e = 0; e < E; e++) {
      q_tg[r * D + int(lane) * E + e] = acc[e];
    }
  } else {
    for (int d = int(lane); d < D; d += 32) {
      q_tg[r * D + d] = row < R ? float(qrow[d]) : 0.0f;
    }
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
float qv[RT][DPL];  // this lane's dims of the rows, times scale * log2 e
float qsum[RT];     // their sum (the bias term of the scores)
KVQ_UNROLL
for (int r = 0; r < RT; r++) {
  qsum[r] = 0.0f;
  KVQ_UNROLL
  for (int j = 0; j < DPL; j++) {
    qv[r][j] = q_tg[r * D + d0 + j] * qscale;
    qsum[r] += qv[r][j];
  }
}

float m[RT];     // running max (base 2) per row, of this slot's keys
float lsum[RT];  // softmax sums, likewise
float o[RT][DPL];
KVQ_UNROLL
for (int r = 0; r < RT; r++) {
  m[r] = NEG_INF;
  lsum[r] = 0.0f;
  KVQ_UNROLL
  for (int j = 0; j < DPL; j++) {
    o[r][j] = 0.0f;
  }
}

// Packed keys: the raw words and scales of KU keys per slot (key blk + KPS * u + slot,
// clamped to the warp's range), loaded together so that their latencies overlap; with
// PF those of the next KU keys go out before the current ones are computed.
#define KVQ_LOAD_KEY(KEY, CW, VW, KS_, KB_, VS_, VB_)                          \
  {                                                                            \
    const int kc_ = metal::min((KEY), kend - 1);                               \
    kvq_load_bits<KNB>(kwp + uint(kc_ * kws), d0 * KB, CW);                    \
    kvq_load_bits<VNB>(vwp + uint(kc_ * vws), d0 * VB, VW);                    \
    KS_ = ksp[uint(kc_ * kss + gi)];                                           \
    KB_ = kbp[uint(kc_ * kbs + gi)];                                           \
    VS_ = vsp[uint(kc_ * vss + gi)];                                           \
    VB_ = vbp[uint(kc_ * vbs + gi)];                                           \
  }
uint cw[KU][KNW], vwd[KU][VNW], ncw[KU][KNW], nvw[KU][VNW];
S kss_[KU], kbs_[KU], vss_[KU], vbs_[KU], nks[KU], nkb[KU], nvs[KU], nvb[KU];
if (PF && !dense && kbeg < kend) {
  KVQ_UNROLL
  for (int u = 0; u < KU; u++) {
    KVQ_LOAD_KEY(kbeg + KPS * u + slot, cw[u], vwd[u], kss_[u], kbs_[u], vss_[u], vbs_[u]);
  }
}

// The key loop twice, for the packed warps and the dense one (dns a constant in each).
KVQ_UNROLL
for (int ph = 0; ph < 2; ph++) {
  const bool dns = ph == 1;
  if (dns != dense) {
    continue;
  }
  for (int blk = kbeg; blk < kend; blk += KPS * KU) {
    if (!dns) {
      if (PF) {  // the next KU keys' words and scales, while these are computed
        KVQ_UNROLL
        for (int u = 0; u < KU; u++) {
          KVQ_LOAD_KEY(blk + KPS * KU + KPS * u + slot, ncw[u], nvw[u], nks[u], nkb[u], nvs[u], nvb[u]);
        }
      } else {
        KVQ_UNROLL
        for (int u = 0; u < KU; u++) {
          KVQ_LOAD_KEY(blk + KPS * u + slot, cw[u], vwd[u], kss_[u], kbs_[u], vss_[u], vbs_[u]);
        }
      }
    }
    // scores (base 2) of the RT rows for the KU keys of this slot: the dot products of
    // all KU keys first, then their reductions interleaved (KU * RT independent chains)
    float s[KU][RT];
    KVQ_UNROLL
    for (int u = 0; u < KU; u++) {
      const int kc = metal::min(blk + KPS * u + slot, kend - 1);  // (clamped: every lane takes part)
      float kx[DPL];  // key dims (dense) or codes (packed)
      if (!dns) {
        KVQ_UNROLL
        for (int j = 0; j < DPL; j++) {
          kx[j] = float((cw[u][(j * KB) / 32] >> ((j * KB) % 32)) & KMASK);
        }
      } else {
        const device DT* kr = kc < ns
            ? sk + size_t(b) * size_t(sk_strides[0]) + size_t(kvh) * size_t(sk_strides[1]) + size_t(kc) * size_t(sk_strides[2])
            : wk + size_t(b) * size_t(wk_strides[0]) + size_t(kvh) * size_t(wk_strides[1]) +
                size_t(kc - ns) * size_t(wk_strides[2]);
        KVQ_UNROLL
        for (int j = 0; j < DPL; j++) {
          kx[j] = float(kr[d0 + j]);
        }
      }
      KVQ_UNROLL
      for (int r = 0; r < RT; r++) {
        float d2[2] = {0.0f, 0.0f};  // two chains
        KVQ_UNROLL
        for (int j = 0; j < DPL; j++) {
          d2[j & 1] += qv[r][j] * kx[j];
        }
        const float dot = d2[0] + d2[1];
        s[u][r] = dns ? dot : float(kss_[u]) * dot + float(kbs_[u]) * qsum[r];
      }
    }
    KVQ_UNROLL
    for (int h = 1; h < KL; h <<= 1) {
      KVQ_UNROLL
      for (int u = 0; u < KU; u++) {
        KVQ_UNROLL
        for (int r = 0; r < RT; r++) {
          s[u][r] += simd_shuffle_xor(s[u][r], uint(h));
        }
      }
    }
    bool need = false;
    float bmax[RT];  // the KU keys' max per row
    KVQ_UNROLL
    for (int r = 0; r < RT; r++) {
      bmax[r] = NEG_INF;
    }
    KVQ_UNROLL
    for (int u = 0; u < KU; u++) {
      const int key = blk + KPS * u + slot;
      const int kc = metal::min(key, kend - 1);
      const int pos = dns ? (kc < ns ? kc : kc + n) : ns + kc;
      KVQ_UNROLL
      for (int r = 0; r < RT; r++) {
        float x = s[u][r];
        bool vis = key < kend && rok[r];
        if (CAUSAL) {
          vis = vis && pos <= rpos[r];
        }
        if (MASK != 0) {
          const size_t mi = size_t(b) * mst0 + size_t(rhead[r]) * mst1 + size_t(rpos[r] - q_start) * mst2 +
              size_t(vis ? pos : 0) * mst3;
          const float mv = float(mask[mi]);
          if (MASK == 1) {
            vis = vis && mv != 0.0f;
          } else {
            x += mv * KVQ_LOG2E;
          }
        }
        s[u][r] = vis ? x : NEG_INF;
        bmax[r] = metal::max(bmax[r], s[u][r]);
      }
    }
    KVQ_UNROLL
    for (int r = 0; r < RT; r++) {
      need = need || bmax[r] > m[r] + RESCALE_SLACK_SIMD;
    }
    // The running max moves only when a score passes it by more than the slack
    // (log2 units): probabilities stay <= 2^8 until then, and the rescaling of
    // the RT * DPL accumulators is skipped by the whole simdgroup.  Exact: out
    // and lse are normalized by the same m at the end.
    if (simd_any(need)) {
      KVQ_UNROLL
      for (int r = 0; r < RT; r++) {
        if (bmax[r] > m[r] + RESCALE_SLACK_SIMD) {  // (m = -inf: any visible key passes)
          const float f = metal::exp2(m[r] - bmax[r]);  // 0 when m was -inf
          m[r] = bmax[r];
          lsum[r] *= f;
          KVQ_UNROLL
          for (int j = 0; j < DPL; j++) {
            o[r][j] *= f;
          }
        }
      }
    }
    // values (dequantized here, after the scores, so that they take no registers before)
    KVQ_UNROLL
    for (int u = 0; u < KU; u++) {
      const int kc = metal::min(blk + KPS * u + slot, kend - 1);
      float vx[DPL];
      if (!dns) {
        const float vsc = float(vss_[u]);
        const float vbi = float(vbs_[u]);
        KVQ_UNROLL
        for (int j = 0; j < DPL; j++) {
          vx[j] = vsc * float((vwd[u][(j * VB) / 32] >> ((j * VB) % 32)) & VMASK) + vbi;
        }
      } else {
        const device DT* vr = kc < ns
            ? sv + size_t(b) * size_t(sv_strides[0]) + size_t(kvh) * size_t(sv_strides[1]) + size_t(kc) * size_t(sv_strides[2])
            : wv + size_t(b) * size_t(wv_strides[0]) + size_t(kvh) * size_t(wv_strides[1]) +
                size_t(kc - ns) * size_t(wv_strides[2]);
        KVQ_UNROLL
        for (int j = 0; j < DPL; j++) {
          vx[j] = float(vr[d0 + j]);
        }
      }
      KVQ_UNROLL
      for (int r = 0; r < RT; r++) {
        const float p = s[u][r] == NEG_INF ? 0.0f : metal::exp2(s[u][r] - m[r]);
        lsum[r] += p;
        KVQ_UNROLL
        for (int j = 0; j < DPL; j++) {
          o[r][j] += p * vx[j];
        }
      }
    }
    if (PF && !dns) {
      KVQ_UNROLL
      for (int u = 0; u < KU; u++) {
        KVQ_UNROLL
        for (int x = 0; x < KNW; x++) {
          cw[u][x] = ncw[u][x];
        }
        KVQ_UNROLL
        for (int x = 0; x < VNW; x++) {
          vwd[u][x] = nvw[u][x];
        }
        kss_[u] = nks[u];
        kbs_[u] = nkb[u];
        vss_[u] = nvs[u];
        vbs_[u] = nvb[u];
      }
    }
  }
}
#undef KVQ_LOAD_KEY

// ---- combine the KPS slots of this simdgroup (shuffles), then the NSG
// simdgroups of the threadgroup (threadgroup memory) into one partial: out
// normalized, lse in natural log
KVQ_UNROLL
for (int r = 0; r < RT; r++) {
  float mt = m[r];
  KVQ_UNROLL
  for (int h = KL; h < 32; h <<= 1) {
    mt = metal::max(mt, simd_shuffle_xor(mt, uint(h)));
  }
  const float f = m[r] == NEG_INF ? 0.0f : metal::exp2(m[r] - mt);
  m[r] = mt;
  lsum[r] *= f;
  KVQ_UNROLL
  for (int h = KL; h < 32; h <<= 1) {
    lsum[r] += simd_shuffle_xor(lsum[r], uint(h));
  }
  KVQ_UNROLL
  for (int j = 0; j < DPL; j++) {
    float x = o[r][j] * f;
    KVQ_UNROLL
    for (int h = KL; h < 32; h <<= 1) {
      x += simd_shuffle_xor(x, uint(h));
    }
    o[r][j] = x;
  }
}
threadgroup float m_tg[NSG * RT];
threadgroup float l_tg[NSG * RT];
threadgroup float o_tg[RT * D];
if (lane == 0) {
  KVQ_UNROLL
  for (int r = 0; r < RT; r++) {
    m_tg[sg * RT + r] = m[r];
    l_tg[sg * RT + r] = lsum[r];
  }
}
for (int i = tid; i < RT * D; i += NT) {
  o_tg[i] = 0.0f;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
float f[RT];
KVQ_UNROLL
for (int r = 0; r < RT; r++) {
  float mt = NEG_INF;
  for (int s2 = 0; s2 < NSG; s2++) {
    mt = metal::max(mt, m_tg[s2 * RT + r]);
  }
  f[r] = m[r] == NEG_INF ? 0.0f : metal::exp2(m[r] - mt);
}
for (int s2 = 0; s2 < NSG; s2++) {
  if (sg == s2 && slot == 0) {
    KVQ_UNROLL
    for (int r = 0; r < RT; r++) {
      KVQ_UNROLL
      for (int j = 0; j < DPL; j++) {
        o_tg[r * D + d0 + j] += o[r][j] * f[r];
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
const size_t rows_total = size_t(B) * size_t(Hq) * size_t(L);
const size_t prow = size_t(part) * rows_total + size_t((b * Hq + kvh * rep) * L + row0);
for (int i = tid; i < RT * D; i += NT) {
  const int r = i / D;
  if (row0 + r < R) {
    float mt = NEG_INF;
    for (int s2 = 0; s2 < NSG; s2++) {
      mt = metal::max(mt, m_tg[s2 * RT + r]);
    }
    float lt = 0.0f;
    if (mt != NEG_INF) {
      for (int s2 = 0; s2 < NSG; s2++) {
        lt += l_tg[s2 * RT + r] * metal::exp2(m_tg[s2 * RT + r] - mt);
      }
    }
    out[(prow + size_t(r)) * D + size_t(i % D)] = lt > 0.0f ? o_tg[i] / lt : 0.0f;
    if (i % D == 0) {
      lse[prow + size_t(r)] = lt > 0.0f ? (mt * KVQ_LN2 + metal::log(lt)) : NEG_INF;
    }
  }
}
#ifdef KVQ_FUSED_MERGE
{
  // as sdpa_decode.metal: the last threadgroup of each row tile merges the tile
  threadgroup uint last_tg[1];
  kvq_device_fence();
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const int nparts = int(threadgroups_per_grid.x);
  device uint* tiles_done = (device uint*)counter;
  const uint tile = uint(b) * threadgroups_per_grid.y + threadgroup_position_in_grid.y;
  if (tid == 0) {
    last_tg[0] = kvq_atomic_add(tiles_done + tile, 1u) == uint(nparts - 1) ? 1u : 0u;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (last_tg[0] != 0u) {
    kvq_device_fence();
    for (int r = sg; r < RT; r += NSG) {
      if (row0 + r < R) {
        kvq_merge_row<D, OT, ROTO, true>(out, lse, nparts, rows_total, size_t((b * Hq + kvh * rep) * L + row0 + r),
                                         lane, signs, fparams[1], fout, flse);
      }
    }
  }
}
#endif
