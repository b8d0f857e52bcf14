// prelude_cuda.h -- maps the kvq kernel dialect (Metal) onto CUDA for
// mx.fast.cuda_kernel.  Comes after MLX's default CUDA header, before the
// shared helpers (kvq_common.h) and the kernel bodies.
//   threadgroup memory     -> __shared__
//   device/thread spaces   -> (nothing)
//   simdgroup (32 lanes)   -> warp; simd_sum/max/shuffle -> __shfl_*_sync
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
// IEEE division whatever the JIT's math flags
__device__ __forceinline__ float kvq_div(float a, float b) { return __fdiv_rn(a, b); }
