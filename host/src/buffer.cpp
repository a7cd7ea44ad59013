#include "buffer.hpp"

#include <cstdlib>
#include <new>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <string>
#include <utility>

#include "cuda/cuda_backend.hpp"

namespace fo::detail {
namespace {

// Host buffers of this size or more start on its boundary and ask for transparent huge pages
// over their whole huge pages: a step streams each state once, and with 4 KiB pages every
// 4 KiB of every stream costs a TLB miss and a page walk. The tail past the last whole huge
// page keeps small pages, so a buffer never holds more memory than it asked for (the
// alignment only reserves address space). Where THP is off the advice changes nothing.
constexpr std::size_t kHugePage = std::size_t{2} << 20;

void* host_allocate(std::size_t bytes) {
  const std::size_t rounded = (bytes + 63) / 64 * 64;
  if (bytes < kHugePage) return std::aligned_alloc(64, rounded);
  void* p = nullptr;
  if (posix_memalign(&p, kHugePage, rounded) != 0) return nullptr;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(p, bytes / kHugePage * kHugePage, MADV_HUGEPAGE);  // advice: a failure is no error
#endif
  return p;
}

}  // namespace

Buffer::Buffer(Device device, int device_index, std::size_t bytes)
    : bytes_(bytes), device_(device), device_index_(device_index) {
  if (bytes == 0) return;
  if (device == Device::cuda) {
    data_ = cuda::allocate(bytes, device_index);
    return;
  }
  data_ = host_allocate(bytes);
  if (!data_)
    throw Error(StatusCode::out_of_memory,
                "cannot allocate " + std::to_string(bytes) + " bytes of optimizer state");
}

Buffer::~Buffer() { release(); }

Buffer::Buffer(Buffer&& o) noexcept
    : data_(std::exchange(o.data_, nullptr)),
      bytes_(std::exchange(o.bytes_, 0)),
      device_(o.device_),
      device_index_(o.device_index_) {}

Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    release();
    data_ = std::exchange(o.data_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
    device_ = o.device_;
    device_index_ = o.device_index_;
  }
  return *this;
}

void Buffer::release() noexcept {
  if (!data_) return;
  if (device_ == Device::cuda)
    cuda::deallocate(data_, device_index_);
  else
    std::free(data_);
  data_ = nullptr;
}

}  // namespace fo::detail
