// Attention over float32 keys and values on the CPU's cores: (out, lse) of a chunk of
// queries over a run of keys, GQA, causal or not, as attention.reference.blocked_attention
// computes it with MLX ops. Built at first use by kernels/cpu.py (g++ -O3 -march=native
// -pthread); one work item is a KV head's block of queries (all its query heads), which
// walks the keys in blocks of KB with an online softmax in base 2.
//
// Vectors are GCC's vector extension: 16 floats where the CPU has AVX-512, else 8.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <atomic>
#include <initializer_list>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#define VW 16
#else
#define VW 8
#endif
typedef float vf __attribute__((vector_size(VW * 4), aligned(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4)));  // unaligned loads
typedef int32_t vi __attribute__((vector_size(VW * 4)));

namespace {

constexpr int KB = 4 * VW;  // keys per block
constexpr int QB = 64;      // queries per work item (per query head)
constexpr int RG = 4;       // rows (queries of one head) per micro-kernel
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

inline vf splat(float x) { return vf{} + x; }

// 2**x for x <= 0 (or -inf: 0); the polynomial of attention/softmax.py
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
  return x != x ? x : r;  // NaN stays NaN
}

inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < VW; i++) m = v[i] > m || v[i] != v[i] ? v[i] : m;  // NaN wins
  return m;
}

inline float hsum(vf v) {
  float s = 0;
  for (int i = 0; i < VW; i++) s += v[i];
  return s;
}

struct Args {
  const float *q, *k, *v;
  const int64_t *qs, *ks, *vs;  // strides (B, H, L, D) in elements
  float *out, *lse;             // (B, Hq, L, Dv), (B, Hq, L), contiguous
  int B, Hq, Hkv, L, n, D, Dv, causal;
  float scale;
  int64_t q_start, k_start;
};

struct Buffers {
  float *qt, *o, *m, *l, *kt, *vb, *s;
  int DvP;
  explicit Buffers(const Args& a) {
    int rep = a.Hq / a.Hkv, rows = rep * QB;
    DvP = (a.Dv + VW - 1) / VW * VW;
    size_t sizes[] = {(size_t)rows * a.D, (size_t)rows * DvP, (size_t)rows, (size_t)rows,
                      (size_t)a.D * KB, (size_t)KB * DvP, (size_t)RG * KB};
    float** ptrs[] = {&qt, &o, &m, &l, &kt, &vb, &s};
    for (int i = 0; i < 7; i++) {
      size_t bytes = (sizes[i] * 4 + 63) / 64 * 64;
      *ptrs[i] = (float*)aligned_alloc(64, bytes ? bytes : 64);
    }
  }
  ~Buffers() {
    for (float* p : {qt, o, m, l, kt, vb, s}) free(p);
  }
};

// s[r][0:KB] = sum_d qt[r][d] * kt[d][0:KB] for RG rows
inline void scores(const float* qt, int D, const float* kt, float* s) {
  for (int c = 0; c < KB; c += 2 * VW) {
    vf acc[RG][2] = {};
    for (int d = 0; d < D; d++) {
      vf k0 = *(const vf*)(kt + d * KB + c), k1 = *(const vf*)(kt + d * KB + c + VW);
      for (int r = 0; r < RG; r++) {
        vf x = splat(qt[r * D + d]);
        acc[r][0] += x * k0;
        acc[r][1] += x * k1;
      }
    }
    for (int r = 0; r < RG; r++) {
      *(vf*)(s + r * KB + c) = acc[r][0];
      *(vf*)(s + r * KB + c + VW) = acc[r][1];
    }
  }
}

