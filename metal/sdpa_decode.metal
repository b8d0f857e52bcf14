// sdpa_decode.metal -- decode attention over a whole QuantizedKVCache view:
// the packed run (affine 2/4/8-bit keys and values) and the unquantized sinks
// and recent window, in one launch, with the QK and PV products on the
// simdgroup matrix op kvq_mma_16816 (tensor cores on NVIDIA).
//
// Work split: every simdgroup ("warp") takes one range of keys: warps
// 0 .. P-1 take P equal ranges of the packed run, warp P the sinks and the
// window, warps past that nothing.  The NSG warps of a threadgroup combine
// their results in threadgroup memory into one partial (normalized out, lse)
// per threadgroup; sdpa_merge combines the partials.  A threadgroup owns a
// tile of 8 query rows of one KV head (rows = the rep query heads of the GQA
// group x the L query positions; rows past R are zeros).
//
// Keys are the M side of the matrix op (16 per block), query rows the N side
// (8), so that no tensor-core work is spent on missing rows for rep*L <= 8.
// Per block of 16 keys (lane = 4 * gr + tq):
//   S^T (16 keys x 8 rows) = K Q^T, D/16 k-steps.  Lane (gr, tq) loads a
//     quarter of the packed rows of keys blk + gr and blk + gr + 8 (the words
//     of dims [tq*D/4, (tq+1)*D/4)) and dequantizes them straight into the A
//     fragment with fp16 pair arithmetic: codes (i, i + CPW/2) of a word sit
//     16 bits apart, so (w >> i*BITS) & mask | 0x6400_6400 is the fp16 pair
//     (1024 + c_i, 1024 + c_i+CPW/2), and one half2 FMA applies scale and bias.
//     The order of dims along the k axis is a permutation of D (the same for
//     the query fragments), which a dot product does not see.
//     KGP (a group's words split evenly over the 4 lanes tq: GS * KB % 128 == 0,
//     so that every k-step lies in one group): no fp16 arithmetic per code at
//     all.  Lane tq takes a quarter of each group's words, the raw fp16 pairs
//     1024 + (c << o) go into the mma ((w >> s) & (mask << o) | 0x6400_6400: o
//     up to 4 spares a shift; the query dims of those codes are divided by 2^o),
//     one fp32 accumulator chain per group, and the scales apply after it:
//     S = sum over groups of sc * (acc - 1024 * sum of the fragment's queries)
//     + bias * (sum of the queries) -- exact but for fp32 rounding, since the
//     codes and 1024 are exact in fp16 and the mma accumulates in fp32.
//   softmax: fp32, base 2, online; lane (gr, tq) holds rows 2tq, 2tq+1 of
//     keys gr, gr+8 (sums stay per lane); the running max moves only by more than
//     a slack, which one vote detects (three shuffles for a row max only then).
//   O^T (D x 8 rows) += V^T P^T: D/16 tiles; lane (gr, tq) loads the words of
//     dims [gr*D/8, (gr+1)*D/8) of keys 2tq, 2tq+1, 2tq+8, 2tq+9 and pairs the
//     same byte of two keys (kvq_bytes2), so that one fp16 pair holds one dim
//     of two keys, as the A fragment wants.  P^T (B operand) is gathered from
//     the score lanes with four shuffles.
// The block loop is written once and compiled twice, for the packed warps and
// the dense one (a constant flag in each), so that its registers are those of
// the larger of the two loops, not of both joined.
//
// Template: T (query dtype), S (scale dtype), DT (sinks/window dtype), MT (mask
// dtype), D, KB, VB (2, 4 or 8), GS, MASK (0 none, 1 bool keep, 2 additive),
// CAUSAL, NSG (warps per threadgroup), PF (blocks of keys loaded ahead: 0, 1 or 2),
// ROTQ (rotate the queries by the cache's rotation first, D a power of two).
// Needs D % 16 == 0, (D * KB) % 128 == 0, (D * VB) % 256 == 0,
// GS a multiple of D/8 and D/4 a multiple or divisor of GS (mlx_kvq/kernels/decode.py checks).
// Inputs: q (B,Hq,L,D); kw/ks/kb, vw/vs/vb packed (B,Hkv,C,...); sk/sv sinks,
// wk/wv window (B,Hkv,*,D); mask 4-D over absolute key positions; carrier;
// fparams [scale, 1 / sqrt(D)] (ROTQ: scale / sqrt(D), the transform below is unnormalized);
// signs (D,) float32, the rotation's signs (read when ROTQ).
// All may be strided in their first three dims.
// Carrier shape: (n/32768+1, n%32768+1, d/65536+1, d%65536+1, ns+1, nw+1, P+1)
// with n packed keys, d = q_start - ns + 2^31, ns sinks, nw window keys, P
// packed splits.  Positions: sink i -> i, packed j -> ns + j, window i ->
// ns + n + i; query row l -> q_start + l.
// Outputs: out float32 (T, B*Hq*L, D), lse float32 (T, B*Hq*L), T = threadgroups along x.
// Fused merge (the kernel "sdpa_decode_fused", KVQ_FUSED_MERGE defined; CUDA only):
// template OT, ROTO as sdpa_merge's; more outputs fout OT (B*Hq*L, D), flse float32
// (B*Hq*L); one more input, counter uint (B * threadgroups along y), fresh zeros per
// launch, which the kernel counts up (written although an input: nothing else holds
// it): the last threadgroup of each row tile to finish merges the tile's T partials
// (kvq_merge_row) -- one launch instead of two.

