// One launch syntax for every kernel of kernels/: `<<<>>>` under nvcc, and the
// CPU emulator of tests/cuda_emu/ under a host compiler (g++ cannot parse
// `<<<>>>`). The emulator build force-includes tests/cuda_emu/cuda_emu.h, which
// provides cuda_emu::launch; the shipped extension is always built by nvcc.
//
//   SAE_LAUNCH(grid, block, shared_bytes, stream, kernel<T, V>)(args...);
//
// The kernel comes last so that template arguments with commas pass through.
#pragma once

#if defined(__CUDACC__)
#define SAE_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<(grid), (block), (smem), (stream)>>>
#elif defined(SAE_FAST_CUDA_EMU)
#define SAE_LAUNCH(grid, block, smem, stream, ...) \
  ::cuda_emu::launch(#__VA_ARGS__, __FILE__, __LINE__, (grid), (block), (smem), (stream), __VA_ARGS__)
#else
#error "kernels/ device code builds with nvcc, or with the CPU emulator of tests/cuda_emu (SAE_FAST_CUDA_EMU)"
#endif

// The most blocks a launcher puts in grid.x (and, capped at CUDA's 65535, in
// grid.y); kernels loop over the work past the grid. 2^20 blocks fill any GPU
// many times over. The emulated build reads it at run time so that tests can
// shrink it and exercise those loops on small inputs.
#if defined(SAE_FAST_CUDA_EMU)
namespace cuda_emu {
long long max_blocks();
}
#define SAE_MAX_BLOCKS (static_cast<int64_t>(::cuda_emu::max_blocks()))
#else
#define SAE_MAX_BLOCKS (static_cast<int64_t>(1) << 20)
#endif
