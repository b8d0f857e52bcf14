// metal_emu.h -- a small C++20 emulation of Metal's compute execution model,
// used to run the kernel bodies of mlx-kvq (metal/*.metal) on the CPU in CI.
//
// Model:
//   * a grid of threadgroups, run one threadgroup at a time;
//   * every thread of the threadgroup is a fiber (ucontext) on ONE OS thread;
//     fibers switch only at synchronisation points (threadgroup_barrier,
//     simdgroup_barrier, simd_* collectives), and the order in which runnable
//     fibers are resumed is shuffled each round (seeded), so a missing barrier
//     between a threadgroup-memory write and another thread's read shows up as a
//     wrong or run-to-run varying result;
//   * simdgroups are 32 consecutive thread indices;
//   * `threadgroup` arrays are function-static (one threadgroup runs at a time,
//     so a static is exactly "shared by the threads of this threadgroup");
//   * collectives need every active lane of the simdgroup and barriers every
//     thread of the threadgroup; a divergent collective/barrier is reported as a
//     deadlock instead of hanging.
#pragma once
#if defined(__APPLE__) && !defined(_XOPEN_SOURCE)
#define _XOPEN_SOURCE 600  // ucontext on macOS
#endif
#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

// ---------------------------------------------------------------- types
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;

struct uint2 { uint x, y; };
struct alignas(16) uint4 { uint x, y, z, w; };
struct uint3 { uint x, y, z; };

static inline float emu_bits_to_float(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
static inline uint32_t emu_float_to_bits(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }

struct emu_half {
  uint16_t bits;
  emu_half() = default;
  emu_half(float f) { bits = from_float(f); }
  operator float() const { return to_float(bits); }
  static float to_float(uint16_t h) {
    uint32_t s = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0) {
      float v = std::ldexp((float)m, -24);
      return s ? -v : v;
    }
    if (e == 31) return emu_bits_to_float(s | 0x7f800000u | (m << 13));
    return emu_bits_to_float(s | ((e + 112) << 23) | (m << 13));
  }
  static uint16_t from_float(float f) {  // round to nearest even
    uint32_t x = emu_float_to_bits(f);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0);
    if (ax >= 0x477ff000u) return sign | 0x7c00;  // overflow -> inf
    if (ax < 0x38800000u) {                      // subnormal half
      float a = emu_bits_to_float(ax);
      float r = std::nearbyint(a * 16777216.0f);  // units of 2^-24
      return sign | (uint16_t)r;
    }
    uint32_t mant = ax & 0x7fffff, exp = (ax >> 23) - 112;
    uint32_t h = (exp << 10) | (mant >> 13);
    uint32_t rem = mant & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
    return sign | h;
  }
};

struct emu_bf16 {
  uint16_t bits;
  emu_bf16() = default;
  emu_bf16(float f) {
    uint32_t x = emu_float_to_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) { bits = (x >> 16) | 0x40; return; }
    x += 0x7fff + ((x >> 16) & 1);
    bits = x >> 16;
  }
  operator float() const { return emu_bits_to_float((uint32_t)bits << 16); }
};

namespace metal {
using std::abs;
using std::exp;
using std::exp2;
using std::floor;
using std::isinf;
using std::isnan;
using std::log;
using std::log2;
using std::rint;
using std::round;
using std::sqrt;
template <typename A, typename B> static inline auto max(A a, B b) { return a > b ? a : b; }
template <typename A, typename B> static inline auto min(A a, B b) { return a < b ? a : b; }
static inline float max(float a, float b) { return std::fmax(a, b); }
static inline float min(float a, float b) { return std::fmin(a, b); }
template <typename T> static inline T as_type_impl(uint32_t b) { T t; std::memcpy(&t, &b, sizeof(T)); return t; }
}  // namespace metal
namespace fast = metal;

enum class mem_flags { mem_none, mem_threadgroup, mem_device };

// ---------------------------------------------------------------- fibers
namespace emu {

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  uint tid = 0;
  bool done = false;
  bool waiting = false;
};

