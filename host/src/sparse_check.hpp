// The checks of a sparse step's index and gradient buffers, shared by fo::Optimizer's
// step_sparse and the functional fused_sparse_step: one place for what makes them bad.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include "cpu/cpu_backend.hpp"
#include "cuda/cuda_backend.hpp"
#include "messages.hpp"
#include "sparse.hpp"

namespace fo::detail {

/// Throws fo::Error (invalid_argument), with who() + the reason, unless the index dtype, nnz,
/// the index and gradient-row pointers (non-null, aligned; on CUDA, memory of `device_index`
/// unless `on_device` vouches for them) and every index (in [0, s.rows)) are good. Reads the
/// indices (on CUDA, one kernel and a wait on `stream`). `who` is called only to build a
/// message, so a good step allocates nothing here.
template <class Who>
void check_sparse_buffers(const SparseStep& s, Device device, int device_index, bool on_device,
                          void* stream, const Who& who) {
  const bool cuda = device == Device::cuda;
  if (s.index_dtype != DType::i32 && s.index_dtype != DType::i64)
    invalid(who() + "indices must be int32 or int64, got " + dtype_name(s.index_dtype));
  if (s.nnz < 0) invalid(who() + "nnz must be >= 0, got " + std::to_string(s.nnz));
  if (cuda && s.nnz > 2147483647)  // CUB's run-length encode counts in int
    invalid(who() + "a CUDA sparse step takes at most 2^31-1 indices, got " +
            std::to_string(s.nnz));
  if (s.nnz == 0) return;
  if (!s.indices) invalid(who() + "indices is null");
  if (!s.grad_rows) invalid(who() + "grad_rows is null");
  if (reinterpret_cast<std::uintptr_t>(s.indices) % dtype_size(s.index_dtype) != 0)
    invalid(who() + "indices are not aligned to their element size");
  if (reinterpret_cast<std::uintptr_t>(s.grad_rows) % sizeof(float) != 0)
    invalid(who() + "grad_rows is not aligned to its element size");
  if (cuda && !on_device) {  // a host pointer in a kernel would end the CUDA context
    if (!cuda::is_device_pointer(s.indices, device_index))
      invalid(who() + "indices are not memory of CUDA device " + std::to_string(device_index));
    if (!cuda::is_device_pointer(s.grad_rows, device_index))
      invalid(who() + "grad_rows is not memory of CUDA device " + std::to_string(device_index));
  }
  const std::int64_t bad =
      cuda ? cuda::sparse_first_bad_index(s, stream) : cpu::sparse_first_bad_index(s);
  if (bad < 0) return;
  const std::size_t size = dtype_size(s.index_dtype);
  const auto* src = static_cast<const char*>(s.indices) + bad * static_cast<std::int64_t>(size);
  std::int64_t value = 0;
  std::int32_t v32 = 0;
  void* dst = s.index_dtype == DType::i32 ? static_cast<void*>(&v32) : &value;
  if (cuda)
    cuda::copy_to_host(dst, src, size);
  else
    std::memcpy(dst, src, size);
  if (s.index_dtype == DType::i32) value = v32;
  invalid(who() + "index " + std::to_string(value) + " at position " + std::to_string(bad) +
          " is outside [0, " + std::to_string(s.rows) + "); nothing was changed");
}

}  // namespace fo::detail
