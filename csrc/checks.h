// Input checks shared by the CPU entries (csrc/cpu/) and the CUDA entries
// (csrc/cuda/) of sae_fast's ops: one function per op, so both devices reject
// the same inputs with the same message (it names the op, the argument and what
// was expected).
//
// Range checks (check_ranges, check_rows_values) read the data of indices, counts
// and rows; their messages name the first offending position and the valid range,
// with the same text as sae_fast._checks (Python), e.g.
//   sae_fast::sparse_decode: indices[3, 1]=5000 outside [0, d_sae=32)
// CPU tensors: a loop. Device tensors: a few ATen ops compute the first bad position
// on the device, and one device->host read of a few int64 brings it back (a sync per
// call; two for rows that are not strictly increasing).
// SAE_FAST_UNCHECKED=1 (read at every call, as in Python) skips them.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

namespace sae_fast {

inline bool range_checks_disabled() {
  const char* e = std::getenv("SAE_FAST_UNCHECKED");
  return e != nullptr && e[0] != '\0' && std::strcmp(e, "0") != 0;
}

// The device path of the range checks, also taken on CPU tensors when the private
// variable _SAE_FAST_TEST_DEVICE_CHECK_PATH=1 is set: tests on a machine without a GPU
// run the exact code the CUDA tensors run.
inline bool use_device_path(const at::Tensor& t) {
  if (!t.is_cpu()) return true;
  const char* e = std::getenv("_SAE_FAST_TEST_DEVICE_CHECK_PATH");
  return e != nullptr && e[0] == '1';
}

// Position of the first true element of a 1-D bool tensor, its length when none:
// a 0-d int64 tensor on its device (no sync).
inline at::Tensor first_true(const at::Tensor& mask) {
  const int64_t n = mask.numel();
  auto pos = at::arange(n, mask.options().dtype(at::kLong));
  if (n == 0) return at::zeros({}, pos.options());
  return at::where(mask, pos, at::Scalar(n)).min();
}

// t.flatten()[min(i, numel - 1)] as a 0-d int64 tensor (0 for an empty t), no sync.
inline at::Tensor value_at(const at::Tensor& t, const at::Tensor& i) {
  auto flat = t.reshape({-1});
  if (flat.numel() == 0) return at::zeros({}, t.options().dtype(at::kLong));
  return flat.index_select(0, i.clamp_max(flat.numel() - 1).reshape({1})).reshape({}).to(at::kLong);
}

inline void check_common(const at::Tensor& indices, const at::Tensor& counts, const at::Tensor& ref, const char* op) {
  TORCH_CHECK(indices.dim() == 2, op, ": indices must be 2-D [n_tokens, capacity], got ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong, op, ": indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK(counts.scalar_type() == at::kInt, op, ": counts must be int32, got ", counts.scalar_type());
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) == indices.size(0), op, ": counts must be [n_tokens]=[",
              indices.size(0), "], got ", counts.sizes());
  TORCH_CHECK(indices.is_contiguous() && counts.is_contiguous(), op, ": indices and counts must be contiguous");
  TORCH_CHECK(indices.device() == ref.device() && counts.device() == ref.device(), op, ": indices (", indices.device(),
              ") and counts (", counts.device(), ") must be on the device of the data tensors (", ref.device(), ")");
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

// counts in [0, K] and every valid index in [0, S). The first offending slot in row
// order, a row's count before its indices (Python reports the same one).
inline void report_ranges(const char* op, int64_t N, int64_t K, int64_t S, int64_t r, int64_t cval, int64_t p,
                          int64_t ival) {
  const int64_t p_row = p < N * K ? p / K : N;
  TORCH_CHECK(!(r < N && r <= p_row), op, ": counts[", r, "]=", cval, " outside [0, capacity=", K, "]");
  TORCH_CHECK(p >= N * K, op, ": indices[", p / K, ", ", p % K, "]=", ival, " outside [0, d_sae=", S, ")");
}

inline void check_ranges(const at::Tensor& indices, const at::Tensor& counts, int64_t S, const char* op) {
  const int64_t N = indices.size(0), K = indices.size(1);
  if (N == 0 || range_checks_disabled()) return;
  if (!use_device_path(indices)) {
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
  auto r = first_true(c.lt(0).logical_or(c.gt(K)));
  auto valid = at::arange(K, c.options()).unsqueeze(0).lt(c.unsqueeze(1));
  auto p = first_true(valid.logical_and(indices.lt(0).logical_or(indices.ge(S))).reshape({-1}));
  auto h = at::stack({r, value_at(c, r), p, value_at(indices, p)}).cpu();  // the one device->host read
  const int64_t* s = h.data_ptr<int64_t>();
  report_ranges(op, N, K, S, s[0], s[1], s[2], s[3]);
}

// The adam rows: each in [0, n_rows), none twice (two updates of one row race between
// blocks on a GPU, and between threads of the CPU kernel). The first offending position:
// p (out of range) or q (repeats the value at a < q), whichever comes first.
inline void report_rows(const char* op, int64_t n, int64_t n_rows, int64_t p, int64_t pval, int64_t q, int64_t qval,
                        int64_t a) {
  TORCH_CHECK(!(p < n && p < q), op, ": rows[", p, "]=", pval, " outside [0, n_rows=", n_rows, ")");
  TORCH_CHECK(q >= n, op, ": rows[", q, "]=", qval, " repeats rows[", a,
              "]; rows must be unique (two updates of one row would race on a GPU: merge their gradients first)");
}

inline void check_rows_values(const at::Tensor& r, int64_t n_rows, const char* op) {
  const int64_t n = r.numel();
  if (n == 0 || range_checks_disabled()) return;
  if (!use_device_path(r)) {
    const int64_t* v = r.data_ptr<int64_t>();
    int64_t p = n;
    bool increasing = true;
    for (int64_t i = 0; i < n; ++i) {
      if (p == n && (v[i] < 0 || v[i] >= n_rows)) p = i;
      if (i > 0 && v[i] <= v[i - 1]) increasing = false;
    }
    int64_t q = n, a = 0;
    if (!increasing) {  // sorted (value, position): equal values in position order
      std::vector<std::pair<int64_t, int64_t>> vp(n);
      for (int64_t i = 0; i < n; ++i) vp[i] = {v[i], i};
      std::sort(vp.begin(), vp.end());
      for (int64_t i = 1; i < n; ++i)
        if (vp[i].first == vp[i - 1].first && vp[i].second < q) {
          q = vp[i].second;
          a = vp[i - 1].second;
        }
    }
    report_rows(op, n, n_rows, p, p < n ? v[p] : 0, q, q < n ? v[q] : 0, a);
    return;
  }
  // One device->host read when the rows are strictly increasing (RowGrads, step()'s
  // nonzero rows): no sort. Otherwise a sort and a second read find the first repeat.
  auto p = first_true(r.lt(0).logical_or(r.ge(n_rows)));
  auto increasing =
      n > 1 ? r.narrow(0, 1, n - 1).gt(r.narrow(0, 0, n - 1)).all().to(at::kLong) : at::ones({}, r.options());
  auto h = at::stack({p, value_at(r, p), increasing}).cpu();
  const int64_t* s = h.data_ptr<int64_t>();
  if (s[2] == 1) {
    report_rows(op, n, n_rows, s[0], s[1], n, 0, 0);
    return;
  }
  auto sorted = at::sort(r, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const auto& sv = std::get<0>(sorted);
  const auto& perm = std::get<1>(sorted);
  // each later occurrence of a value, at its position in r; the smallest is the first repeat
  auto key = at::where(sv.narrow(0, 1, n - 1).eq(sv.narrow(0, 0, n - 1)), perm.narrow(0, 1, n - 1), at::Scalar(n));
  auto i = key.argmin().reshape({1});
  auto q = key.index_select(0, i).reshape({});
  auto a = perm.narrow(0, 0, n - 1).index_select(0, i).reshape({});
  auto h2 = at::stack({q, value_at(r, q), a}).cpu();
  const int64_t* s2 = h2.data_ptr<int64_t>();
  report_rows(op, n, n_rows, s[0], s[1], s2[0], s2[1], s2[2]);
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

inline at::ScalarType check_gather_dot_args(const at::Tensor& grad, const at::Tensor& indices, const at::Tensor& counts,
                                            const at::Tensor& W) {
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
  TORCH_CHECK(coef.sizes() == indices.sizes(), op, ": coef must have the shape of indices ", indices.sizes(), ", got ",
              coef.sizes());
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
                ": rows must be a contiguous 1-D int64 tensor on param's device, got ", r.scalar_type(), " ",
                r.sizes());
    check_rows_values(r, g.n_rows, op);
  }
  return g;
}

// jumprelu_select: pre [N, C] and its thresholds [C].
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
  TORCH_CHECK(threshold.scalar_type() == at::kFloat, op, ": threshold must be float32, got ", threshold.scalar_type());
  TORCH_CHECK(threshold.dim() == 1 && threshold.size(0) == C, op, ": threshold must be [n_features]=[", C, "], got ",
              threshold.sizes());
  TORCH_CHECK(threshold.is_contiguous(), op, ": threshold must be contiguous");
  TORCH_CHECK(threshold.device() == pre.device(), op, ": threshold (", threshold.device(),
              ") must be on pre's device (", pre.device(), ")");
  TORCH_CHECK(half_bandwidth >= 0.0, op, ": half_bandwidth must be >= 0 (and not NaN), got ", half_bandwidth);
  TORCH_CHECK(col_offset >= 0 && col_offset <= std::numeric_limits<int64_t>::max() - C, op,
              ": col_offset must be >= 0 and col_offset + n_features must fit int64, got ", col_offset);
}

}  // namespace sae_fast
