// prelude_metal.h -- maps the kvq kernel dialect onto Metal (MLX metal_kernel).
#include <metal_stdlib>
using namespace metal;

#define KVQ_FUNC inline
#define KVQ_TGP(T) threadgroup T*
#define KVQ_UNROLL _Pragma("clang loop unroll(full)")
#define KVQ_LOG2E 1.4426950408889634f
#define KVQ_LN2 0.6931471805599453f

inline float kvq_as_float(uint b) {
  return as_type<float>(b);
}
// a pointer the optimizer may not look through (a hint for nvcc, see prelude_cuda.h)
template <typename T>
inline T kvq_opaque(T x) {
  return x;
}
// Cross-threadgroup hand-off, used only by the decode kernel's fused merge, which the
// launcher enables on CUDA alone (MLX's Metal kernels never order memory across
// threadgroups within a launch); defined so that the shared bodies compile.
inline void kvq_device_fence() {
  threadgroup_barrier(mem_flags::mem_device);
}
inline uint kvq_atomic_add(device uint* p, uint v) {
  return atomic_fetch_add_explicit((device atomic_uint*)p, v, memory_order_relaxed);
}
inline float kvq_load_cg(const device float* p) {
  return *p;
}
// metal_kernel compiles with math_mode "safe": '/' is IEEE division
inline float kvq_div(float a, float b) {
  return a / b;
}

// ---- fp16 pairs used by sdpa_decode (a "h2" is a uint holding two halves)
inline uint kvq_h2(float lo, float hi) {
  return as_type<uint>(half2(half(lo), half(hi)));
}
inline float kvq_h2lo(uint x) {
  return float(as_type<half2>(x).x);
}
inline float kvq_h2hi(uint x) {
  return float(as_type<half2>(x).y);
}
// (x - 1024) * sc + bi per half: x holds codes as fp16 1024 + code (0x6400 | code)
inline uint kvq_h2_deq(uint x, uint sc, uint bi) {
  half2 c = as_type<half2>(x) - half2(1024.0h, 1024.0h);
  return as_type<uint>(fma(c, as_type<half2>(sc), as_type<half2>(bi)));
}
inline uint kvq_bytes2(uint a, uint b, int k) {
  return ((a >> (8 * k)) & 0xFFu) | (((b >> (8 * k)) & 0xFFu) << 16);
}
