// CPU kernel of sae_fast::jumprelu_select (the op is defined in csrc/ops.cpp; its
// argument checks, shared with the CUDA entry csrc/cuda/jumprelu_select.cu, are in
// csrc/checks.h), and its registration for the CPU dispatch key.
//
// The rows are split into parts, one parallel task each. Pass 1 reads each row of
// pre once: blocks of 256 columns are flagged with branch-free, vectorised compares
// (the step count comes from the same compares), and the flagged columns are
// compacted into the part's growing buffers (column as int32, value as T), skipping
// 8 unflagged columns at a time. Pass 2, once the capacities are known, copies each
// row's entries out and writes its padding. pre is read once; the buffers hold only
// the selected entries.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "checks.h"

namespace sae_fast {

namespace {

constexpr int64_t kBlock = 256;            // columns flagged per vectorised pass (the flags stay in L1)
constexpr int64_t kWorkPerPart = 1 << 16;  // pre elements per parallel task, at least

// float32 values of pre, written so that the flag loop vectorises (c10's own
// conversions compile to a branch per element for float16 without F16C).
inline float bits_to_f32(uint32_t w) {
  float f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}
inline uint32_t f32_to_bits(float f) {
  uint32_t w;
  std::memcpy(&w, &f, sizeof(w));
  return w;
}
inline float to_f32(float v) { return v; }
inline float to_f32(c10::BFloat16 v) { return bits_to_f32(static_cast<uint32_t>(v.x) << 16); }
// Exact for every float16 (the same float as c10's conversion; NaN stays NaN): the normal
// exponent rebased 15 -> 127 (twice for inf/NaN), zero and subnormals as m * 2^-24, picked
// by masks rather than branches or selects.
inline float to_f32(c10::Half v) {
  const uint32_t h = v.x;
  const uint32_t em = h & 0x7fffu;
  const uint32_t special = 0u - static_cast<uint32_t>(em >= 0x7c00u);  // all ones for inf / NaN
  const uint32_t sub = 0u - static_cast<uint32_t>(em < 0x0400u);       // all ones for zero / subnormal
  const uint32_t normal = (em << 13) + 0x38000000u + (special & 0x38000000u);
  const uint32_t subv = f32_to_bits(static_cast<float>(static_cast<int32_t>(em & 0x3ffu)) * 0x1.0p-24f);
  return bits_to_f32(((h & 0x8000u) << 16) | (sub & subv) | (~sub & normal));
}

template <typename T>
struct Part {
  std::vector<int32_t> a_col, n_col;
  std::vector<T> a_val;
  int64_t a_used = 0, n_used = 0;
};

// At least `need` slots past `used` (geometric growth: amortised O(1) per slot).
template <typename V>
inline V* room(std::vector<V>& v, int64_t used, int64_t need) {
  if (static_cast<int64_t>(v.size()) < used + need)
    v.resize(static_cast<size_t>(std::max<int64_t>(used + need, 2 * static_cast<int64_t>(v.size()))));
  return v.data() + used;
}

// One row: appends its A and N entries to the part's buffers; sets |A|, |N| and the steps.
// Per block of kBlock columns: a branch-free, vectorised pass writes one flag byte per
// column (bit 0: in A, bit 1: in N) and counts the steps; then the flags are scanned
// 8 at a time, a zero word (the common case) is skipped, and the columns of a
// nonzero word are compacted branch-free.
template <typename T, bool BAND>
void select_row(const T* __restrict__ p, const float* __restrict__ thr, int64_t C, float hb, Part<T>& part,
                int32_t& a_cnt, int32_t& band_cnt, int64_t& steps) {
  // Branch-free writes land at most one slot past the last entry, so C slots suffice.
  int32_t* __restrict__ ac = room(part.a_col, part.a_used, C);
  T* __restrict__ av = room(part.a_val, part.a_used, C);
  int32_t* __restrict__ nc = BAND ? room(part.n_col, part.n_used, C) : nullptr;
  int64_t ka = 0, kn = 0, st = 0;
  alignas(64) uint8_t m[kBlock];
  auto emit = [&](int64_t j0, int64_t i) {
    const int32_t fl = m[i];
    ac[ka] = static_cast<int32_t>(j0 + i);
    av[ka] = p[j0 + i];
    ka += fl & 1;
    if constexpr (BAND) {
      nc[kn] = static_cast<int32_t>(j0 + i);
      kn += fl >> 1;
    }
  };
  for (int64_t j0 = 0; j0 < C; j0 += kBlock) {
    const int64_t len = std::min<int64_t>(kBlock, C - j0);
    const T* __restrict__ pp = p + j0;
    const float* __restrict__ tt = thr + j0;
    int32_t gts = 0;
    for (int64_t i = 0; i < len; ++i) {
      const float f = to_f32(pp[i]);
      const float t = tt[i];
      const int32_t gt = f > t;
      int32_t fl = (gt & (f > 0.f)) | (f != f);
      if constexpr (BAND) fl |= static_cast<int32_t>(std::fabs(f - t) < hb) << 1;
      m[i] = static_cast<uint8_t>(fl);
      gts += gt;
    }
    st += gts;
    int64_t i0 = 0;
    for (; i0 + 8 <= len; i0 += 8) {
      uint64_t w;
      std::memcpy(&w, m + i0, 8);
      if (w)
        for (int64_t i = i0; i < i0 + 8; ++i) emit(j0, i);
    }
    for (int64_t i = i0; i < len; ++i) emit(j0, i);
  }
  part.a_used += ka;
  if constexpr (BAND) part.n_used += kn;
  a_cnt = static_cast<int32_t>(ka);
  band_cnt = static_cast<int32_t>(kn);
  steps = st;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> select_cpu(
    const at::Tensor& pre, const at::Tensor& threshold, float hb, bool band, int64_t col_offset) {
  const int64_t N = pre.size(0), C = pre.size(1);
  auto a_cnt = at::empty({N}, pre.options().dtype(at::kInt));
  auto band_cnt = at::empty({N}, pre.options().dtype(at::kInt));
  auto steps = at::empty({N}, pre.options().dtype(at::kLong));
  const T* P = pre.data_ptr<T>();
  const float* thr = threshold.data_ptr<float>();
  int32_t* acnt = a_cnt.data_ptr<int32_t>();
  int32_t* ncnt = band_cnt.data_ptr<int32_t>();
  int64_t* stp = steps.data_ptr<int64_t>();

  // Parts: contiguous row ranges of >= kWorkPerPart elements, a few per thread for balance.
  const int64_t work = N * std::max<int64_t>(C, 1);
  const int64_t max_parts = std::max<int64_t>(1, 4 * static_cast<int64_t>(at::get_num_threads()));
  const int64_t n_parts = std::max<int64_t>(1, std::min({N, max_parts, work / kWorkPerPart}));
  const int64_t rows_per = N > 0 ? (N + n_parts - 1) / n_parts : 0;
  std::vector<Part<T>> parts(static_cast<size_t>(n_parts));
  std::vector<int64_t> a_start(static_cast<size_t>(N)), n_start(static_cast<size_t>(N));

  // pass 1: select into the part buffers
  at::parallel_for(0, n_parts, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      Part<T>& part = parts[static_cast<size_t>(q)];
      const int64_t r1 = std::min(N, (q + 1) * rows_per);
      for (int64_t b = q * rows_per; b < r1; ++b) {
        a_start[static_cast<size_t>(b)] = part.a_used;
        n_start[static_cast<size_t>(b)] = part.n_used;
        if (band)
          select_row<T, true>(P + b * C, thr, C, hb, part, acnt[b], ncnt[b], stp[b]);
        else
          select_row<T, false>(P + b * C, thr, C, hb, part, acnt[b], ncnt[b], stp[b]);
      }
    }
  });

