// sdpa_prefill.metal -- a prefill chunk's attention over a packed (affine) K/V run, with
// simdgroup_matrix 8x8 products: the structure of MLX's steel attention (Apple GPUs' matrix
// path) over keys and values dequantized block by block into threadgroup memory, so the
// memory a layer takes is bounded by a block, not by its keys.
//
// A threadgroup owns QR = NSG * 8 query rows of one KV head (rows = the rep query heads of
// the GQA group x the L query positions, as sdpa_packed); simdgroup sg owns 8 of them.  Per
// block of BK keys:
//   1. the threadgroup dequantizes the block's keys and values (fp32, one group of GS dims
//      per task) into kt / vt;
//   2. each simdgroup: S (8 rows x BK keys) = Q K^T, its queries held as D/8 matrices
//      (pre-scaled by scale * log2(e)), K^T tiles loaded transposed from kt;
//   3. fp32 online softmax in base 2 on the lanes' elements (a row's 8 columns of a tile lie
//      on lanes l, l^1, l^8, l^9: simd_shuffle_xor 1 and 8);
//   4. O (8 rows x D, D/8 matrices) = O * alpha + P V.
// The key range may be split over threadgroups (grid x); sdpa_merge combines the partials.
//
// Template constants: T (query dtype), S (scale dtype), D (a multiple of 8 and of GS), KB, VB
// (bits: 2, 4, 8), GS (group size), NSG, CAUSAL.
// Inputs: q (B,Hq,L,D); kw/ks/kb, vw/vs/vb packed (B,Hkv,C,...), strided in their first three
// dims; carrier (n and q_start - k_start in its shape, as sdpa_packed); fparams [scale].
// Outputs: out float32 (nsplit,B,Hq,L,D), lse float32 (nsplit,B,Hq,L) (natural log; a row with
// no visible key: out 0, lse -inf).

constexpr int BK = D <= 128 ? 16 : 8;  // keys per block: kt + vt = 2 * BK * D floats <= 16 KiB
constexpr int NKT = BK / 8;             // key tiles per block
constexpr int ND = D / 8;               // dim tiles
constexpr int NG = D / GS;              // groups per row
constexpr int KGW = GS * KB / 32;       // uint32 words per group of a key row
constexpr int VGW = GS * VB / 32;
constexpr int NT = NSG * 32;
constexpr int QR = NSG * 8;
constexpr float NEG_INF = -INFINITY;

const int n = (int(carrier_shape[0]) - 1) * 32768 + (int(carrier_shape[1]) - 1);
const int delta = int(long((int(carrier_shape[2]) - 1) * 65536 + (int(carrier_shape[3]) - 1)) - 2147483648l);
const int B = int(q_shape[0]);
const int Hq = int(q_shape[1]);
const int L = int(q_shape[2]);
const int Hkv = int(kw_shape[1]);
const int rep = Hq / Hkv;
const int R = rep * L;
const int nsplit = int(threadgroups_per_grid.x);
const int kps = ((n + nsplit - 1) / nsplit + BK - 1) / BK * BK;

const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint tid = thread_index_in_threadgroup;
const int split = int(threadgroup_position_in_grid.x);
const int g = int(threadgroup_position_in_grid.y) % Hkv;
const int tile = int(threadgroup_position_in_grid.y) / Hkv;
const int b = int(threadgroup_position_in_grid.z);

// this lane's elements of every 8x8 matrix: row fr, columns fc and fc + 1
const int fq = int(lane) / 4;
const int fr = (fq & 4) + (int(lane) / 2) % 4;
const int fc = (fq & 2) * 2 + (int(lane) % 2) * 2;

const int row = tile * QR + int(sg) * 8 + fr;
const bool rok = row < R;
const int head = g * rep + (rok ? row / L : 0);
const int pos = rok ? row % L : 0;
const int lim = !rok ? -1 : (CAUSAL ? metal::min(n - 1, delta + pos) : n - 1);  // last visible key

// keys of this threadgroup: its split, cut at the last key any row may see
const int kbeg = split * kps;
int kend = metal::min(n, kbeg + kps);
if (CAUSAL) {
  kend = metal::min(kend, delta + L);
}

threadgroup float kt[BK * D];
threadgroup float vt[BK * D];

// queries of this lane's row, scaled into base-2 units
const float qscale = fparams[0] * KVQ_LOG2E;
simdgroup_matrix<float, 8, 8> qm[ND];
simdgroup_matrix<float, 8, 8> om[ND];
{
  const size_t qi = size_t(b) * size_t(q_strides[0]) + size_t(head) * size_t(q_strides[1]) +
      size_t(pos) * size_t(q_strides[2]);
  KVQ_UNROLL
  for (int d = 0; d < ND; d++) {
    qm[d].thread_elements()[0] = rok ? float(q[qi + d * 8 + fc]) * qscale : 0.0f;
    qm[d].thread_elements()[1] = rok ? float(q[qi + d * 8 + fc + 1]) * qscale : 0.0f;
    om[d] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }
}
float m = NEG_INF;  // running max and sum of this lane's row (the same on its 4 lanes)
float l = 0.0f;

