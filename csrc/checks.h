// Input checks shared by the CPU (sparse_ops.cpp) and CUDA (sparse_ops_cuda.cu)
// entries of sae_fast's ops: one function per op, so both devices reject the
// same inputs with the same message (it names the op, the argument and what
// was expected).
#pragma once

#include <ATen/ATen.h>

namespace sae_fast {

inline void check_common(const at::Tensor& indices, const at::Tensor& counts, const at::Tensor& ref, const char* op) {
  TORCH_CHECK(indices.dim() == 2, op, ": indices must be 2-D [n_tokens, capacity], got ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong, op, ": indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK(counts.scalar_type() == at::kInt, op, ": counts must be int32, got ", counts.scalar_type());
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) == indices.size(0), op,
              ": counts must be [n_tokens]=[", indices.size(0), "], got ", counts.sizes());
  TORCH_CHECK(indices.is_contiguous() && counts.is_contiguous(), op, ": indices and counts must be contiguous");
  TORCH_CHECK(indices.device() == ref.device() && counts.device() == ref.device(), op,
              ": indices (", indices.device(), ") and counts (", counts.device(),
              ") must be on the device of the data tensors (", ref.device(), ")");
}

inline void check_float_tensor(const at::Tensor& t, const char* name, const char* op) {
  auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op, ": ", name,
              " must be float32, bfloat16 or float16, got ", st);
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_same(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn, const char* op) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", an, " (", a.scalar_type(), ") and ", bn, " (",
              b.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(a.device() == b.device(), op, ": ", an, " (", a.device(), ") and ", bn, " (", b.device(),
              ") must be on the same device");
}

// counts in [0, K] and every valid index in [0, S). On CPU a loop that names the
// first bad slot; on a device one fused reduction (a single sync).
inline void check_ranges(const at::Tensor& indices, const at::Tensor& counts, int64_t S, const char* op) {
  const int64_t N = indices.size(0), K = indices.size(1);
  if (N == 0) return;
  if (indices.is_cpu()) {
    const int64_t* idx = indices.data_ptr<int64_t>();
    const int32_t* cnt = counts.data_ptr<int32_t>();
    for (int64_t b = 0; b < N; ++b) {
      TORCH_CHECK(cnt[b] >= 0 && cnt[b] <= K, op, ": counts[", b, "]=", cnt[b], " outside [0, capacity=", K, "]");
      for (int64_t k = 0; k < cnt[b]; ++k) {
        const int64_t j = idx[b * K + k];
        TORCH_CHECK(j >= 0 && j < S, op, ": indices[", b, ", ", k, "]=", j, " outside [0, d_sae=", S, ")");
      }
    }
    return;
  }
  auto c = counts.to(at::kLong);
  auto valid = at::arange(K, indices.options()).unsqueeze(0) < c.unsqueeze(1);
  auto bad_idx = valid.logical_and(indices.lt(0).logical_or(indices.ge(S))).any();
  auto bad_cnt = c.lt(0).logical_or(c.gt(K)).any();
  auto flags = at::stack({bad_cnt, bad_idx}).cpu();
  TORCH_CHECK(!flags[0].item<bool>(), op, ": counts must lie in [0, capacity=", K, "]");
  TORCH_CHECK(!flags[1].item<bool>(), op, ": an index on a valid slot lies outside [0, d_sae=", S, ")");
}

// Each returns the output dtype after checking every argument.
inline at::ScalarType check_decode_args(const at::Tensor& indices, const at::Tensor& values, const at::Tensor& counts,
                                        const at::Tensor& W, const c10::optional<at::Tensor>& bias,
                                        c10::optional<at::ScalarType> out_dtype) {
  const char* op = "sae_fast::sparse_decode";
  check_common(indices, counts, W, op);
  check_float_tensor(values, "values", op);
  check_float_tensor(W, "W", op);
  check_same(values, "values", W, "W", op);
  TORCH_CHECK(values.sizes() == indices.sizes(), op, ": values must have the shape of indices ", indices.sizes(),
              ", got ", values.sizes());
  TORCH_CHECK(W.dim() == 2, op, ": W must be 2-D [d_sae, d_in], got ", W.sizes());
  if (bias.has_value()) {
    check_float_tensor(*bias, "bias", op);
    check_same(*bias, "bias", W, "W", op);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == W.size(1), op, ": bias must be [d_in]=[", W.size(1), "], got ",
                bias->sizes());
  }
  const auto ot = out_dtype.value_or(W.scalar_type());
  TORCH_CHECK(ot == W.scalar_type() || ot == at::kFloat, op, ": out_dtype must be W's dtype (", W.scalar_type(),
              ") or float32, got ", ot);
  check_ranges(indices, counts, W.size(0), op);
  return ot;
}

