// CUDA entries of sae_fast's sparse primitives and fused optimizer step (the ops
// are defined in csrc/ops.cpp), and their registration for the CUDA dispatch key:
// the checks of csrc/checks.h, then the launchers of kernels/sparse_ops.cuh on
// PyTorch's current stream.
// Deliberately avoids ATen/cuda/CUDAContext.h (it pulls in cuBLAS headers).
// Compiled only in a CUDA build (setup.py adds csrc/cuda/*.cu together with
// SAE_FAST_WITH_CUDA); a CPU-only build registers the CPU kernels alone.

#ifdef SAE_FAST_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "checks.h"
#include "sparse_ops.cuh"

namespace sae_fast {

namespace {

sae_fast_kernels::DType kdtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return sae_fast_kernels::DType::F32;
    case at::kBFloat16: return sae_fast_kernels::DType::BF16;
    case at::kHalf: return sae_fast_kernels::DType::F16;
    default: TORCH_CHECK(false, "sae_fast: unsupported dtype ", t);
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

at::Tensor sparse_decode_cuda(const at::Tensor& indices, const at::Tensor& values, const at::Tensor& counts,
                              const at::Tensor& W, const c10::optional<at::Tensor>& bias,
                              c10::optional<at::ScalarType> out_dtype) {
  const auto ot = check_decode_args(indices, values, counts, W, bias, out_dtype);
  c10::cuda::CUDAGuard guard(W.device());
  const int64_t N = indices.size(0), K = indices.size(1), D = W.size(1);
  auto out = at::empty({N, D}, W.options().dtype(ot));
  check_launch(sae_fast_kernels::sparse_decode(kdtype(W.scalar_type()), kdtype(ot), indices.data_ptr<int64_t>(),
                                               values.data_ptr(), counts.data_ptr<int32_t>(), W.data_ptr(),
                                               bias.has_value() ? bias->data_ptr() : nullptr, out.data_ptr(), N, K,
                                               W.size(0), D, c10::cuda::getCurrentCUDAStream()),
               "sae_fast::sparse_decode");
  return out;
}

at::Tensor sparse_gather_dot_cuda(const at::Tensor& grad, const at::Tensor& indices, const at::Tensor& counts,
                                  const at::Tensor& W) {
  const auto gt = check_gather_dot_args(grad, indices, counts, W);
  c10::cuda::CUDAGuard guard(W.device());
  const int64_t N = indices.size(0), K = indices.size(1), D = W.size(1);
  auto out = at::empty({N, K}, grad.options());
  check_launch(
      sae_fast_kernels::sparse_gather_dot(kdtype(W.scalar_type()), kdtype(gt), grad.data_ptr(),
                                          indices.data_ptr<int64_t>(), counts.data_ptr<int32_t>(), W.data_ptr(),
                                          out.data_ptr(), N, K, W.size(0), D, c10::cuda::getCurrentCUDAStream()),
      "sae_fast::sparse_gather_dot");
  return out;
}

at::Tensor sparse_scatter_rows_cuda(const at::Tensor& coef, const at::Tensor& indices, const at::Tensor& counts,
                                    const at::Tensor& grad, int64_t d_sae) {
  const char* op = "sae_fast::sparse_scatter_rows";
  check_scatter_rows_args(coef, indices, counts, grad, d_sae);
  c10::cuda::CUDAGuard guard(grad.device());
  const int64_t N = indices.size(0), K = indices.size(1), D = grad.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  // Group the valid slots by feature (padding keyed d_sae sorts last); a stable
  // sort keeps token order inside a feature, so the sums have a fixed order.
  auto valid = at::arange(K, indices.options()).unsqueeze(0) < counts.to(at::kLong).unsqueeze(1);
  auto key = at::where(valid, indices, d_sae).reshape({-1});
  auto order = std::get<1>(key.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
  auto start = at::zeros({d_sae + 1}, indices.options());
  start.narrow(0, 1, d_sae).copy_(at::bincount(key, {}, d_sae + 1).narrow(0, 0, d_sae).cumsum(0));
  auto out = at::empty({d_sae, D}, grad.options());
  check_launch(sae_fast_kernels::sparse_scatter_rows_segmented(kdtype(grad.scalar_type()), order.data_ptr<int64_t>(),
                                                               start.data_ptr<int64_t>(), coef.data_ptr(),
                                                               grad.data_ptr(), out.data_ptr(), d_sae, N, K, D, stream),
               op);
  return out;
}

void adam_b1zero_rows_cuda(const at::Tensor& param, const at::Tensor& v, const at::Tensor& last,
                           const c10::optional<at::Tensor>& rows, const at::Tensor& grad, int64_t step, double lr,
                           double beta2, double eps, c10::optional<int64_t> sparse_dim, bool renorm) {
  const RowGeometry g = check_adam_rows_args(param, v, last, rows, grad, sparse_dim);
  c10::cuda::CUDAGuard guard(param.device());
  const int64_t n = rows.has_value() ? rows->numel() : 1;
  const float bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))));
  check_launch(sae_fast_kernels::adam_b1zero_rows(
                   kdtype(param.scalar_type()), param.data_ptr(), v.data_ptr<float>(), last.data_ptr<int64_t>(),
                   rows.has_value() ? rows->data_ptr<int64_t>() : nullptr, grad.data_ptr(), n, g.n_rows, g.L, g.s_row,
                   g.s_col, step, static_cast<float>(lr), static_cast<float>(beta2), static_cast<float>(1.0 - beta2),
                   static_cast<float>(eps), bc2_sqrt, renorm, c10::cuda::getCurrentCUDAStream()),
               "sae_fast::adam_b1zero_rows_");
}

}  // namespace

TORCH_LIBRARY_IMPL(sae_fast, CUDA, m) {
  m.impl("sparse_decode", &sparse_decode_cuda);
  m.impl("sparse_gather_dot", &sparse_gather_dot_cuda);
  m.impl("sparse_scatter_rows", &sparse_scatter_rows_cuda);
  m.impl("adam_b1zero_rows_", &adam_b1zero_rows_cuda);
}

}  // namespace sae_fast

#endif  // SAE_FAST_WITH_CUDA
