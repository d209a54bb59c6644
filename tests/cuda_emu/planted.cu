// Kernels with planted bugs, each of a kind the emulator must catch (and two
// correct ones to compare with). Built only into the emulator's test driver.
#include "extra_ops.h"
#include "launch.cuh"

namespace {

constexpr int kMax = 1024;

// Correct: a warp reduction with shuffles, then a block reduction through shared memory.
__global__ void block_sum(const float* in, float* out, int n) {
  __shared__ float partial[32];
  float v = static_cast<int>(threadIdx.x) < n ? in[threadIdx.x] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) t += partial[w];
    out[0] = t;
  }
}

// Two barriers at different call sites, chosen by thread.
__global__ void divergent_sync(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

// A thread leaves before the barrier the others wait at.
__global__ void exited_sync(float* out) {
  if (threadIdx.x == 3) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

// A full-warp shuffle after lane 5 has returned.
__global__ void shfl_exited_lane(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<float>(threadIdx.x), 1);
}

// Lanes 0-15 shuffle among themselves but read lane 20.
__global__ void shfl_outside_mask(float* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, static_cast<float>(threadIdx.x), 20);
}

// Lane 0 waits at the block barrier while the rest of its warp waits in a
// full-warp shuffle that needs lane 0: neither can complete.
__global__ void deadlock(float* out) {
  if (threadIdx.x == 0) {
    __syncthreads();
  } else if (threadIdx.x < 32) {
    out[threadIdx.x] = __shfl_sync(0xffffffffu, 1.f, 0);
  }
}

// Reads a neighbour's shared-memory write without a barrier: the result depends on
// the order the threads run in. With the barrier (`synced`) it does not.
__global__ void neighbour(float* out, int synced) {
  __shared__ float s[kMax];
  const unsigned n = blockDim.x;
  s[threadIdx.x] = static_cast<float>(threadIdx.x) + 1.f;
  if (synced) __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % n];  // (one launch per driver run: s starts at zeros)
}

// One element past the end of a global array.
__global__ void global_overflow(const float* in, float* out, int n) {
  out[threadIdx.x] = in[threadIdx.x + (threadIdx.x == 0 ? n : 0)];
}

// One element past the end of a shared array.
__global__ void shared_overflow(float* out) {
  __shared__ float s[32];
  s[threadIdx.x] = 1.f;  // launched with 64 threads
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x % 32];
}

}  // namespace

namespace emu_driver {

bool run_extra(const std::string& op, const Ints& ints, const Floats& floats, const ArrayOf& array, const Alloc& alloc,
               std::set<std::string>& outputs, int& err) {
  auto out = static_cast<float*>(array("out"));
  auto in = static_cast<const float*>(array("in"));
  const int threads = ints.count("threads") ? static_cast<int>(ints.at("threads")) : 32;
  const unsigned grid_y = ints.count("grid_y") ? static_cast<unsigned>(ints.at("grid_y")) : 1u;
  cudaStream_t s = nullptr;
  if (op.rfind("planted_", 0) != 0) return run_extra_select(op, ints, floats, array, alloc, err);
  outputs = {"out"};
  if (op == "planted_block_sum") {
    SAE_LAUNCH(1, threads, 0, s, block_sum)(in, out, threads);
  } else if (op == "planted_divergent_sync") {
    SAE_LAUNCH(1, threads, 0, s, divergent_sync)(out);
  } else if (op == "planted_exited_sync") {
    SAE_LAUNCH(1, threads, 0, s, exited_sync)(out);
  } else if (op == "planted_shfl_exited_lane") {
    SAE_LAUNCH(1, threads, 0, s, shfl_exited_lane)(out);
  } else if (op == "planted_shfl_outside_mask") {
    SAE_LAUNCH(1, threads, 0, s, shfl_outside_mask)(out);
  } else if (op == "planted_deadlock") {
    SAE_LAUNCH(1, threads, 0, s, deadlock)(out);
  } else if (op == "planted_neighbour") {
    SAE_LAUNCH(1, threads, 0, s, neighbour)(out, static_cast<int>(ints.at("synced")));
  } else if (op == "planted_global_overflow") {
    SAE_LAUNCH(1, threads, 0, s, global_overflow)(in, out, threads);
  } else if (op == "planted_shared_overflow") {
    SAE_LAUNCH(1, threads, 0, s, shared_overflow)(out);
  } else if (op == "planted_bad_grid") {
    SAE_LAUNCH(dim3(1, grid_y), threads, 0, s, block_sum)(in, out, threads);
  } else {
    return false;
  }
  err = static_cast<int>(cudaGetLastError());
  return true;
}

}  // namespace emu_driver
