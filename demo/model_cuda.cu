// CudaModel (model_cuda.hpp): model_cuda_plan.hpp's sequence run with cuBLAS SGEMM and the
// small kernels below, all on the model's stream. Precision: fp32 throughout, as
// Model<float>; the GEMMs in cuBLAS's default math mode, which for SGEMM is plain fp32 (no
// TF32, that needs CUBLAS_TF32_TENSOR_OP_MATH), and the loss's mean summed in double, as the
// CPU sums it. The results differ from the CPU's in the order of each GEMM's sums and in the
// last bits of expf/logf/tanhf, not in the math. Every kernel reads and writes a few bytes
// per element of a batch-sized matrix: at these sizes (a batch of 32 is 8 KB of input) they
// are launch-bound, and the GEMMs are too small for any peak.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <stdexcept>
#include <string>

#include "data.hpp"
#include "model_cuda.hpp"
#include "model_cuda_plan.hpp"

namespace fo::demo {
namespace {

[[noreturn]] void throw_cublas_error(cublasStatus_t s, const char* expr, const char* file,
                                     int line) {
  throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + expr +
                           " failed: " + cublasGetStatusName(s) + ": " + cublasGetStatusString(s));
}

#define FO_DEMO_CUBLAS_CHECK(expr)                                            \
  do {                                                                        \
    const cublasStatus_t fo_demo_st_ = (expr);                                \
    if (fo_demo_st_ != CUBLAS_STATUS_SUCCESS)                                 \
      ::fo::demo::throw_cublas_error(fo_demo_st_, #expr, __FILE__, __LINE__); \
  } while (0)

// A launch's error (a bad configuration) at the launch, not at some later synchronisation.
#define FO_DEMO_CHECK_LAUNCH() FO_DEMO_CUDA_CHECK(cudaGetLastError())

constexpr int kThreads = 256;

// Blocks for `count` elements with grid-stride loops: enough to cover them, at most 4096.
unsigned grid_for(std::size_t count) {
  const std::size_t blocks = (count + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::clamp<std::size_t>(blocks, 1, 4096));
}

// xb (n x kFeatures) and yb: example i is row rows[i] of x and y.
__global__ void gather_rows_kernel(const float* __restrict__ x, const int* __restrict__ y,
                                   const int* __restrict__ rows, int n, float* __restrict__ xb,
                                   int* __restrict__ yb) {
  const std::size_t count = static_cast<std::size_t>(n) * kFeatures;
  for (std::size_t e = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; e < count;
       e += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const std::size_t i = e / kFeatures, k = e % kFeatures;
    const std::size_t src = static_cast<std::size_t>(rows[i]);
    xb[e] = x[src * kFeatures + k];
    if (k == 0) yb[i] = y[src];
  }
}

// a[i][j] = f(a[i][j] + bias[j]) over a row-major rows x cols matrix.
__global__ void bias_activation_kernel(float* __restrict__ a, const float* __restrict__ bias,
                                       int rows, int cols, gpu::Pointwise f) {
  const std::size_t count = static_cast<std::size_t>(rows) * cols;
  for (std::size_t e = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; e < count;
       e += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    a[e] = gpu::activate(f, a[e] + bias[e % cols]);
}

// d = d * f'(a), from the activation's output h, elementwise.
__global__ void activation_backward_kernel(float* __restrict__ d, const float* __restrict__ h,
                                           std::size_t count, gpu::Pointwise f) {
  for (std::size_t e = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; e < count;
       e += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    d[e] = gpu::activation_backward(f, d[e], h[e]);
}

// One thread per example: its kClasses logits (40 bytes) in registers' reach, the loss, and
// the logits overwritten by their gradient.
__global__ void softmax_xent_kernel(float* __restrict__ z, const int* __restrict__ y, int n,
                                    float inv_n, float* __restrict__ row_loss, bool grad) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const float l =
        gpu::softmax_xent_row(z + static_cast<std::size_t>(i) * kClasses, y[i], inv_n, grad);
    if (row_loss) row_loss[i] = l;
  }
}

// out[j] = the sum of column j of a row-major rows x cols matrix: one thread per column,
// adding the rows in order as the CPU model does (consecutive threads read consecutive
// addresses). A bias gradient: cols is at most the hidden width.
__global__ void column_sum_kernel(const float* __restrict__ a, int rows, int cols,
                                  float* __restrict__ out) {
  for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < cols; j += gridDim.x * blockDim.x) {
    float s = 0.0f;
    for (int i = 0; i < rows; ++i) s += a[static_cast<std::size_t>(i) * cols + j];
    out[j] = s;
  }
}

// *out = (float)(sum of v[0..n) in double / n): one block, a fixed reduction order, so the
// same inputs give the same bits.
__global__ void mean_kernel(const float* __restrict__ v, int n, float* __restrict__ out) {
  __shared__ double partial[kThreads];
  double s = 0;
  for (int i = threadIdx.x; i < n; i += kThreads) s += static_cast<double>(v[i]);
  partial[threadIdx.x] = s;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (static_cast<int>(threadIdx.x) < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = static_cast<float>(partial[0] / static_cast<double>(n));
}

// model_cuda_plan.hpp's executor: cuBLAS for the GEMMs, the kernels above for the rest.
class CudaExec {
 public:
  CudaExec(cublasHandle_t handle, cudaStream_t stream) : handle_(handle), stream_(stream) {}

  void gemm(gpu::Op ta, gpu::Op tb, int m, int n, int k, const float* a, int lda, const float* b,
            int ldb, float* c, int ldc) {
    const float one = 1.0f, zero = 0.0f;  // host pointer mode: read before cublasSgemm returns
    FO_DEMO_CUBLAS_CHECK(
        cublasSgemm(handle_, op(ta), op(tb), m, n, k, &one, a, lda, b, ldb, &zero, c, ldc));
  }
  void zero(float* p, std::size_t count) {
    FO_DEMO_CUDA_CHECK(cudaMemsetAsync(p, 0, count * sizeof(float), stream_));
  }
  void bias_activation(float* a, const float* bias, int rows, int cols, gpu::Pointwise f) {
    bias_activation_kernel<<<grid_for(static_cast<std::size_t>(rows) * cols), kThreads, 0,
                             stream_>>>(a, bias, rows, cols, f);
    FO_DEMO_CHECK_LAUNCH();
  }
  void activation_backward(float* d, const float* h, std::size_t count, gpu::Pointwise f) {
    activation_backward_kernel<<<grid_for(count), kThreads, 0, stream_>>>(d, h, count, f);
    FO_DEMO_CHECK_LAUNCH();
  }
  void softmax_xent(float* z, const int* y, int n, float inv_n, float* row_loss, bool grad) {
    softmax_xent_kernel<<<grid_for(static_cast<std::size_t>(n)), kThreads, 0, stream_>>>(
        z, y, n, inv_n, row_loss, grad);
    FO_DEMO_CHECK_LAUNCH();
  }
  void column_sum(const float* a, int rows, int cols, float* out) {
    column_sum_kernel<<<grid_for(static_cast<std::size_t>(cols)), kThreads, 0, stream_>>>(
        a, rows, cols, out);
    FO_DEMO_CHECK_LAUNCH();
  }
  void mean(const float* v, int n, float* out) {
    mean_kernel<<<1, kThreads, 0, stream_>>>(v, n, out);
    FO_DEMO_CHECK_LAUNCH();
  }

 private:
  static cublasOperation_t op(gpu::Op o) { return o == gpu::Op::n ? CUBLAS_OP_N : CUBLAS_OP_T; }
  cublasHandle_t handle_;
  cudaStream_t stream_;
};

std::size_t hidden_size(const ModelSpec& spec, std::size_t max_batch) {
  return spec.kind == ModelKind::mlp ? max_batch * static_cast<std::size_t>(spec.hidden) : 0;
}

std::size_t checked_max_batch(std::size_t max_batch) {
  // Batch sizes reach cuBLAS as int, and n * kFeatures must stay far from overflow.
  if (max_batch == 0 || max_batch > (1u << 24))
    throw std::invalid_argument("CudaModel: max_batch must be in [1, 2^24]");
  return max_batch;
}

}  // namespace

CublasHandle::CublasHandle() { FO_DEMO_CUBLAS_CHECK(cublasCreate(&handle_)); }

CublasHandle::~CublasHandle() {
  if (handle_) {
    const cublasStatus_t s = cublasDestroy(handle_);
    if (s != CUBLAS_STATUS_SUCCESS)
      std::fprintf(stderr, "fusedopt-demo: cublasDestroy failed: %s\n", cublasGetStatusName(s));
  }
}

CudaModel::CudaModel(ModelSpec spec, std::size_t max_batch, cudaStream_t stream)
    : host_(spec),
      max_batch_(checked_max_batch(max_batch)),
      stream_(stream),
      x_(max_batch * kFeatures),
      y_(max_batch),
      hidden_(hidden_size(spec, max_batch)),
      dhidden_(hidden_size(spec, max_batch)),
      logits_(max_batch * kClasses),
      row_loss_(max_batch),
      loss_(1) {
  FO_DEMO_CUBLAS_CHECK(cublasSetStream(cublas_.get(), stream_));
  FO_DEMO_CUBLAS_CHECK(cublasSetPointerMode(cublas_.get(), CUBLAS_POINTER_MODE_HOST));
  FO_DEMO_CUBLAS_CHECK(cublasSetMathMode(cublas_.get(), CUBLAS_DEFAULT_MATH));
}

void CudaModel::loss_async(const float* d_params, const float* d_x, const int* d_y,
                           const int* d_rows, std::size_t n, float* d_grad, float* d_loss) const {
  if (n == 0) throw std::invalid_argument("CudaModel: loss of an empty batch");
  if (n > max_batch_)
    throw std::invalid_argument("CudaModel: a batch of " + std::to_string(n) +
                                " examples, more than max_batch " + std::to_string(max_batch_));
  if (!d_grad && !d_loss) throw std::invalid_argument("CudaModel: neither a gradient nor a loss");
  const int rows = static_cast<int>(n);
  if (d_rows) {
    gather_rows_kernel<<<grid_for(n * kFeatures), kThreads, 0, stream_>>>(d_x, d_y, d_rows, rows,
                                                                          x_.data(), y_.data());
    FO_DEMO_CHECK_LAUNCH();
    d_x = x_.data();
    d_y = y_.data();
  }
  CudaExec exec(cublas_.get(), stream_);
  const gpu::Scratch scratch{hidden_.data(), dhidden_.data(), logits_.data(), row_loss_.data()};
  gpu::forward_backward(exec, host_.spec(), host_.tensors(), host_.num_params(), rows, d_params,
                        d_x, d_y, scratch, d_grad, d_loss);
}

float CudaModel::loss(const float* d_params, const float* d_x, const int* d_y, std::size_t n,
                      float* d_grad) const {
  loss_async(d_params, d_x, d_y, nullptr, n, d_grad, loss_.data());
  float h_loss = 0;
  loss_.copy_to_host(&h_loss, 1, stream_);  // waits for the stream
  return h_loss;
}

}  // namespace fo::demo
