// sdpa_merge.metal -- second pass of split-K attention: merge nsplit partial
// (normalized out, lse) pairs by log-sum-exp.  One simdgroup per output row.
// Template: D, OT (output dtype), ROTO (rotate the output back by the cache's
// rotation: o R^T = ((o H) / sqrt(D)) * signs, H the Sylvester Hadamard matrix;
// needs D a power of two >= 32).  Inputs: o_part float32 (nsplit, rows, D),
// lse_part float32 (nsplit, rows), signs (D,) float32 (read when ROTO), fparams
// [1 / sqrt(D)].  Outputs: out OT (rows, D), lse float32 (rows).
const int nsplit = int(o_part_shape[0]);
const int rows = int(o_part_shape[1]);
const int row = int(threadgroup_position_in_grid.x);
const uint lane = thread_index_in_simdgroup;
if (row < rows) {
  float mx = -INFINITY;
  for (int s = 0; s < nsplit; s++) {
    mx = metal::max(mx, lse_part[size_t(s) * rows + row]);
  }
  float den = 0.0f;
  if (mx != -INFINITY) {
    for (int s = 0; s < nsplit; s++) {
      den += metal::exp(lse_part[size_t(s) * rows + row] - mx);
    }
  }
  if (ROTO) {
    // lane holds dims [lane * E, lane * E + E) (kvq_fwht_lanes)
    constexpr int E = D / 32;
    float acc[E];
    KVQ_UNROLL
    for (int e = 0; e < E; e++) {
      acc[e] = 0.0f;
    }
    if (mx != -INFINITY) {
      for (int s = 0; s < nsplit; s++) {
        const float w = metal::exp(lse_part[size_t(s) * rows + row] - mx) / den;
        KVQ_UNROLL
        for (int e = 0; e < E; e++) {
          acc[e] += w * o_part[(size_t(s) * rows + row) * D + lane * E + e];
        }
      }
    }
    kvq_fwht_lanes<E>(acc, lane);
    KVQ_UNROLL
    for (int e = 0; e < E; e++) {
      const int d = int(lane) * E + e;
      out[size_t(row) * D + d] = OT(acc[e] * fparams[0] * signs[d]);
    }
  } else {
    for (int d = int(lane); d < D; d += 32) {
      float acc = 0.0f;
      if (mx != -INFINITY) {
        for (int s = 0; s < nsplit; s++) {
          float w = metal::exp(lse_part[size_t(s) * rows + row] - mx);
          acc += w * o_part[(size_t(s) * rows + row) * D + d];
        }
      }
      out[size_t(row) * D + d] = OT(mx != -INFINITY ? acc / den : 0.0f);
    }
  }
  if (lane == 0) {
    lse[row] = mx != -INFINITY ? mx + metal::log(den) : -INFINITY;
  }
}
