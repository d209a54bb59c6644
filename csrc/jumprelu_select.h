// Argument checks of sae_fast::jumprelu_select, shared by its CPU entry
// (csrc/jumprelu_select.cpp) and its CUDA entry (csrc/jumprelu_select_cuda.cu),
// so both devices reject the same inputs with the same message.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace sae_fast {

inline void check_jumprelu_select_args(const at::Tensor& pre, const at::Tensor& threshold, double half_bandwidth,
                                       int64_t col_offset) {
  const char* op = "sae_fast::jumprelu_select";
  TORCH_CHECK(pre.dim() == 2, op, ": pre must be 2-D [n_tokens, n_features], got ", pre.sizes());
  const auto st = pre.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op,
              ": pre must be float32, bfloat16 or float16, got ", st);
  TORCH_CHECK(pre.is_contiguous(), op, ": pre must be contiguous");
  const int64_t C = pre.size(1);
  // counts are int32 and the kernels keep a column as int32
  TORCH_CHECK(C <= std::numeric_limits<int32_t>::max(), op, ": pre has ", C,
              " columns; at most 2^31 - 1 fit the int32 counts");
  TORCH_CHECK(threshold.scalar_type() == at::kFloat, op, ": threshold must be float32, got ",
              threshold.scalar_type());
  TORCH_CHECK(threshold.dim() == 1 && threshold.size(0) == C, op, ": threshold must be [n_features]=[", C,
              "], got ", threshold.sizes());
  TORCH_CHECK(threshold.is_contiguous(), op, ": threshold must be contiguous");
  TORCH_CHECK(threshold.device() == pre.device(), op, ": threshold (", threshold.device(),
              ") must be on pre's device (", pre.device(), ")");
  TORCH_CHECK(half_bandwidth >= 0.0, op, ": half_bandwidth must be >= 0 (and not NaN), got ", half_bandwidth);
  TORCH_CHECK(col_offset >= 0 && col_offset <= std::numeric_limits<int64_t>::max() - C, op,
              ": col_offset must be >= 0 and col_offset + n_features must fit int64, got ", col_offset);
}

}  // namespace sae_fast
