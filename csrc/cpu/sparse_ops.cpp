// CPU (OpenMP) kernels of sae_fast's sparse primitives and fused optimizer step,
// and their registration for the CPU dispatch key. The schemas and the ops'
// definitions are in csrc/ops.cpp; the input checks, shared with the CUDA
// entries (csrc/cuda/sparse_ops.cu), in csrc/checks.h.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "checks.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace sae_fast {

namespace {

template <typename T>
inline float tof(T v) {
  return static_cast<float>(v);
}

// Sums run in double on the CPU: a d_in = 2304 dot product accumulated
// sequentially in float32 loses ~4x more than torch's blocked float32 GEMM
// (measured at d = 130: 1.9e-5 vs 4.4e-6), while double leaves one rounding.
// Four independent lanes keep the adds pipelined.
template <typename A, typename T>
inline double dot(const A* a, const T* b, int64_t D) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {
    s0 += double(tof(a[d])) * tof(b[d]);
    s1 += double(tof(a[d + 1])) * tof(b[d + 1]);
    s2 += double(tof(a[d + 2])) * tof(b[d + 2]);
    s3 += double(tof(a[d + 3])) * tof(b[d + 3]);
  }
  for (; d < D; ++d) s0 += double(tof(a[d])) * tof(b[d]);
  return (s0 + s1) + (s2 + s3);
}

// ------------------------------------------------------------------ CPU kernels
// Memory safety, as in kernels/sparse_ops.cu: the entries refuse bad indices and
// counts (csrc/checks.h), and the kernels stay in bounds even when that check is
// skipped (SAE_FAST_UNCHECKED=1): a count is clamped to [0, K], a slot whose index
// lies outside [0, S) contributes nothing (reads as 0), an optimizer row outside
// [0, n_rows) is skipped. A compare per slot, nothing per element.
inline int64_t clamp_count(int32_t c, int64_t K) { return c < 0 ? 0 : std::min<int64_t>(c, K); }
inline bool in_range(int64_t j, int64_t S) { return j >= 0 && j < S; }

// O is T, or float when the caller keeps the reconstruction unrounded (the
// training step computes its float32 loss and gradient from it).
template <typename T, typename O>
void decode_cpu(const int64_t* idx, const T* val, const int32_t* cnt, const T* W, const T* bias, O* out, int64_t N,
                int64_t K, int64_t S, int64_t D) {
  at::parallel_for(0, N, 1, [&](int64_t b0, int64_t b1) {
    std::vector<double> acc(D);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t d = 0; d < D; ++d) acc[d] = bias ? tof(bias[d]) : 0.0;
      const int64_t c = clamp_count(cnt[b], K);
      for (int64_t k = 0; k < c; ++k) {
        const int64_t j = idx[b * K + k];
        if (!in_range(j, S)) continue;
        const double v = tof(val[b * K + k]);
        const T* row = W + j * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += v * tof(row[d]);
      }
      for (int64_t d = 0; d < D; ++d) out[b * D + d] = static_cast<O>(static_cast<float>(acc[d]));
    }
  });
}

// G is T, or float when the caller wants the dot products unrounded (the
// threshold gradient sums them over the band; see sae_fast/step/sparse.py).
template <typename T, typename G>
void gather_dot_cpu(const G* grad, const int64_t* idx, const int32_t* cnt, const T* W, G* out, int64_t N, int64_t K,
                    int64_t S, int64_t D) {
  at::parallel_for(0, N, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const G* g = grad + b * D;
      const int64_t c = clamp_count(cnt[b], K);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t j = k < c ? idx[b * K + k] : -1;
        const double s = in_range(j, S) ? dot(g, W + j * D, D) : 0.0;
        out[b * K + k] = static_cast<G>(static_cast<float>(s));
      }
    }
  });
}

