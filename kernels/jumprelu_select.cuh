// CUDA launchers of sae_fast::jumprelu_select (see csrc/ops.cpp for the
// definition). Device code only: raw pointers, sizes and a cudaStream_t;
// csrc/cuda/jumprelu_select.cu holds the checks and the allocation and calls these.
//
// pre [N, C] in dtype t (row-major, contiguous), threshold [C] float32. For each
// row b, with p = float32(pre[b, j]) and t = threshold[j]:
//   A = { j : (p > t and p > 0) or p is NaN },  N = { j : |p - t| < half_bandwidth },
//   steps[b] = |{ j : p > t }|.
// Every offset is int64 (N * C passes 2^31 at 4096 tokens x 2^20 features).
//
// Each row is cut into `segments` pieces of `seg_len` columns (a multiple of 128;
// one piece unless the rows are too few to fill the GPU), one warp per piece.
// Sequence on one stream:
//   1. jumprelu_select_count   per-piece counts into seg_a, seg_n (int32 [N * segments]),
//                              seg_s (int64 [N * segments])
//   2. jumprelu_select_scan    (segments > 1 only) per-row totals into a_cnt, band_cnt, steps,
//                              and seg_a, seg_n replaced by each piece's first slot
//                              (exclusive prefix sums along the row)
//      with segments == 1, pass a_cnt, band_cnt, steps as seg_a, seg_n, seg_s to step 1 and
//      skip this step (every piece starts at slot 0)
//   3. the caller reads max a_cnt, max band_cnt and allocates the outputs
//   4. jumprelu_select_write   the entries and the padding
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.cuh"

namespace sae_fast_kernels {

struct SelectPlan {
  int64_t segments;  // pieces per row, >= 1
  int64_t seg_len;   // columns per piece, a multiple of 128 (the last piece may be shorter)
};

// The pieces for an [N, C] pre (host function).
SelectPlan jumprelu_select_plan(int64_t N, int64_t C);

cudaError_t jumprelu_select_count(DType t, const void* pre, const float* threshold, int64_t N, int64_t C,
                                  SelectPlan plan, float half_bandwidth, bool band, int32_t* seg_a, int32_t* seg_n,
                                  int64_t* seg_s, cudaStream_t stream);

cudaError_t jumprelu_select_scan(int64_t N, SelectPlan plan, int32_t* seg_a, int32_t* seg_n, const int64_t* seg_s,
                                 int32_t* a_cnt, int32_t* band_cnt, int64_t* steps, cudaStream_t stream);

// Row b of a_idx / a_val [N, cap_a] gets col_offset + j and pre[b, j] for j in A_b in
// increasing j, then padding (index 0, value 0) up to cap_a; row b of band_idx [N, cap_band]
// likewise for N_b (band_idx unused when !band). a_base / band_base: each piece's first slot
// (step 2's seg_a / seg_n), or null with one piece. Needs cap_a >= max a_cnt and
// cap_band >= max band_cnt; whatever the counts and bases hold, row b writes only its
// slots [0, min(count, cap)) and pads [min(count, cap), cap).
cudaError_t jumprelu_select_write(DType t, const void* pre, const float* threshold, int64_t N, int64_t C,
                                  SelectPlan plan, float half_bandwidth, bool band, int64_t col_offset,
                                  const int32_t* a_cnt, const int32_t* band_cnt, const int32_t* a_base,
                                  const int32_t* band_base, int64_t* a_idx, void* a_val, int64_t cap_a,
                                  int64_t* band_idx, int64_t cap_band, cudaStream_t stream);

}  // namespace sae_fast_kernels
