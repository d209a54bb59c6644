// CUDA kernels for sae_fast's sparse primitives (see sparse_ops.cuh).
//
// Rows of W are read with 16-byte vector loads when d_in allows it (d_in a
// multiple of 16 / sizeof(T) and 16-byte aligned pointers; the launchers check
// and fall back to scalar loads). Gemma widths (2304, 3584) always vectorise.
//
// Cost of these choices (python -m benchmarks.kernel_resources, sm_90a / sm_80, every
// dtype and vector width, no spills, no local memory): 128-thread blocks for decode,
// gather-dot and scatter, 30-48 registers, 62.5-100% theoretical occupancy (the
// vectorised fp32-out decode and the segmented scatter hold VEC float accumulators:
// 43 and 48 registers, 62.5-75%); the 256-thread Adam kernels 37-38 registers, 75%.
// All are memory-bound: occupancy above ~50% hides the latency of their loads.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "device_common.cuh"
#include "sparse_ops.cuh"

namespace sae_fast_kernels {
namespace {

using detail::clamp_count;
using detail::from_f;
using detail::grid_x;
using detail::in_range;
using detail::to_f;
using detail::with_type;

constexpr int kThreads = 128;
constexpr int kTile = 128;  // (index, value) pairs of a row staged in shared memory at a time

// VEC elements of T starting at p, as floats: 16-byte loads when VEC > 1.
template <typename T, int VEC>
__device__ __forceinline__ void load_f(const T* p, float (&f)[VEC]) {
  if constexpr (VEC == 1) {
    f[0] = to_f(p[0]);
  } else {
    static_assert((VEC * sizeof(T)) % 16 == 0, "vector width must fill 16-byte loads");
    constexpr int per = 16 / sizeof(T);
#pragma unroll
    for (int i = 0; i < VEC / per; ++i) {
      const uint4 u = reinterpret_cast<const uint4*>(p)[i];
      const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int j = 0; j < per; ++j) f[i * per + j] = to_f(e[j]);
    }
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_f(T* p, const float (&f)[VEC]) {
  if constexpr (VEC == 1) {
    p[0] = from_f<T>(f[0]);
  } else {
    constexpr int per = 16 / sizeof(T);
#pragma unroll
    for (int i = 0; i < VEC / per; ++i) {
      uint4 u;
      T* e = reinterpret_cast<T*>(&u);
#pragma unroll
      for (int j = 0; j < per; ++j) e[j] = from_f<T>(f[i * per + j]);
      reinterpret_cast<uint4*>(p)[i] = u;
    }
  }
}

// Memory safety (detail::clamp_count, detail::in_range): a count outside [0, K]
// is clamped; a slot whose index lies outside [0, S) contributes nothing
// (decode, scatter) or reads as 0 (gather-dot); an optimizer row outside
// [0, n_rows) is skipped.

// ------------------------------------------------------------------ decode
// One block per (token, chunk of kThreads * VEC columns); blocks loop over the
// tokens and chunks past the grid (grid-stride in x and y). The row's (index,
// value) pairs are staged in shared memory and every thread walks them, so each
// W row is read once per chunk with coalesced 16-byte loads.
template <typename T, typename O, int VEC>
__global__ void sparse_decode_kernel(const int64_t* __restrict__ idx, const T* __restrict__ val,
                                     const int32_t* __restrict__ cnt, const T* __restrict__ W,
                                     const T* __restrict__ bias, O* __restrict__ out, int64_t N, int64_t K, int64_t S,
                                     int64_t D) {
  __shared__ int64_t s_idx[kTile];
  __shared__ float s_val[kTile];
  const int64_t chunk = static_cast<int64_t>(blockDim.x) * VEC;
  const int64_t n_chunks = (D + chunk - 1) / chunk;
  for (int64_t b = blockIdx.x; b < N; b += gridDim.x) {
    const int64_t c = clamp_count(cnt[b], K);
    const int64_t row0 = b * K;
    for (int64_t cy = blockIdx.y; cy < n_chunks; cy += gridDim.y) {
      const int64_t d0 = cy * chunk + static_cast<int64_t>(threadIdx.x) * VEC;
      const bool active = d0 < D;  // with VEC > 1, D % VEC == 0, so the whole vector is in range
      float acc[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] = 0.f;
      if (active && bias != nullptr) load_f<T, VEC>(bias + d0, acc);
      for (int64_t k0 = 0; k0 < c; k0 += kTile) {
        const int n = static_cast<int>(c - k0 < kTile ? c - k0 : kTile);
        for (int t = threadIdx.x; t < n; t += blockDim.x) {
          const int64_t j = idx[row0 + k0 + t];
          const bool ok = in_range(j, S);
          s_idx[t] = ok ? j : 0;
          s_val[t] = ok ? to_f(val[row0 + k0 + t]) : 0.f;  // an invalid slot adds 0 * W[0]
        }
        __syncthreads();
        if (active) {
          for (int t = 0; t < n; ++t) {
            float w[VEC];
            load_f<T, VEC>(W + s_idx[t] * D + d0, w);
            const float v = s_val[t];
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[e] = fmaf(v, w[e], acc[e]);
          }
        }
        __syncthreads();
      }
      if (active) store_f<O, VEC>(out + b * D + d0, acc);
    }
  }
}

// -------------------------------------------------------------- gather-dot
// One warp per slot (b, k): a strided dot over D, then a warp reduction. Warps
// loop over the slots past the grid; the loop bound depends on the warp only,
// so every lane of a warp reaches the shuffles together.
template <typename T, typename G, int VEC>
__global__ void sparse_gather_dot_kernel(const G* __restrict__ grad, const int64_t* __restrict__ idx,
                                         const int32_t* __restrict__ cnt, const T* __restrict__ W, G* __restrict__ out,
                                         int64_t N, int64_t K, int64_t S, int64_t D) {
  const int64_t warps = blockDim.x / 32;
  const int lane = threadIdx.x & 31;
  for (int64_t slot = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / 32; slot < N * K;
       slot += static_cast<int64_t>(gridDim.x) * warps) {
    const int64_t b = slot / K;
    const int64_t k = slot - b * K;
    float s = 0.f;
    const int64_t j = k < clamp_count(cnt[b], K) ? idx[slot] : -1;
    if (in_range(j, S)) {
      const T* row = W + j * D;
      const G* g = grad + b * D;
      for (int64_t d = static_cast<int64_t>(lane) * VEC; d < D; d += 32 * VEC) {
        float w[VEC], x[VEC];
        load_f<T, VEC>(row + d, w);
        load_f<G, VEC>(g + d, x);
#pragma unroll
        for (int e = 0; e < VEC; ++e) s = fmaf(w[e], x[e], s);
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
    if (lane == 0) out[slot] = from_f<G>(s);
  }
}

// ------------------------------------------------------------ scatter-rows
// Deterministic: block (j, chunk) sums feature j's entries in their listed order.
// Blocks loop over the features and chunks past the grid.
template <typename T, int VEC>
__global__ void sparse_scatter_rows_segmented_kernel(const int64_t* __restrict__ order,
                                                     const int64_t* __restrict__ start, const T* __restrict__ coef,
                                                     const T* __restrict__ grad, T* __restrict__ out, int64_t S,
                                                     int64_t NK, int64_t K, int64_t D) {
  const int64_t chunk = static_cast<int64_t>(blockDim.x) * VEC;
  const int64_t n_chunks = (D + chunk - 1) / chunk;
  for (int64_t j = blockIdx.x; j < S; j += gridDim.x) {
    for (int64_t cy = blockIdx.y; cy < n_chunks; cy += gridDim.y) {
      const int64_t d0 = cy * chunk + static_cast<int64_t>(threadIdx.x) * VEC;
      if (d0 >= D) continue;
      float acc[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] = 0.f;
      // start is the host's exclusive scan, so 0 <= start[j] <= start[j+1] <= NK;
      // the clamps keep a corrupted one in bounds all the same
      const int64_t e0 = start[j] < 0 ? 0 : start[j];
      const int64_t e1 = start[j + 1] > NK ? NK : start[j + 1];
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t slot = order[e];
        if (!in_range(slot, NK)) continue;
        const float c = to_f(coef[slot]);
        float g[VEC];
        load_f<T, VEC>(grad + (slot / K) * D + d0, g);
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[v] = fmaf(c, g[v], acc[v]);
      }
      store_f<T, VEC>(out + j * D + d0, acc);
    }
  }
}

// ---------------------------------------------------------------- dispatch
template <typename T>
constexpr int vec_of() {
  return 16 / static_cast<int>(sizeof(T));
}

inline bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Grid sizes: at most max_blocks() blocks in x and 65535 in y; the kernels loop
// over the rest, so every size the ops accept launches within CUDA's limits.
inline unsigned int grid_cols(int64_t D, int vec) {
  const int64_t chunk = static_cast<int64_t>(kThreads) * vec;
  const int64_t n = (D + chunk - 1) / chunk;
  const int64_t cap = SAE_MAX_BLOCKS < 65535 ? SAE_MAX_BLOCKS : 65535;
  return static_cast<unsigned int>(n < cap ? (n > 0 ? n : 1) : cap);
}

// ---- the fused optimizer step
constexpr int kAdamThreads = 256;

__device__ __forceinline__ float row_decay(const int64_t* last, int64_t j, int64_t step, float beta2) {
  const int64_t missed = step - 1 - last[j];
  return missed == 0 ? 1.0f : static_cast<float>(pow(static_cast<double>(beta2), static_cast<double>(missed)));
}

// New value of one element; writes its second moment.
template <typename T>
__device__ __forceinline__ float adam_elem(const T* param, float* v, int64_t off, float g, float decay, float lr,
                                           float beta2, float omb2, float eps, float bc2_sqrt) {
  const float vi = v[off] * decay * beta2 + omb2 * g * g;
  v[off] = vi;
  return to_f(param[off]) - lr * (g / (sqrtf(vi) / bc2_sqrt + eps));
}

// Long rows (W_enc columns, W_dec rows): a block per row, blocks looping over
// the rows past the grid. With renorm the row is swept twice: the first pass
// writes v and sums the squares of the new values, the second recomputes each
// new value from the same inputs and writes it scaled (no per-row buffer, and
// the param is rounded once). A row outside [0, n_rows) is skipped (the loop
// condition is uniform over the block, so the barriers stay convergent).
template <typename T>
__global__ void adam_rows_kernel(T* param, float* v, const int64_t* last, const int64_t* rows, const T* grad, int64_t n,
                                 int64_t n_rows, int64_t L, int64_t s_row, int64_t s_col, int64_t step, float lr,
                                 float beta2, float omb2, float eps, float bc2_sqrt, bool renorm) {
  __shared__ float partial[kAdamThreads / 32];
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const int64_t j = rows ? rows[r] : r;
    if (!in_range(j, n_rows)) continue;
    const float decay = row_decay(last, j, step, beta2);
    const T* g = grad + r * L;
    const int64_t base = j * s_row;
    float sq = 0.0f;
    for (int64_t i = threadIdx.x; i < L; i += blockDim.x) {
      const int64_t off = base + i * s_col;
      const float p = adam_elem(param, v, off, to_f(g[i]), decay, lr, beta2, omb2, eps, bc2_sqrt);
      if (renorm) {
        sq += p * p;
      } else {
        param[off] = from_f<T>(p);
      }
    }
    if (!renorm) continue;
    for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, o);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = sq;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total += partial[w];
    const float nrm = fmaxf(sqrtf(total), 1e-12f);
    for (int64_t i = threadIdx.x; i < L; i += blockDim.x) {
      const int64_t off = base + i * s_col;
      const float gi = to_f(g[i]);
      const float p = to_f(param[off]) - lr * (gi / (sqrtf(v[off]) / bc2_sqrt + eps));  // v[off] is this step's
      param[off] = from_f<T>(p / nrm);
    }
    __syncthreads();  // every thread has read `partial` before the next row writes it
  }
}

// Short rows (b_enc, threshold: L = 1; b_dec as one row): a thread per element.
template <typename T>
__global__ void adam_elems_kernel(T* param, float* v, const int64_t* last, const int64_t* rows, const T* grad,
                                  int64_t n, int64_t n_rows, int64_t L, int64_t s_row, int64_t s_col, int64_t step,
                                  float lr, float beta2, float omb2, float eps, float bc2_sqrt) {
  const int64_t total = n * L;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / L, i = e % L;
    const int64_t j = rows ? rows[r] : r;
    if (!in_range(j, n_rows)) continue;
    const int64_t off = j * s_row + i * s_col;
    param[off] = from_f<T>(
        adam_elem(param, v, off, to_f(grad[e]), row_decay(last, j, step, beta2), lr, beta2, omb2, eps, bc2_sqrt));
  }
}

// After the update kernels (stream order), so no thread reads a `last` already advanced.
__global__ void set_last_kernel(int64_t* last, const int64_t* rows, int64_t n, int64_t n_rows, int64_t step) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < n;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = rows ? rows[r] : r;
    if (in_range(j, n_rows)) last[j] = step;
  }
}