struct SyncPoint {
  int arrived = 0;
  uint64_t gen = 0;
};

struct State {
  ucontext_t sched;
  std::vector<Fiber> fibers;
  int cur = -1;
  int nthreads = 0;
  int alive_total = 0;
  std::vector<int> alive_sg;  // live lanes per simdgroup
  SyncPoint tg_sync;
  std::vector<SyncPoint> sg_sync;
  // values exchanged by simd collectives, double-buffered by generation parity
  std::vector<std::array<std::array<uint64_t, 32>, 2>> sg_vals;
  std::vector<std::array<std::array<uint64_t, 32>, 2>> sg_valgen;
  bool progress = false;
  std::string error;
  std::function<void(uint)> body;
};

inline State*& state() { static State* s = nullptr; return s; }

inline void fail(const std::string& msg) {
  State* s = state();
  if (s->error.empty()) s->error = msg;
  // park this fiber forever; the scheduler sees the error and stops
  while (true) {
    s->fibers[s->cur].waiting = true;
    swapcontext(&s->fibers[s->cur].ctx, &s->sched);
  }
}

inline void yield_waiting() {
  State* s = state();
  s->fibers[s->cur].waiting = true;
  swapcontext(&s->fibers[s->cur].ctx, &s->sched);
}

inline void yield_progress() {
  State* s = state();
  s->progress = true;
  s->fibers[s->cur].waiting = false;
  swapcontext(&s->fibers[s->cur].ctx, &s->sched);
}

inline uint cur_tid() { State* s = state(); return s->fibers[s->cur].tid; }

// Arrive at `sp` with `expected()` participants; returns the generation used.
template <typename F>
inline uint64_t arrive(SyncPoint& sp, F expected) {
  State* s = state();
  uint64_t g = sp.gen;
  sp.arrived++;
  if (sp.arrived == expected()) {
    sp.arrived = 0;
    sp.gen++;
    yield_progress();  // let others run first: exposes ordering bugs
  } else {
    s->progress = true;
    s->fibers[s->cur].waiting = false;
    swapcontext(&s->fibers[s->cur].ctx, &s->sched);
    while (sp.gen == g) yield_waiting();
  }
  return g;
}

inline void tg_barrier() {
  State* s = state();
  if (s->alive_total != s->nthreads)
    fail("threadgroup_barrier reached after some threads of the threadgroup returned");
  arrive(s->tg_sync, [s] { return s->nthreads; });
}

inline void simd_barrier() {
  State* s = state();
  uint sg = cur_tid() / 32;
  arrive(s->sg_sync[sg], [s, sg] { return s->alive_sg[sg]; });
}

template <typename T>
inline uint64_t pack(T x) { uint64_t v = 0; std::memcpy(&v, &x, sizeof(T)); return v; }
template <typename T>
inline T unpack(uint64_t v) { T x; std::memcpy(&x, &v, sizeof(T)); return x; }

// exchange one 64-bit payload per lane; returns the generation used
inline uint64_t simd_exchange(uint64_t v) {
  State* s = state();
  uint tid = cur_tid();
  uint sg = tid / 32, lane = tid % 32;
  uint64_t g = s->sg_sync[sg].gen;
  s->sg_vals[sg][g & 1][lane] = v;
  s->sg_valgen[sg][g & 1][lane] = g;
  arrive(s->sg_sync[sg], [s, sg] { return s->alive_sg[sg]; });
  return g;
}
inline bool simd_has(uint sg, uint64_t g, int lane) { return state()->sg_valgen[sg][g & 1][lane] == g; }
template <typename T>
inline T simd_val(uint sg, uint64_t g, int lane) { return unpack<T>(state()->sg_vals[sg][g & 1][lane]); }


inline void fiber_entry() {
  State* s = state();
  Fiber& f = s->fibers[s->cur];
  s->body(f.tid);
  f.done = true;
  s->alive_total--;
  uint sg = f.tid / 32;
  s->alive_sg[sg]--;
  // a finished lane may complete a pending simd collective of its simdgroup
  SyncPoint& sp = s->sg_sync[sg];
  if (sp.arrived > 0 && sp.arrived == s->alive_sg[sg]) {
    sp.arrived = 0;
    sp.gen++;
  }
  s->progress = true;
  swapcontext(&f.ctx, &s->sched);
}

