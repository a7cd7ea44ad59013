#include "buffer.hpp"

#include <cstdlib>
#include <new>
#include <string>
#include <utility>

#include "cuda/cuda_backend.hpp"

namespace fo::detail {

Buffer::Buffer(Device device, int device_index, std::size_t bytes)
    : bytes_(bytes), device_(device), device_index_(device_index) {
  if (bytes == 0) return;
  if (device == Device::cuda) {
    data_ = cuda::allocate(bytes, device_index);
    return;
  }
  const std::size_t rounded = (bytes + 63) / 64 * 64;
  data_ = std::aligned_alloc(64, rounded);
  if (!data_)
    throw Error(StatusCode::out_of_memory,
                "cannot allocate " + std::to_string(rounded) + " bytes of optimizer state");
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
