// CUDA error checks: FO_CUDA_CHECK throws fo::Error with file:line and the error's name;
// FO_CUDA_CHECK_NOTHROW, for destructors and other no-throw paths, reports to stderr.
//
// A failed runtime call also leaves its error as the thread's "last error"; both macros clear
// it (as PyTorch's allocator does after a failed cudaMalloc), so that a caller who retries
// after an out-of-memory, or any later launch check, does not meet the stale error again.
// Launches are checked with cudaGetLastError, which clears as it reads; never with
// cudaPeekAtLastError, which would leave one failure to poison every later check.
#pragma once

#include <cstdio>
#include <string>

#include "fusedopt/kernels/cuda/runtime.hpp"
#include "fusedopt/types.hpp"

namespace fo::cuda {

[[noreturn]] inline void throw_cuda_error(cudaError_t e, const char* expr, const char* file,
                                          int line) {
  const StatusCode code =
      e == cudaErrorMemoryAllocation ? StatusCode::out_of_memory : StatusCode::device_error;
  throw Error(code, std::string(file) + ":" + std::to_string(line) + ": " + expr +
                        " failed: " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}

}  // namespace fo::cuda

#define FO_CUDA_CHECK(expr)                                             \
  do {                                                                  \
    const cudaError_t fo_err_ = (expr);                                 \
    if (fo_err_ != cudaSuccess) {                                       \
      (void)cudaGetLastError();                                         \
      ::fo::cuda::throw_cuda_error(fo_err_, #expr, __FILE__, __LINE__); \
    }                                                                   \
  } while (0)

#define FO_CUDA_CHECK_NOTHROW(expr)                                                       \
  do {                                                                                    \
    const cudaError_t fo_err_ = (expr);                                                   \
    if (fo_err_ != cudaSuccess) {                                                         \
      (void)cudaGetLastError();                                                           \
      std::fprintf(stderr, "fusedopt: %s:%d: %s failed: %s\n", __FILE__, __LINE__, #expr, \
                   cudaGetErrorName(fo_err_));                                            \
    }                                                                                     \
  } while (0)