// Run one threadgroup of `nthreads` threads; body(tid) runs the kernel.
inline std::string run_threadgroup(int nthreads, std::mt19937& rng, std::function<void(uint)> body) {
  State st;
  st.nthreads = nthreads;
  st.alive_total = nthreads;
  int nsg = (nthreads + 31) / 32;
  st.alive_sg.assign(nsg, 0);
  for (int t = 0; t < nthreads; t++) st.alive_sg[t / 32]++;
  st.sg_sync.assign(nsg, SyncPoint{});
  st.sg_vals.assign(nsg, {});
  st.sg_valgen.assign(nsg, {});
  for (auto& a : st.sg_valgen) for (auto& b : a) b.fill(~0ull);
  st.body = std::move(body);
  st.fibers.resize(nthreads);
  State* prev = state();
  state() = &st;
  for (int t = 0; t < nthreads; t++) {
    Fiber& f = st.fibers[t];
    f.tid = t;
    f.stack.resize(256 * 1024);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &st.sched;
    makecontext(&f.ctx, (void (*)())fiber_entry, 0);
  }
  std::vector<int> order(nthreads);
  for (int i = 0; i < nthreads; i++) order[i] = i;
  int remaining = nthreads;
  // One simdgroup at a time may be held back (its fibers not resumed) for 1 to 16 rounds
  // (a hold starts in one round of 8, so about half the rounds hold one) while the others run on, so that a simdgroup gets ahead of another by up to 16
  // synchronisation points: a missing barrier between one simdgroup's threadgroup-memory
  // writes and another's reads (or reads and later writes) shows up even where each side
  // has a dozen collectives of its own in between (simdgroups with the same sequence of
  // collectives otherwise move in step).  A round without progress is run again with none
  // held back.
  int held = -1, hold_rounds = 0;
  while (remaining > 0 && st.error.empty()) {
    std::shuffle(order.begin(), order.end(), rng);
    st.progress = false;
    for (int i : order) {
      Fiber& f = st.fibers[i];
      if (f.done || i / 32 == held) continue;
      st.cur = i;
      swapcontext(&st.sched, &f.ctx);
      if (f.done) remaining--;
      if (!st.error.empty()) break;
    }
    if (!st.progress && remaining > 0 && st.error.empty()) {
      if (held < 0) st.error = "deadlock: a barrier or simd collective was not reached by all threads";
      held = -1;
      hold_rounds = 0;
      continue;
    }
    if (hold_rounds > 0) {
      hold_rounds--;
    } else if (nsg > 1 && rng() % 8 == 0) {
      held = int(rng() % nsg);
      hold_rounds = int(rng() % 16);
    } else {
      held = -1;
    }
  }
  std::string err = st.error;
  state() = prev;
  return err;
}

}  // namespace emu

// ---------------------------------------------------------------- Metal API
// half / bfloat and the names MLX's metal::utils() (kernels/utils.h, bf16.h) declares
// ahead of every custom kernel's source
typedef emu_half half;
typedef emu_bf16 bfloat;
typedef half float16_t;
typedef bfloat bfloat16_t;
struct ulong2 {
  ulong x, y;
  ulong2(ulong v = 0) : x(v), y(v) {}
  ulong2(ulong a, ulong b) : x(a), y(b) {}
};

#define threadgroup static
#define device
#define constant
#define thread
struct alignas(16) float4 { float x, y, z, w; };

inline void threadgroup_barrier(mem_flags) { emu::tg_barrier(); }
inline void simdgroup_barrier(mem_flags) { emu::simd_barrier(); }