inline unsigned int grid_1d(int64_t work, int threads) { return grid_x((work + threads - 1) / threads); }

}  // namespace

cudaError_t sparse_decode(DType w, DType out_dtype, const int64_t* indices, const void* values, const int32_t* counts,
                          const void* W, const void* bias, void* out, int64_t N, int64_t K, int64_t S, int64_t D,
                          cudaStream_t stream) {
  if (N == 0 || D == 0) return cudaSuccess;
  return with_type(w, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    auto run = [&](auto otag) -> cudaError_t {
      using O = decltype(otag);
      constexpr int V = vec_of<T>() > vec_of<O>() ? vec_of<T>() : vec_of<O>();  // whole 16-byte loads on both sides
      const bool vec = D % V == 0 && aligned16(W) && aligned16(bias) && aligned16(out);
      if (vec) {
        dim3 grid(grid_x(N), grid_cols(D, V));
        SAE_LAUNCH(grid, kThreads, 0, stream, sparse_decode_kernel<T, O, V>)(
            indices, static_cast<const T*>(values), counts, static_cast<const T*>(W), static_cast<const T*>(bias),
            static_cast<O*>(out), N, K, S, D);
      } else {
        dim3 grid(grid_x(N), grid_cols(D, 1));
        SAE_LAUNCH(grid, kThreads, 0, stream, sparse_decode_kernel<T, O, 1>)(
            indices, static_cast<const T*>(values), counts, static_cast<const T*>(W), static_cast<const T*>(bias),
            static_cast<O*>(out), N, K, S, D);
      }
      return cudaGetLastError();
    };
    if (out_dtype == DType::F32) return run(float{});
    if (out_dtype != w) return cudaErrorInvalidValue;
    return run(T{});
  });
}