const size_t kw0 = size_t(b) * size_t(kw_strides[0]) + size_t(g) * size_t(kw_strides[1]);
const size_t ks0 = size_t(b) * size_t(ks_strides[0]) + size_t(g) * size_t(ks_strides[1]);
const size_t kb0 = size_t(b) * size_t(kb_strides[0]) + size_t(g) * size_t(kb_strides[1]);
const size_t vw0 = size_t(b) * size_t(vw_strides[0]) + size_t(g) * size_t(vw_strides[1]);
const size_t vs0 = size_t(b) * size_t(vs_strides[0]) + size_t(g) * size_t(vs_strides[1]);
const size_t vb0 = size_t(b) * size_t(vb_strides[0]) + size_t(g) * size_t(vb_strides[1]);

for (int blk = kbeg; blk < kend; blk += BK) {
  // ---- 1. the block's keys and values, dequantized (keys past the end: 0)
  threadgroup_barrier(mem_flags::mem_threadgroup);  // every simdgroup is done with the last block
  for (int i = int(tid); i < BK * NG; i += NT) {
    const int kk = i / NG;
    const int gi = i % NG;
    const int j = blk + kk;
    const int o = kk * D + gi * GS;
    if (j < kend) {
      kvq_dequant_group<KB, GS>(kw + kw0 + size_t(j) * size_t(kw_strides[2]) + gi * KGW,
                                float(ks[ks0 + size_t(j) * size_t(ks_strides[2]) + gi]),
                                float(kb[kb0 + size_t(j) * size_t(kb_strides[2]) + gi]), kt + o);
      kvq_dequant_group<VB, GS>(vw + vw0 + size_t(j) * size_t(vw_strides[2]) + gi * VGW,
                                float(vs[vs0 + size_t(j) * size_t(vs_strides[2]) + gi]),
                                float(vb[vb0 + size_t(j) * size_t(vb_strides[2]) + gi]), vt + o);
    } else {
      for (int e = 0; e < GS; e++) {
        kt[o + e] = 0.0f;
        vt[o + e] = 0.0f;
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // ---- 2. scores: S = Q K^T (K^T tiles: kt read transposed)
  simdgroup_matrix<float, 8, 8> st[NKT];
  KVQ_UNROLL
  for (int t = 0; t < NKT; t++) {
    st[t] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    KVQ_UNROLL
    for (int d = 0; d < ND; d++) {
      simdgroup_matrix<float, 8, 8> kmat;
      simdgroup_load(kmat, kt, D, ulong2(d * 8, t * 8), true);
      simdgroup_multiply_accumulate(st[t], qm[d], kmat, st[t]);
    }
  }

  // ---- 3. online softmax over this lane's row
  float bmax = NEG_INF;
  KVQ_UNROLL
  for (int t = 0; t < NKT; t++) {
    KVQ_UNROLL
    for (int e = 0; e < 2; e++) {
      const int j = blk + t * 8 + fc + e;
      const float s = j <= lim && j < kend ? st[t].thread_elements()[e] : NEG_INF;
      st[t].thread_elements()[e] = s;
      bmax = metal::max(bmax, s);
    }
  }
  bmax = metal::max(bmax, simd_shuffle_xor(bmax, 1));
  bmax = metal::max(bmax, simd_shuffle_xor(bmax, 8));
  const float mnew = metal::max(m, bmax);
  const float alpha = mnew == NEG_INF ? 1.0f : metal::exp2(m - mnew);  // exp2(-inf) = 0 on a first block
  float psum = 0.0f;
  KVQ_UNROLL
  for (int t = 0; t < NKT; t++) {
    KVQ_UNROLL
    for (int e = 0; e < 2; e++) {
      const float s = st[t].thread_elements()[e];
      const float p = s == NEG_INF ? 0.0f : metal::exp2(s - mnew);
      st[t].thread_elements()[e] = p;
      psum += p;
    }
  }
  psum += simd_shuffle_xor(psum, 1);
  psum += simd_shuffle_xor(psum, 8);
  l = l * alpha + psum;
  m = mnew;

  // ---- 4. O = O * alpha + P V
  KVQ_UNROLL
  for (int d = 0; d < ND; d++) {
    om[d].thread_elements()[0] *= alpha;
    om[d].thread_elements()[1] *= alpha;
    KVQ_UNROLL
    for (int t = 0; t < NKT; t++) {
      simdgroup_matrix<float, 8, 8> vmat;
      simdgroup_load(vmat, vt, D, ulong2(d * 8, t * 8));
      simdgroup_multiply_accumulate(om[d], st[t], vmat, om[d]);
    }
  }
}

// ---- the partial result of this split
if (rok) {
  const size_t orow = size_t(split) * size_t(B * Hq * L) + (size_t(b) * size_t(Hq) + size_t(head)) * size_t(L) +
      size_t(pos);
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  KVQ_UNROLL
  for (int d = 0; d < ND; d++) {
    out[orow * D + d * 8 + fc] = om[d].thread_elements()[0] * inv;
    out[orow * D + d * 8 + fc + 1] = om[d].thread_elements()[1] * inv;
  }
  if ((lane & 9u) == 0u) {
    lse[orow] = l > 0.0f ? (m + metal::log2(l)) * KVQ_LN2 : NEG_INF;
  }
}