constexpr float NEG_INF = -INFINITY;
constexpr int NT = NSG * 32;
constexpr int NK = D / 16;          // QK k-steps
constexpr int KDL = D / 4;          // key dims per lane (tq)
constexpr int KWL = D * KB / 128;   // key words per lane and key
constexpr int KCPW = 32 / KB;       // codes per word (keys)
constexpr int KH = KCPW / 2;        // distance of the two codes of a pair
constexpr int KKPW = KCPW / 4;      // k-steps per word
constexpr int LGK = KDL >= GS ? KDL / GS : 1;  // key groups per lane (not KGP)
constexpr int G = D / GS;           // groups per row
constexpr int KWPG = GS * KB / 32;  // key words per group
// KGP: every QK k-step lies in one group (lane tq takes a quarter of each group's
// words), so the key scales apply after the mma, in fp32, per group accumulator
constexpr bool KGP = KWPG % 4 == 0;
constexpr int KLW = KGP ? KWPG / 4 : KWL;  // consecutive key words of a lane
constexpr int KSG = KGP ? G : LGK;         // key scales (and biases) per key of a lane
constexpr int NCH = KGP && G > 2 ? G : 2;  // QK accumulator chains
// KGP codes go into the mma as fp16 1024 + c << o: no shift when o + KB <= 10 and
// o <= 4 (the query dims of code position p are divided by 2^o instead)
constexpr int KNPB = KGP ? (KB == 2 ? 3 : (KB == 4 ? 2 : 1)) : 1;  // code positions per shift
// bit offset o of code position p inside its 16-bit half in the mma (0 but with KGP)
#define KVQ_KOFF(p) (((p) % KNPB) * KB)
constexpr int DPL = D / 8;          // value dims per lane (gr)
constexpr int NJ = D / 16;          // PV tiles (16 dims each)
constexpr int VWL = D * VB / 256;   // value words per lane and key
constexpr int VCPW = 32 / VB;       // codes per word (values)
constexpr int VCPB = 8 / VB;        // codes per byte (values)
constexpr uint KM2 = ((1u << KB) - 1u) * 0x10001u;
constexpr uint VM2 = ((1u << VB) - 1u) * 0x10001u;
constexpr uint MAGIC = 0x64006400u;
// WIDE (a template constant: scales or sinks/window stored wider than fp16, bf16 or fp32):
// a block of keys whose keys or values could leave the fp16 range of the fragments (a
// group's |bias| or |bias + (2^b - 1) scale|, a dense element, over FP16_SAFE) has its
// scores computed in fp32 (keys) or its values scaled by a power of two into the fragments
// (see below); KGP keys take their scales in fp32 after the mma and stay on it.  A float16
// store holds nothing beyond fp16 (the cache saturates) and compiles none of this.
constexpr float FP16_SAFE = 65000.0f;

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
// MAGIC from a launch value (P < 2^30), so that it sits in a register: (x & M) | magic
// is then one op (nvcc folds a constant, and LOP3 takes one immediate)
const uint magic = MAGIC | uint(P >> 30);

const uint lane = thread_index_in_simdgroup;
const int gr = int(lane >> 2);
const int tq = int(lane & 3u);
// k-step c: the first dim d0 of lane tq's pairs (b0: d0, d0 + KH; b1: d0 + 1, d0 + 1 + KH),
// from the layout of its key words (KGP: a quarter of each group's)
#define KVQ_KDIM(c) \
  ((((c) / KKPW / KLW) * KWPG + tq * KLW + ((c) / KKPW) % KLW) * KCPW + 2 * ((c) % KKPW))
const int sg = int(simdgroup_index_in_threadgroup);
const int tid = int(thread_index_in_threadgroup);
const int part = int(threadgroup_position_in_grid.x);
const int w = part * NSG + sg;
const int kvh = int(threadgroup_position_in_grid.y) % Hkv;
const int row0 = (int(threadgroup_position_in_grid.y) / Hkv) * 8;
const int b = int(threadgroup_position_in_grid.z);
const float qscale = fparams[0] * KVQ_LOG2E;

// this warp's keys: packed [kbeg, kend) or the dense keys [0, ns + nw)
const bool dense = (w == P);
const int kps = P > 0 ? ((n + P - 1) / P + 15) / 16 * 16 : 0;
const int kbeg = dense ? 0 : metal::min(w * kps, n);
const int kend = dense ? ns + nw : (w < P ? metal::min(n, (w + 1) * kps) : kbeg);

// rows 2tq, 2tq + 1 of the tile (scores, softmax, output): head, position
int rhead[2];
int rpos[2];
bool rok[2];
KVQ_UNROLL
for (int i = 0; i < 2; i++) {
  const int row = row0 + 2 * tq + i;
  rok[i] = row < R;
  rhead[i] = kvh * rep + (rok[i] ? row / L : 0);
  rpos[i] = q_start + (rok[i] ? row % L : 0);
}

// (b, kvh) bases and per-key strides
// (kvq_opaque: computed here once, not folded into every load's address)
const device uint* kwp = kvq_opaque(kw + size_t(b) * size_t(kw_strides[0]) + size_t(kvh) * size_t(kw_strides[1]));
const device S* ksp = kvq_opaque(ks + size_t(b) * size_t(ks_strides[0]) + size_t(kvh) * size_t(ks_strides[1]));
const device S* kbp = kvq_opaque(kb + size_t(b) * size_t(kb_strides[0]) + size_t(kvh) * size_t(kb_strides[1]));
const device uint* vwp = kvq_opaque(vw + size_t(b) * size_t(vw_strides[0]) + size_t(kvh) * size_t(vw_strides[1]));
const device S* vsp = kvq_opaque(vs + size_t(b) * size_t(vs_strides[0]) + size_t(kvh) * size_t(vs_strides[1]));
const device S* vbp = kvq_opaque(vb + size_t(b) * size_t(vb_strides[0]) + size_t(kvh) * size_t(vb_strides[1]));
const int kws = int(kw_strides[2]), kss = int(ks_strides[2]), kbs = int(kb_strides[2]);
const int vws = int(vw_strides[2]), vss = int(vs_strides[2]), vbs = int(vb_strides[2]);
size_t mst0 = 0, mst1 = 0, mst2 = 0, mst3 = 0;
if (MASK != 0) {
  mst0 = mask_shape[0] == 1 ? 0 : size_t(mask_strides[0]);
  mst1 = mask_shape[1] == 1 ? 0 : size_t(mask_strides[1]);
  mst2 = mask_shape[2] == 1 ? 0 : size_t(mask_strides[2]);
  mst3 = mask_shape[3] == 1 ? 0 : size_t(mask_strides[3]);
}

