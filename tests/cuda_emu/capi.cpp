// A C ABI over the launchers of kernels/, for the emulated library that the tests
// load with ctypes (harness.build_library) to run whole training steps through the
// CUDA kernels on CPU tensors. Each returns the launcher's cudaError_t.
#include <cstdint>

#include "jumprelu_select.cuh"
#include "sparse_ops.cuh"

using sae_fast_kernels::DType;

extern "C" {

int emu_sparse_decode(int w, int out_dtype, const int64_t* indices, const void* values, const int32_t* counts,
                      const void* W, const void* bias, void* out, int64_t N, int64_t K, int64_t S, int64_t D) {
  return sae_fast_kernels::sparse_decode(DType(w), DType(out_dtype), indices, values, counts, W, bias, out, N, K, S, D,
                                         nullptr);
}

int emu_sparse_gather_dot(int w, int g, const void* grad, const int64_t* indices, const int32_t* counts, const void* W,
                          void* out, int64_t N, int64_t K, int64_t S, int64_t D) {
  return sae_fast_kernels::sparse_gather_dot(DType(w), DType(g), grad, indices, counts, W, out, N, K, S, D, nullptr);
}

int emu_sparse_scatter_rows_segmented(int t, const int64_t* order, const int64_t* start, const void* coef,
                                      const void* grad, void* out, int64_t S, int64_t N, int64_t K, int64_t D) {
  return sae_fast_kernels::sparse_scatter_rows_segmented(DType(t), order, start, coef, grad, out, S, N, K, D, nullptr);
}

void emu_select_plan(int64_t N, int64_t C, int64_t* segments, int64_t* seg_len) {
  const auto p = sae_fast_kernels::jumprelu_select_plan(N, C);
  *segments = p.segments;
  *seg_len = p.seg_len;
}

int emu_select_count(int t, const void* pre, const float* thr, int64_t N, int64_t C, int64_t segments, int64_t seg_len,
                     float hb, int band, int32_t* seg_a, int32_t* seg_n, int64_t* seg_s) {
  return sae_fast_kernels::jumprelu_select_count(DType(t), pre, thr, N, C, {segments, seg_len}, hb, band != 0, seg_a,
                                                 seg_n, seg_s, nullptr);
}

int emu_select_scan(int64_t N, int64_t segments, int64_t seg_len, int32_t* seg_a, int32_t* seg_n, const int64_t* seg_s,
                    int32_t* a_cnt, int32_t* band_cnt, int64_t* steps) {
  return sae_fast_kernels::jumprelu_select_scan(N, {segments, seg_len}, seg_a, seg_n, seg_s, a_cnt, band_cnt, steps,
                                                nullptr);
}

int emu_select_write(int t, const void* pre, const float* thr, int64_t N, int64_t C, int64_t segments, int64_t seg_len,
                     float hb, int band, int64_t col_offset, const int32_t* a_cnt, const int32_t* band_cnt,
                     const int32_t* a_base, const int32_t* band_base, int64_t* a_idx, void* a_val, int64_t cap_a,
                     int64_t* band_idx, int64_t cap_band) {
  return sae_fast_kernels::jumprelu_select_write(DType(t), pre, thr, N, C, {segments, seg_len}, hb, band != 0,
                                                 col_offset, a_cnt, band_cnt, a_base, band_base, a_idx, a_val, cap_a,
                                                 band_idx, cap_band, nullptr);
}

}  // extern "C"
