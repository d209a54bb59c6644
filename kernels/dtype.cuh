// The element types of sae_fast's kernels, as the launchers of kernels/*.cuh take
// them (host-safe: the torch-facing entries of csrc/ include it).
#pragma once

#include <cuda_runtime.h>

namespace sae_fast_kernels {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

}  // namespace sae_fast_kernels
