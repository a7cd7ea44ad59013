// The part of the CUDA runtime API that tests/cuda_test.cpp calls, over the emulated device of
// cuda_runtime_emulated.cpp (fusedopt_emulated_device_test; docs/host-emulation.md): memory,
// copies checked as the library's are, streams that are names only (everything is
// synchronous). The error type and cudaGetLastError are host_emulation.hpp's. No graphs
// (cuda_test's capture test skips here) and no memory to report: cudaMemGetInfo says none is
// free, so the test that needs 20 GiB skips.
#pragma once

#if !defined(FUSEDOPT_EMULATED_DEVICE)
#error "cuda_runtime_api_emulated.hpp is for the emulated device's tests only"
#endif

#include <cstddef>

#include "cuda/cuda_backend.hpp"
#include "fusedopt/kernels/cuda/runtime.hpp"

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
};

inline cudaError_t cudaMalloc(void** p, std::size_t bytes) {
  try {
    *p = fo::cuda::allocate(bytes, 0);
    return cudaSuccess;
  } catch (const fo::Error&) {
    fo::emu::tl_last_error = cudaErrorMemoryAllocation;
    return cudaErrorMemoryAllocation;
  }
}

inline cudaError_t cudaFree(void* p) {
  fo::cuda::deallocate(p, 0);
  return cudaSuccess;
}

inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes,
                                   cudaMemcpyKind kind, cudaStream_t = nullptr) {
  switch (kind) {
    case cudaMemcpyHostToDevice: fo::cuda::copy_from_host(dst, src, bytes, nullptr); break;
    case cudaMemcpyDeviceToHost: fo::cuda::copy_to_host(dst, src, bytes); break;
    case cudaMemcpyDeviceToDevice: fo::cuda::copy_device(dst, src, bytes, nullptr); break;
    default: fo::emu::tl_last_error = cudaErrorInvalidValue; return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

inline cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind) {
  return cudaMemcpyAsync(dst, src, bytes, kind);
}

inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

inline cudaError_t cudaStreamCreate(cudaStream_t* s) {
  *s = reinterpret_cast<cudaStream_t>(new char);  // a distinct name; nothing runs on it
  return cudaSuccess;
}
inline cudaError_t cudaStreamDestroy(cudaStream_t s) {
  delete reinterpret_cast<char*>(s);
  return cudaSuccess;
}

inline cudaError_t cudaMemGetInfo(std::size_t* free_bytes, std::size_t* total_bytes) {
  *free_bytes = 0;
  *total_bytes = 0;
  return cudaSuccess;
}

// Graphs: names only, for the RAII holders; the capture test skips before using them.
struct fo_emulated_graph;
struct fo_emulated_graph_exec;
using cudaGraph_t = fo_emulated_graph*;
using cudaGraphExec_t = fo_emulated_graph_exec*;
inline cudaError_t cudaGraphDestroy(cudaGraph_t) { return cudaSuccess; }
inline cudaError_t cudaGraphExecDestroy(cudaGraphExec_t) { return cudaSuccess; }
