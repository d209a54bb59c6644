// CUDA kernels of sae_fast::jumprelu_select (see jumprelu_select.cuh). Torch-free.
//
// Design: a warp per piece of a row (jumprelu_select_plan: one piece per row
// when there are >= 4096 rows or the row is <= 2048 columns, else pieces of
// >= 2048 columns, a multiple of 128, so that ~4096 warps run), 8 warps per
// 256-thread block, a grid-stride loop over pieces beyond 2^20 blocks. No
// shared memory and no __syncthreads (the warps of a block are independent):
// warp shuffles with the full mask, in warp-uniform control flow only.
//
//   count pass: the lanes stride the piece (coalesced loads, 4 in flight per
//     lane), count A, N and the steps per lane and reduce them with
//     __shfl_xor_sync; lane 0 writes the piece's three counts.
//   scan (pieces > 1 only): a warp per row turns the pieces' counts into row
//     totals and exclusive prefix sums (each piece's first slot).
//   The entry then takes the largest row counts (one host sync, which the
//   output shapes need anyway) and allocates the outputs.
//   write pass: the warp walks its piece in steps of 32 lanes x 4 consecutive
//     columns; each lane flags its 4 columns, the warp's inclusive scan
//     (__shfl_up_sync) of the per-lane counts, A in the low and N in the high 16
//     bits of one int, gives every lane its first slot, so the entries land in
//     increasing column order; the running base is warp-uniform. The warp of a
//     row's first piece then writes the padding (index 0, value 0) from the
//     row's count to the capacity. Every write is bounded by min(count, capacity)
//     whatever the counts hold; every read by the row's columns.
//
// Cost: memory-bound. pre is read twice (N*C*sizeof(T) per pass; the write pass
// finds it in L2 only for small chunks), threshold from L1/L2, the outputs are
// written once: N*(cap_a*(8+sizeof(T)) + cap_band*8) bytes. At 4096 x 20096 bf16
// (one chunk of the 1 GiB workspace) that is ~330 MB of reads, ~0.1 ms at H100
// bandwidth, against ~0.5 ms for the chunk's GEMM. Registers (ptxas, sm_90a):
// count 28-32, write 40-42 (4 values + flags + pointers), no spills: 6 blocks
// (48 warps) per SM. Not measured on a GPU yet (none was lent when this was written).

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "jumprelu_select.cuh"
#include "device_common.cuh"