// Deterministic segmented reduction: a counting sort groups the (b, k) entries
// by feature in (b, k) order, then each feature row is summed in that order.
template <typename T>
void scatter_rows_cpu(const T* coef, const int64_t* idx, const int32_t* cnt, const T* grad, T* out, int64_t N,
                      int64_t K, int64_t D, int64_t S) {
  std::vector<int64_t> start(S + 1, 0);
  for (int64_t b = 0; b < N; ++b)
    for (int64_t k = 0, c = clamp_count(cnt[b], K); k < c; ++k)
      if (in_range(idx[b * K + k], S)) start[idx[b * K + k] + 1]++;
  for (int64_t j = 0; j < S; ++j) start[j + 1] += start[j];
  std::vector<int64_t> entry(start[S]);  // flat slot b*K+k, grouped by feature
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t b = 0; b < N; ++b)
    for (int64_t k = 0, c = clamp_count(cnt[b], K); k < c; ++k)
      if (in_range(idx[b * K + k], S)) entry[fill[idx[b * K + k]]++] = b * K + k;
  at::parallel_for(0, S, 16, [&](int64_t j0, int64_t j1) {
    std::vector<double> acc(D);
    for (int64_t j = j0; j < j1; ++j) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t e = start[j]; e < start[j + 1]; ++e) {
        const int64_t slot = entry[e];
        const double c = tof(coef[slot]);
        const T* g = grad + (slot / K) * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += c * tof(g[d]);
      }
      for (int64_t d = 0; d < D; ++d) out[j * D + d] = static_cast<T>(static_cast<float>(acc[d]));
    }
  });
}

// One row per iteration: lazy decay, moment, update, (renormalisation), one rounding.
// Same operation order as the reference; the decay is beta2^missed in double.
template <typename T>
void adam_b1zero_rows_cpu_kernel(T* param, float* v, int64_t* last, const int64_t* rows, const T* grad, int64_t n,
                                 const RowGeometry& g, int64_t step, float lr, float beta2, float omb2, float eps,
                                 float bc2_sqrt, bool renorm) {
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(g.L, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(renorm ? g.L : 0);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t j = rows ? rows[r] : r;
      if (!in_range(j, g.n_rows)) continue;
      const int64_t missed = step - 1 - last[j];
      const float decay = static_cast<float>(std::pow(static_cast<double>(beta2), static_cast<double>(missed)));
      const T* gr = grad + r * g.L;
      double sq = 0.0;
      for (int64_t i = 0; i < g.L; ++i) {
        const int64_t off = j * g.s_row + i * g.s_col;
        const float gi = tof(gr[i]);
        const float vi = v[off] * decay * beta2 + omb2 * gi * gi;
        v[off] = vi;
        const float pi = tof(param[off]) - lr * (gi / (std::sqrt(vi) / bc2_sqrt + eps));
        if (renorm) {
          buf[i] = pi;
          sq += static_cast<double>(pi) * pi;
        } else {
          param[off] = static_cast<T>(pi);
        }
      }
      if (renorm) {
        const float nrm = std::max(static_cast<float>(std::sqrt(sq)), 1e-12f);
        for (int64_t i = 0; i < g.L; ++i) param[j * g.s_row + i * g.s_col] = static_cast<T>(buf[i] / nrm);
      }
      last[j] = step;
    }
  });
}

#define SAE_FAST_DISPATCH_FLOAT(st, NAME, ...)                       \
  [&] {                                                              \
    switch (st) {                                                    \
      case at::kFloat: {                                             \
        using scalar_t = float;                                      \
        return __VA_ARGS__();                                        \
      }                                                              \
      case at::kBFloat16: {                                          \
        using scalar_t = c10::BFloat16;                              \
        return __VA_ARGS__();                                        \
      }                                                              \
      case at::kHalf: {                                              \
        using scalar_t = c10::Half;                                  \
        return __VA_ARGS__();                                        \
      }                                                              \
      default: TORCH_CHECK(false, NAME, ": unsupported dtype ", st); \
    }                                                                \
  }()

