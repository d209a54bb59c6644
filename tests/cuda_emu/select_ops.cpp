// The emulator driver's entry for sae_fast::jumprelu_select: the launch sequence
// of csrc/cuda/jumprelu_select.cu (count, scan when a row has several pieces,
// capacities from the counts, write), with the host's tensors as heap arrays.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "extra_ops.h"
#include "jumprelu_select.cuh"

namespace emu_driver {

namespace {

const char* dtype_name(long long code) { return code == 0 ? "float32" : code == 1 ? "bfloat16" : "float16"; }

std::string meta(const char* dtype, long long d0, long long d1 = -1) {
  return std::string(dtype) + " " + std::to_string(d0) + (d1 >= 0 ? " " + std::to_string(d1) : "");
}

}  // namespace

bool run_extra_select(const std::string& op, const Ints& ints, const Floats& floats, const ArrayOf& array,
                      const Alloc& alloc, int& err) {
  using namespace sae_fast_kernels;
  if (op != "jumprelu_select") return false;
  const long long N = ints.at("N"), C = ints.at("C"), t = ints.at("t");
  const bool band = ints.at("band") != 0;
  const float hb = static_cast<float>(floats.at("half_bandwidth"));
  const DType kt = static_cast<DType>(t);
  const void* pre = array("pre");
  const float* thr = static_cast<const float*>(array("threshold"));
  // the plan of the entry, or one the test names (to run the several-pieces path on small rows)
  SelectPlan plan = jumprelu_select_plan(N, C);
  if (ints.count("segments")) plan = SelectPlan{ints.at("segments"), ints.at("seg_len")};
  auto i32 = [&](const char* name, long long n) { return static_cast<int32_t*>(alloc(name, 4 * n, meta("int32", n))); };
  int32_t* a_cnt = i32("a_cnt", N);
  int32_t* band_cnt = i32("band_cnt", N);
  auto* steps = static_cast<int64_t*>(alloc("steps", 8 * N, meta("int64", N)));
  int32_t *a_base = nullptr, *band_base = nullptr;
  if (plan.segments == 1) {
    err = jumprelu_select_count(kt, pre, thr, N, C, plan, hb, band, a_cnt, band_cnt, steps, nullptr);
  } else {
    const long long segs = N * plan.segments;
    a_base = i32("a_base", segs);
    band_base = i32("band_base", segs);
    auto* seg_s = static_cast<int64_t*>(alloc("seg_s", 8 * segs, meta("int64", segs)));
    err = jumprelu_select_count(kt, pre, thr, N, C, plan, hb, band, a_base, band_base, seg_s, nullptr);
    if (err == 0) err = jumprelu_select_scan(N, plan, a_base, band_base, seg_s, a_cnt, band_cnt, steps, nullptr);
  }
  if (err != 0) return true;
  long long cap_a = 0, cap_band = 0;
  for (long long b = 0; b < N; ++b) {
    cap_a = std::max<long long>(cap_a, a_cnt[b]);
    if (band) cap_band = std::max<long long>(cap_band, band_cnt[b]);
  }
  const size_t esz = t == 0 ? 4 : 2;
  auto* a_idx = static_cast<int64_t*>(alloc("a_idx", 8 * N * cap_a, meta("int64", N, cap_a)));
  void* a_val = alloc("a_val", esz * N * cap_a, meta(dtype_name(t), N, cap_a));
  auto* band_idx = static_cast<int64_t*>(alloc("band_idx", 8 * N * cap_band, meta("int64", N, cap_band)));
  // poisoned, as the host's at::empty would hold anything: every slot must be written
  std::fill(a_idx, a_idx + N * cap_a, int64_t{-7});
  std::memset(a_val, 0xff, esz * N * cap_a);  // NaN in every float dtype
  std::fill(band_idx, band_idx + N * cap_band, int64_t{-7});
  err = jumprelu_select_write(kt, pre, thr, N, C, plan, hb, band, ints.at("col_offset"), a_cnt, band_cnt, a_base,
                              band_base, a_idx, a_val, cap_a, band_idx, cap_band, nullptr);
  return true;
}

}  // namespace emu_driver
