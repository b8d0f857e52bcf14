// quantize_append.metal -- affine quantization of new tokens, bit-identical to
// mx.quantize of the backend it runs on.  One thread per group of GS values.
// Template: T (input/scale dtype), D, BITS, GS, FLAVOR.
//   FLAVOR 0 = MLX's CPU algorithm (min/max over the group, round half to
//              even, clamp to [0, 2^bits - 1]);
//   FLAVOR 1 = MLX's Metal/CUDA algorithm (max starts at 0, round half away
//              from zero, clamp above only).
// Inputs: x (rows, D) row-contiguous.
// Outputs: w uint32 (rows, D*BITS/32), scales (rows, D/GS), biases (rows, D/GS).
constexpr int NG = D / GS;
constexpr int GW = GS * BITS / 32;  // words per group
const int rows = int(x_shape[0]);
const size_t gid = size_t(threadgroup_position_in_grid.x) * 256 + size_t(thread_index_in_threadgroup);
if (gid < size_t(rows) * NG) {
  const size_t row = gid / NG;
  const int gi = int(gid % NG);
  const device T* xp = x + row * D + gi * GS;
  const float n_bins = float((1 << BITS) - 1);
  const float eps = 1e-7f;
  float w_min = FLAVOR == 0 ? INFINITY : 3.4028234663852886e38f;
  float w_max = FLAVOR == 0 ? -INFINITY : 0.0f;
  for (int e = 0; e < GS; e++) {
    float v = float(xp[e]);
    w_min = metal::min(w_min, v);
    w_max = metal::max(w_max, v);
  }
  float scale = metal::max(kvq_div(w_max - w_min, n_bins), eps);
  bool side = metal::abs(w_min) > metal::abs(w_max);
  scale = side ? scale : -scale;
  float edge = side ? w_min : w_max;
  float q0 = FLAVOR == 0 ? metal::rint(kvq_div(edge, scale)) : metal::round(kvq_div(edge, scale));
  bool at_zero = q0 == 0.0f;
  scale = at_zero ? scale : kvq_div(edge, q0);
  float bias = at_zero ? 0.0f : edge;
  uint words[GW];
  KVQ_UNROLL
  for (int i = 0; i < GW; i++) {
    words[i] = 0u;
  }
  for (int e = 0; e < GS; e++) {
    float v = float(xp[e]);
    float qf;
    if (FLAVOR == 0) {
      qf = metal::min(metal::max(metal::rint(kvq_div(v - bias, scale)), 0.0f), n_bins);
    } else {
      qf = metal::min(metal::round(kvq_div(v - bias, scale)), n_bins);
    }
    uint c = uint(int(qf)) & ((1u << BITS) - 1u);
    const int bit = e * BITS;
    words[bit >> 5] |= c << (bit & 31);
    if ((bit & 31) + BITS > 32) {
      words[(bit >> 5) + 1] |= c >> (32 - (bit & 31));
    }
  }
  device uint* wp = w + row * (D * BITS / 32) + gi * GW;
  KVQ_UNROLL
  for (int i = 0; i < GW; i++) {
    wp[i] = words[i];
  }
  scales[row * NG + gi] = static_cast<T>(scale);
  biases[row * NG + gi] = static_cast<T>(bias);
}
