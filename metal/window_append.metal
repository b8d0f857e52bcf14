// window_append.metal -- a decode step's new keys and values into the cache's
// recent window in one launch (instead of a rotation matmul per tensor plus a
// slice update each: on GPUs every op of a decode step costs host time).
// The outputs are the window buffers with rows [nw, nw + L) replaced by the new
// rows, rotated by the cache's rotation where ROTK / ROTV (x R = ((x * signs) H)
// / sqrt(D), kvq_fwht_lanes; D a power of two >= 32), cast to the window's
// dtype; every other row is copied.  One simdgroup per row, RPT rows per
// threadgroup; threadgroup y: 0 keys, 1 values.  As the host path (format.fit):
// inf and NaN become 0 before the rotation (a non-finite channel stays in its
// channel), the rotation runs in fp32, and the result saturates at the window
// dtype's largest value (a token near the fp16 maximum, rotated, exceeds it by up
// to sqrt(D)) instead of becoming inf.
// Template: IT (new rows' dtype), OT (window dtype), D, ROTK, ROTV.
// Inputs: wk, wv (B, H, C, D) window buffers; k, v (B, H, L, D) new rows (all
// read through their strides); signs (D,) float32; fparams [1 / sqrt(D) (1 when not
// rotating), -, the largest finite OT];
// carrier: shape (nw + 1,), nw = rows already in the window.
// Outputs: ok, ov (B, H, C, D) row-contiguous, OT.
constexpr int RPT = 4;
constexpr int E = D / 32;
const int H = int(wk_shape[1]);
const int C = int(wk_shape[2]);
const int L = int(k_shape[2]);
const int nw = int(carrier_shape[0]) - 1;
const int rows = int(wk_shape[0]) * H * C;
const int row = int(threadgroup_position_in_grid.x) * RPT + int(simdgroup_index_in_threadgroup);
const bool isv = threadgroup_position_in_grid.y == 1u;
const uint lane = thread_index_in_simdgroup;
const float omax = fparams[2];
if (row < rows) {
  const int c = row % C;
  const int h = (row / C) % H;
  const int b = row / (C * H);
  const int l = c - nw;
  device OT* dst = (isv ? ov : ok) + size_t(row) * D;
  if (l >= 0 && l < L) {
    const device IT* x = isv ? v + size_t(b) * size_t(v_strides[0]) + size_t(h) * size_t(v_strides[1]) +
            size_t(l) * size_t(v_strides[2])
                             : k + size_t(b) * size_t(k_strides[0]) + size_t(h) * size_t(k_strides[1]) +
            size_t(l) * size_t(k_strides[2]);
    const size_t xs = size_t(isv ? v_strides[3] : k_strides[3]);
    if (isv ? ROTV : ROTK) {
      float acc[E];
      KVQ_UNROLL
      for (int e = 0; e < E; e++) {
        const int d = int(lane) * E + e;
        acc[e] = kvq_finite_or_0(float(x[size_t(d) * xs])) * signs[d];
      }
      kvq_fwht_lanes<E>(acc, lane);
      KVQ_UNROLL
      for (int e = 0; e < E; e++) {
        dst[int(lane) * E + e] = OT(metal::min(metal::max(acc[e] * fparams[0], -omax), omax));
      }
    } else {
      for (int d = int(lane); d < D; d += 32) {
        dst[d] = OT(metal::min(metal::max(kvq_finite_or_0(float(x[size_t(d) * xs])), -omax), omax));
      }
    }
  } else {
    const device OT* src = isv ? wv + size_t(b) * size_t(wv_strides[0]) + size_t(h) * size_t(wv_strides[1]) +
            size_t(c) * size_t(wv_strides[2])
                               : wk + size_t(b) * size_t(wk_strides[0]) + size_t(h) * size_t(wk_strides[1]) +
            size_t(c) * size_t(wk_strides[2]);
    const size_t ss = size_t(isv ? wv_strides[3] : wk_strides[3]);
    for (int d = int(lane); d < D; d += 32) {
      dst[d] = src[size_t(d) * ss];
    }
  }
}