// a dense key's row (sinks, then window) of K (KVQ_DROW(sk, sk_strides, wk, wk_strides, key)) or V
#define KVQ_DROW(SP, SST, WP, WST, KEY)                                                             \
  ((KEY) < ns ? SP + size_t(b) * size_t(SST[0]) + size_t(kvh) * size_t(SST[1]) + size_t(KEY) * size_t(SST[2]) \
              : WP + size_t(b) * size_t(WST[0]) + size_t(kvh) * size_t(WST[1]) + size_t((KEY) - ns) * size_t(WST[2]))
// element d of packed row `key` (words WP, scales SP, biases BP; strides per key), in fp32
#define KVQ_PACKED_AT(BITS, WP, WS, SP, SS, BP, BS, KEY, D_)                                         \
  (float(SP[uint((KEY) * (SS) + (D_) / GS)]) *                                                        \
       float((WP[uint((KEY) * (WS) + ((D_) * (BITS)) / 32)] >> (((D_) * (BITS)) % 32)) & ((1u << (BITS)) - 1u)) + \
   float(BP[uint((KEY) * (BS) + (D_) / GS)]))
// Packed blocks: raw K/V words and scales of a block of 16 keys, loaded into
// registers; with PF the next block's are loaded while this one is computed.
//   K: keys blk + gr (kr0) and blk + gr + 8 (kr1), the words of dims [tq*D/4, ...)
//   V: keys blk + 2tq, +1, +8, +9 (vr[0..3]), the words of dims [gr*D/8, ...)
#define KVQ_LOAD_BLOCK(BLK, KR0, KR1, KS0, KB0, KS1, KB1, VR, VSC, VBI)        \
  {                                                                            \
    const int key0_ = metal::min((BLK) + gr, kend - 1);                        \
    const int key1_ = metal::min((BLK) + gr + 8, kend - 1);                    \
    KVQ_UNROLL                                                                 \
    for (int g = 0; g < KWL / KLW; g++) {                                      \
      kvq_load_words<KLW>(kwp + uint(key0_ * kws + g * KWPG + tq * KLW), KR0 + g * KLW); \
      kvq_load_words<KLW>(kwp + uint(key1_ * kws + g * KWPG + tq * KLW), KR1 + g * KLW); \
    }                                                                          \
    KVQ_UNROLL                                                                 \
    for (int x = 0; x < KSG; x++) {                                            \
      const int gi = KGP ? x : (tq * KDL) / GS + x;                            \
      KS0[x] = ksp[uint(key0_ * kss + gi)];                                    \
      KB0[x] = kbp[uint(key0_ * kbs + gi)];                                    \
      KS1[x] = ksp[uint(key1_ * kss + gi)];                                    \
      KB1[x] = kbp[uint(key1_ * kbs + gi)];                                    \
    }                                                                          \
    const int vg_ = (gr * DPL) / GS;                                           \
    KVQ_UNROLL                                                                 \
    for (int i = 0; i < 4; i++) {                                              \
      const int vk_ = metal::min((BLK) + 2 * tq + (i & 1) + 8 * (i >> 1), kend - 1); \
      kvq_load_words<VWL>(vwp + uint(vk_ * vws + gr * VWL), VR[i]);            \
      VSC[i] = vsp[uint(vk_ * vss + vg_)];                                     \
      VBI[i] = vbp[uint(vk_ * vbs + vg_)];                                     \
    }                                                                          \
  }
uint kr0[KWL], kr1[KWL], vr[4][VWL];
S ks0f[KSG], kb0f[KSG], ks1f[KSG], kb1f[KSG], vsc[4], vbi[4];  // scales/biases as stored
uint nkr0[KWL], nkr1[KWL], nvr[4][VWL];
S nks0[KSG], nkb0[KSG], nks1[KSG], nkb1[KSG], nvsc[4], nvbi[4];
uint fkr0[KWL], fkr1[KWL], fvr[4][VWL];
S fks0[KSG], fkb0[KSG], fks1[KSG], fkb1[KSG], fvsc[4], fvbi[4];
// (the first block's loads go out before the query prologue below, so that its
// latency overlaps it)
if (!dense && kbeg < kend) {
  KVQ_LOAD_BLOCK(kbeg, kr0, kr1, ks0f, kb0f, ks1f, kb1f, vr, vsc, vbi);
  if (PF > 1) {
    KVQ_LOAD_BLOCK(kbeg + 16, nkr0, nkr1, nks0, nkb0, nks1, nkb1, nvr, nvsc, nvbi);
  }
}