cudaError_t sparse_gather_dot(DType w, DType g, const void* grad, const int64_t* indices, const int32_t* counts,
                              const void* W, void* out, int64_t N, int64_t K, int64_t S, int64_t D,
                              cudaStream_t stream) {
  if (N == 0 || K == 0) return cudaSuccess;
  return with_type(w, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    auto run = [&](auto gtag) -> cudaError_t {
      using G = decltype(gtag);
      constexpr int V = vec_of<T>() > vec_of<G>() ? vec_of<T>() : vec_of<G>();
      constexpr int warps = kThreads / 32;
      const unsigned int blocks = grid_x((N * K + warps - 1) / warps);
      if (D % V == 0 && aligned16(W) && aligned16(grad)) {
        SAE_LAUNCH(blocks, kThreads, 0, stream, sparse_gather_dot_kernel<T, G, V>)(
            static_cast<const G*>(grad), indices, counts, static_cast<const T*>(W), static_cast<G*>(out), N, K, S, D);
      } else {
        SAE_LAUNCH(blocks, kThreads, 0, stream, sparse_gather_dot_kernel<T, G, 1>)(
            static_cast<const G*>(grad), indices, counts, static_cast<const T*>(W), static_cast<G*>(out), N, K, S, D);
      }
      return cudaGetLastError();
    };
    if (g == DType::F32) return run(float{});
    if (g != w) return cudaErrorInvalidValue;
    return run(T{});
  });
}

