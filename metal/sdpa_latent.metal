// sdpa_latent.metal -- attention whose keys and values are one packed (affine) run: MLA's
// decode step, sdpa(q, latent, latent, mask=rope_scores), many query heads over one
// 512-wide latent.  simdgroup_matrix 8x8 products, the structure of sdpa_prefill (MLX's
// steel attention), with the latent dequantized once per block for both products and the
// head dim split over the simdgroups (a query row's 512 dims are too many for one lane's
// registers).
//
// A threadgroup owns QR = 16 query rows (two 8-row tiles; rows = the rep query heads of
// one KV head x the L query positions); simdgroup sg owns the dims [sg * DS, (sg + 1) * DS)
// of every row's queries and output (DS = D / NSG).  Per block of BK = 8 keys:
//   1. the threadgroup dequantizes the block (fp32, one group of GS dims per task) into kt;
//   2. each simdgroup: its share of S (16 rows x 8 keys) = Q[:, dims] K[:, dims]^T;
//   3. the shares summed through threadgroup memory (every simdgroup sums them in the
//      same order, so all hold the same S), the mask added, fp32 online softmax in base 2
//      on the lanes' elements (a row's 8 columns lie on lanes l, l^1, l^8, l^9);
//   4. O[:, dims] = O[:, dims] * alpha + P K[:, dims] (the values are the keys).
// The key range may be split over threadgroups (grid x); sdpa_merge combines the partials.
//
// Template constants: T (query dtype), S (scale dtype), MT (mask dtype), D (a multiple of
// 8 * NSG and of GS, at most 512), KB (bits: 2, 4, 8), GS, NSG, MASK (0 none, 1 bool
// keep-mask, 2 additive), CAUSAL.
// Inputs: q (B,Hq,L,D); kw/ks/kb packed (B,Hkv,C,...), strided in their first three dims;
// mask (4-D, broadcastable to (B,Hq,L,n), strided); carrier (n and q_start - k_start in its
// shape, as sdpa_packed); fparams [scale].
// Outputs: out float32 (nsplit,B,Hq,L,D), lse float32 (nsplit,B,Hq,L) (natural log; a row
// with no visible key: out 0, lse -inf).

constexpr int BK = 8;                   // keys per block: kt = BK * D floats <= 16 KiB
constexpr int RTL = 2;                  // 8-row tiles per threadgroup
constexpr int QR = RTL * 8;
constexpr int DS = D / NSG;             // dims per simdgroup
constexpr int NDS = DS / 8;             // dim tiles per simdgroup
constexpr int NG = D / GS;              // groups per row
constexpr int KGW = GS * KB / 32;       // uint32 words per group of a row
constexpr int NT = NSG * 32;
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
const int d0 = int(sg) * DS;  // this simdgroup's first dim

// this lane's row in each tile: validity, head, position, last visible key
bool rok[RTL];
int head[RTL];
int pos[RTL];
int lim[RTL];
KVQ_UNROLL
for (int rt = 0; rt < RTL; rt++) {
  const int row = tile * QR + rt * 8 + fr;
  rok[rt] = row < R;
  head[rt] = g * rep + (rok[rt] ? row / L : 0);
  pos[rt] = rok[rt] ? row % L : 0;
  lim[rt] = !rok[rt] ? -1 : (CAUSAL ? metal::min(n - 1, delta + pos[rt]) : n - 1);
}

// keys of this threadgroup: its split, cut at the last key any row may see
const int kbeg = split * kps;
int kend = metal::min(n, kbeg + kps);
if (CAUSAL) {
  kend = metal::min(kend, delta + L);
}

threadgroup float kt[BK * D];
threadgroup float st_tg[NSG * RTL * 64];  // each simdgroup's share of S

// queries (this simdgroup's dims), scaled into base-2 units; the output accumulators
const float qscale = fparams[0] * KVQ_LOG2E;
simdgroup_matrix<float, 8, 8> qm[RTL][NDS];
simdgroup_matrix<float, 8, 8> om[RTL][NDS];
float m[RTL];  // running max and sum of this lane's row per tile (the same on its 4 lanes)
float l[RTL];
KVQ_UNROLL
for (int rt = 0; rt < RTL; rt++) {
  const size_t qi = size_t(b) * size_t(q_strides[0]) + size_t(head[rt]) * size_t(q_strides[1]) +
      size_t(pos[rt]) * size_t(q_strides[2]) + size_t(d0);
  KVQ_UNROLL
  for (int d = 0; d < NDS; d++) {
    qm[rt][d].thread_elements()[0] = rok[rt] ? float(q[qi + d * 8 + fc]) * qscale : 0.0f;
    qm[rt][d].thread_elements()[1] = rok[rt] ? float(q[qi + d * 8 + fc + 1]) * qscale : 0.0f;
    om[rt][d] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }
  m[rt] = NEG_INF;
  l[rt] = 0.0f;
}

// mask strides (0 on broadcast dims)
size_t mst0 = 0, mst1 = 0, mst2 = 0, mst3 = 0;
if (MASK != 0) {
  mst0 = mask_shape[0] == 1 ? 0 : size_t(mask_strides[0]);
  mst1 = mask_shape[1] == 1 ? 0 : size_t(mask_strides[1]);
  mst2 = mask_shape[2] == 1 ? 0 : size_t(mask_strides[2]);
  mst3 = mask_shape[3] == 1 ? 0 : size_t(mask_strides[3]);
}

