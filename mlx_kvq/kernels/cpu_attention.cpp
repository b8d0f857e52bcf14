// Attention on the CPU's cores over a cache view's runs of keys: float32 runs (sinks,
// window, a chunk's own keys) and the packed run (affine codes of 2, 4 or 8 bits, MLX's
// layout: a uint32 word holds 32 / bits codes, the lowest bits first; a float32 scale and
// bias per group), GQA, causal or not, an additive mask, attention-sink logits. It gives
// (out, lse) as attention.reference.blocked_attention does, or, with sinks, the output
// of one softmax over all runs as attention.one_pass does. Built at first use by
// kernels/cpu.py (g++ -O3 -march=native -pthread).
//
// One work item is a KV head's block of up to QB queries (all its query heads, rows taken
// RG at a time across heads: a decode step's few rows share a micro-kernel), or, where a
// decode step has fewer items than twice the threads, one split of its key blocks; it walks
// the runs' keys in blocks of KB, dequantized (packed) or transposed (float32) once for
// all its rows, with an online softmax in base 2. Vectors are GCC's vector extension:
// 16 floats where the CPU has AVX-512, else 8.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <climits>
#include <cstring>
#include <initializer_list>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#define VW 16
#else
#define VW 8
#endif
typedef float vf __attribute__((vector_size(VW * 4), aligned(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));

namespace {

constexpr int KB = 4 * VW;  // keys per block
constexpr int QB = 64;      // queries per work item (per query head)
constexpr int RG = 4;       // rows (a head's query) per micro-kernel
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

inline vf splat(float x) { return vf{} + x; }

// 2**x for x <= 0 (or -inf: 0); the polynomial of attention/softmax.py. NaN stays NaN.
inline vf exp2v(vf x) {
  vf y = x < -126.0f ? splat(-126.0f) : x;
  vi ni = __builtin_convertvector(splat(0.5f) - y, vi);  // round(-y), y <= 0
  vf n = -__builtin_convertvector(ni, vf);
  vf f = y - n;
  vf p = splat(1.3218672481615686e-3f);
  p = p * f + 9.67169793839837e-3f;
  p = p * f + 5.5508929524512085e-2f;
  p = p * f + 2.4022238002741114e-1f;
  p = p * f + 6.931468559416913e-1f;
  p = p * f + 1.0f;
  vi bits = (127 - ni) << 23;
  vf r = p * (vf)bits;
  r = x < -126.0f ? splat(0.0f) : r;
  return x != x ? x : r;
}

inline float exp2s(float x) { return exp2v(splat(x))[0]; }

typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

template <class V>
inline V vmax(V a, V b) { return a > b || a != a ? a : b; }  // NaN wins

// a vector's 8-float halves folded by f, then 4-float halves (memcpy: no shuffle builtins needed)
template <class F>
inline v4f fold(vf v, F f) {
  v8f x;
#if VW == 16
  v8f hi;
  memcpy(&x, &v, 32);
  memcpy(&hi, (const char*)&v + 32, 32);
  x = f(x, hi);
#else
  memcpy(&x, &v, 32);
#endif
  v4f a, b;
  memcpy(&a, &x, 16);
  memcpy(&b, (const char*)&x + 16, 16);
  return f(a, b);
}

inline float hmax(vf v) {
  v4f y = fold(v, [](auto a, auto b) { return vmax(a, b); });
  return vmax(vmax(y[0], y[1]), vmax(y[2], y[3]));
}

inline float hsum(vf v) {
  v4f y = fold(v, [](auto a, auto b) { return a + b; });
  return (y[0] + y[2]) + (y[1] + y[3]);
}

// One run of keys and values. Float32: k, v. Packed: words kw / vw, float32 scales and
// biases. Strides (B, H, n, last axis) in elements; a run's key j sits at position
// k_start + j and in column col + j of the mask.
struct Run {
  const float *k, *v;
  const uint32_t *kw, *vw;
  const float *k_scales, *k_biases, *v_scales, *v_biases;
  int64_t ks[4], vs[4], kss[4], kbs[4], vss[4], vbs[4];
  int64_t n, k_start, col;
  int32_t packed, k_bits, v_bits, group;
};

struct Args {
  const float* q;
  int64_t qs[4];
  const Run* runs;
  int nruns;
  const float* mask;  // additive, float32, or null
  int64_t ms[4];      // its strides over (B, Hq, L, columns), 0 where it broadcasts
  const float* sinks; // per query head, or null
  float* out;         // (B, Hq, L, Dv)
  float* lse;         // (B, Hq, L)
  int B, Hq, Hkv, L, D, Dv, causal;
  float scale;
  int64_t q_start;
};

struct Buffers {
  float *qt, *o, *m, *l, *kt, *vb, *s;
  int DvP;
  explicit Buffers(const Args& a) {
    int rows = (a.Hq / a.Hkv * QB + RG - 1) / RG * RG;
    DvP = (a.Dv + VW - 1) / VW * VW;
    size_t sizes[] = {(size_t)rows * a.D, (size_t)rows * DvP, (size_t)rows, (size_t)rows,
                      (size_t)a.D * KB, (size_t)KB * DvP, (size_t)RG * KB};
    float** ptrs[] = {&qt, &o, &m, &l, &kt, &vb, &s};
    for (int i = 0; i < 7; i++) *ptrs[i] = (float*)aligned_alloc(64, (sizes[i] * 4 + 63) / 64 * 64);
  }
  ~Buffers() {
    for (float* p : {qt, o, m, l, kt, vb, s}) free(p);
  }
};

// a packed token's dims: scale * code + bias, a word's 32 / BITS codes at once
template <int PER> struct Lanes;  // a word's codes as one vector of PER lanes
template <> struct Lanes<4> {
  typedef uint32_t u __attribute__((vector_size(16)));
  typedef float f __attribute__((vector_size(16), aligned(4)));
};
template <> struct Lanes<8> {
  typedef uint32_t u __attribute__((vector_size(32)));
  typedef float f __attribute__((vector_size(32), aligned(4)));
};
template <> struct Lanes<16> {
  typedef uint32_t u __attribute__((vector_size(64)));
  typedef float f __attribute__((vector_size(64), aligned(4)));
};

template <int BITS>
inline void dequant_bits(const uint32_t* w, int64_t wstride, const float* sc, int64_t sstride, const float* bi,
                         int64_t bstride, int group, int dims, float* dst) {
  constexpr int PER = 32 / BITS;
  typedef typename Lanes<PER>::u vu;
  typedef typename Lanes<PER>::f vpu;
  vu shifts;
  for (int e = 0; e < PER; e++) shifts[e] = e * BITS;
  for (int wi = 0; wi < dims / PER; wi++) {
    int g = wi * PER / group;
    vu codes = (((vu){} + w[wi * wstride]) >> shifts) & ((1u << BITS) - 1);
    *(vpu*)(dst + wi * PER) = __builtin_convertvector(codes, vpu) * sc[g * sstride] + bi[g * bstride];
  }
}

inline void dequant(const uint32_t* w, int64_t wstride, const float* sc, int64_t sstride, const float* bi,
                    int64_t bstride, int bits, int group, int dims, float* dst) {
  if (bits == 4) dequant_bits<4>(w, wstride, sc, sstride, bi, bstride, group, dims, dst);
  else if (bits == 8) dequant_bits<8>(w, wstride, sc, sstride, bi, bstride, group, dims, dst);
  else dequant_bits<2>(w, wstride, sc, sstride, bi, bstride, group, dims, dst);
}

// packed keys j0 .. j0 + nk into kt (D x KB), VW keys at a time: each code plane of a word
// of VW keys is one vector of kt's row (zeros past nk: their scales and biases are 0)
template <int BITS>
void dequant_keys(const Run& r, int b, int h, int64_t j0, int nk, int D, float* kt) {
  constexpr int PER = 32 / BITS;
  const uint32_t* w = r.kw + b * r.ks[0] + h * r.ks[1] + j0 * r.ks[2];
  const float* sc = r.k_scales + b * r.kss[0] + h * r.kss[1] + j0 * r.kss[2];
  const float* bi = r.k_biases + b * r.kbs[0] + h * r.kbs[1] + j0 * r.kbs[2];
  for (int jv = 0; jv < KB; jv += VW) {
    int g = -1;
    vf s = {}, o = {};
    for (int wi = 0; wi < D / PER; wi++) {
      if (wi * PER / r.group != g) {
        g = wi * PER / r.group;
        for (int u = 0; u < VW; u++) {
          bool in = jv + u < nk;
          s[u] = in ? sc[(jv + u) * r.kss[2] + g * r.kss[3]] : 0.0f;
          o[u] = in ? bi[(jv + u) * r.kbs[2] + g * r.kbs[3]] : 0.0f;
        }
      }
      vu x;
      for (int u = 0; u < VW; u++) x[u] = jv + u < nk ? w[(jv + u) * r.ks[2] + wi * r.ks[3]] : 0u;
      for (int e = 0; e < PER; e++)
        *(vf*)(kt + (wi * PER + e) * KB + jv) = __builtin_convertvector((x >> (e * BITS)) & ((1u << BITS) - 1), vf) * s + o;
    }
  }
}

// keys j0 .. j0 + nk of a run into kt (D x KB, transposed) and values into vb (KB x DvP); zeros past nk
void load_block(const Args& a, const Run& r, int b, int h, int64_t j0, int nk, Buffers& w) {
  const int D = a.D, Dv = a.Dv, DvP = w.DvP;
  if (r.packed) {
    if (r.k_bits == 4) dequant_keys<4>(r, b, h, j0, nk, D, w.kt);
    else if (r.k_bits == 8) dequant_keys<8>(r, b, h, j0, nk, D, w.kt);
    else dequant_keys<2>(r, b, h, j0, nk, D, w.kt);
  }
  for (int j = 0; j < KB; j++) {
    float* vrow = w.vb + j * DvP;
    if (j >= nk) {
      if (!r.packed)
        for (int d = 0; d < D; d++) w.kt[d * KB + j] = 0.0f;
      memset(vrow, 0, DvP * 4);
      continue;
    }
    int64_t t = j0 + j;
    if (r.packed) {
      dequant(r.vw + b * r.vs[0] + h * r.vs[1] + t * r.vs[2], r.vs[3],
              r.v_scales + b * r.vss[0] + h * r.vss[1] + t * r.vss[2], r.vss[3],
              r.v_biases + b * r.vbs[0] + h * r.vbs[1] + t * r.vbs[2], r.vbs[3], r.v_bits, r.group, Dv, vrow);
    } else {
      const float* kp = r.k + b * r.ks[0] + h * r.ks[1] + t * r.ks[2];
      const float* vp = r.v + b * r.vs[0] + h * r.vs[1] + t * r.vs[2];
      for (int d = 0; d < D; d++) w.kt[d * KB + j] = kp[d * r.ks[3]];
      for (int d = 0; d < Dv; d++) vrow[d] = vp[d * r.vs[3]];
    }
    for (int d = Dv; d < DvP; d++) vrow[d] = 0.0f;
  }
}

// s[r][0:KB] = sum_d qt[r][d] * kt[d][0:KB] for RG rows, SV vectors of keys at a time
// (RG x SV accumulators: 16 of AVX-512's 32 registers, 8 of AVX2's 16)
constexpr int SV = VW == 16 ? 4 : 2;
inline void scores(const float* qt, int D, const float* kt, float* s) {
  for (int c = 0; c < KB; c += SV * VW) {
    vf acc[RG][SV] = {};
    for (int d = 0; d < D; d++) {
      vf k[SV];
      for (int u = 0; u < SV; u++) k[u] = *(const vf*)(kt + d * KB + c + u * VW);
      for (int r = 0; r < RG; r++) {
        vf x = splat(qt[r * D + d]);
        for (int u = 0; u < SV; u++) acc[r][u] += x * k[u];
      }
    }
    for (int r = 0; r < RG; r++)
      for (int u = 0; u < SV; u++) *(vf*)(s + r * KB + c + u * VW) = acc[r][u];
  }
}

// rows' weights s0 (and s1) times the block's values, added to o0 (o1) rescaled by a0 (a1):
// two rows at a time, one load of a value for both
template <bool TWO>
inline void weighted_values(const float* s0, const float* s1, int nk, float a0, float a1, float* o0, float* o1,
                            const float* vb, int DvP) {
  for (int c = 0; c < DvP; c += 4 * VW) {
    const int nv = (DvP - c) / VW < 4 ? (DvP - c) / VW : 4;
    vf acc0[4], acc1[4];
    for (int u = 0; u < nv; u++) {
      acc0[u] = *(vf*)(o0 + c + u * VW) * a0;
      if (TWO) acc1[u] = *(vf*)(o1 + c + u * VW) * a1;
    }
    for (int j = 0; j < nk; j++) {
      const vf p0 = splat(s0[j]), p1 = TWO ? splat(s1[j]) : vf{};
      const float* vr = vb + j * DvP + c;
      for (int u = 0; u < nv; u++) {
        const vf x = *(const vf*)(vr + u * VW);
        acc0[u] += p0 * x;
        if (TWO) acc1[u] += p1 * x;
      }
    }
    for (int u = 0; u < nv; u++) {
      *(vf*)(o0 + c + u * VW) = acc0[u];
      if (TWO) *(vf*)(o1 + c + u * VW) = acc1[u];
    }
  }
}

// the block's scores S (base 2) of rows 0 .. nr into their online softmax: weights in S, each
// row's o and l rescaled, then the weighted values added
inline void block_update(float* S, int nr, int nk, float* m, float* l, float* o, const float* vb, int DvP) {
  float alpha[RG];
  for (int r = 0; r < nr; r++) {
    float* s = S + r * KB;
    vf mv = splat(-INFINITY);
    for (int j = 0; j < KB; j += VW) mv = vmax(*(vf*)(s + j), mv);
    const float mn = vmax(hmax(mv), m[r]);
    if (mn == -INFINITY) {  // nothing visible yet: no weight
      alpha[r] = 1.0f;
      for (int j = 0; j < KB; j += VW) *(vf*)(s + j) = vf{};
      continue;
    }
    alpha[r] = m[r] == -INFINITY ? 0.0f : exp2s(m[r] - mn);
    vf sum = {}, mnv = splat(mn);
    for (int j = 0; j < KB; j += VW) {
      vf p = exp2v(*(vf*)(s + j) - mnv);
      *(vf*)(s + j) = p;
      sum += p;
    }
    m[r] = mn;
    l[r] = l[r] * alpha[r] + hsum(sum);
  }
  int r = 0;
  for (; r + 1 < nr; r += 2)
    weighted_values<true>(S + r * KB, S + (r + 1) * KB, nk, alpha[r], alpha[r + 1], o + r * DvP, o + (r + 1) * DvP, vb, DvP);
  if (r < nr) weighted_values<false>(S + r * KB, nullptr, nk, alpha[r], 0.0f, o + r * DvP, nullptr, vb, DvP);
}

// rows r of item (b, h, q0 .. q0 + nq) from their softmax state: out and lse (sink logits in the denominator)
void finish(const Args& a, int b, int h, int q0, int nq, const float* m_, const float* l_, const float* o, int DvP) {
  const int rep = a.Hq / a.Hkv;
  for (int r = 0; r < rep * nq; r++) {
    const int hq = h * rep + r / nq;
    const int64_t row = ((int64_t)b * a.Hq + hq) * a.L + q0 + r % nq;
    float m = m_[r], l = l_[r], keep = 1.0f;
    if (a.sinks) {
      float s = a.sinks[hq] * LOG2E, mn = s > m ? s : m;
      keep = m == -INFINITY ? 0.0f : exp2s(m - mn);
      l = l * keep + exp2s(s - mn);
      m = mn;
    }
    float inv = l > 0 ? keep / l : 0.0f;
    for (int d = 0; d < a.Dv; d++) a.out[row * a.Dv + d] = o[r * DvP + d] * inv;
    a.lse[row] = l > 0 ? (m + std::log2(l)) * LN2 : -INFINITY;
  }
}

// one work item: KV head h of row b, query block qb, the key blocks split, split + nsplit, ...
// of all runs; with nsplit > 1 its rows' softmax state goes to part (merged by merge_splits)
void item(const Args& a, Buffers& w, int b, int h, int qb, int split, int nsplit, float* part) {
  const int rep = a.Hq / a.Hkv, D = a.D, DvP = w.DvP;
  const int q0 = qb * QB, nq = (a.L - q0 < QB ? a.L - q0 : QB);
  const int R = rep * nq, RP = (R + RG - 1) / RG * RG;  // rows (head g, query i) at g * nq + i
  // the item's queries, scaled to base 2; padding rows are zeros
  for (int r = 0; r < RP; r++) {
    const int g = r / nq, i = r % nq;
    const float* qp = a.q + b * a.qs[0] + (int64_t)(h * rep + g) * a.qs[1] + (q0 + i) * a.qs[2];
    for (int d = 0; d < D; d++) w.qt[r * D + d] = r < R ? qp[d * a.qs[3]] * a.scale * LOG2E : 0.0f;
    w.m[r] = -INFINITY;
    w.l[r] = 0.0f;
    memset(w.o + r * DvP, 0, DvP * 4);
  }
  const int64_t last_q = a.q_start + q0 + nq - 1;
  int64_t blocks = 0;
  for (int ri = 0; ri < a.nruns; ri++) {
    const Run& run = a.runs[ri];
    int64_t kend = run.n;
    if (a.causal && last_q - run.k_start + 1 < kend) kend = last_q - run.k_start + 1;
    for (int64_t j0 = 0; j0 < kend; j0 += KB) {
      if (blocks++ % nsplit != split) continue;
      int nk = kend - j0 < KB ? (int)(kend - j0) : KB;
      load_block(a, run, b, h, j0, nk, w);
      const int64_t kpos0 = run.k_start + j0;
      for (int r0 = 0; r0 < R; r0 += RG) {
        const int nr = R - r0 < RG ? R - r0 : RG;
        int64_t lo = INT64_MAX, hi = INT64_MIN;  // the rows' query positions
        for (int r = r0; r < r0 + nr; r++) {
          int64_t pos = a.q_start + q0 + r % nq;
          lo = pos < lo ? pos : lo;
          hi = pos > hi ? pos : hi;
        }
        if (a.causal && kpos0 > hi) continue;  // after every row's query
        scores(w.qt + r0 * D, D, w.kt, w.s);
        const bool edge = nk < KB || (a.causal && kpos0 + KB - 1 > lo);
        for (int r = r0; r < r0 + nr; r++) {
          const int g = r / nq, i = r % nq;
          float* s = w.s + (r - r0) * KB;
          if (edge) {
            int64_t lim = a.causal ? a.q_start + q0 + i - kpos0 + 1 : KB;  // keys visible to this row
            if (lim > nk) lim = nk;
            for (int j = (lim < 0 ? 0 : (int)lim); j < KB; j++) s[j] = -INFINITY;
          }
          if (a.mask) {
            const float* mp = a.mask + b * a.ms[0] + (h * rep + g) * a.ms[1] + (q0 + i) * a.ms[2] +
                              (run.col + j0) * a.ms[3];
            for (int j = 0; j < nk; j++) s[j] += mp[j * a.ms[3]] * LOG2E;
          }
        }
        block_update(w.s, nr, nk, w.m + r0, w.l + r0, w.o + r0 * DvP, w.vb, DvP);
      }
    }
  }
  if (nsplit == 1) {
    finish(a, b, h, q0, nq, w.m, w.l, w.o, DvP);
    return;
  }
  for (int r = 0; r < R; r++) {  // (m, l, o) per row
    float* p = part + (int64_t)r * (2 + DvP);
    p[0] = w.m[r];
    p[1] = w.l[r];
    memcpy(p + 2, w.o + r * DvP, DvP * 4);
  }
}

// the splits of one item merged: (m, l, o) rescaled to their largest m and summed, then finished
void merge_splits(const Args& a, int b, int h, int nsplit, const float* parts, Buffers& w) {
  const int R = a.Hq / a.Hkv * a.L, DvP = w.DvP;
  const int64_t stride = (int64_t)R * (2 + DvP);
  for (int r = 0; r < R; r++) {
    float m = -INFINITY;
    for (int s = 0; s < nsplit; s++) m = vmax(parts[s * stride + r * (2 + DvP)], m);
    float l = 0.0f, *o = w.o + r * DvP;
    memset(o, 0, DvP * 4);
    for (int s = 0; s < nsplit; s++) {
      const float* p = parts + s * stride + r * (2 + DvP);
      if (p[0] == -INFINITY) continue;  // saw nothing
      const float f = m != m ? NAN : exp2s(p[0] - m);
      l += p[1] * f;
      for (int d = 0; d < DvP; d++) o[d] += p[2 + d] * f;
    }
    w.m[r] = m;
    w.l[r] = l;
  }
  finish(a, b, h, 0, a.L, w.m, w.l, w.o, DvP);
}

}  // namespace

// A decode step's few work items (B x Hkv) on more cores split the keys: each split takes every
// nsplit-th block of keys, and their softmax states are merged after.
extern "C" int kvq_cpu_attention(const Args* args, int threads) {
  const Args& a = *args;
  const int nqb = (a.L + QB - 1) / QB, base = a.B * a.Hkv * nqb;
  int64_t nblocks = 0;
  for (int i = 0; i < a.nruns; i++) nblocks += (a.runs[i].n + KB - 1) / KB;
  int nsplit = 1;
  if (nqb == 1 && base < 2 * threads && nblocks > 1) {
    nsplit = (2 * threads + base - 1) / base;
    nsplit = nsplit < nblocks ? nsplit : (int)nblocks;
  }
  const int items = base * nsplit;
  const int64_t part_size = (int64_t)(a.Hq / a.Hkv) * a.L * (2 + (a.Dv + VW - 1) / VW * VW);
  std::vector<float> parts(nsplit > 1 ? (size_t)items * part_size : 0);
  std::atomic<int> next{0};
  auto work = [&]() {
    Buffers w(a);
    for (int t; (t = next++) < items;) {
      int qb = nqb - 1 - t / (base / nqb * nsplit);  // the last query blocks (the most keys) first
      int rest = t % (base / nqb * nsplit), bh = rest / nsplit, split = rest % nsplit;
      item(a, w, bh / a.Hkv, bh % a.Hkv, qb, split, nsplit, nsplit > 1 ? parts.data() + (int64_t)t * part_size : nullptr);
    }
  };
  const int used = threads < items ? threads : items;
  std::vector<std::thread> pool;
  for (int i = 1; i < used; i++) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (nsplit > 1) {
    Buffers w(a);
    for (int bh = 0; bh < a.B * a.Hkv; bh++)
      merge_splits(a, bh / a.Hkv, bh % a.Hkv, nsplit, parts.data() + (int64_t)bh * nsplit * part_size, w);
  }
  return 0;
}

extern "C" int kvq_cpu_vector_width() { return VW; }
extern "C" int kvq_cpu_sizes(int* out) {  // sizeof(Run), sizeof(Args): ctypes checks its layout
  out[0] = sizeof(Run);
  out[1] = sizeof(Args);
  return 0;
}