cudaError_t sparse_scatter_rows_segmented(DType t, const int64_t* order, const int64_t* start, const void* coef,
                                          const void* grad, void* out, int64_t S, int64_t N, int64_t K, int64_t D,
                                          cudaStream_t stream) {
  if (S == 0 || D == 0) return cudaSuccess;
  if (K == 0) K = 1;  // no entries (start is all zeros): every row is written as zeros
  return with_type(t, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    constexpr int V = vec_of<T>();
    if (D % V == 0 && aligned16(grad) && aligned16(out)) {
      dim3 grid(grid_x(S), grid_cols(D, V));
      SAE_LAUNCH(grid, kThreads, 0, stream, sparse_scatter_rows_segmented_kernel<T, V>)(
          order, start, static_cast<const T*>(coef), static_cast<const T*>(grad), static_cast<T*>(out), S, N * K, K, D);
    } else {
      dim3 grid(grid_x(S), grid_cols(D, 1));
      SAE_LAUNCH(grid, kThreads, 0, stream, sparse_scatter_rows_segmented_kernel<T, 1>)(
          order, start, static_cast<const T*>(coef), static_cast<const T*>(grad), static_cast<T*>(out), S, N * K, K, D);
    }
    return cudaGetLastError();
  });
}

cudaError_t adam_b1zero_rows(DType t, void* param, float* v, int64_t* last, const int64_t* rows, const void* grad,
                             int64_t n, int64_t n_rows, int64_t L, int64_t s_row, int64_t s_col, int64_t step, float lr,
                             float beta2, float one_minus_beta2, float eps, float bc2_sqrt, bool renorm,
                             cudaStream_t stream) {
  if (n == 0 || L == 0) return cudaSuccess;
  cudaError_t err = with_type(t, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    // A block per row once a row fills most of a block's threads (measured choice
    // pending: no GPU was lent when this was written); renorm always needs it.
    if (renorm || L >= kAdamThreads / 2) {
      SAE_LAUNCH(grid_x(n), kAdamThreads, 0, stream, adam_rows_kernel<T>)(
          static_cast<T*>(param), v, last, rows, static_cast<const T*>(grad), n, n_rows, L, s_row, s_col, step, lr,
          beta2, one_minus_beta2, eps, bc2_sqrt, renorm);
    } else {
      SAE_LAUNCH(grid_1d(n * L, kAdamThreads), kAdamThreads, 0, stream, adam_elems_kernel<T>)(
          static_cast<T*>(param), v, last, rows, static_cast<const T*>(grad), n, n_rows, L, s_row, s_col, step, lr,
          beta2, one_minus_beta2, eps, bc2_sqrt);
    }
    return cudaGetLastError();
  });
  if (err != cudaSuccess) return err;
  SAE_LAUNCH(grid_1d(n, kAdamThreads), kAdamThreads, 0, stream, set_last_kernel)(last, rows, n, n_rows, step);
  return cudaGetLastError();
}

}  // namespace sae_fast_kernels