// The tile's query rows in threadgroup memory (rows past R are zeros), rotated
// when ROTQ: q R = ((q * signs) H) / sqrt(D), H the Sylvester Hadamard matrix, by
// a fast Walsh-Hadamard transform of each row across a simdgroup (kvq_fwht_lanes,
// D a power of two >= 32: a lane holds dims [lane * E, lane * E + E)); the
// 1 / sqrt(D) is in fparams[0].
threadgroup float q_tg[8 * D];
threadgroup float qs_tg[8];
for (int r = sg; r < 8; r += NSG) {  // a row per simdgroup
  const int row = row0 + r;
  const int qr_ = row < R ? row : 0;  // (rows past R are zeros)
  const device T* qrow = q + size_t(b) * size_t(q_strides[0]) + size_t(kvh * rep + qr_ / L) * size_t(q_strides[1]) +
      size_t(qr_ % L) * size_t(q_strides[2]);
  // The row is scaled by 2^sh, its largest |q| about 2^4 (exact: a power of two), so that
  // the fp16 fragments below keep their precision whatever the queries' scale (queries of
  // 1e-5 against keys near the fp16 maximum are fp16 subnormals otherwise); the scores
  // take 2^-sh back in fp32 (qs_tg). (Each lane scales the values it wrote itself.)
  int sh = 0;
  if (ROTQ) {
    constexpr int E = D / 32 > 0 ? D / 32 : 1;
    float acc[E];
    KVQ_UNROLL
    for (int e = 0; e < E; e++) {
      const int d = int(lane) * E + e;
      acc[e] = row < R ? float(qrow[d]) * signs[d] : 0.0f;
    }
    kvq_fwht_lanes<E>(acc, lane);
    float qmax = 0.0f;
    KVQ_UNROLL
    for (int e = 0; e < E; e++) {
      qmax = metal::max(qmax, metal::abs(acc[e]));
    }
    sh = kvq_pow2_shift(simd_max(qmax), 4);
    const float up = kvq_pow2(sh);
    KVQ_UNROLL
    for (int e = 0; e < E; e++) {
      q_tg[r * D + int(lane) * E + e] = acc[e] * up;
    }
  } else {
    float qmax = 0.0f;
    for (int d = int(lane); d < D; d += 32) {
      const float x = row < R ? float(qrow[d]) : 0.0f;
      q_tg[r * D + d] = x;
      qmax = metal::max(qmax, metal::abs(x));
    }
    sh = kvq_pow2_shift(simd_max(qmax), 4);
    if (sh != 0) {
      const float up = kvq_pow2(sh);
      for (int d = int(lane); d < D; d += 32) {
        q_tg[r * D + d] *= up;
      }
    }
  }
  if (lane == 0) {
    qs_tg[r] = qscale * kvq_pow2(-sh);
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
// per row 2tq + i of this lane: the score scale (softmax base 2) times 2^-sh
const float rqs[2] = {qs_tg[2 * tq], qs_tg[2 * tq + 1]};
// Q^T fragments (B operand): k-step c, row gr, dims d0, d0+KH (b0) and
// d0+1, d0+1+KH (b1) (KVQ_KDIM); KGP: divided by 2^o of their code position -- and,
// per group g and rows 2tq + i, the sums of the queries qs (bias term) and 1024 x
// those of the fragments' values qc (the 1024 of the codes), for the scales after
// the mma
uint qb[NK][2];
float qs[2][G], qc[2][G];
{
  const KVQ_TGP(float) qr = q_tg + gr * D;
  float ps[G], pc[G];  // this lane's share for row gr
  KVQ_UNROLL
  for (int g = 0; g < G; g++) {
    ps[g] = pc[g] = 0.0f;
  }
  KVQ_UNROLL
  for (int c = 0; c < NK; c++) {
    const int p = 2 * (c % KKPW);
    const int d0 = KVQ_KDIM(c);
    const float f0 = 1.0f / float(1 << KVQ_KOFF(p));
    const float f1 = 1.0f / float(1 << KVQ_KOFF(p + 1));
    qb[c][0] = kvq_h2(qr[d0] * f0, qr[d0 + KH] * f0);
    qb[c][1] = kvq_h2(qr[d0 + 1] * f1, qr[d0 + 1 + KH] * f1);
    if (KGP) {
      const int g = c / KKPW / KLW;
      ps[g] += (qr[d0] + qr[d0 + KH]) + (qr[d0 + 1] + qr[d0 + 1 + KH]);
      pc[g] += (kvq_h2lo(qb[c][0]) + kvq_h2hi(qb[c][0])) + (kvq_h2lo(qb[c][1]) + kvq_h2hi(qb[c][1]));
    }
  }
  KVQ_UNROLL
  for (int g = 0; g < G; g++) {
    ps[g] += simd_shuffle_xor(ps[g], 1u);
    ps[g] += simd_shuffle_xor(ps[g], 2u);
    pc[g] += simd_shuffle_xor(pc[g], 1u);
    pc[g] += simd_shuffle_xor(pc[g], 2u);
    KVQ_UNROLL
    for (int i = 0; i < 2; i++) {
      qs[i][g] = simd_shuffle(ps[g], uint(4 * (2 * tq + i)));
      qc[i][g] = 1024.0f * simd_shuffle(pc[g], uint(4 * (2 * tq + i)));
    }
  }
}

float m[2] = {NEG_INF, NEG_INF};  // running max (base 2) of rows 2tq, 2tq + 1
float lsum[2] = {0.0f, 0.0f};     // this lane's share of their softmax sums
float o[NJ][4];                   // O^T tiles: dims (2j, 2j+1 of lane gr) x rows (2tq, 2tq+1)
KVQ_UNROLL
for (int j = 0; j < NJ; j++) {
  o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
}

// The block loop twice, for the packed warps and the dense one (dns a constant in each):
// registers are then those of the larger loop, not of both joined
KVQ_UNROLL
for (int ph = 0; ph < 2; ph++) {
  const bool dns = ph == 1;
  if (dns != dense) {
    continue;
  }
  for (int blk = kbeg; blk < kend; blk += 16) {
    if (!dns) {
      if (PF > 1) {
        KVQ_LOAD_BLOCK(blk + 32, fkr0, fkr1, fks0, fkb0, fks1, fkb1, fvr, fvsc, fvbi);
      } else if (PF > 0) {
        KVQ_LOAD_BLOCK(blk + 16, nkr0, nkr1, nks0, nkb0, nks1, nkb1, nvr, nvsc, nvbi);
      } else if (blk != kbeg) {
        KVQ_LOAD_BLOCK(blk, kr0, kr1, ks0f, kb0f, ks1f, kb1f, vr, vsc, vbi);
      }
    }

    // WIDE: whether the block's keys could leave fp16 in the fragments (one vote): the
    // dense keys, and packed ones whose scales apply in the fragments (not KGP); then its
    // scores are computed in fp32 (KGP keys enter as codes, their scales apply in fp32)
    bool slow = false;
    if (WIDE && (dns || !KGP)) {
      bool big = false;
      if (!dns) {
        KVQ_UNROLL
        for (int x = 0; x < KSG; x++) {
          big = big || !(metal::max(kvq_group_absmax(ks0f[x], kb0f[x], KB),
                                    kvq_group_absmax(ks1f[x], kb1f[x], KB)) <= FP16_SAFE);
        }
      } else {  // the dense elements this lane converts: dims [tq D/4, ...) of its keys
        float kmax = 0.0f;
        for (int h = 0; h < 2; h++) {
          const int key = metal::min(blk + gr + 8 * h, kend - 1);
          const device DT* kp = KVQ_DROW(sk, sk_strides, wk, wk_strides, key);
          for (int d = tq * KDL; d < (tq + 1) * KDL; d++) {
            kmax = metal::max(kmax, metal::abs(float(kp[d])));
          }
        }
        big = !(kmax <= FP16_SAFE);
      }
      slow = simd_any(big);
    }
    // ---- S^T (16 keys x 8 rows) = K Q^T: keys blk + gr (a0, a2) and blk + gr + 8 (a1, a3)
    float s[4];
    if (slow) {
      // fp32: s[e] = (q scale log2(e)) . key blk + gr + 8 (e >> 1), row 2tq + (e & 1)
      // (already scaled: the queries are taken back from 2^sh first, see rqs)
      KVQ_UNROLL
      for (int e = 0; e < 4; e++) {
        s[e] = 0.0f;
      }
      const KVQ_TGP(float) q0 = q_tg + (2 * tq) * D;
      const KVQ_TGP(float) q1 = q_tg + (2 * tq + 1) * D;
      KVQ_UNROLL
      for (int h = 0; h < 2; h++) {
        const int key = metal::min(blk + gr + 8 * h, kend - 1);
        const device DT* kp = KVQ_DROW(sk, sk_strides, wk, wk_strides, dns ? key : 0);
        float a0 = 0.0f, a1 = 0.0f;
        for (int d = 0; d < D; d++) {
          const float kx = dns ? float(kp[d]) : KVQ_PACKED_AT(KB, kwp, kws, ksp, kss, kbp, kbs, key, d);
          a0 += q0[d] * rqs[0] * kx;
          a1 += q1[d] * rqs[1] * kx;
        }
        s[2 * h] = a0;
        s[2 * h + 1] = a1;
      }
    } else {
      float acc[NCH][4];  // independent mma chains (KGP with G > 1: one per group)
      KVQ_UNROLL
      for (int h = 0; h < NCH; h++) {
        acc[h][0] = acc[h][1] = acc[h][2] = acc[h][3] = 0.0f;
      }
      if (!dns && KGP) {
        KVQ_UNROLL
        for (int c = 0; c < NK; c++) {
          const int u = c / KKPW;
          const int p = 2 * (c % KKPW);  // code positions p (a0, a1), p + 1 (a2, a3)
          const int o0 = KVQ_KOFF(p), o1 = KVQ_KOFF(p + 1);
          const uint w0 = kr0[u];
          const uint w1 = kr1[u];
          const uint a0 = ((w0 >> (p * KB - o0)) & (KM2 << o0)) | magic;
          const uint a2 = ((w0 >> ((p + 1) * KB - o1)) & (KM2 << o1)) | magic;
          const uint a1 = ((w1 >> (p * KB - o0)) & (KM2 << o0)) | magic;
          const uint a3 = ((w1 >> ((p + 1) * KB - o1)) & (KM2 << o1)) | magic;
          kvq_mma_16816(acc[G > 1 ? u / KLW : (c & 1)], a0, a1, a2, a3, qb[c][0], qb[c][1], lane);
        }
        // acc = sum of q (1024 + c): S = sum over groups of sc (acc - qc) + bias qs
        KVQ_UNROLL
        for (int e = 0; e < 4; e++) {
          const int i = e & 1;
          float t = 0.0f;
          KVQ_UNROLL
          for (int g = 0; g < G; g++) {
            const float a = G > 1 ? acc[g][e] : acc[0][e] + acc[1][e];
            const float sc = float((e >> 1) ? ks1f[g] : ks0f[g]);
            const float bi = float((e >> 1) ? kb1f[g] : kb0f[g]);
            t += sc * (a - qc[i][g]) + bi * qs[i][g];
          }
          s[e] = t;
        }
      } else {
        if (!dns) {
          uint ksc0[LGK], kbi0[LGK], ksc1[LGK], kbi1[LGK];
          KVQ_UNROLL
          for (int x = 0; x < LGK; x++) {
            ksc0[x] = kvq_h2s(ks0f[x], ks0f[x]);
            kbi0[x] = kvq_h2s(kb0f[x], kb0f[x]);
            ksc1[x] = kvq_h2s(ks1f[x], ks1f[x]);
            kbi1[x] = kvq_h2s(kb1f[x], kb1f[x]);
          }
          KVQ_UNROLL
          for (int c = 0; c < NK; c++) {
            const int x = LGK > 1 ? (KCPW * (c / KKPW)) / GS : 0;
            const int sh = 2 * (c % KKPW) * KB;
            const uint w0 = kr0[c / KKPW];
            const uint w1 = kr1[c / KKPW];
            const uint a0 = kvq_h2_deq(((w0 >> sh) & KM2) | magic, ksc0[x], kbi0[x]);
            const uint a2 = kvq_h2_deq(((w0 >> (sh + KB)) & KM2) | magic, ksc0[x], kbi0[x]);
            const uint a1 = kvq_h2_deq(((w1 >> sh) & KM2) | magic, ksc1[x], kbi1[x]);
            const uint a3 = kvq_h2_deq(((w1 >> (sh + KB)) & KM2) | magic, ksc1[x], kbi1[x]);
            kvq_mma_16816(acc[c & 1], a0, a1, a2, a3, qb[c][0], qb[c][1], lane);
          }
        } else {  // the dense warp: keys blk + gr, blk + gr + 8 (clamped) of sinks | window
          const int key0 = metal::min(blk + gr, kend - 1);
          const int key1 = metal::min(blk + gr + 8, kend - 1);
          const device DT* kp0 = key0 < ns ? sk + size_t(b) * size_t(sk_strides[0]) + size_t(kvh) * size_t(sk_strides[1]) +
                  size_t(key0) * size_t(sk_strides[2])
                                            : wk + size_t(b) * size_t(wk_strides[0]) + size_t(kvh) * size_t(wk_strides[1]) +
                  size_t(key0 - ns) * size_t(wk_strides[2]);
          const device DT* kp1 = key1 < ns ? sk + size_t(b) * size_t(sk_strides[0]) + size_t(kvh) * size_t(sk_strides[1]) +
                  size_t(key1) * size_t(sk_strides[2])
                                            : wk + size_t(b) * size_t(wk_strides[0]) + size_t(kvh) * size_t(wk_strides[1]) +
                  size_t(key1 - ns) * size_t(wk_strides[2]);
          const KVQ_TGP(float) qd = q_tg + gr * D;
          KVQ_UNROLL
          for (int c = 0; c < NK; c++) {
            const int d0 = KVQ_KDIM(c);
            const uint a0 = kvq_h2(float(kp0[d0]), float(kp0[d0 + KH]));
            const uint a2 = kvq_h2(float(kp0[d0 + 1]), float(kp0[d0 + 1 + KH]));
            const uint a1 = kvq_h2(float(kp1[d0]), float(kp1[d0 + KH]));
            const uint a3 = kvq_h2(float(kp1[d0 + 1]), float(kp1[d0 + 1 + KH]));
            // (the query fragments as the prologue builds them, but never divided by 2^o:
            // read again from q_tg, which holds the rows until the end)
            const uint b0 = kvq_h2(qd[d0], qd[d0 + KH]);
            const uint b1 = kvq_h2(qd[d0 + 1], qd[d0 + 1 + KH]);
            kvq_mma_16816(acc[c & 1], a0, a1, a2, a3, b0, b1, lane);
          }
        }
        KVQ_UNROLL
        for (int e = 0; e < 4; e++) {
          s[e] = acc[0][e] + acc[1][e];
        }
      }
    }

    // ---- masking and online softmax (base 2); s[e]: key blk + gr + 8*(e>>1), row 2tq + (e&1)
    float bmax[2] = {NEG_INF, NEG_INF};  // (this lane's keys first)
    KVQ_UNROLL
    for (int e = 0; e < 4; e++) {
      const int i = e & 1;
      const int key = blk + gr + 8 * (e >> 1);
      const int pos = dns ? (key < ns ? key : key + n) : ns + key;
      float x = slow ? s[e] : s[e] * rqs[i];
      bool vis = key < kend && rok[i];
      if (CAUSAL) {
        vis = vis && pos <= rpos[i];
      }
      if (MASK != 0) {
        const size_t mi = size_t(b) * mst0 + size_t(rhead[i]) * mst1 + size_t(rpos[i] - q_start) * mst2 +
            size_t(vis ? pos : 0) * mst3;
        const float mv = float(mask[mi]);
        if (MASK == 1) {
          vis = vis && mv != 0.0f;
        } else {
          x += mv * KVQ_LOG2E;
        }
      }
      x = vis ? x : NEG_INF;
      s[e] = x;
      bmax[i] = metal::max(bmax[i], x);
    }
    // The running max moves only when a row's block max passes it by more than
    // RESCALE_SLACK (log2 units): until then probabilities are exp2(s - m) <= 2^8
    // (fine in fp16), and the 2 * NJ * 2 rescaling multiplies are skipped by the
    // whole warp.  Exact: out and lse are normalized by the same m at the end.
    // A row's block max passes m + slack iff some lane's share of it does, so one
    // vote decides, and the reductions across lanes run only when it says so (the
    // first block, rarely later): no shuffle chain on the common path.
    constexpr float RESCALE_SLACK = 8.0f;
    // (m = -inf: any visible key passes, as -inf + slack = -inf)
    if (simd_any(bmax[0] > m[0] + RESCALE_SLACK || bmax[1] > m[1] + RESCALE_SLACK)) {
      float fac[2] = {1.0f, 1.0f};
      KVQ_UNROLL
      for (int i = 0; i < 2; i++) {
        bmax[i] = metal::max(bmax[i], simd_shuffle_xor(bmax[i], 4u));
        bmax[i] = metal::max(bmax[i], simd_shuffle_xor(bmax[i], 8u));
        bmax[i] = metal::max(bmax[i], simd_shuffle_xor(bmax[i], 16u));
        if (bmax[i] > m[i] + RESCALE_SLACK) {
          fac[i] = metal::exp2(m[i] - bmax[i]);  // 0 when m was -inf
          m[i] = bmax[i];
        }
      }
      lsum[0] *= fac[0];
      lsum[1] *= fac[1];
      KVQ_UNROLL
      for (int j = 0; j < NJ; j++) {
        o[j][0] *= fac[0];
        o[j][1] *= fac[1];
        o[j][2] *= fac[0];
        o[j][3] *= fac[1];
      }
    }
    KVQ_UNROLL
    for (int e = 0; e < 4; e++) {
      s[e] = m[e & 1] == NEG_INF ? 0.0f : metal::exp2(s[e] - m[e & 1]);
    }
    lsum[0] += s[0] + s[2];
    lsum[1] += s[1] + s[3];
    // P^T as the B operand: b0 = P[row gr][keys 2tq, 2tq+1], b1 = keys 2tq+8, 2tq+9,
    // gathered from the lanes holding them (lane 4*key + row/2, fp16 pair of rows)
    uint pb0, pb1;
    {
      const uint u01 = kvq_h2(s[0], s[1]);
      const uint u23 = kvq_h2(s[2], s[3]);
      const uint src = uint(8 * tq + (gr >> 1));
      const uint sh = (gr & 1) ? 16u : 0u;
      const uint x0 = simd_shuffle(u01, src);
      const uint x1 = simd_shuffle(u01, src + 4u);
      const uint x2 = simd_shuffle(u23, src);
      const uint x3 = simd_shuffle(u23, src + 4u);
      pb0 = ((x0 >> sh) & 0xFFFFu) | (((x1 >> sh) & 0xFFFFu) << 16);
      pb1 = ((x2 >> sh) & 0xFFFFu) | (((x3 >> sh) & 0xFFFFu) << 16);
    }

    // ---- O^T (dims x rows) += V^T P^T; tile j: local dims 2j (a0, a2) and 2j+1 (a1, a3)
    // WIDE: values that could leave fp16 (one vote) enter the fragments times vup = 2^-k,
    // the largest about 2^13, and o is scaled by vup around the products (exact)
    float vup = 1.0f;
    if (WIDE) {
      float vmax = 0.0f;
      if (!dns) {
        KVQ_UNROLL
        for (int i = 0; i < 4; i++) {
          vmax = metal::max(vmax, kvq_group_absmax(vsc[i], vbi[i], VB));
        }
      } else {  // the dense elements this lane converts: dims [gr D/8, ...) of keys 2tq, +1, +8, +9
        for (int i = 0; i < 4; i++) {
          const int vk = metal::min(blk + 2 * tq + (i & 1) + 8 * (i >> 1), kend - 1);
          const device DT* vp = KVQ_DROW(sv, sv_strides, wv, wv_strides, vk);
          for (int d = gr * DPL; d < (gr + 1) * DPL; d++) {
            vmax = metal::max(vmax, metal::abs(float(vp[d])));
          }
        }
      }
      if (simd_any(!(vmax <= FP16_SAFE))) {
        vup = kvq_pow2(metal::min(0, kvq_pow2_shift(simd_max(vmax), 13)));
      }
    }
    if (WIDE && vup != 1.0f) {
      KVQ_UNROLL
      for (int j = 0; j < NJ; j++) {
        o[j][0] *= vup;
        o[j][1] *= vup;
        o[j][2] *= vup;
        o[j][3] *= vup;
      }
    }
    if (!dns) {
      const uint sc01 = WIDE ? kvq_h2(float(vsc[0]) * vup, float(vsc[1]) * vup) : kvq_h2s(vsc[0], vsc[1]);
      const uint bi01 = WIDE ? kvq_h2(float(vbi[0]) * vup, float(vbi[1]) * vup) : kvq_h2s(vbi[0], vbi[1]);
      const uint sc23 = WIDE ? kvq_h2(float(vsc[2]) * vup, float(vsc[3]) * vup) : kvq_h2s(vsc[2], vsc[3]);
      const uint bi23 = WIDE ? kvq_h2(float(vbi[2]) * vup, float(vbi[3]) * vup) : kvq_h2s(vbi[2], vbi[3]);
      KVQ_UNROLL
      for (int j = 0; j < NJ; j++) {
        const int l0 = 2 * j;
        const int x = l0 / VCPW;
        const int q0 = l0 % VCPW;
        const int k0 = q0 / VCPB, e0 = q0 % VCPB;
        const int k1 = (q0 + 1) / VCPB, e1 = (q0 + 1) % VCPB;
        const uint a0 = kvq_h2_deq(((kvq_bytes2(vr[0][x], vr[1][x], k0) >> (e0 * VB)) & VM2) | magic, sc01, bi01);
        const uint a1 = kvq_h2_deq(((kvq_bytes2(vr[0][x], vr[1][x], k1) >> (e1 * VB)) & VM2) | magic, sc01, bi01);
        const uint a2 = kvq_h2_deq(((kvq_bytes2(vr[2][x], vr[3][x], k0) >> (e0 * VB)) & VM2) | magic, sc23, bi23);
        const uint a3 = kvq_h2_deq(((kvq_bytes2(vr[2][x], vr[3][x], k1) >> (e1 * VB)) & VM2) | magic, sc23, bi23);
        kvq_mma_16816(o[j], a0, a1, a2, a3, pb0, pb1, lane);
      }
    } else {
      const device DT* vp[4];
      KVQ_UNROLL
      for (int i = 0; i < 4; i++) {  // keys blk + 2tq, +1, +8, +9 (clamped), as the packed loads
        const int vk = metal::min(blk + 2 * tq + (i & 1) + 8 * (i >> 1), kend - 1);
        vp[i] = vk < ns
            ? sv + size_t(b) * size_t(sv_strides[0]) + size_t(kvh) * size_t(sv_strides[1]) + size_t(vk) * size_t(sv_strides[2])
            : wv + size_t(b) * size_t(wv_strides[0]) + size_t(kvh) * size_t(wv_strides[1]) +
                size_t(vk - ns) * size_t(wv_strides[2]);
      }
      KVQ_UNROLL
      for (int j = 0; j < NJ; j++) {
        const int d = gr * DPL + 2 * j;
        const uint a0 = kvq_h2(float(vp[0][d]) * vup, float(vp[1][d]) * vup);
        const uint a1 = kvq_h2(float(vp[0][d + 1]) * vup, float(vp[1][d + 1]) * vup);
        const uint a2 = kvq_h2(float(vp[2][d]) * vup, float(vp[3][d]) * vup);
        const uint a3 = kvq_h2(float(vp[2][d + 1]) * vup, float(vp[3][d + 1]) * vup);
        kvq_mma_16816(o[j], a0, a1, a2, a3, pb0, pb1, lane);
      }
    }
    if (WIDE && vup != 1.0f) {  // (a power of two: exact)
      KVQ_UNROLL
      for (int j = 0; j < NJ; j++) {
        o[j][0] /= vup;
        o[j][1] /= vup;
        o[j][2] /= vup;
        o[j][3] /= vup;
      }
    }
    if (PF > 0 && !dns) {  // shift the prefetched blocks down
      KVQ_UNROLL
      for (int x = 0; x < KWL; x++) {
        kr0[x] = nkr0[x];
        kr1[x] = nkr1[x];
        nkr0[x] = fkr0[x];
        nkr1[x] = fkr1[x];
      }
      KVQ_UNROLL
      for (int x = 0; x < KSG; x++) {
        ks0f[x] = nks0[x];
        kb0f[x] = nkb0[x];
        ks1f[x] = nks1[x];
        kb1f[x] = nkb1[x];
        nks0[x] = fks0[x];
        nkb0[x] = fkb0[x];
        nks1[x] = fks1[x];
        nkb1[x] = fkb1[x];
      }
      KVQ_UNROLL
      for (int i = 0; i < 4; i++) {
        KVQ_UNROLL
        for (int x = 0; x < VWL; x++) {
          vr[i][x] = nvr[i][x];
          nvr[i][x] = fvr[i][x];
        }
        vsc[i] = nvsc[i];
        vbi[i] = nvbi[i];
        nvsc[i] = fvsc[i];
        nvbi[i] = fvbi[i];
      }
    }
  }
}
#undef KVQ_LOAD_BLOCK
#undef KVQ_KDIM
#undef KVQ_KOFF
#undef KVQ_DROW
#undef KVQ_PACKED_AT

// ---- combine the NSG warps of this threadgroup (same head and rows, adjacent
// key ranges) into one partial: out normalized, lse in natural log
threadgroup float m_tg[NSG * 8];
threadgroup float l_tg[NSG * 8];
threadgroup float o_tg[8 * D];
KVQ_UNROLL
for (int i = 0; i < 2; i++) {
  lsum[i] += simd_shuffle_xor(lsum[i], 4u);
  lsum[i] += simd_shuffle_xor(lsum[i], 8u);
  lsum[i] += simd_shuffle_xor(lsum[i], 16u);
}
if (gr == 0) {
  KVQ_UNROLL
  for (int i = 0; i < 2; i++) {
    m_tg[sg * 8 + 2 * tq + i] = m[i];
    l_tg[sg * 8 + 2 * tq + i] = lsum[i];
  }
}
for (int i = tid; i < 8 * D; i += NT) {
  o_tg[i] = 0.0f;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
float f[2];
KVQ_UNROLL
for (int i = 0; i < 2; i++) {
  float mt = NEG_INF;
  for (int s2 = 0; s2 < NSG; s2++) {
    mt = metal::max(mt, m_tg[s2 * 8 + 2 * tq + i]);
  }
  f[i] = m[i] == NEG_INF ? 0.0f : metal::exp2(m[i] - mt);
}
for (int s2 = 0; s2 < NSG; s2++) {
  if (sg == s2) {
    KVQ_UNROLL
    for (int j = 0; j < NJ; j++) {
      const int d = gr * DPL + 2 * j;
      o_tg[(2 * tq) * D + d] += o[j][0] * f[0];
      o_tg[(2 * tq + 1) * D + d] += o[j][1] * f[1];
      o_tg[(2 * tq) * D + d + 1] += o[j][2] * f[0];
      o_tg[(2 * tq + 1) * D + d + 1] += o[j][3] * f[1];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
const size_t rows_total = size_t(B) * size_t(Hq) * size_t(L);
const size_t prow = size_t(part) * rows_total + size_t((b * Hq + kvh * rep) * L + row0);
for (int i = tid; i < 8 * D; i += NT) {
  const int r = i / D;
  if (row0 + r < R) {
    float mt = NEG_INF;
    for (int s2 = 0; s2 < NSG; s2++) {
      mt = metal::max(mt, m_tg[s2 * 8 + r]);
    }
    float lt = 0.0f;
    if (mt != NEG_INF) {
      for (int s2 = 0; s2 < NSG; s2++) {
        lt += l_tg[s2 * 8 + r] * metal::exp2(m_tg[s2 * 8 + r] - mt);
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
  // every thread fences its own partial writes; then one thread counts this
  // threadgroup done for its row tile, and the last one merges the tile
  threadgroup uint last_tg[1];
  kvq_device_fence();
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const int nparts = int(threadgroups_per_grid.x);
  device uint* tiles_done = (device uint*)counter;  // this launch's zeros (see above)
  const uint tile = uint(b) * threadgroups_per_grid.y + threadgroup_position_in_grid.y;
  if (tid == 0) {
    last_tg[0] = kvq_atomic_add(tiles_done + tile, 1u) == uint(nparts - 1) ? 1u : 0u;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (last_tg[0] != 0u) {
    kvq_device_fence();
    for (int r = sg; r < 8; r += NSG) {
      if (row0 + r < R) {
        kvq_merge_row<D, OT, ROTO, true>(out, lse, nparts, rows_total, size_t((b * Hq + kvh * rep) * L + row0 + r),
                                         lane, signs, fparams[1], fout, flse);
      }
    }
  }
}
#endif
