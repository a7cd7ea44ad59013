// Muon's Newton-Schulz iteration (kernels/newton_schulz.hpp) for a batch of matrices on the
// GPU, through cuBLAS. Declared without CUDA headers (the stream is a void*) so host code can
// include it; defined in newton_schulz.cu, which loads cuBLAS on first use, and by the stubs
// of a build without CUDA (cuda_stub.cpp) and of the emulated device, which has no cuBLAS.
#pragma once

#include <cstddef>
#include <cstdint>

#include "fusedopt/kernels/newton_schulz.hpp"
#include "fusedopt/kernels/sum_order.hpp"
#include "fusedopt/types.hpp"

namespace fo::cuda {

/// Doubles of device workspace newton_schulz_normalize needs for `batch` matrices of `size`
/// elements: one partial sum per chunk of kSumChunk elements of each matrix.
constexpr std::int64_t ns_norm_partials(std::int64_t batch, std::int64_t size) {
  return batch * sum_chunks(size);
}

/// Where newton_schulz_device keeps what it needs in the caller's workspace, each region
/// 256-byte aligned: cuBLAS's own workspace (cublasSetWorkspace), the norm's partial sums
/// (ns_norm_partials doubles), and the batch's `next`, `gram` and `poly` operands (the
/// caller's output is `x`'s buffer) in the storage type.
struct NsDeviceLayout {
  static constexpr std::size_t kCublasBytes = std::size_t{32} << 20;  // NVIDIA's size for Hopper
  std::size_t partials, next, gram, poly, total;  // byte offsets, and the bytes needed
};

constexpr std::size_t ns_align(std::size_t bytes) { return (bytes + 255) / 256 * 256; }

/// The layout for `batch` rows x cols matrices of dtype (f32 or bf16).
constexpr NsDeviceLayout ns_device_layout(DType dtype, std::int64_t batch, std::int64_t rows,
                                          std::int64_t cols) {
  const std::size_t elem = dtype == DType::bf16 ? 2 : 4;
  const std::size_t b = batch > 0 ? static_cast<std::size_t>(batch) : 0;
  const std::size_t m = static_cast<std::size_t>(rows < cols ? rows : cols);
  const std::size_t n = static_cast<std::size_t>(rows < cols ? cols : rows);
  NsDeviceLayout l{};
  l.partials = NsDeviceLayout::kCublasBytes;
  const std::int64_t size = rows > 0 && cols > 0 ? rows * cols : 0;
  const auto partials = static_cast<std::size_t>(ns_norm_partials(batch > 0 ? batch : 0, size));
  l.next = l.partials + ns_align(partials * sizeof(double));
  l.gram = l.next + ns_align(b * m * n * elem);
  l.poly = l.gram + ns_align(b * m * m * elem);
  l.total = l.poly + ns_align(b * m * m * elem);
  return l;
}

/// Bytes of device workspace newton_schulz_device needs: ns_device_layout(...).total.
inline std::size_t newton_schulz_workspace_bytes(DType dtype, std::int64_t batch, std::int64_t rows,
                                                 std::int64_t cols) {
  return ns_device_layout(dtype, batch, rows, cols).total;
}

/// Orthogonalizes `batch` row-major rows x cols matrices in device memory (each contiguous
/// after the other), ordered on `stream` (a cudaStream_t; null: the default stream):
///   dtype f32:  float in/out, every GEMM float32 in and out, CUBLAS_COMPUTE_32F (no TF32);
///   dtype bf16: bf16 in/out and bf16 operands, products accumulated in float32
///               (CUBLAS_COMPUTE_32F), each GEMM's result rounded to bf16, as torch's bf16
///               matmul and torch.optim.Muon.
/// The norm's sum of squares is accumulated in double by a kernel, in the CPU's order (so X
/// is bitwise the CPU's), and X is divided by max(norm, eps) read from device memory
/// (newton_schulz_normalize): nothing waits for the host, nothing is allocated
/// (the workspace is the caller's, cuBLAS's included), so the call can be captured in a CUDA
/// graph. `in` and `out` may be the same buffer. The cuBLAS handle is created once per thread
/// and device, and set to `stream` and the workspace on every call.
///
/// Throws fo::Error: invalid_argument for a dtype other than f32/bf16, sizes < 0 or over
/// INT_MAX (cuBLAS's int), steps outside [0, kNsMaxSteps], eps not finite or < 0, null
/// pointers, a workspace below newton_schulz_workspace_bytes(); unsupported if cuBLAS cannot
/// be loaded; device_error for a CUDA or cuBLAS failure.
///
///   fo::cuda::newton_schulz_device(d_g, d_o, DType::bf16, batch, rows, cols,
///                                  kNsDefaultCoefficients, kNsDefaultSteps, kNsDefaultEps,
///                                  d_ws, ws_bytes, stream);
void newton_schulz_device(const void* d_in, void* d_out, DType dtype, std::int64_t batch,
                          std::int64_t rows, std::int64_t cols, const NsCoefficients& coefficients,
                          int steps, double eps, void* d_workspace, std::size_t workspace_bytes,
                          void* stream = nullptr);

/// Loads cuBLAS now (the first call does otherwise): libcublas.so.<major> from the loader's
/// path, then from the toolkit fusedopt was built with. Throws fo::Error (unsupported),
/// naming what it tried, when it is not there. Needs no GPU.
void require_cublas();

// The launcher of the iteration's scale (cuda_backend.cu): also compiled for the host
// emulation of the kernels.
FO_EMULATION_BEGIN

/// The iteration's first step on the device (kernels/cuda/newton_schulz.cuh): d_x = d_in /
/// max(||d_in||_F, eps) for each of `batch` contiguous matrices of `size` elements of dtype
/// (f32 or bf16), the sum of squares in the order of kernels/sum_order.hpp, as the CPU's
/// (newton_schulz_cpu). d_partials: ns_norm_partials(batch, size) doubles of device memory.
/// Ordered on `stream`; nothing waits for the host. d_in and d_x may be the same buffer.
/// Does nothing where batch or size is 0. No other checks (newton_schulz_device makes them);
/// throws fo::Error for another dtype or a failed launch.
void newton_schulz_normalize(const void* d_in, void* d_x, DType dtype, std::int64_t batch,
                             std::int64_t size, double eps, double* d_partials,
                             void* stream = nullptr);

FO_EMULATION_END

}  // namespace fo::cuda