void item(const Args& a, Buffers& w, int b, int h, int qb) {
  const int rep = a.Hq / a.Hkv, D = a.D, Dv = a.Dv, DvP = w.DvP;
  const int q0 = qb * QB, nq = (a.L - q0 < QB ? a.L - q0 : QB);
  const int ng = (nq + RG - 1) / RG;
  // the item's queries, scaled to base 2, rows (head, query); padding rows are zeros
  for (int g = 0; g < rep; g++) {
    const float* qp = a.q + b * a.qs[0] + (int64_t)(h * rep + g) * a.qs[1];
    for (int i = 0; i < ng * RG; i++) {
      float* dst = w.qt + (g * QB + i) * D;
      for (int d = 0; d < D; d++) dst[d] = i < nq ? qp[(q0 + i) * a.qs[2] + d * a.qs[3]] * a.scale * LOG2E : 0.0f;
    }
  }
  for (int r = 0; r < rep * QB; r++) {
    w.m[r] = -INFINITY;
    w.l[r] = 0.0f;
    memset(w.o + r * DvP, 0, DvP * 4);
  }
  int64_t last_q = a.q_start + q0 + nq - 1;
  int64_t kend = a.n;
  if (a.causal) kend = last_q - a.k_start + 1 < kend ? last_q - a.k_start + 1 : kend;
  const float* kp = a.k + b * a.ks[0] + (int64_t)h * a.ks[1];
  const float* vp = a.v + b * a.vs[0] + (int64_t)h * a.vs[1];
  for (int64_t j0 = 0; j0 < kend; j0 += KB) {
    int nk = kend - j0 < KB ? (int)(kend - j0) : KB;
    for (int d = 0; d < D; d++)
      for (int j = 0; j < KB; j++) w.kt[d * KB + j] = j < nk ? kp[(j0 + j) * a.ks[2] + d * a.ks[3]] : 0.0f;
    for (int j = 0; j < KB; j++)
      for (int d = 0; d < DvP; d++) w.vb[j * DvP + d] = j < nk && d < Dv ? vp[(j0 + j) * a.vs[2] + d * a.vs[3]] : 0.0f;
    int64_t kpos0 = a.k_start + j0;
    for (int g = 0; g < rep; g++) {
      for (int gi = 0; gi < ng; gi++) {
        int i0 = gi * RG;
        int64_t first = a.q_start + q0 + i0;
        int nr = nq - i0 < RG ? nq - i0 : RG;
        if (a.causal && kpos0 > first + nr - 1) continue;  // after every row's query
        int row0 = g * QB + i0;
        scores(w.qt + row0 * D, D, w.kt, w.s);
        bool edge = nk < KB || (a.causal && kpos0 + KB - 1 > first);
        for (int r = 0; r < RG; r++) {
          float* s = w.s + r * KB;
          if (edge) {
            int64_t lim = a.causal ? first + r - kpos0 + 1 : KB;  // keys visible to this row
            if (lim > nk) lim = nk;
            for (int j = (lim < 0 ? 0 : (int)lim); j < KB; j++) s[j] = -INFINITY;
          }
          vf mv = splat(-INFINITY);
          for (int j = 0; j < KB; j += VW) {
            vf x = *(vf*)(s + j);
            mv = x > mv || x != x ? x : mv;  // NaN wins: the row's output is NaN
          }
          float mb = hmax(mv), mo = w.m[row0 + r];
          float mn = mb > mo || mb != mb ? mb : mo;
          if (mn == -INFINITY) continue;  // nothing visible yet
          float alpha = mo == -INFINITY ? 0.0f : exp2v(splat(mo - mn))[0];
          vf sum = {}, mnv = splat(mn);
          for (int j = 0; j < KB; j += VW) {
            vf p = exp2v(*(vf*)(s + j) - mnv);
            *(vf*)(s + j) = p;
            sum += p;
          }
          w.m[row0 + r] = mn;
          w.l[row0 + r] = w.l[row0 + r] * alpha + hsum(sum);
          float* o = w.o + (row0 + r) * DvP;
          for (int c = 0; c < DvP; c += 4 * VW) {
            int nv = (DvP - c) / VW < 4 ? (DvP - c) / VW : 4;
            vf acc[4];
            for (int u = 0; u < nv; u++) acc[u] = *(vf*)(o + c + u * VW) * alpha;
            for (int j = 0; j < nk; j++) {
              vf p = splat(s[j]);
              const float* vr = w.vb + j * DvP + c;
              for (int u = 0; u < nv; u++) acc[u] += p * *(const vf*)(vr + u * VW);
            }
            for (int u = 0; u < nv; u++) *(vf*)(o + c + u * VW) = acc[u];
          }
        }
      }
    }
  }
  for (int g = 0; g < rep; g++) {
    int hq = h * rep + g;
    for (int i = 0; i < nq; i++) {
      int r = g * QB + i;
      int64_t row = ((int64_t)b * a.Hq + hq) * a.L + q0 + i;
      float l = w.l[r];
      float inv = l > 0 ? 1.0f / l : 0.0f;
      for (int d = 0; d < Dv; d++) a.out[row * Dv + d] = w.o[r * DvP + d] * inv;
      a.lse[row] = l > 0 ? (w.m[r] + std::log2(l)) * LN2 : -INFINITY;
    }
  }
}

}  // namespace

extern "C" int kvq_cpu_attention(const float* q, const int64_t* qs, const float* k, const int64_t* ks,
                                 const float* v, const int64_t* vs, float* out, float* lse, int B, int Hq,
                                 int Hkv, int L, int n, int D, int Dv, float scale, int causal, int64_t q_start,
                                 int64_t k_start, int threads) {
  Args a{q, k, v, qs, ks, vs, out, lse, B, Hq, Hkv, L, n, D, Dv, causal, scale, q_start, k_start};
  const int nqb = (L + QB - 1) / QB, items = B * Hkv * nqb;
  std::atomic<int> next{0};
  auto work = [&]() {
    Buffers w(a);
    for (int t; (t = next++) < items;) {
      int qb = nqb - 1 - t / (B * Hkv);  // the last query blocks (the most keys) first
      int bh = t % (B * Hkv);
      item(a, w, bh / Hkv, bh % Hkv, qb);
    }
  };
  if (threads > items) threads = items;
  std::vector<std::thread> pool;
  for (int i = 1; i < threads; i++) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  return 0;
}

extern "C" int kvq_cpu_vector_width() { return VW; }
