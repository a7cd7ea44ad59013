#include "buffer.hpp"

#include <cstdlib>
#include <new>
#include <string>
#include <utility>

#include "cuda/cuda_backend.hpp"

namespace fo::detail {

StateBuffer::StateBuffer(Device device, int device_index, std::int64_t n)
    : size_(n), device_(device), device_index_(device_index) {
  if (n == 0) return;
  if (device == Device::cuda) {
    data_ = cuda::allocate(n, device_index);
    return;
  }
  const std::size_t bytes = (static_cast<std::size_t>(n) * sizeof(float) + 63) / 64 * 64;
  data_ = static_cast<float*>(std::aligned_alloc(64, bytes));
  if (!data_)
    throw Error(StatusCode::out_of_memory,
                "cannot allocate " + std::to_string(bytes) + " bytes of optimizer state");
}

StateBuffer::~StateBuffer() { release(); }

StateBuffer::StateBuffer(StateBuffer&& o) noexcept
    : data_(std::exchange(o.data_, nullptr)),
      size_(std::exchange(o.size_, 0)),
      device_(o.device_),
      device_index_(o.device_index_) {}

StateBuffer& StateBuffer::operator=(StateBuffer&& o) noexcept {
  if (this != &o) {
    release();
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
    device_ = o.device_;
    device_index_ = o.device_index_;
  }
  return *this;
}

void StateBuffer::release() noexcept {
  if (!data_) return;
  if (device_ == Device::cuda)
    cuda::deallocate(data_, device_index_);
  else
    std::free(data_);
  data_ = nullptr;
}

}  // namespace fo::detail