  int64_t cap_a = 0, cap_band = 0;
  for (int64_t b = 0; b < N; ++b) {
    cap_a = std::max<int64_t>(cap_a, acnt[b]);
    cap_band = std::max<int64_t>(cap_band, ncnt[b]);
  }
  auto a_idx = at::empty({N, cap_a}, pre.options().dtype(at::kLong));
  auto a_val = at::empty({N, cap_a}, pre.options());
  auto band_idx = at::empty({N, cap_band}, pre.options().dtype(at::kLong));
  int64_t* ai = a_idx.data_ptr<int64_t>();
  T* av = a_val.data_ptr<T>();
  int64_t* ni = band_idx.data_ptr<int64_t>();

  // pass 2: copy out, with the padding (index 0, value 0)
  at::parallel_for(0, n_parts, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const Part<T>& part = parts[static_cast<size_t>(q)];
      const int64_t r1 = std::min(N, (q + 1) * rows_per);
      for (int64_t b = q * rows_per; b < r1; ++b) {
        const int64_t ka = acnt[b], kn = ncnt[b];
        const int32_t* col = part.a_col.data() + a_start[static_cast<size_t>(b)];
        const T* val = part.a_val.data() + a_start[static_cast<size_t>(b)];
        int64_t* oi = ai + b * cap_a;
        T* ov = av + b * cap_a;
        for (int64_t k = 0; k < ka; ++k) oi[k] = col_offset + col[k];
        if (ka) std::memcpy(ov, val, static_cast<size_t>(ka) * sizeof(T));
        for (int64_t k = ka; k < cap_a; ++k) {
          oi[k] = 0;
          ov[k] = static_cast<T>(0.f);
        }
        if (cap_band) {
          const int32_t* ncol = part.n_col.data() + n_start[static_cast<size_t>(b)];
          int64_t* on = ni + b * cap_band;
          for (int64_t k = 0; k < kn; ++k) on[k] = col_offset + ncol[k];
          for (int64_t k = kn; k < cap_band; ++k) on[k] = 0;
        }
      }
    }
  });
  return {a_idx, a_val, a_cnt, band_idx, band_cnt, steps};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> jumprelu_select_cpu(
    const at::Tensor& pre, const at::Tensor& threshold, double half_bandwidth, bool band, int64_t col_offset) {
  check_jumprelu_select_args(pre, threshold, half_bandwidth, col_offset);
  TORCH_CHECK(pre.is_cpu(), "sae_fast::jumprelu_select: the CPU kernel got pre on ", pre.device());
  // the reference compares against torch.tensor(half_bandwidth, dtype=float32)
  const float hb = static_cast<float>(half_bandwidth);
  switch (pre.scalar_type()) {
    case at::kFloat: return select_cpu<float>(pre, threshold, hb, band, col_offset);
    case at::kBFloat16: return select_cpu<c10::BFloat16>(pre, threshold, hb, band, col_offset);
    case at::kHalf: return select_cpu<c10::Half>(pre, threshold, hb, band, col_offset);
    default: TORCH_CHECK(false, "sae_fast::jumprelu_select: unsupported dtype ", pre.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(sae_fast, CPU, m) { m.impl("jumprelu_select", &jumprelu_select_cpu); }

}  // namespace sae_fast
