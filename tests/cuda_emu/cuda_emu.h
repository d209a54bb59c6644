// A CPU emulator of the CUDA execution model, for tests only: the unchanged
// device code of kernels/ compiles with g++ (force-included: -include this
// file) and runs on the CPU, under ASan and UBSan.
//
// The model:
// - blocks run one after another (in forward or reversed order, see
//   CUDA_EMU_ORDER below), so a `__shared__` variable is a function-local
//   `static`: one copy, used by one block at a time, with ASan redzones;
// - the threads of a block are ucontext fibers on one OS thread. A thread runs
//   until it reaches a synchronisation point (__syncthreads, a warp
//   collective) or returns; then the next one runs. With CUDA_EMU_ORDER=reverse
//   threads (and blocks) are visited last to first, so a kernel whose result
//   depends on thread order gives a different answer in the two orders;
// - __syncthreads completes when every thread of the block waits at the same
//   call site; a thread that waits at another site, or has exited, is a
//   divergent barrier: the run aborts naming the kernel and both sites;
// - warp collectives (__shfl_*_sync, __syncwarp, __ballot_sync, __any_sync,
//   __all_sync) complete when every lane named in the mask waits at the same
//   call site with the same mask; a mask naming an exited lane, a lane waiting
//   at another site or with another mask, or a shuffle reading a lane outside
//   the mask aborts with the file and line;
// - when no thread can run and no wait can complete, the run aborts as a
//   deadlock, listing where each thread waits;
// - atomics go through std::atomic_ref;
// - a launch checks its configuration as the CUDA runtime does (grid and block
//   limits): a bad one is a sticky cudaErrorInvalidConfiguration from
//   cudaGetLastError, and nothing runs.
//
// Launches go through SAE_LAUNCH (kernels/launch.cuh), which expands to
// cuda_emu::launch here.
#pragma once

#define SAE_FAST_CUDA_EMU 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

// Execution-space qualifiers mean nothing on the host; __shared__ storage is
// one per block because blocks run one at a time (see above).
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __shared__ static

