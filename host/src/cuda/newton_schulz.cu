// Muon's Newton-Schulz iteration on the GPU (newton_schulz_device.hpp): the plan of
// kernels/newton_schulz.hpp run with cuBLAS's strided batched GEMM over the whole batch,
// after X = G / max(norm, eps) by the two small kernels of kernels/cuda/newton_schulz.cuh
// (newton_schulz_normalize, launched from cuda_backend.cu so that the host emulation runs it
// too: the sum of squares in double, in the CPU's fixed order, so X is bitwise the CPU's).
// Precision: f32 (CUBLAS_COMPUTE_32F, no TF32) or bf16 storage with float32 accumulation.
// Bytes per matrix: the norm reads G twice and writes X once; each step's GEMMs are
// compute-bound (4 m^2 n + 2 m^3 flops) beside two copies (A, X) for beta.
//
// cuBLAS is loaded on first use (dlopen), not linked, for the reason newton_cusolver.cu gives
// for cuSOLVER: a program that links fusedopt and steps on the CPU must start without the
// CUDA toolkit's libraries (tests/consumer/without_cuda.sh checks it). cublas_v2.h gives the
// types and signatures.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/cuda_check.hpp"
#include "cuda/newton_schulz_device.hpp"
#include "fusedopt/kernels/newton_schulz.hpp"
#include "fusedopt/types.hpp"
#include "matrix/newton_schulz.hpp"

namespace fo::cuda {
namespace {

#define FO_STR2(x) #x
#define FO_STR(x) FO_STR2(x)

// ---- cuBLAS, loaded on first use

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

constexpr const char* kCublasSoname = "libcublas.so." FO_STR(CUBLAS_VER_MAJOR);

Cublas load_cublas() {
  void* lib = dlopen(kCublasSoname, RTLD_NOW | RTLD_LOCAL);
  std::string tried = kCublasSoname;
#ifdef FO_CUDA_TOOLKIT_LIBRARY_DIR
  if (!lib) {
    const std::string path = std::string(FO_CUDA_TOOLKIT_LIBRARY_DIR) + "/" + kCublasSoname;
    lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    tried += ", " + path;
  }
#endif
  if (!lib)
    throw Error(StatusCode::unsupported,
                std::string("newton_schulz_device needs cuBLAS, which was not found (tried ") +
                    tried +
                    "): install the CUDA toolkit's cuBLAS or add its directory to "
                    "LD_LIBRARY_PATH");
  Cublas api;  // never dlclose'd: handles live until their threads exit
  auto bind = [&](auto& fn, const char* name) {
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name));
    if (!fn)
      throw Error(StatusCode::unsupported,
                  std::string("newton_schulz_device: ") + kCublasSoname + " lacks " + name);
  };
  bind(api.create, "cublasCreate_v2");
  bind(api.destroy, "cublasDestroy_v2");
  bind(api.set_stream, "cublasSetStream_v2");
  bind(api.set_workspace, "cublasSetWorkspace_v2");
  bind(api.gemm_strided_batched, "cublasGemmStridedBatchedEx");
  return api;
}

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

[[noreturn]] void throw_cublas_error(cublasStatus_t s, const char* expr, const char* file,
                                     int line) {
  const StatusCode code =
      s == CUBLAS_STATUS_ALLOC_FAILED ? StatusCode::out_of_memory : StatusCode::device_error;
  throw Error(code, std::string(file) + ":" + std::to_string(line) + ": " + expr +
                        " failed: " + cublas_status_name(s));
}

#define FO_CUBLAS_CHECK(expr)                                            \
  do {                                                                   \
    const cublasStatus_t fo_st_ = (expr);                                \
    if (fo_st_ != CUBLAS_STATUS_SUCCESS)                                 \
      ::fo::cuda::throw_cublas_error(fo_st_, #expr, __FILE__, __LINE__); \
  } while (0)

// One cuBLAS handle per thread and device (a handle must not be used by two threads at once),
// destroyed when the thread exits.
class HandleCache {
 public:
  HandleCache() = default;
  HandleCache(const HandleCache&) = delete;
  HandleCache& operator=(const HandleCache&) = delete;
  ~HandleCache() {
    for (cublasHandle_t h : handles_)
      if (h) cublas().destroy(h);  // status ignored: nothing to do about it at thread exit
  }
  cublasHandle_t get() {
    int device = 0;
    FO_CUDA_CHECK(cudaGetDevice(&device));
    if (handles_.size() <= static_cast<std::size_t>(device)) handles_.resize(device + 1, nullptr);
    if (!handles_[device]) FO_CUBLAS_CHECK(cublas().create(&handles_[device]));
    return handles_[device];
  }

 private:
  std::vector<cublasHandle_t> handles_;
};

cublasHandle_t thread_handle() {
  thread_local HandleCache cache;
  return cache.get();
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
