// prelude_cuda.h -- maps the kvq kernel dialect (Metal) onto CUDA for
// mx.fast.cuda_kernel.  Comes after MLX's default CUDA header, before the
// shared helpers (kvq_common.h) and the kernel bodies.
//   threadgroup memory     -> __shared__
//   device/thread spaces   -> (nothing)
//   simdgroup (32 lanes)   -> warp; simd_sum/max/shuffle -> __shfl_*_sync, simd_any -> __any_sync
//   threadgroup_barrier    -> __syncthreads, simdgroup_barrier -> __syncwarp
//   Metal attributes       -> threadIdx/blockIdx expressions (1-D threadgroups)
#define device
#define thread
#define threadgroup __shared__

#define KVQ_FUNC __device__ __forceinline__
#define KVQ_TGP(T) T*
#define KVQ_UNROLL _Pragma("unroll")
#define KVQ_LOG2E 1.4426950408889634f
#define KVQ_LN2 0.6931471805599453f

#ifndef INFINITY
#define INFINITY (cuda::std::numeric_limits<float>::infinity())
#endif

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;

#define thread_index_in_simdgroup (threadIdx.x & 31u)
#define simdgroup_index_in_threadgroup (threadIdx.x >> 5)
#define thread_index_in_threadgroup (threadIdx.x)
#define threadgroup_position_in_grid (make_uint3(blockIdx.x, blockIdx.y, blockIdx.z))
#define threadgroups_per_grid (make_uint3(gridDim.x, gridDim.y, gridDim.z))
#define threads_per_threadgroup (make_uint3(blockDim.x, blockDim.y, blockDim.z))

namespace metal {
__device__ __forceinline__ float max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ float min(float a, float b) { return fminf(a, b); }
__device__ __forceinline__ int max(int a, int b) { return a > b ? a : b; }
__device__ __forceinline__ int min(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ float exp2(float x) { return exp2f(x); }
__device__ __forceinline__ float exp(float x) { return expf(x); }
__device__ __forceinline__ float log(float x) { return logf(x); }
__device__ __forceinline__ float abs(float x) { return fabsf(x); }
__device__ __forceinline__ float rint(float x) { return rintf(x); }
__device__ __forceinline__ float round(float x) { return roundf(x); }
__device__ __forceinline__ float log2(float x) { return log2f(x); }
}  // namespace metal

enum class mem_flags { mem_none, mem_threadgroup, mem_device };

__device__ __forceinline__ void threadgroup_barrier(mem_flags) { __syncthreads(); }
__device__ __forceinline__ void simdgroup_barrier(mem_flags) { __syncwarp(); }

template <typename T>
__device__ __forceinline__ T simd_sum(T x) {
  for (int o = 16; o > 0; o >>= 1) {
    x += __shfl_xor_sync(0xffffffffu, x, o);
  }
  return x;
}
template <typename T>
__device__ __forceinline__ T simd_max(T x) {
  for (int o = 16; o > 0; o >>= 1) {
    T y = __shfl_xor_sync(0xffffffffu, x, o);
    x = x > y ? x : y;
  }
  return x;
}
__device__ __forceinline__ bool simd_any(bool x) { return __any_sync(0xffffffffu, x); }
template <typename T>
__device__ __forceinline__ T simd_shuffle(T x, uint src) {
  return __shfl_sync(0xffffffffu, x, src);
}
template <typename T>
__device__ __forceinline__ T simd_shuffle_xor(T x, uint m) {
  return __shfl_xor_sync(0xffffffffu, x, m);
}
template <typename T>
__device__ __forceinline__ T simd_shuffle_down(T x, uint d) {
  return __shfl_down_sync(0xffffffffu, x, d);
}

__device__ __forceinline__ float kvq_as_float(uint b) { return __uint_as_float(b); }
// a pointer the optimizer may not look through (computed once, kept in registers):
// nvcc would otherwise re-derive a base pointer at every load (four ops each)
template <typename T>
__device__ __forceinline__ const T* kvq_opaque(const T* p) {
  asm("" : "+l"(p));
  __builtin_assume(__isGlobal(p));  // (only ever given device buffers: keeps LDG)
  return p;
}
// cross-threadgroup hand-off (the decode kernel's fused merge): make this thread's device
// writes visible to the whole grid, count threadgroups done, read others' writes from L2
__device__ __forceinline__ void kvq_device_fence() { __threadfence(); }
__device__ __forceinline__ uint kvq_atomic_add(uint* p, uint v) { return atomicAdd(p, v); }
__device__ __forceinline__ float kvq_load_cg(const float* p) { return __ldcg(p); }
// IEEE division whatever the JIT's math flags
__device__ __forceinline__ float kvq_div(float a, float b) { return __fdiv_rn(a, b); }

// ---- fp16 pairs and the warp matrix op (tensor cores) used by sdpa_decode
// A "h2" is a uint holding two fp16 values (low half = first).
#define KVQ_NATIVE_MMA 1
__device__ __forceinline__ uint kvq_h2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint*>(&h);
}
__device__ __forceinline__ float kvq_h2lo(uint x) { return __low2float(*reinterpret_cast<__half2*>(&x)); }
__device__ __forceinline__ float kvq_h2hi(uint x) { return __high2float(*reinterpret_cast<__half2*>(&x)); }
__device__ __forceinline__ uint kvq_h2s(__half lo, __half hi) {
  __half2 h = __halves2half2(lo, hi);
  return *reinterpret_cast<uint*>(&h);
}
// (x - 1024) * sc + bi per half: x holds codes as fp16 1024 + code (0x6400 | code)
__device__ __forceinline__ uint kvq_h2_deq(uint x, uint sc, uint bi) {
  __half2 hx = *reinterpret_cast<__half2*>(&x);
  __half2 hs = *reinterpret_cast<__half2*>(&sc);
  __half2 hb = *reinterpret_cast<__half2*>(&bi);
  __half2 r = __hfma2(__hsub2(hx, __float2half2_rn(1024.0f)), hs, hb);
  return *reinterpret_cast<uint*>(&r);
}
// byte k of a in bits 0-7, byte k of b in bits 16-23 (bits 8-15, 24-31: don't care)
__device__ __forceinline__ uint kvq_bytes2(uint a, uint b, int k) {
  return __byte_perm(a, b, uint(k) | (uint(k + 4) << 8));
}
// c[0..3] += A (16x16, fp16) * B (16x8, fp16), fp32 accumulate, the
// mma.sync m16n8k16 fragment layout (see kvq_common.h, kvq_mma_16816)
__device__ __forceinline__ void kvq_mma_16816(
    float* c, uint a0, uint a1, uint a2, uint a3, uint b0, uint b1, uint lane) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// ---- simdgroup_matrix<T, 8, 8> (Metal's 8x8 matrix of a simdgroup) on a warp, by shuffles:
