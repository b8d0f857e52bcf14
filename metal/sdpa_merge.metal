// sdpa_merge.metal -- second pass of split-K attention: merge nsplit partial
// (normalized out, lse) pairs by log-sum-exp.  One simdgroup per output row.
// Template: D.  Inputs: o_part float32 (nsplit, rows, D), lse_part float32
// (nsplit, rows).  Outputs: out (rows, D), lse (rows).
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
  for (int d = int(lane); d < D; d += 32) {
    float acc = 0.0f;
    if (mx != -INFINITY) {
      for (int s = 0; s < nsplit; s++) {
        float w = metal::exp(lse_part[size_t(s) * rows + row] - mx);
        acc += w * o_part[(size_t(s) * rows + row) * D + d];
      }
    }
    out[size_t(row) * D + d] = mx != -INFINITY ? acc / den : 0.0f;
  }
  if (lane == 0) {
    lse[row] = mx != -INFINITY ? mx + metal::log(den) : -INFINITY;
  }
}
