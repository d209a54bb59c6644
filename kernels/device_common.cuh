// What the kernels of kernels/ share: the dispatch from a DType to a C++ type,
// float conversions, the memory-safety guards of counts and indices, and the
// grid cap. Device code only, torch-free; included by the .cu files alone.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.cuh"
#include "launch.cuh"

namespace sae_fast_kernels {

namespace detail {

// f(T{}) with T the C++ type of t; cudaErrorInvalidValue for an unknown code.
template <typename F>
inline cudaError_t with_type(DType t, F&& f) {
  switch (t) {
    case DType::F32: return f(float{});
    case DType::BF16: return f(__nv_bfloat16{});
    case DType::F16: return f(__half{});
  }
  return cudaErrorInvalidValue;
}

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

// Round to nearest even, as torch's casts do.
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}

// Memory safety: no input reaches memory out of bounds. A count is clamped to
// [0, cap]; an index outside [0, S) is skipped by the caller. The host entries
// (csrc/) refuse such inputs with an error; these guards keep the kernels in
// bounds even when called unchecked. A compare per staged index, nothing per element.
__device__ __forceinline__ int64_t clamp_count(int32_t c, int64_t cap) {
  return c < 0 ? 0 : (static_cast<int64_t>(c) > cap ? cap : static_cast<int64_t>(c));
}

__device__ __forceinline__ bool in_range(int64_t j, int64_t S) { return j >= 0 && j < S; }

// Blocks for `work` items, at most SAE_MAX_BLOCKS (kernels loop over the rest),
// at least 1 (a launch with a zero grid is an error).
inline unsigned int grid_x(int64_t work) {
  const int64_t cap = SAE_MAX_BLOCKS;
  return static_cast<unsigned int>(work < cap ? (work > 0 ? work : 1) : cap);
}

}  // namespace detail
}  // namespace sae_fast_kernels
