// Cholesky solve on the GPU (newton_device.hpp): cuSOLVER potrf factors A = U^T U in place,
// potrs solves with the factor; float (S) or double (D) throughout. The caller's row-major
// lower triangle is, read column-major, the upper triangle: hence CUBLAS_FILL_MODE_UPPER,
// so the GPU reads exactly the elements fo::cholesky_solve reads. O(n^3/3) flops, O(n^2)
// bytes: meant for the dense Hessians of damped Newton, not for bandwidth.
//
// cuSOLVER is loaded on first use (dlopen, cuda_library.hpp), not linked: linking it would make
// every program that links fusedopt need libcusolver (with the cuBLAS, cuSPARSE and nvJitLink
// it loads, about 950 MB in CUDA 13.0) to start, also when it only steps on the CPU.
// cusolverDn.h gives the types and signatures.
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <cstddef>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/cuda_check.hpp"
#include "cuda/cuda_library.hpp"
#include "cuda/newton_device.hpp"
#include "fusedopt/types.hpp"

namespace fo::cuda {
namespace {

// The cuSOLVER entry points this file calls, resolved once per process.
struct Cusolver {
  decltype(&cusolverDnCreate) create = nullptr;
  decltype(&cusolverDnDestroy) destroy = nullptr;
  decltype(&cusolverDnSetStream) set_stream = nullptr;
  decltype(&cusolverDnSpotrf_bufferSize) spotrf_buffer_size = nullptr;
  decltype(&cusolverDnDpotrf_bufferSize) dpotrf_buffer_size = nullptr;
  decltype(&cusolverDnSpotrf) spotrf = nullptr;
  decltype(&cusolverDnDpotrf) dpotrf = nullptr;
  decltype(&cusolverDnSpotrs) spotrs = nullptr;
  decltype(&cusolverDnDpotrs) dpotrs = nullptr;
};

// The soname of the cuSOLVER this file was compiled against.
constexpr const char* kCusolverSoname = "libcusolver.so." FO_CUDA_LIBRARY_STR(CUSOLVER_VER_MAJOR);
constexpr const char* kWho = "cholesky_solve_device";

Cusolver load_cusolver() {
  void* const lib = open_cuda_library(kCusolverSoname, kWho, "cuSOLVER");
  Cusolver api;
  auto bind = [&](auto& fn, const char* name) {
    bind_cuda_symbol(lib, fn, name, kWho, kCusolverSoname);
  };
  bind(api.create, "cusolverDnCreate");
  bind(api.destroy, "cusolverDnDestroy");
  bind(api.set_stream, "cusolverDnSetStream");
  bind(api.spotrf_buffer_size, "cusolverDnSpotrf_bufferSize");
  bind(api.dpotrf_buffer_size, "cusolverDnDpotrf_bufferSize");
  bind(api.spotrf, "cusolverDnSpotrf");
  bind(api.dpotrf, "cusolverDnDpotrf");
  bind(api.spotrs, "cusolverDnSpotrs");
  bind(api.dpotrs, "cusolverDnDpotrs");
  return api;
}

// Loaded on first use; a failed load throws and is tried again by the next call.
const Cusolver& cusolver() {
  static const Cusolver api = load_cusolver();
  return api;
}

const char* cusolver_status_name(cusolverStatus_t s) {
  switch (s) {
    case CUSOLVER_STATUS_SUCCESS: return "CUSOLVER_STATUS_SUCCESS";
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    default: return "cusolverStatus_t (unknown)";
  }
}

#define FO_CUSOLVER_CHECK(expr)                                                           \
  do {                                                                                    \
    const cusolverStatus_t fo_st_ = (expr);                                               \
    if (fo_st_ != CUSOLVER_STATUS_SUCCESS)                                                \
      ::fo::cuda::throw_cuda_library_error(fo_st_ == CUSOLVER_STATUS_ALLOC_FAILED,        \
                                           cusolver_status_name(fo_st_), #expr, __FILE__, \
                                           __LINE__);                                     \
  } while (0)

struct CusolverHandles {
  static cusolverDnHandle_t create() {
    cusolverDnHandle_t h = nullptr;
    FO_CUSOLVER_CHECK(cusolver().create(&h));
    return h;
  }
  static void destroy(cusolverDnHandle_t h) { cusolver().destroy(h); }
};

cusolverDnHandle_t thread_handle() {
  return HandleCache<cusolverDnHandle_t, CusolverHandles>::thread_handle();
}

// Stream-ordered scratch: freed on `stream` when it goes out of scope, also on a throw.
class AsyncScratch {
 public:
  AsyncScratch(std::size_t bytes, cudaStream_t stream) : stream_(stream) {
    FO_CUDA_CHECK(cudaMallocAsync(&ptr_, bytes, stream));
  }
  ~AsyncScratch() {
    if (ptr_) FO_CUDA_CHECK_NOTHROW(cudaFreeAsync(ptr_, stream_));
  }
  AsyncScratch(const AsyncScratch&) = delete;
  AsyncScratch& operator=(const AsyncScratch&) = delete;
  char* get() const noexcept { return static_cast<char*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

// The S/D entry points under one name.
cusolverStatus_t potrf_buffer_size(cusolverDnHandle_t h, int n, float* a, int* lwork) {
  return cusolver().spotrf_buffer_size(h, CUBLAS_FILL_MODE_UPPER, n, a, n, lwork);
}
cusolverStatus_t potrf_buffer_size(cusolverDnHandle_t h, int n, double* a, int* lwork) {
  return cusolver().dpotrf_buffer_size(h, CUBLAS_FILL_MODE_UPPER, n, a, n, lwork);
}
cusolverStatus_t potrf(cusolverDnHandle_t h, int n, float* a, float* work, int lwork, int* info) {
  return cusolver().spotrf(h, CUBLAS_FILL_MODE_UPPER, n, a, n, work, lwork, info);
}
cusolverStatus_t potrf(cusolverDnHandle_t h, int n, double* a, double* work, int lwork, int* info) {
  return cusolver().dpotrf(h, CUBLAS_FILL_MODE_UPPER, n, a, n, work, lwork, info);
}
cusolverStatus_t potrs(cusolverDnHandle_t h, int n, int nrhs, const float* a, float* b, int* info) {
  return cusolver().spotrs(h, CUBLAS_FILL_MODE_UPPER, n, nrhs, a, n, b, n, info);
}
cusolverStatus_t potrs(cusolverDnHandle_t h, int n, int nrhs, const double* a, double* b,
                       int* info) {
  return cusolver().dpotrs(h, CUBLAS_FILL_MODE_UPPER, n, nrhs, a, n, b, n, info);
}

template <class T>
void solve(T* d_a, T* d_b, int n, int nrhs, int* d_info, void* stream_ptr) {
  if (n <= 0)
    throw Error(StatusCode::invalid_argument,
                "cholesky_solve_device: n must be > 0, got " + std::to_string(n));
  if (nrhs <= 0)
    throw Error(StatusCode::invalid_argument,
                "cholesky_solve_device: nrhs must be > 0, got " + std::to_string(nrhs));
  if (!d_a || !d_b)
    throw Error(StatusCode::invalid_argument, "cholesky_solve_device: d_a or d_b is null");
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const cusolverDnHandle_t handle = thread_handle();
  FO_CUSOLVER_CHECK(cusolver().set_stream(handle, stream));

  int lwork = 0;
  FO_CUSOLVER_CHECK(potrf_buffer_size(handle, n, d_a, &lwork));
  // One allocation: [potrf info, potrs info] then the workspace, 256-byte aligned. potrs
  // writes its own info (0 or a bad-argument code), which must not overwrite potrf's.
  constexpr std::size_t kInfoBytes = 256;
  AsyncScratch scratch(kInfoBytes + static_cast<std::size_t>(lwork) * sizeof(T), stream);
  int* const d_potrf_info = d_info ? d_info : reinterpret_cast<int*>(scratch.get());
  int* const d_potrs_info = reinterpret_cast<int*>(scratch.get()) + 1;
  T* const work = reinterpret_cast<T*>(scratch.get() + kInfoBytes);

  FO_CUSOLVER_CHECK(potrf(handle, n, d_a, work, lwork, d_potrf_info));
  FO_CUSOLVER_CHECK(potrs(handle, n, nrhs, d_a, d_b, d_potrs_info));
  FO_CUDA_CHECK(cudaGetLastError());
  if (d_info) return;  // stream-ordered: the caller reads *d_info when it needs it

  int info[2] = {0, 0};
  FO_CUDA_CHECK(cudaMemcpyAsync(info, scratch.get(), sizeof info, cudaMemcpyDeviceToHost, stream));
  FO_CUDA_CHECK(cudaStreamSynchronize(stream));
  if (info[0] > 0)
    throw Error(StatusCode::invalid_argument,
                "cholesky_solve_device: the matrix is not positive definite (leading minor of "
                "order " +
                    std::to_string(info[0]) + ")");
  if (info[0] < 0 || info[1] < 0)
    throw Error(StatusCode::device_error, "cholesky_solve_device: cuSOLVER rejected argument " +
                                              std::to_string(info[0] < 0 ? -info[0] : -info[1]));
}

}  // namespace

void require_cusolver() { cusolver(); }

void cholesky_solve_device(double* d_a, double* d_b, int n, int nrhs, int* d_info, void* stream) {
  solve(d_a, d_b, n, nrhs, d_info, stream);
}

void cholesky_solve_device(float* d_a, float* d_b, int n, int nrhs, int* d_info, void* stream) {
  solve(d_a, d_b, n, nrhs, d_info, stream);
}

}  // namespace fo::cuda
