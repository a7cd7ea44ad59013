// The demo's models on a CUDA GPU: the softmax regression and two-layer perceptron of
// model.hpp, forward and backward with cuBLAS SGEMM and a few small kernels
// (model_cuda_plan.hpp has the sequence and the layout), on params and gradients in device
// memory in Model's flat layout, so the same TensorSlice offsets register them with an
// optimizer. The math is Model<float>'s: the same activations, the same mean, the same
// initialisation (done on the host by Model::init, then copied). Only in CUDA builds
// (FUSEDOPT_WITH_CUDA).
//
//   fo::demo::CudaModel m({fo::demo::ModelKind::mlp}, max_batch);
//   std::vector<float> h(m.num_params());
//   m.host_model().init(h.data(), seed);
//   fo::demo::DeviceArray<float> p(m.num_params()), g(m.num_params());
//   p.copy_from_host(h.data(), h.size(), m.stream());
//   float loss = m.loss(p.data(), d_x, d_y, n, g.data());   // g = d(loss)/d(p), on the GPU
#pragma once

#ifdef FUSEDOPT_WITH_CUDA

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "model.hpp"

struct cublasContext;  // cublas_api.h: typedef struct cublasContext* cublasHandle_t

namespace fo::demo {

[[noreturn]] inline void throw_cuda_error(cudaError_t e, const char* expr, const char* file,
                                          int line) {
  throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + expr +
                           " failed: " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}

}  // namespace fo::demo

/// Throws std::runtime_error with file:line, the call and the CUDA error's name.
#define FO_DEMO_CUDA_CHECK(expr)                                             \
  do {                                                                       \
    const cudaError_t fo_demo_err_ = (expr);                                 \
    if (fo_demo_err_ != cudaSuccess)                                         \
      ::fo::demo::throw_cuda_error(fo_demo_err_, #expr, __FILE__, __LINE__); \
  } while (0)

/// For destructors: reports to stderr instead.
#define FO_DEMO_CUDA_CHECK_NOTHROW(expr)                                                       \
  do {                                                                                         \
    const cudaError_t fo_demo_err_ = (expr);                                                   \
    if (fo_demo_err_ != cudaSuccess)                                                           \
      std::fprintf(stderr, "fusedopt-demo: %s:%d: %s failed: %s\n", __FILE__, __LINE__, #expr, \
                   cudaGetErrorName(fo_demo_err_));                                            \
  } while (0)

namespace fo::demo {

/// n elements of T in device memory (cudaMalloc), freed on destruction; move-only.
template <class T>
class DeviceArray {
  static_assert(std::is_trivially_copyable_v<T>, "device memory holds trivially copyable types");

 public:
  explicit DeviceArray(std::size_t n) : size_(n) {
    if (n) FO_DEMO_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&data_), n * sizeof(T)));
  }
  ~DeviceArray() {
    if (data_) FO_DEMO_CUDA_CHECK_NOTHROW(cudaFree(data_));
  }
  DeviceArray(DeviceArray&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  DeviceArray& operator=(DeviceArray&& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
    return *this;
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  T* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }

  /// Copies n <= size() elements from host memory, ordered on `stream`, and waits for it.
  void copy_from_host(const T* h_src, std::size_t n, cudaStream_t stream) {
    check_count(n);
    if (n == 0) return;
    FO_DEMO_CUDA_CHECK(
        cudaMemcpyAsync(data_, h_src, n * sizeof(T), cudaMemcpyHostToDevice, stream));
    FO_DEMO_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  /// Copies the first n <= size() elements to host memory, ordered on `stream`, and waits.
  void copy_to_host(T* h_dst, std::size_t n, cudaStream_t stream) const {
    check_count(n);
    if (n == 0) return;
    FO_DEMO_CUDA_CHECK(
        cudaMemcpyAsync(h_dst, data_, n * sizeof(T), cudaMemcpyDeviceToHost, stream));
    FO_DEMO_CUDA_CHECK(cudaStreamSynchronize(stream));
  }

 private:
  void check_count(std::size_t n) const {
    if (n > size_)
      throw std::invalid_argument("DeviceArray: copy of " + std::to_string(n) + " elements into " +
                                  std::to_string(size_));
  }
  T* data_ = nullptr;
  std::size_t size_ = 0;
};

/// An owned cuBLAS handle (cublasCreate, cublasDestroy in the destructor); move-only.
class CublasHandle {
 public:
  CublasHandle();  // throws std::runtime_error naming the cuBLAS status
  ~CublasHandle();
  CublasHandle(CublasHandle&& o) noexcept : handle_(std::exchange(o.handle_, nullptr)) {}
  CublasHandle& operator=(CublasHandle&& o) noexcept {
    std::swap(handle_, o.handle_);
    return *this;
  }
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;
  cublasContext* get() const noexcept { return handle_; }

 private:
  cublasContext* handle_ = nullptr;
};

/// A model of model.hpp on the current CUDA device: scratch for batches of up to max_batch
/// examples and a cuBLAS handle of its own; all its work is ordered on one stream. Like
/// Model, not to be shared between threads.
class CudaModel {
 public:
  /// `stream`: where the work goes (null: the default stream), not owned. Throws
  /// std::invalid_argument for max_batch == 0 or a bad spec (as Model does),
  /// std::runtime_error for a CUDA or cuBLAS failure.
  CudaModel(ModelSpec spec, std::size_t max_batch, cudaStream_t stream = nullptr);

  /// The same model on the CPU: its tensors(), num_params() and init() are this one's.
  const Model<float>& host_model() const noexcept { return host_; }
  const ModelSpec& spec() const noexcept { return host_.spec(); }
  const std::vector<TensorSlice>& tensors() const noexcept { return host_.tensors(); }
  std::size_t num_params() const noexcept { return host_.num_params(); }
  std::size_t max_batch() const noexcept { return max_batch_; }
  cudaStream_t stream() const noexcept { return stream_; }

  /// Enqueues the mean cross-entropy of n <= max_batch() examples and its gradient, as
  /// Model<float>::loss computes them, without waiting for the GPU. All pointers are device
  /// memory: d_params and d_grad num_params() floats; d_x rows of kFeatures floats and d_y
  /// labels in [0, kClasses). Example i is row d_rows[i] of d_x and d_y when d_rows (n row
  /// indices) is not null, else row i. d_grad (if not null) is overwritten, padding zero;
  /// *d_loss (if not null) receives the loss. Throws std::invalid_argument for n == 0,
  /// n > max_batch() or neither output.
  void loss_async(const float* d_params, const float* d_x, const int* d_y, const int* d_rows,
                  std::size_t n, float* d_grad, float* d_loss) const;

  /// loss_async on rows 0..n-1, then waits for the stream: the loss comes back as one float.
  float loss(const float* d_params, const float* d_x, const int* d_y, std::size_t n,
             float* d_grad) const;

 private:
  Model<float> host_;
  std::size_t max_batch_;
  cudaStream_t stream_;
  CublasHandle cublas_;
  // Scratch (Scratch in model_cuda_plan.hpp): written by every call.
  DeviceArray<float> x_;  // gathered rows (with d_rows)
  DeviceArray<int> y_;
  DeviceArray<float> hidden_, dhidden_, logits_, row_loss_, loss_;
};

}  // namespace fo::demo

#endif  // FUSEDOPT_WITH_CUDA