inline at::ScalarType check_gather_dot_args(const at::Tensor& grad, const at::Tensor& indices,
                                            const at::Tensor& counts, const at::Tensor& W) {
  const char* op = "sae_fast::sparse_gather_dot";
  check_common(indices, counts, W, op);
  check_float_tensor(grad, "grad", op);
  check_float_tensor(W, "W", op);
  TORCH_CHECK(grad.scalar_type() == W.scalar_type() || grad.scalar_type() == at::kFloat, op,
              ": grad must have W's dtype (", W.scalar_type(), ") or float32, got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == W.device(), op, ": grad (", grad.device(), ") and W (", W.device(),
              ") must be on the same device");
  TORCH_CHECK(W.dim() == 2, op, ": W must be 2-D [d_sae, D], got ", W.sizes());
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == indices.size(0) && grad.size(1) == W.size(1), op, ": grad must be [",
              indices.size(0), ", ", W.size(1), "], got ", grad.sizes());
  check_ranges(indices, counts, W.size(0), op);
  return grad.scalar_type();  // the output takes grad's dtype
}

inline at::ScalarType check_scatter_rows_args(const at::Tensor& coef, const at::Tensor& indices,
                                              const at::Tensor& counts, const at::Tensor& grad, int64_t d_sae) {
  const char* op = "sae_fast::sparse_scatter_rows";
  check_common(indices, counts, grad, op);
  check_float_tensor(coef, "coef", op);
  check_float_tensor(grad, "grad", op);
  check_same(coef, "coef", grad, "grad", op);
  TORCH_CHECK(coef.sizes() == indices.sizes(), op, ": coef must have the shape of indices ", indices.sizes(),
              ", got ", coef.sizes());
  TORCH_CHECK(d_sae >= 0, op, ": d_sae must be non-negative, got ", d_sae);  // 0: a compact step that touched no row
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == indices.size(0), op, ": grad must be [n_tokens=", indices.size(0),
              ", D], got ", grad.sizes());
  check_ranges(indices, counts, d_sae, op);
  return grad.scalar_type();
}

// adam_b1zero_rows_: the rows of param (slices along sparse_dim) as a strided
// [n_rows, L] view: row j, element i at j * s_row + i * s_col.
struct RowGeometry {
  int64_t n_rows, L, s_row, s_col;
};

inline RowGeometry check_adam_rows_args(const at::Tensor& param, const at::Tensor& v, const at::Tensor& last,
                                        const c10::optional<at::Tensor>& rows, const at::Tensor& grad,
                                        c10::optional<int64_t> sparse_dim) {
  const char* op = "sae_fast::adam_b1zero_rows_";
  check_float_tensor(param, "param", op);
  TORCH_CHECK(v.scalar_type() == at::kFloat && v.sizes() == param.sizes() && v.is_contiguous(), op,
              ": v must be a contiguous float32 tensor of param's shape ", param.sizes(), ", got ", v.scalar_type(),
              " ", v.sizes());
  TORCH_CHECK(grad.scalar_type() == param.scalar_type() && grad.is_contiguous(), op,
              ": grad must be contiguous with param's dtype (", param.scalar_type(), "), got ", grad.scalar_type());
  TORCH_CHECK(v.device() == param.device() && grad.device() == param.device() && last.device() == param.device(), op,
              ": param, v, grad and last must share a device");
  RowGeometry g{1, param.numel(), 0, 1};
  if (sparse_dim.has_value()) {
    const int64_t sd = *sparse_dim;
    TORCH_CHECK((param.dim() == 1 && sd == 0) || (param.dim() == 2 && (sd == 0 || sd == 1)), op,
                ": sparse_dim must be 0 for a 1-D param or 0/1 for a 2-D param, got ", sd, " for ", param.sizes());
    TORCH_CHECK(rows.has_value(), op, ": rows are required with a sparse_dim");
    g.n_rows = param.size(sd);
    g.L = param.dim() == 1 ? 1 : param.size(1 - sd);
    g.s_row = param.stride(sd);
    g.s_col = param.dim() == 1 ? 1 : param.stride(1 - sd);
  } else {
    TORCH_CHECK(!rows.has_value(), op, ": rows must be None without a sparse_dim (the whole tensor is one row)");
  }
  TORCH_CHECK(last.scalar_type() == at::kLong && last.dim() == 1 && last.size(0) == g.n_rows && last.is_contiguous(),
              op, ": last must be a contiguous int64 [", g.n_rows, "], got ", last.scalar_type(), " ", last.sizes());
  const int64_t n = rows.has_value() ? rows->numel() : 1;
  TORCH_CHECK(grad.numel() == n * g.L, op, ": grad must hold [n_rows touched=", n, ", row length=", g.L,
              "] elements, got ", grad.sizes());
  if (rows.has_value()) {
    const at::Tensor& r = *rows;
    TORCH_CHECK(r.scalar_type() == at::kLong && r.dim() == 1 && r.is_contiguous() && r.device() == param.device(), op,
                ": rows must be a contiguous 1-D int64 tensor on param's device, got ", r.scalar_type(), " ", r.sizes());
    if (r.numel() > 0) {
      auto bad = r.lt(0).logical_or(r.ge(g.n_rows)).any();
      TORCH_CHECK(!bad.item<bool>(), op, ": rows must lie in [0, ", g.n_rows, ")");
    }
  }
  return g;
}

}  // namespace sae_fast
