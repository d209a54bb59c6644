// CUDA entry of sae_fast::jumprelu_select (the op is defined and documented in
// csrc/ops.cpp), and its registration for the CUDA dispatch key: the checks of
// csrc/checks.h, the allocation, and the launchers of kernels/jumprelu_select.cuh
// on PyTorch's current stream.
// Deliberately avoids ATen/cuda/CUDAContext.h (it pulls in cuBLAS headers).
// Compiled only in a CUDA build (setup.py adds csrc/cuda/*.cu together with
// SAE_FAST_WITH_CUDA); a CPU-only build registers the CPU kernel alone.

#ifdef SAE_FAST_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "jumprelu_select.cuh"

namespace sae_fast {

namespace {

sae_fast_kernels::DType select_kdtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return sae_fast_kernels::DType::F32;
    case at::kBFloat16: return sae_fast_kernels::DType::BF16;
    case at::kHalf: return sae_fast_kernels::DType::F16;
    default: TORCH_CHECK(false, "sae_fast::jumprelu_select: unsupported dtype ", t);
  }
}

void check_select_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "sae_fast::jumprelu_select: CUDA ", what, " failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> jumprelu_select_cuda(
    const at::Tensor& pre, const at::Tensor& threshold, double half_bandwidth, bool band, int64_t col_offset) {
  check_jumprelu_select_args(pre, threshold, half_bandwidth, col_offset);
  TORCH_CHECK(pre.is_cuda(), "sae_fast::jumprelu_select: the CUDA kernel got pre on ", pre.device());
  c10::cuda::CUDAGuard guard(pre.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = pre.size(0), C = pre.size(1);
  const auto kt = select_kdtype(pre.scalar_type());
  const float hb = static_cast<float>(half_bandwidth);  // the reference's float32 half bandwidth
  const auto plan = sae_fast_kernels::jumprelu_select_plan(N, C);

  auto a_cnt = at::empty({N}, pre.options().dtype(at::kInt));
  auto band_cnt = at::empty({N}, pre.options().dtype(at::kInt));
  auto steps = at::empty({N}, pre.options().dtype(at::kLong));
  at::Tensor a_base, band_base;  // each piece's first slot, with several pieces per row
  if (plan.segments == 1) {
    check_select_launch(sae_fast_kernels::jumprelu_select_count(
                            kt, pre.data_ptr(), threshold.data_ptr<float>(), N, C, plan, hb, band,
                            a_cnt.data_ptr<int32_t>(), band_cnt.data_ptr<int32_t>(), steps.data_ptr<int64_t>(), stream),
                        "count");
  } else {
    a_base = at::empty({N, plan.segments}, a_cnt.options());
    band_base = at::empty({N, plan.segments}, a_cnt.options());
    auto seg_s = at::empty({N, plan.segments}, steps.options());
    check_select_launch(
        sae_fast_kernels::jumprelu_select_count(kt, pre.data_ptr(), threshold.data_ptr<float>(), N, C, plan, hb, band,
                                                a_base.data_ptr<int32_t>(), band_base.data_ptr<int32_t>(),
                                                seg_s.data_ptr<int64_t>(), stream),
        "count");
    check_select_launch(
        sae_fast_kernels::jumprelu_select_scan(N, plan, a_base.data_ptr<int32_t>(), band_base.data_ptr<int32_t>(),
                                               seg_s.data_ptr<int64_t>(), a_cnt.data_ptr<int32_t>(),
                                               band_cnt.data_ptr<int32_t>(), steps.data_ptr<int64_t>(), stream),
        "scan");
  }

  // The capacities: one device-to-host copy (the output shapes depend on the data).
  int64_t cap_a = 0, cap_band = 0;
  if (N > 0) {
    auto caps = (band ? at::stack({a_cnt.max(), band_cnt.max()}) : a_cnt.max().reshape({1})).cpu();
    cap_a = caps[0].item<int64_t>();
    cap_band = band ? caps[1].item<int64_t>() : 0;
  }
  auto a_idx = at::empty({N, cap_a}, pre.options().dtype(at::kLong));
  auto a_val = at::empty({N, cap_a}, pre.options());
  auto band_idx = at::empty({N, cap_band}, pre.options().dtype(at::kLong));
  check_select_launch(
      sae_fast_kernels::jumprelu_select_write(
          kt, pre.data_ptr(), threshold.data_ptr<float>(), N, C, plan, hb, band, col_offset, a_cnt.data_ptr<int32_t>(),
          band_cnt.data_ptr<int32_t>(), plan.segments == 1 ? nullptr : a_base.data_ptr<int32_t>(),
          plan.segments == 1 ? nullptr : band_base.data_ptr<int32_t>(), a_idx.data_ptr<int64_t>(), a_val.data_ptr(),
          cap_a, band_idx.data_ptr<int64_t>(), cap_band, stream),
      "write");
  return {a_idx, a_val, a_cnt, band_idx, band_cnt, steps};
}

}  // namespace

TORCH_LIBRARY_IMPL(sae_fast, CUDA, m) { m.impl("jumprelu_select", &jumprelu_select_cuda); }

}  // namespace sae_fast

#endif  // SAE_FAST_WITH_CUDA