// Reduce over the active lanes of the caller's simdgroup, starting from `acc`.
template <typename T, typename Op>
inline T simd_reduce(T x, T acc, Op op) {
  uint sg = emu::cur_tid() / 32;
  uint64_t g = emu::simd_exchange(emu::pack(x));
  for (int l = 0; l < 32; l++)
    if (emu::simd_has(sg, g, l)) acc = op(acc, emu::simd_val<T>(sg, g, l));
  return acc;
}
template <typename T>
inline T simd_sum(T x) {
  return simd_reduce(x, T(0), [](T a, T b) { return T(a + b); });
}
template <typename T>
inline T simd_max(T x) {
  return simd_reduce(x, x, [](T a, T b) { return std::max(a, b); });
}
template <typename T>
inline T simd_min(T x) {
  return simd_reduce(x, x, [](T a, T b) { return std::min(a, b); });
}
inline bool simd_any(bool x) {
  return simd_reduce(int(x), 0, [](int a, int b) { return a | b; }) != 0;
}
template <typename T>
inline T simd_shuffle(T x, uint src) {
  uint sg = emu::cur_tid() / 32;
  if (src >= 32) emu::fail("simd_shuffle: source lane out of range");
  uint64_t g = emu::simd_exchange(emu::pack(x));
  if (!emu::simd_has(sg, g, src)) emu::fail("simd_shuffle: source lane inactive");
  return emu::simd_val<T>(sg, g, src);
}
template <typename T>
inline T simd_shuffle_xor(T x, uint mask) { return simd_shuffle(x, (emu::cur_tid() % 32) ^ mask); }
template <typename T>
inline T simd_shuffle_down(T x, uint delta) {
  uint lane = emu::cur_tid() % 32;
  uint src = lane + delta < 32 ? lane + delta : lane;
  return simd_shuffle(x, src);
}


// ---------------------------------------------------------------- simdgroup_matrix
// simdgroup_matrix<T, 8, 8>: each of the 32 lanes holds two elements, thread_elements()
// = {M[r][c], M[r][c + 1]} with r = (q & 4) + (lane / 2) % 4, c = (q & 2) * 2 + (lane % 2) * 2,
// q = lane / 4 (the layout MLX's steel MMAFrag reads through get_coord).  Every function is
// a simdgroup-wide operation: all 32 lanes of the simdgroup must call it (else the
// emulator reports an error).
namespace metal {
template <typename T, int N>
struct vec {
  T v[N];
  T& operator[](int i) { return v[i]; }
  const T& operator[](int i) const { return v[i]; }
};
}  // namespace metal

template <typename T, int Cols, int Rows>
struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "the emulator has 8x8 simdgroup matrices only");
  metal::vec<T, 2> e;
  metal::vec<T, 2>& thread_elements() { return e; }
  const metal::vec<T, 2>& thread_elements() const { return e; }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

namespace emu {
inline void sgm_coord(uint lane, int& r, int& c) {
  const int q = lane / 4;
  r = (q & 4) + (lane / 2) % 4;
  c = (q & 2) * 2 + (lane % 2) * 2;
}
// all 32 lanes of the caller's simdgroup take part in the same operation `what`
inline void sgm_uniform(const char* what) {
  uint sg = cur_tid() / 32;
  uint64_t g = simd_exchange((uint64_t)(uintptr_t)what);
  for (int l = 0; l < 32; l++)
    if (!simd_has(sg, g, l) || simd_val<uint64_t>(sg, g, l) != (uint64_t)(uintptr_t)what)
      fail(std::string(what) + ": not called by all 32 lanes of the simdgroup together");
}
// the full 8x8 matrix (row major, in float) from every lane's two elements
template <typename T>
inline void sgm_gather(const simdgroup_matrix<T, 8, 8>& m, float* out, const char* what) {
  static_assert(sizeof(T) <= 4, "simdgroup_matrix element");
  uint32_t a, b;
  std::memcpy(&a, &m.e.v[0], sizeof(T) < 4 ? sizeof(T) : 4);
  std::memcpy(&b, &m.e.v[1], sizeof(T) < 4 ? sizeof(T) : 4);
  if (sizeof(T) < 4) { a &= (1u << (8 * sizeof(T))) - 1; b &= (1u << (8 * sizeof(T))) - 1; }
  uint64_t g = simd_exchange((uint64_t)a | ((uint64_t)b << 32));
  uint sg = cur_tid() / 32;
  for (uint l = 0; l < 32; l++) {
    if (!simd_has(sg, g, l)) fail(std::string(what) + ": a lane of the simdgroup left");
    uint64_t v = simd_val<uint64_t>(sg, g, l);
    uint32_t lo = (uint32_t)v, hi = (uint32_t)(v >> 32);
    T x, y;
    std::memcpy(&x, &lo, sizeof(T));
    std::memcpy(&y, &hi, sizeof(T));
    int r, c;
    sgm_coord(l, r, c);
    out[r * 8 + c] = float(x);
    out[r * 8 + c + 1] = float(y);
  }
}
}  // namespace emu