// ----------------------------------------------------------------- CPU entries
at::Tensor sparse_decode_cpu(const at::Tensor& indices, const at::Tensor& values, const at::Tensor& counts,
                             const at::Tensor& W, const c10::optional<at::Tensor>& bias,
                             c10::optional<at::ScalarType> out_dtype) {
  const char* op = "sae_fast::sparse_decode";
  const auto ot = check_decode_args(indices, values, counts, W, bias, out_dtype);
  const int64_t N = indices.size(0), K = indices.size(1), S = W.size(0), D = W.size(1);
  auto out = at::empty({N, D}, W.options().dtype(ot));
  SAE_FAST_DISPATCH_FLOAT(W.scalar_type(), op, [&] {
    const scalar_t* bp = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    if (ot == at::kFloat)
      decode_cpu<scalar_t, float>(indices.data_ptr<int64_t>(), values.data_ptr<scalar_t>(), counts.data_ptr<int32_t>(),
                                  W.data_ptr<scalar_t>(), bp, out.data_ptr<float>(), N, K, S, D);
    else
      decode_cpu<scalar_t, scalar_t>(indices.data_ptr<int64_t>(), values.data_ptr<scalar_t>(),
                                     counts.data_ptr<int32_t>(), W.data_ptr<scalar_t>(), bp, out.data_ptr<scalar_t>(),
                                     N, K, S, D);
  });
  return out;
}

at::Tensor sparse_gather_dot_cpu(const at::Tensor& grad, const at::Tensor& indices, const at::Tensor& counts,
                                 const at::Tensor& W) {
  const char* op = "sae_fast::sparse_gather_dot";
  check_gather_dot_args(grad, indices, counts, W);
  const int64_t N = indices.size(0), K = indices.size(1), S = W.size(0), D = W.size(1);
  auto out = at::empty({N, K}, grad.options());  // the output takes grad's dtype
  const bool g32 = grad.scalar_type() == at::kFloat;
  SAE_FAST_DISPATCH_FLOAT(W.scalar_type(), op, [&] {
    if (g32)
      gather_dot_cpu<scalar_t, float>(grad.data_ptr<float>(), indices.data_ptr<int64_t>(), counts.data_ptr<int32_t>(),
                                      W.data_ptr<scalar_t>(), out.data_ptr<float>(), N, K, S, D);
    else
      gather_dot_cpu<scalar_t, scalar_t>(grad.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(),
                                         counts.data_ptr<int32_t>(), W.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                         N, K, S, D);
  });
  return out;
}

at::Tensor sparse_scatter_rows_cpu(const at::Tensor& coef, const at::Tensor& indices, const at::Tensor& counts,
                                   const at::Tensor& grad, int64_t d_sae) {
  const char* op = "sae_fast::sparse_scatter_rows";
  check_scatter_rows_args(coef, indices, counts, grad, d_sae);
  const int64_t N = indices.size(0), K = indices.size(1), D = grad.size(1);
  auto out = at::empty({d_sae, D}, grad.options());
  SAE_FAST_DISPATCH_FLOAT(grad.scalar_type(), op, [&] {
    scatter_rows_cpu<scalar_t>(coef.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(), counts.data_ptr<int32_t>(),
                               grad.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), N, K, D, d_sae);
  });
  return out;
}

void adam_b1zero_rows_cpu(const at::Tensor& param, const at::Tensor& v, const at::Tensor& last,
                          const c10::optional<at::Tensor>& rows, const at::Tensor& grad, int64_t step, double lr,
                          double beta2, double eps, c10::optional<int64_t> sparse_dim, bool renorm) {
  const char* op = "sae_fast::adam_b1zero_rows_";
  const RowGeometry g = check_adam_rows_args(param, v, last, rows, grad, sparse_dim);
  const int64_t n = rows.has_value() ? rows->numel() : 1;
  if (n == 0 || g.L == 0) return;
  const float bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))));
  SAE_FAST_DISPATCH_FLOAT(param.scalar_type(), op, [&] {
    adam_b1zero_rows_cpu_kernel<scalar_t>(param.data_ptr<scalar_t>(), v.data_ptr<float>(), last.data_ptr<int64_t>(),
                                          rows.has_value() ? rows->data_ptr<int64_t>() : nullptr,
                                          grad.data_ptr<scalar_t>(), n, g, step, static_cast<float>(lr),
                                          static_cast<float>(beta2), static_cast<float>(1.0 - beta2),
                                          static_cast<float>(eps), bc2_sqrt, renorm);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sae_fast, CPU, m) {
  m.impl("sparse_decode", &sparse_decode_cpu);
  m.impl("sparse_gather_dot", &sparse_gather_dot_cpu);
  m.impl("sparse_scatter_rows", &sparse_scatter_rows_cpu);
  m.impl("adam_b1zero_rows_", &adam_b1zero_rows_cpu);
}

}  // namespace sae_fast