namespace sae_fast_kernels {
namespace {

using detail::clamp_count;
using detail::from_f;
using detail::grid_x;
using detail::to_f;
using detail::with_type;

constexpr int kWarps = 8;  // rows per block
constexpr int kThreads = 32 * kWarps;
constexpr int kPer = 4;                  // consecutive columns per lane in the write pass
constexpr int kStep = 32 * kPer;         // columns per warp step of the write pass
constexpr int64_t kTargetPieces = 4096;  // warps wanted per pass (132 SMs x 31): rows are cut below this
constexpr int64_t kMinSegLen = 2048;     // columns per piece, at least (16 write steps)
constexpr unsigned kFull = 0xffffffffu;

// The reference's float32 mask arithmetic (sae_fast/step/encoders.py).
__device__ __forceinline__ int is_active(float p, float t) { return ((p > t) & (p > 0.0f)) | (p != p); }
__device__ __forceinline__ int in_band(float p, float t, float hb) { return fabsf(p - t) < hb; }

// A warp per item (a piece of a row); warps loop over the items past the grid.
__device__ __forceinline__ int64_t warp_item() { return static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; }
__device__ __forceinline__ int64_t warp_stride() { return static_cast<int64_t>(gridDim.x) * kWarps; }

// Piece `item` of the plan: row b, columns [c0, c1). Columns inside a row are
// 32-bit unsigned: C < 2^31 and c0 + seg_len < 2^32 (plan_ok), so no step wraps.
struct Piece {
  int64_t b;
  uint32_t c0, c1;
};

__device__ __forceinline__ Piece piece_of(int64_t item, int64_t C, int64_t segments, int64_t seg_len) {
  const int64_t b = item / segments;
  const int64_t c0 = (item - b * segments) * seg_len;
  const int64_t c1 = c0 + seg_len < C ? c0 + seg_len : C;
  return {b, static_cast<uint32_t>(c0), static_cast<uint32_t>(c1)};
}

template <typename T, bool BAND>
__global__ void select_count_kernel(const T* __restrict__ pre, const float* __restrict__ thr, int64_t N, int64_t C,
                                    int64_t segments, int64_t seg_len, float hb, int32_t* __restrict__ seg_a,
                                    int32_t* __restrict__ seg_n, int64_t* __restrict__ seg_s) {
  const int lane = static_cast<int>(threadIdx.x & 31u);
  for (int64_t item = warp_item(); item < N * segments; item += warp_stride()) {
    const Piece pc = piece_of(item, C, segments, seg_len);
    const T* row = pre + pc.b * C;
    int ca = 0, cn = 0, cs = 0;  // per lane <= C / 32 + 1; C < 2^31
    for (uint32_t j0 = pc.c0 + lane; j0 < pc.c1; j0 += 4 * 32) {
      float p[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // the 4 loads first: 4 in flight per lane
        const uint32_t j = j0 + 32 * i;
        p[i] = j < pc.c1 ? to_f(row[j]) : 0.0f;
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t j = j0 + 32 * i;
        if (j < pc.c1) {
          const float t = thr[j];
          cs += p[i] > t;
          ca += is_active(p[i], t);
          if constexpr (BAND) cn += in_band(p[i], t, hb);
        }
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      ca += __shfl_xor_sync(kFull, ca, off);
      cn += __shfl_xor_sync(kFull, cn, off);
      cs += __shfl_xor_sync(kFull, cs, off);
    }
    if (lane == 0) {
      seg_a[item] = ca;
      seg_n[item] = cn;
      seg_s[item] = cs;
    }
  }
}

// A warp per row: totals, and the pieces' counts replaced by their exclusive prefix sums.
__global__ void select_scan_kernel(int64_t N, int64_t segments, int32_t* __restrict__ seg_a,
                                   int32_t* __restrict__ seg_n, const int64_t* __restrict__ seg_s,
                                   int32_t* __restrict__ a_cnt, int32_t* __restrict__ band_cnt,
                                   int64_t* __restrict__ steps) {
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; b < N; b += stride) {
    int run_a = 0, run_n = 0;  // a row's counts are <= C < 2^31
    int64_t run_s = 0;
    for (int64_t s0 = 0; s0 < segments; s0 += 32) {  // warp-uniform
      const int64_t s = s0 + lane;
      const int64_t at = b * segments + s;
      const int a = s < segments ? seg_a[at] : 0;
      const int n = s < segments ? seg_n[at] : 0;
      int64_t st = s < segments ? seg_s[at] : 0;
      int ia = a, in = n;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int va = __shfl_up_sync(kFull, ia, off);
        const int vn = __shfl_up_sync(kFull, in, off);
        if (lane >= off) {
          ia += va;
          in += vn;
        }
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) st += __shfl_xor_sync(kFull, st, off);
      if (s < segments) {
        seg_a[at] = run_a + ia - a;
        seg_n[at] = run_n + in - n;
      }
      run_a += __shfl_sync(kFull, ia, 31);
      run_n += __shfl_sync(kFull, in, 31);
      run_s += st;
    }
    if (lane == 0) {
      a_cnt[b] = run_a;
      band_cnt[b] = run_n;
      steps[b] = run_s;
    }
  }
}

template <typename T, bool BAND>
__global__ void select_write_kernel(const T* __restrict__ pre, const float* __restrict__ thr, int64_t N, int64_t C,
                                    int64_t segments, int64_t seg_len, float hb, int64_t col_offset,
                                    const int32_t* __restrict__ a_cnt, const int32_t* __restrict__ band_cnt,
                                    const int32_t* __restrict__ a_base, const int32_t* __restrict__ band_base,
                                    int64_t* __restrict__ a_idx, T* __restrict__ a_val, int64_t cap_a,
                                    int64_t* __restrict__ band_idx, int64_t cap_band) {
  const int lane = static_cast<int>(threadIdx.x & 31u);
  for (int64_t item = warp_item(); item < N * segments; item += warp_stride()) {
    const Piece pc = piece_of(item, C, segments, seg_len);
    const T* row = pre + pc.b * C;
    const int64_t ka = clamp_count(a_cnt[pc.b], cap_a);
    int64_t* oi = a_idx + pc.b * cap_a;
    T* ov = a_val + pc.b * cap_a;
    int64_t base_a = a_base ? a_base[item] : 0;  // warp-uniform: the next slot of this piece
    int64_t kn = 0, base_n = 0;
    int64_t* on = nullptr;
    if constexpr (BAND) {
      kn = clamp_count(band_cnt[pc.b], cap_band);
      on = band_idx + pc.b * cap_band;
      base_n = band_base ? band_base[item] : 0;
    }
    for (uint32_t j0 = pc.c0; j0 < pc.c1; j0 += kStep) {  // warp-uniform loop: the shuffles see every lane
      const uint32_t jl = j0 + static_cast<uint32_t>(lane) * kPer;
      T raw[kPer];
      unsigned fa = 0u, fn = 0u;  // bit i: column jl + i is in A / in N
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        raw[i] = from_f<T>(0.0f);
        if (jl + i < pc.c1) {
          raw[i] = row[jl + i];
          const float p = to_f(raw[i]);
          const float t = thr[jl + i];
          fa |= static_cast<unsigned>(is_active(p, t)) << i;
          if constexpr (BAND) fn |= static_cast<unsigned>(in_band(p, t, hb)) << i;
        }
      }
      int mine = 0;
#pragma unroll
      for (int i = 0; i < kPer; ++i) mine += static_cast<int>(((fa >> i) & 1u) + (((fn >> i) & 1u) << 16));
      int incl = mine;  // warp inclusive scan; each half stays below 2^16 (<= 32 * kPer)
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int v = __shfl_up_sync(kFull, incl, off);
        if (lane >= off) incl += v;
      }
      const int total = __shfl_sync(kFull, incl, 31);
      const int excl = incl - mine;
      int64_t pa = base_a + (excl & 0xffff);
      int64_t pn = base_n + (excl >> 16);
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        if ((fa >> i) & 1u) {
          if (pa >= 0 && pa < ka) {
            oi[pa] = col_offset + jl + i;
            ov[pa] = raw[i];
          }
          ++pa;
        }
        if constexpr (BAND) {
          if ((fn >> i) & 1u) {
            if (pn >= 0 && pn < kn) on[pn] = col_offset + jl + i;
            ++pn;
          }
        }
      }
      base_a += total & 0xffff;
      base_n += total >> 16;
    }
    if (pc.c0 == 0) {  // the row's first piece pads it
      for (int64_t k = ka + lane; k < cap_a; k += 32) {
        oi[k] = 0;
        ov[k] = from_f<T>(0.0f);
      }
      if constexpr (BAND)
        for (int64_t k = kn + lane; k < cap_band; k += 32) on[k] = 0;
    }
  }
}