template <typename T>
inline simdgroup_matrix<T, 8, 8> make_filled_simdgroup_matrix(const T value) {
  simdgroup_matrix<T, 8, 8> m;
  m.e.v[0] = value;
  m.e.v[1] = value;
  return m;
}
template <typename T, int Cols, int Rows>
inline simdgroup_matrix<T, Cols, Rows> make_filled_simdgroup_matrix(const T value) {
  return make_filled_simdgroup_matrix<T>(value);
}

// element (r, c) of the matrix is src[(origin.y + r) * elements_per_row + origin.x + c],
// or src[(origin.y + c) * elements_per_row + origin.x + r] when transposed
template <typename T, int C, int R>
inline void simdgroup_load(simdgroup_matrix<T, C, R>& d, const T* src, ulong elements_per_row = C,
                           ulong2 matrix_origin = 0, bool transpose_matrix = false) {
  emu::sgm_uniform("simdgroup_load");
  int r, c;
  emu::sgm_coord(emu::cur_tid() % 32, r, c);
  const T* p = src + matrix_origin.y * elements_per_row + matrix_origin.x;
  for (int k = 0; k < 2; k++)
    d.e.v[k] = transpose_matrix ? p[(c + k) * elements_per_row + r] : p[r * elements_per_row + c + k];
}
template <typename T, int C, int R>
inline void simdgroup_store(const simdgroup_matrix<T, C, R>& a, T* dst, ulong elements_per_row = C,
                            ulong2 matrix_origin = 0, bool transpose_matrix = false) {
  emu::sgm_uniform("simdgroup_store");
  int r, c;
  emu::sgm_coord(emu::cur_tid() % 32, r, c);
  T* p = dst + matrix_origin.y * elements_per_row + matrix_origin.x;
  for (int k = 0; k < 2; k++)
    (transpose_matrix ? p[(c + k) * elements_per_row + r] : p[r * elements_per_row + c + k]) = a.e.v[k];
}
// d = a * b + c: each element a float sum over k in order, from c, rounded to T once
template <typename T, typename U, typename V, typename W>
inline void simdgroup_multiply_accumulate(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<U, 8, 8>& a,
                                          const simdgroup_matrix<V, 8, 8>& b,
                                          const simdgroup_matrix<W, 8, 8>& c) {
  float A[64], B[64], Cm[64];
  emu::sgm_uniform("simdgroup_multiply_accumulate");
  emu::sgm_gather(a, A, "simdgroup_multiply_accumulate");
  emu::sgm_gather(b, B, "simdgroup_multiply_accumulate");
  emu::sgm_gather(c, Cm, "simdgroup_multiply_accumulate");
  int r, col;
  emu::sgm_coord(emu::cur_tid() % 32, r, col);
  for (int k = 0; k < 2; k++) {
    float acc = Cm[r * 8 + col + k];
    for (int i = 0; i < 8; i++) acc = std::fma(A[r * 8 + i], B[i * 8 + col + k], acc);
    d.e.v[k] = T(acc);
  }
}
template <typename T, typename U, typename V>
inline void simdgroup_multiply(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<U, 8, 8>& a,
                               const simdgroup_matrix<V, 8, 8>& b) {
  simdgroup_multiply_accumulate(d, a, b, make_filled_simdgroup_matrix<T>(T(0)));
}
namespace metal {
using ::make_filled_simdgroup_matrix;
using ::simdgroup_load;
using ::simdgroup_matrix;
using ::simdgroup_multiply;
using ::simdgroup_multiply_accumulate;
using ::simdgroup_store;
}  // namespace metal

