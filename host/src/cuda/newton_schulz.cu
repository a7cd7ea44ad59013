// Muon's Newton-Schulz iteration on the GPU (newton_schulz_device.hpp): the plan of
// kernels/newton_schulz.hpp run with cuBLAS's strided batched GEMM over the whole batch,
// after X = G / max(norm, eps) by the two small kernels of kernels/cuda/newton_schulz.cuh
// (newton_schulz_normalize, launched from cuda_backend.cu so that the host emulation runs it
// too: the sum of squares in double, in the CPU's fixed order, so X is bitwise the CPU's).
// Precision: f32 (CUBLAS_COMPUTE_32F, no TF32) or bf16 storage with float32 accumulation.
// Bytes per matrix: the norm reads G twice and writes X once; each step's GEMMs are
// compute-bound (4 m^2 n + 2 m^3 flops) beside two copies (A, X) for beta.
//
// cuBLAS is loaded on first use (dlopen, cuda_library.hpp), not linked; cublas_v2.h gives the
// types and signatures.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/cuda_check.hpp"
#include "cuda/cuda_library.hpp"
#include "cuda/newton_schulz_device.hpp"
#include "fusedopt/kernels/newton_schulz.hpp"
#include "fusedopt/types.hpp"
#include "matrix/newton_schulz.hpp"

namespace fo::cuda {
namespace {

// ---- cuBLAS, loaded on first use (cuda_library.hpp)

using GemmStridedBatchedEx = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t,
                                                cublasOperation_t, int, int, int, const void*,
                                                const void*, cudaDataType, int, long long,
                                                const void*, cudaDataType, int, long long,
                                                const void*, void*, cudaDataType, int, long long,
                                                int, cublasComputeType_t, cublasGemmAlgo_t);

struct Cublas {
  decltype(&cublasCreate_v2) create = nullptr;
  decltype(&cublasDestroy_v2) destroy = nullptr;
  decltype(&cublasSetStream_v2) set_stream = nullptr;
  decltype(&cublasSetWorkspace_v2) set_workspace = nullptr;
  GemmStridedBatchedEx gemm_strided_batched = nullptr;
};

constexpr const char* kCublasSoname = "libcublas.so." FO_CUDA_LIBRARY_STR(CUBLAS_VER_MAJOR);
constexpr const char* kWho = "newton_schulz_device";

Cublas load_cublas() {
  void* const lib = open_cuda_library(kCublasSoname, kWho, "cuBLAS");
  Cublas api;
  auto bind = [&](auto& fn, const char* name) {
    bind_cuda_symbol(lib, fn, name, kWho, kCublasSoname);
  };
  bind(api.create, "cublasCreate_v2");
  bind(api.destroy, "cublasDestroy_v2");
  bind(api.set_stream, "cublasSetStream_v2");
  bind(api.set_workspace, "cublasSetWorkspace_v2");
  bind(api.gemm_strided_batched, "cublasGemmStridedBatchedEx");
  return api;
}

// Loaded on first use; a failed load throws and is tried again by the next call.
const Cublas& cublas() {
  static const Cublas api = load_cublas();
  return api;
}

const char* cublas_status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "cublasStatus_t (unknown)";
  }
}