inline unsigned int warp_blocks(int64_t items) {
  const int64_t blocks = (items + kWarps - 1) / kWarps;
  return grid_x(blocks);
}

inline bool plan_ok(int64_t N, int64_t C, SelectPlan plan) {
  // C < 2^31, seg_len <= 2^31 and no piece starting at or past C (one piece when C = 0)
  // keep every in-row column below 2^32 (Piece); N * segments must fit int64.
  const int64_t pieces = C > 0 ? (C + plan.seg_len - 1) / plan.seg_len : 1;
  return N >= 0 && C >= 0 && C <= 0x7fffffffLL && plan.seg_len >= kStep && plan.seg_len <= (int64_t{1} << 31) &&
         plan.seg_len % kStep == 0 && plan.segments >= 1 && plan.segments <= pieces &&
         (N == 0 || plan.segments <= 0x7fffffffffffffffLL / N);
}

}  // namespace

SelectPlan jumprelu_select_plan(int64_t N, int64_t C) {
  auto round_up = [](int64_t v) { return (v + kStep - 1) / kStep * kStep; };
  const int64_t whole = round_up(C > 0 ? C : 1);
  if (N <= 0 || C <= kMinSegLen || N >= kTargetPieces) return {1, whole};
  const int64_t want = (kTargetPieces + N - 1) / N;        // pieces per row to fill the GPU
  const int64_t most = (C + kMinSegLen - 1) / kMinSegLen;  // pieces no shorter than kMinSegLen
  const int64_t s = want < most ? want : most;
  const int64_t len = round_up((C + s - 1) / s);
  return {(C + len - 1) / len, len};
}

