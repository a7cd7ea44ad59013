// The Cholesky solve of damped Newton (fusedopt/newton.hpp) on the GPU, through cuSOLVER's
// potrf/potrs. Declared without CUDA headers (the stream is a void*, as in fo::Optimizer) so
// host code can include it; defined in newton_cusolver.cu, which loads cuSOLVER on first use.
#pragma once

namespace fo::cuda {

/// Solves A X = B for a symmetric positive definite A, on the device, ordered on `stream`
/// (a cudaStream_t; null: the default stream).
///
///   d_a    n x n, device memory. Only the lower triangle of A in row-major order is read
///          (the same elements as fo::cholesky_solve); overwritten by the Cholesky factor.
///   d_b    n x nrhs, device memory, each right-hand side contiguous (column-major with
///          leading dimension n; for nrhs = 1 simply a vector); overwritten by X.
///   d_info device int, or null. Non-null: receives potrf's info (0: solved; i > 0: the
///          leading minor of order i is not positive definite, and d_b holds garbage), and
///          nothing waits for the host. Null: the call synchronizes with `stream` and throws
///          fo::Error (invalid_argument) if A is not positive definite.
///
/// Throws fo::Error (invalid_argument) for n <= 0, nrhs <= 0 or null d_a/d_b; device_error
/// or out_of_memory for a CUDA or cuSOLVER failure. The cuSOLVER handle is created once per
/// thread and device; the workspace is stream-ordered (cudaMallocAsync / cudaFreeAsync).
///
///   fo::cuda::cholesky_solve_device(d_h, d_step, n, 1, d_info, stream);
void cholesky_solve_device(double* d_a, double* d_b, int n, int nrhs, int* d_info,
                           void* stream = nullptr);

/// Loads cuSOLVER now (the first solve does otherwise): libcusolver.so.<major> from the
/// loader's path, then from the toolkit fusedopt was built with. Throws fo::Error
/// (unsupported), naming what it tried, when it is not there. Needs no GPU.
void require_cusolver();
void cholesky_solve_device(float* d_a, float* d_b, int n, int nrhs, int* d_info,
                           void* stream = nullptr);

}  // namespace fo::cuda
