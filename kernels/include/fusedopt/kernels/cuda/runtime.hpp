// What the kernels and their launchers include instead of <cuda_runtime.h>: the CUDA runtime,
// or its host emulation (host_emulation.hpp) where FO_CUDA_HOST_EMULATION is defined.
//
//   FO_LAUNCH(grid, block, stream, kernel)(args...);   // kernel<<<grid, block, 0, stream>>>
//   FO_CUDA_CHECK(cudaGetLastError());
//
// Kernels and launchers also wrap themselves in FO_EMULATION_BEGIN / FO_EMULATION_END
// (config.hpp).
#pragma once

#if defined(FO_CUDA_HOST_EMULATION)
#include "fusedopt/kernels/cuda/host_emulation.hpp"
#define FO_LAUNCH(grid, block, stream, ...) \
  ((void)(stream), ::fo::emu::make_launch(&__VA_ARGS__, (grid), (block)))
#else
#include <cuda_runtime.h>
#if CUDART_VERSION < 12010
#error "fusedopt's CUDA kernels take up to 32 KB of parameters: CUDA 12.1 or newer is needed"
#endif
#define FO_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>
#endif