// lane l holds elements (r, c) and (r, c + 1), r = (q & 4) + (l / 2) % 4,
// c = (q & 2) * 2 + (l % 2) * 2, q = l / 4 (Metal's layout, which MLX's steel kernels read).
// sdpa_prefill's body, the Apple algorithm, runs here through these; no tensor cores.
template <typename T>
struct kvq_vec2 {
  T v[2];
  __device__ __forceinline__ T& operator[](int i) { return v[i]; }
  __device__ __forceinline__ const T& operator[](int i) const { return v[i]; }
};
template <typename T, int C, int R>
struct simdgroup_matrix {
  kvq_vec2<T> e;
  __device__ __forceinline__ kvq_vec2<T>& thread_elements() { return e; }
  __device__ __forceinline__ const kvq_vec2<T>& thread_elements() const { return e; }
};
template <typename T, int C, int R>
__device__ __forceinline__ simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(const T value) {
  simdgroup_matrix<T, C, R> m;
  m.e.v[0] = value;
  m.e.v[1] = value;
  return m;
}
struct kvq_ulong2 {
  ulong x, y;
  __device__ __forceinline__ kvq_ulong2(ulong a = 0, ulong b = 0) : x(a), y(b) {}
};
#define ulong2(...) kvq_ulong2(__VA_ARGS__)  // Metal's ulong2(x, y) as a matrix origin
__device__ __forceinline__ void kvq_sgm_coord(uint lane, int& r, int& c) {
  const int q = int(lane) / 4;
  r = (q & 4) + (int(lane) / 2) % 4;
  c = (q & 2) * 2 + (int(lane) % 2) * 2;
}
// the lane holding element (r, c)
__device__ __forceinline__ uint kvq_sgm_lane(int r, int c) {
  return uint(((r & 4) << 2) | ((c & 4) << 1) | ((r & 2) << 1) | ((r & 1) << 1) | ((c >> 1) & 1));
}
template <typename T, int C, int R>
__device__ __forceinline__ void simdgroup_load(simdgroup_matrix<T, C, R>& d, const T* src, ulong elements_per_row = C,
                                               kvq_ulong2 origin = kvq_ulong2(), bool transpose_matrix = false) {
  int r, c;
  kvq_sgm_coord(threadIdx.x & 31u, r, c);
  const T* p = src + origin.y * elements_per_row + origin.x;
  for (int k = 0; k < 2; k++) {
    d.e.v[k] = transpose_matrix ? p[(c + k) * elements_per_row + r] : p[r * elements_per_row + c + k];
  }
}
// d = a b + c
template <typename T, int C, int R>
__device__ __forceinline__ void simdgroup_multiply_accumulate(simdgroup_matrix<T, C, R>& d,
                                                              const simdgroup_matrix<T, C, R>& a,
                                                              const simdgroup_matrix<T, C, R>& b,
                                                              const simdgroup_matrix<T, C, R>& c) {
  int r, c0;
  kvq_sgm_coord(threadIdx.x & 31u, r, c0);
  T acc0 = c.e.v[0], acc1 = c.e.v[1];
  _Pragma("unroll") for (int k = 0; k < 8; k++) {
    const T av = __shfl_sync(0xffffffffu, a.e.v[k & 1], kvq_sgm_lane(r, k));
    const uint bl = kvq_sgm_lane(k, c0);
    acc0 += av * __shfl_sync(0xffffffffu, b.e.v[0], bl);
    acc1 += av * __shfl_sync(0xffffffffu, b.e.v[1], bl);
  }
  d.e.v[0] = acc0;
  d.e.v[1] = acc1;
}
