// The device-side schedule of a build without CUDA: unsupported.
#include "cuda/schedule_device.hpp"

namespace fo::cuda {

void schedule_to_device(const Schedule&, const std::int64_t*, float*, void*) {
  throw Error(StatusCode::unsupported, "fusedopt was built without CUDA");
}

}  // namespace fo::cuda
