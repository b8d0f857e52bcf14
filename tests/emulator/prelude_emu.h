// prelude_emu.h -- maps the kvq kernel dialect onto the emulator (tests/emulator/metal_emu.h),
// as metal/prelude_metal.h does onto Metal: the launcher puts it first in the kernel header.
#define KVQ_FUNC inline
#define KVQ_TGP(T) T*
#define KVQ_UNROLL
#define KVQ_LOG2E 1.4426950408889634f
#define KVQ_LN2 0.6931471805599453f

inline float kvq_as_float(uint b) { return emu_bits_to_float(b); }
template <typename T>
inline T kvq_opaque(T x) { return x; }
// threadgroups run one after another here: plain memory operations are the hand-off
inline void kvq_device_fence() {}
inline uint kvq_atomic_add(uint* p, uint v) {
  const uint old = *p;
  *p = old + v;
  return old;
}
inline float kvq_load_cg(const float* p) { return *p; }
inline float kvq_div(float a, float b) {
  volatile float r = a / b;  // no contraction / reassociation
  return r;
}

// ---- fp16 pairs used by sdpa_decode (a "h2" is a uint holding two halves)
inline uint kvq_h2(float lo, float hi) {
  return (uint)emu_half::from_float(lo) | ((uint)emu_half::from_float(hi) << 16);
}
inline float kvq_h2lo(uint x) { return emu_half::to_float((uint16_t)(x & 0xFFFFu)); }
inline float kvq_h2hi(uint x) { return emu_half::to_float((uint16_t)(x >> 16)); }
// (x - 1024) * sc + bi per half, one rounding (as a fused half2 FMA)
inline uint kvq_h2_deq(uint x, uint sc, uint bi) {
  double lo = ((double)kvq_h2lo(x) - 1024.0) * kvq_h2lo(sc) + kvq_h2lo(bi);
  double hi = ((double)kvq_h2hi(x) - 1024.0) * kvq_h2hi(sc) + kvq_h2hi(bi);
  return kvq_h2((float)lo, (float)hi);
}
inline uint kvq_bytes2(uint a, uint b, int k) {
  return ((a >> (8 * k)) & 0xFFu) | (((b >> (8 * k)) & 0xFFu) << 16);
}
