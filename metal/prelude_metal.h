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
// metal_kernel compiles with math_mode "safe": '/' is IEEE division
inline float kvq_div(float a, float b) {
  return a / b;
}