#define FO_CUBLAS_CHECK(expr)                                                                      \
  do {                                                                                             \
    const cublasStatus_t fo_st_ = (expr);                                                          \
    if (fo_st_ != CUBLAS_STATUS_SUCCESS)                                                           \
      ::fo::cuda::throw_cuda_library_error(fo_st_ == CUBLAS_STATUS_ALLOC_FAILED,                   \
                                           cublas_status_name(fo_st_), #expr, __FILE__, __LINE__); \
  } while (0)

struct CublasHandles {
  static cublasHandle_t create() {
    cublasHandle_t h = nullptr;
    FO_CUBLAS_CHECK(cublas().create(&h));
    return h;
  }
  static void destroy(cublasHandle_t h) { cublas().destroy(h); }
};

cublasHandle_t thread_handle() {
  return HandleCache<cublasHandle_t, CublasHandles>::thread_handle();
}

cublasOperation_t op(bool trans) { return trans ? CUBLAS_OP_T : CUBLAS_OP_N; }

template <class T>
void run(const T* d_in, T* d_out, DType dtype, cudaDataType type, std::int64_t batch,
         const NsPlan& p, int steps, double eps, char* ws, const NsDeviceLayout& l,
         cudaStream_t stream) {
  const cublasHandle_t handle = thread_handle();
  // cublasSetStream resets the workspace to cuBLAS's own pool: the caller's is set after it.
  FO_CUBLAS_CHECK(cublas().set_stream(handle, stream));
  FO_CUBLAS_CHECK(cublas().set_workspace(handle, ws, NsDeviceLayout::kCublasBytes));

  T* ops[4];
  T* const next_ws = reinterpret_cast<T*>(ws + l.next);
  // x and next swap after each step: start where an even number of swaps ends in d_out.
  ops[static_cast<int>(NsOperand::x)] = steps % 2 ? next_ws : d_out;
  ops[static_cast<int>(NsOperand::next)] = steps % 2 ? d_out : next_ws;
  ops[static_cast<int>(NsOperand::gram)] = reinterpret_cast<T*>(ws + l.gram);
  ops[static_cast<int>(NsOperand::poly)] = reinterpret_cast<T*>(ws + l.poly);

  // X = G / max(||G||_F, eps)
  newton_schulz_normalize(d_in, ops[static_cast<int>(NsOperand::x)], dtype, batch, p.m * p.n, eps,
                          reinterpret_cast<double*>(ws + l.partials), stream);

  auto gemm = [&](const NsGemm& g) {
    T* const c = ops[static_cast<int>(g.c)];
    const long long stride_c = ns_operand_size(p, g.c);
    if (g.beta != 0.0)
      FO_CUDA_CHECK(cudaMemcpyAsync(c, ops[static_cast<int>(g.init)],
                                    static_cast<std::size_t>(batch * stride_c) * sizeof(T),
                                    cudaMemcpyDeviceToDevice, stream));
    const float alpha = static_cast<float>(g.alpha), beta = static_cast<float>(g.beta);
    FO_CUBLAS_CHECK(cublas().gemm_strided_batched(
        handle, op(g.trans_a), op(g.trans_b), static_cast<int>(g.m), static_cast<int>(g.n),
        static_cast<int>(g.k), &alpha, ops[static_cast<int>(g.a)], type, static_cast<int>(g.lda),
        ns_operand_size(p, g.a), ops[static_cast<int>(g.b)], type, static_cast<int>(g.ldb),
        ns_operand_size(p, g.b), &beta, c, type, static_cast<int>(g.ldc), stride_c,
        static_cast<int>(batch), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  };
  for (int s = 0; s < steps; ++s) {
    gemm(p.gram);    // A = X X^T
    gemm(p.poly);    // B = b A + c A A
    gemm(p.update);  // next = a X + B X
    std::swap(ops[static_cast<int>(NsOperand::x)], ops[static_cast<int>(NsOperand::next)]);
  }
  FO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void require_cublas() { cublas(); }

void newton_schulz_device(const void* d_in, void* d_out, DType dtype, std::int64_t batch,
                          std::int64_t rows, std::int64_t cols, const NsCoefficients& coefficients,
                          int steps, double eps, void* d_workspace, std::size_t workspace_bytes,
                          void* stream_ptr) {
  const char* name = "newton_schulz_device";
  detail::validate_newton_schulz(name, batch, rows, cols, coefficients, steps, eps);
  if (dtype != DType::f32 && dtype != DType::bf16)
    throw Error(StatusCode::invalid_argument,
                std::string(name) + ": dtype must be f32 or bf16, got " + dtype_name(dtype));
  if (batch == 0 || rows == 0 || cols == 0) return;
  if (!d_in || !d_out || !d_workspace)
    throw Error(StatusCode::invalid_argument,
                std::string(name) + ": d_in, d_out or d_workspace is null");
  const NsDeviceLayout l = ns_device_layout(dtype, batch, rows, cols);
  if (workspace_bytes < l.total)
    throw Error(StatusCode::invalid_argument, std::string(name) + ": the workspace has " +
                                                  std::to_string(workspace_bytes) + " bytes, " +
                                                  std::to_string(l.total) + " are needed");
  if (reinterpret_cast<std::uintptr_t>(d_workspace) % 256 != 0)
    throw Error(StatusCode::invalid_argument,
                std::string(name) + ": d_workspace must be 256-byte aligned");
  const NsPlan p = ns_plan(rows, cols, coefficients);
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  char* const ws = static_cast<char*>(d_workspace);
  if (dtype == DType::f32)
    run(static_cast<const float*>(d_in), static_cast<float*>(d_out), dtype, CUDA_R_32F, batch, p,
        steps, eps, ws, l, stream);
  else
    run(static_cast<const __nv_bfloat16*>(d_in), static_cast<__nv_bfloat16*>(d_out), dtype,
        CUDA_R_16BF, batch, p, steps, eps, ws, l, stream);
}

}  // namespace fo::cuda
