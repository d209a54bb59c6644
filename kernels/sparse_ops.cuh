// CUDA launchers for sae_fast's sparse primitives. Device code only: no torch
// headers, raw pointers, sizes and a cudaStream_t, so nvcc can compile-check
// it on machines without a CUDA build of torch. csrc/cuda/sparse_ops.cu holds
// the checks and calls these.
//
// Layout (SparseActs): indices int64 [N, K], counts int32 [N]; slot k of row b
// is valid iff k < counts[b]. Kernels never read or write out of bounds, whatever
// the indices and counts (see the guards in sparse_ops.cu). Every offset is int64 (N*K, N*D, S*D pass 2^31 at
// 2^20 latents). All sums accumulate in float32.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.cuh"

namespace sae_fast_kernels {

// out[b] = sum_{k < counts[b]} values[b, k] * W[indices[b, k]] (+ bias).
// values, W [S, D], bias: dtype w; out: dtype out (w or F32).
cudaError_t sparse_decode(DType w, DType out_dtype, const int64_t* indices, const void* values, const int32_t* counts,
                          const void* W, const void* bias, void* out, int64_t N, int64_t K, int64_t S, int64_t D,
                          cudaStream_t stream);

// out[b, k] = <grad[b], W[indices[b, k]]> on valid slots, 0 on padding.
// W [S, D]: dtype w; grad and out: dtype g (w or F32).
cudaError_t sparse_gather_dot(DType w, DType g, const void* grad, const int64_t* indices, const int32_t* counts,
                              const void* W, void* out, int64_t N, int64_t K, int64_t S, int64_t D,
                              cudaStream_t stream);

// Deterministic: out[j] = sum over e in [start[j], start[j+1]) of coef[order[e]] * grad[order[e] / K],
// in that order. `order` lists the valid flat slots b*K+k grouped by feature (stable in b);
// `start` [S+1] are the group offsets. Every row of out [S, D] is written (0 where empty).
// coef [N, K], grad [N, D].
cudaError_t sparse_scatter_rows_segmented(DType t, const int64_t* order, const int64_t* start, const void* coef,
                                          const void* grad, void* out, int64_t S, int64_t N, int64_t K, int64_t D,
                                          cudaStream_t stream);

// Fused Adam(beta1 = 0) on the touched rows of a parameter (sae_fast.reference.adam_b1zero_rows_):
// row j = rows[r] (or r when rows is null), element i at param[j * s_row + i * s_col] (same
// offsets in v, float32); grad [n, L] in param's dtype t. Per row: v *= beta2^(step-1-last[j]),
// v = beta2 v + (1-beta2) g², p -= lr g / (sqrt(v)/bc2_sqrt + eps), with renorm p /= ||p||,
// one rounding to t; then last[j] = step. rows must be unique (blocks of a duplicated row
// would race) and lie in [0, n_rows) (a row outside is skipped). one_minus_beta2 comes from the
// host in double precision (1 - float(beta2) would be off by 1e-6 relative at beta2 = 0.99).
cudaError_t adam_b1zero_rows(DType t, void* param, float* v, int64_t* last, const int64_t* rows, const void* grad,
                             int64_t n, int64_t n_rows, int64_t L, int64_t s_row, int64_t s_col, int64_t step, float lr,
                             float beta2, float one_minus_beta2, float eps, float bc2_sqrt, bool renorm,
                             cudaStream_t stream);

}  // namespace sae_fast_kernels