// ---------------------------------------------------------------- launch
namespace emu {
// The values of the thread attributes MLX can declare (mlx_source.METAL_ATTRIBUTES), for
// one thread of a dispatchThreads(grid, threadgroup) launch as MLX makes it: the
// threadgroup size is min(threadgroup, grid) per axis; edge threadgroups are partial
// (non-uniform), their threads linearised over the partial size.
struct Attrs {
  uint dispatch_quadgroups_per_threadgroup, dispatch_simdgroups_per_threadgroup;
  uint3 dispatch_threads_per_threadgroup, grid_origin, grid_size;
  uint quadgroup_index_in_threadgroup, quadgroups_per_threadgroup, simdgroup_index_in_threadgroup,
      simdgroups_per_threadgroup, thread_execution_width, thread_index_in_quadgroup,
      thread_index_in_simdgroup, thread_index_in_threadgroup;
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid,
      threadgroups_per_grid, threads_per_grid;
  uint threads_per_simdgroup;
  uint3 threads_per_threadgroup;
};

template <typename F>
inline int launch(int gx, int gy, int gz, int tx, int ty, int tz, unsigned seed, char* err, int errlen, F kernel) {
  std::mt19937 rng(seed);
  tx = std::min(tx, gx), ty = std::min(ty, gy), tz = std::min(tz, gz);
  if (tx <= 0 || ty <= 0 || tz <= 0) return 0;
  const uint nx = (gx + tx - 1) / tx, ny = (gy + ty - 1) / ty, nz = (gz + tz - 1) / tz;
  const uint full = tx * ty * tz;
  for (uint z = 0; z < nz; z++)
    for (uint y = 0; y < ny; y++)
      for (uint x = 0; x < nx; x++) {
        const uint ax = std::min<uint>(tx, gx - x * tx), ay = std::min<uint>(ty, gy - y * ty),
                   az = std::min<uint>(tz, gz - z * tz);
        const uint nt = ax * ay * az;
        std::string e = run_threadgroup(nt, rng, [&](uint tid) {
          Attrs A;
          A.dispatch_quadgroups_per_threadgroup = (nt + 3) / 4;
          A.dispatch_simdgroups_per_threadgroup = (nt + 31) / 32;
          A.dispatch_threads_per_threadgroup = uint3{ax, ay, az};
          A.grid_origin = uint3{0, 0, 0};
          A.grid_size = A.threads_per_grid = uint3{(uint)gx, (uint)gy, (uint)gz};
          A.quadgroup_index_in_threadgroup = tid / 4;
          A.quadgroups_per_threadgroup = (full + 3) / 4;
          A.simdgroup_index_in_threadgroup = tid / 32;
          A.simdgroups_per_threadgroup = (full + 31) / 32;
          A.thread_execution_width = A.threads_per_simdgroup = 32;
          A.thread_index_in_quadgroup = tid % 4;
          A.thread_index_in_simdgroup = tid % 32;
          A.thread_index_in_threadgroup = tid;
          A.thread_position_in_threadgroup = uint3{tid % ax, (tid / ax) % ay, tid / (ax * ay)};
          A.threadgroup_position_in_grid = uint3{x, y, z};
          A.thread_position_in_grid = uint3{x * tx + A.thread_position_in_threadgroup.x,
                                            y * ty + A.thread_position_in_threadgroup.y,
                                            z * tz + A.thread_position_in_threadgroup.z};
          A.threadgroups_per_grid = uint3{nx, ny, nz};
          A.threads_per_threadgroup = uint3{(uint)tx, (uint)ty, (uint)tz};
          kernel(A);
        });
        if (!e.empty()) {
          std::snprintf(err, errlen, "threadgroup (%u,%u,%u): %s", x, y, z, e.c_str());
          return 1;
        }
      }
  return 0;
}
}  // namespace emu
