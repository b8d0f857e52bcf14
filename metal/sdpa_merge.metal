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
if (row < rows) {
  kvq_merge_row<D, OT, ROTO, false>(o_part, lse_part, nsplit, size_t(rows), size_t(row), thread_index_in_simdgroup,
                                    signs, fparams[0], out, lse);
}