namespace cuda_emu {

// The running launch, block and thread.
dim3 block_dim();
dim3 grid_dim();
uint3 block_idx();
const uint3& thread_idx();

[[noreturn]] void fail(const char* file, int line, const char* fmt, ...) __attribute__((format(printf, 3, 4)));

void syncthreads(const char* file, int line);

enum class Collective : int { Sync = 0, ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All };

// Deposits `bits` (the value, or the predicate) for this lane, waits for the
// lanes of `mask`, and returns the collective's result for this lane.
uint64_t warp_collective(const char* file, int line, Collective kind, unsigned mask, uint64_t bits, int arg, int width);

template <typename T>
T shfl(const char* file, int line, Collective kind, unsigned mask, T v, int arg, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = warp_collective(file, line, kind, mask, bits, arg, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

inline void syncwarp(const char* file, int line, unsigned mask = 0xffffffffu) {
  (void)warp_collective(file, line, Collective::Sync, mask, 0, 0, 32);
}

using Thunk = std::function<void()>;

// Runs the grid of one launch, or records why the launch is invalid.
void run_grid(const char* kernel, const char* file, int line, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
              const Thunk& body);

template <typename... P>
struct Launch {
  const char* name;
  const char* file;
  int line;
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  void (*kernel)(P...);

  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    // Kernel parameters are passed by value, converted to the parameter types, as
    // a real launch copies them into the parameter buffer.
    std::tuple<std::decay_t<P>...> params(static_cast<std::decay_t<P>>(std::forward<A>(args))...);
    auto* k = kernel;
    run_grid(name, file, line, grid, block, smem, stream, [k, &params] { std::apply(k, params); });
  }
};

template <typename... P>
Launch<P...> launch(const char* name, const char* file, int line, dim3 grid, dim3 block, size_t smem,
                    cudaStream_t stream, void (*kernel)(P...)) {
  return Launch<P...>{name, file, line, grid, block, smem, stream, kernel};
}

// ------------------------------------------------------------------ atomics
template <typename T>
T atomic_add(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_add(v);
}
// old = *p; *p = better(v, old) ? v : old, atomically (atomicMax, atomicMin).
template <typename T, typename Better>
T atomic_keep(T* p, T v, Better better) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (better(v, old) && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
template <typename T>
T atomic_max(T* p, T v) {
  return atomic_keep(p, v, [](T x, T y) { return y < x; });
}
template <typename T>
T atomic_min(T* p, T v) {
  return atomic_keep(p, v, [](T x, T y) { return x < y; });
}
template <typename T>
T atomic_cas(T* p, T expected, T desired) {
  std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired);
  return expected;  // the old value either way
}

}  // namespace cuda_emu

// ------------------------------------------------------------ built-in names
#define threadIdx (::cuda_emu::thread_idx())
#define blockIdx (::cuda_emu::block_idx())
#define blockDim (::cuda_emu::block_dim())
#define gridDim (::cuda_emu::grid_dim())
#define warpSize 32

#define __syncthreads() ::cuda_emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::cuda_emu::syncwarp(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(mask, v, ...) \
  ::cuda_emu::shfl(__FILE__, __LINE__, ::cuda_emu::Collective::ShflIdx, (mask), (v), __VA_ARGS__)
#define __shfl_up_sync(mask, v, ...) \
  ::cuda_emu::shfl(__FILE__, __LINE__, ::cuda_emu::Collective::ShflUp, (mask), (v), __VA_ARGS__)
#define __shfl_down_sync(mask, v, ...) \
  ::cuda_emu::shfl(__FILE__, __LINE__, ::cuda_emu::Collective::ShflDown, (mask), (v), __VA_ARGS__)
#define __shfl_xor_sync(mask, v, ...) \
  ::cuda_emu::shfl(__FILE__, __LINE__, ::cuda_emu::Collective::ShflXor, (mask), (v), __VA_ARGS__)
#define __ballot_sync(mask, pred)                                                                               \
  static_cast<unsigned>(::cuda_emu::warp_collective(__FILE__, __LINE__, ::cuda_emu::Collective::Ballot, (mask), \
                                                    (pred) ? 1u : 0u, 0, 32))
#define __any_sync(mask, pred) \
  static_cast<int>(            \
      ::cuda_emu::warp_collective(__FILE__, __LINE__, ::cuda_emu::Collective::Any, (mask), (pred) ? 1u : 0u, 0, 32))
#define __all_sync(mask, pred) \
  static_cast<int>(            \
      ::cuda_emu::warp_collective(__FILE__, __LINE__, ::cuda_emu::Collective::All, (mask), (pred) ? 1u : 0u, 0, 32))

inline float atomicAdd(float* p, float v) { return ::cuda_emu::atomic_add(p, v); }
inline double atomicAdd(double* p, double v) { return ::cuda_emu::atomic_add(p, v); }
inline int atomicAdd(int* p, int v) { return ::cuda_emu::atomic_add(p, v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return ::cuda_emu::atomic_add(p, v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return ::cuda_emu::atomic_add(p, v);
}
inline int atomicMax(int* p, int v) { return ::cuda_emu::atomic_max(p, v); }
inline long long atomicMax(long long* p, long long v) { return ::cuda_emu::atomic_max(p, v); }
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
  return ::cuda_emu::atomic_max(p, v);
}
inline int atomicMin(int* p, int v) { return ::cuda_emu::atomic_min(p, v); }
inline long long atomicMin(long long* p, long long v) { return ::cuda_emu::atomic_min(p, v); }
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  return ::cuda_emu::atomic_min(p, v);
}
inline int atomicCAS(int* p, int e, int d) { return ::cuda_emu::atomic_cas(p, e, d); }
inline unsigned atomicCAS(unsigned* p, unsigned e, unsigned d) { return ::cuda_emu::atomic_cas(p, e, d); }
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long e, unsigned long long d) {
  return ::cuda_emu::atomic_cas(p, e, d);
}

// Device intrinsics with a host meaning.
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