cudaError_t jumprelu_select_count(DType t, const void* pre, const float* threshold, int64_t N, int64_t C,
                                  SelectPlan plan, float half_bandwidth, bool band, int32_t* seg_a, int32_t* seg_n,
                                  int64_t* seg_s, cudaStream_t stream) {
  if (!plan_ok(N, C, plan)) return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  const unsigned int grid = warp_blocks(N * plan.segments);
  return with_type(t, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    const T* p = static_cast<const T*>(pre);
    if (band)
      SAE_LAUNCH(grid, kThreads, 0, stream, select_count_kernel<T, true>)(
          p, threshold, N, C, plan.segments, plan.seg_len, half_bandwidth, seg_a, seg_n, seg_s);
    else
      SAE_LAUNCH(grid, kThreads, 0, stream, select_count_kernel<T, false>)(
          p, threshold, N, C, plan.segments, plan.seg_len, half_bandwidth, seg_a, seg_n, seg_s);
    return cudaGetLastError();
  });
}

cudaError_t jumprelu_select_scan(int64_t N, SelectPlan plan, int32_t* seg_a, int32_t* seg_n, const int64_t* seg_s,
                                 int32_t* a_cnt, int32_t* band_cnt, int64_t* steps, cudaStream_t stream) {
  if (N < 0 || plan.segments < 1) return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  SAE_LAUNCH(warp_blocks(N), kThreads, 0, stream, select_scan_kernel)(N, plan.segments, seg_a, seg_n, seg_s, a_cnt,
                                                                      band_cnt, steps);
  return cudaGetLastError();
}

cudaError_t jumprelu_select_write(DType t, const void* pre, const float* threshold, int64_t N, int64_t C,
                                  SelectPlan plan, float half_bandwidth, bool band, int64_t col_offset,
                                  const int32_t* a_cnt, const int32_t* band_cnt, const int32_t* a_base,
                                  const int32_t* band_base, int64_t* a_idx, void* a_val, int64_t cap_a,
                                  int64_t* band_idx, int64_t cap_band, cudaStream_t stream) {
  if (!plan_ok(N, C, plan) || cap_a < 0 || cap_band < 0) return cudaErrorInvalidValue;
  if (plan.segments > 1 && (a_base == nullptr || (band && band_base == nullptr))) return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  const unsigned int grid = warp_blocks(N * plan.segments);
  return with_type(t, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    const T* p = static_cast<const T*>(pre);
    T* v = static_cast<T*>(a_val);
    if (band)
      SAE_LAUNCH(grid, kThreads, 0, stream, select_write_kernel<T, true>)(
          p, threshold, N, C, plan.segments, plan.seg_len, half_bandwidth, col_offset, a_cnt, band_cnt, a_base,
          band_base, a_idx, v, cap_a, band_idx, cap_band);
    else
      SAE_LAUNCH(grid, kThreads, 0, stream, select_write_kernel<T, false>)(
          p, threshold, N, C, plan.segments, plan.seg_len, half_bandwidth, col_offset, a_cnt, band_cnt, a_base,
          band_base, a_idx, v, cap_a, band_idx, cap_band);
    return cudaGetLastError();
  });
}

}  // namespace sae_fast_kernels