const size_t kw0 = size_t(b) * size_t(kw_strides[0]) + size_t(g) * size_t(kw_strides[1]);
const size_t ks0 = size_t(b) * size_t(ks_strides[0]) + size_t(g) * size_t(ks_strides[1]);
const size_t kb0 = size_t(b) * size_t(kb_strides[0]) + size_t(g) * size_t(kb_strides[1]);

for (int blk = kbeg; blk < kend; blk += BK) {
  // ---- 1. the block's keys, dequantized (keys past the end: 0)
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
    } else {
      for (int e = 0; e < GS; e++) {
        kt[o + e] = 0.0f;
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // ---- 2. this simdgroup's share of the scores (K^T tiles: kt read transposed)
  simdgroup_matrix<float, 8, 8> st[RTL];
  KVQ_UNROLL
  for (int rt = 0; rt < RTL; rt++) {
    st[rt] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    KVQ_UNROLL
    for (int d = 0; d < NDS; d++) {
      simdgroup_matrix<float, 8, 8> kmat;
      simdgroup_load(kmat, kt, D, ulong2(d0 + d * 8, 0), true);
      simdgroup_multiply_accumulate(st[rt], qm[rt][d], kmat, st[rt]);
    }
    st_tg[(int(sg) * RTL + rt) * 64 + fr * 8 + fc] = st[rt].thread_elements()[0];
    st_tg[(int(sg) * RTL + rt) * 64 + fr * 8 + fc + 1] = st[rt].thread_elements()[1];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // ---- 3. the whole scores, masked; online softmax over this lane's rows
  KVQ_UNROLL
  for (int rt = 0; rt < RTL; rt++) {
    float bmax = NEG_INF;
    KVQ_UNROLL
    for (int e = 0; e < 2; e++) {
      float s = 0.0f;
      for (int s2 = 0; s2 < NSG; s2++) {
        s += st_tg[(s2 * RTL + rt) * 64 + fr * 8 + fc + e];
      }
      const int j = blk + fc + e;
      bool vis = j <= lim[rt] && j < kend;
      if (MASK != 0) {
        const size_t mi = size_t(b) * mst0 + size_t(head[rt]) * mst1 + size_t(pos[rt]) * mst2 +
            size_t(vis ? j : 0) * mst3;
        const float mv = float(mask[mi]);
        if (MASK == 1) {
          vis = vis && mv != 0.0f;
        } else {
          s += mv * KVQ_LOG2E;
        }
      }
      s = vis ? s : NEG_INF;
      st[rt].thread_elements()[e] = s;
      bmax = metal::max(bmax, s);
    }
    bmax = metal::max(bmax, simd_shuffle_xor(bmax, 1));
    bmax = metal::max(bmax, simd_shuffle_xor(bmax, 8));
    const float mnew = metal::max(m[rt], bmax);
    const float alpha = mnew == NEG_INF ? 1.0f : metal::exp2(m[rt] - mnew);  // exp2(-inf) = 0 on a first block
    float psum = 0.0f;
    KVQ_UNROLL
    for (int e = 0; e < 2; e++) {
      const float s = st[rt].thread_elements()[e];
      const float p = s == NEG_INF ? 0.0f : metal::exp2(s - mnew);
      st[rt].thread_elements()[e] = p;
      psum += p;
    }
    psum += simd_shuffle_xor(psum, 1);
    psum += simd_shuffle_xor(psum, 8);
    l[rt] = l[rt] * alpha + psum;
    m[rt] = mnew;

    // ---- 4. O = O * alpha + P K (this simdgroup's dims)
    KVQ_UNROLL
    for (int d = 0; d < NDS; d++) {
      om[rt][d].thread_elements()[0] *= alpha;
      om[rt][d].thread_elements()[1] *= alpha;
      simdgroup_matrix<float, 8, 8> vmat;
      simdgroup_load(vmat, kt, D, ulong2(d0 + d * 8, 0));
      simdgroup_multiply_accumulate(om[rt][d], st[rt], vmat, om[rt][d]);
    }
  }
}

// ---- the partial result of this split
const size_t rows_total = size_t(B) * size_t(Hq) * size_t(L);
KVQ_UNROLL
for (int rt = 0; rt < RTL; rt++) {
  if (rok[rt]) {
    const size_t orow = size_t(split) * rows_total + (size_t(b) * size_t(Hq) + size_t(head[rt])) * size_t(L) +
        size_t(pos[rt]);
    const float inv = l[rt] > 0.0f ? 1.0f / l[rt] : 0.0f;
    KVQ_UNROLL
    for (int d = 0; d < NDS; d++) {
      out[orow * D + d0 + d * 8 + fc] = om[rt][d].thread_elements()[0] * inv;
      out[orow * D + d0 + d * 8 + fc + 1] = om[rt][d].thread_elements()[1] * inv;
    }
    if (sg == 0u && (lane & 9u) == 0u) {
      lse[orow] = l[rt] > 0.0f ? (m[rt] + metal::log2(l[rt])) * KVQ_LN2 : NEG_INF;
    }
  }
}
