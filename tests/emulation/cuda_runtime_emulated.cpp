// The CUDA runtime side of the library (host/src/cuda/cuda_memory.cu, and the CUB, cuSOLVER
// and cuBLAS parts of sparse.cu, newton_cusolver.cu and newton_schulz.cu) over an emulated
// device whose memory is host memory: with the emulated launchers (tests/emulation/*_emulated.cpp),
// the whole library's CUDA path runs on the CPU in fusedopt_emulated_device
// (docs/host-emulation.md).
//
// "Device memory" (4 GiB of it) is what allocate() returned: 256-byte aligned host memory of the
// size asked for, filled with 0xFF bytes (NaN floats and doubles, -1 counts) as cudaMalloc leaves
// it undefined, and recorded so that is_device_pointer answers as the runtime does and every copy,
// fill and free checks that its device side lies inside one live allocation and its host side
// outside every one. A failed check ends the process with a message: on a GPU it is an illegal
// address or a wrong copy. Every operation is synchronous; there is one device, 0.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <numeric>
#include <string>
#include <vector>

#include "cuda/cuda_backend.hpp"
#include "cuda/newton_device.hpp"
#include "cuda/newton_schulz_device.hpp"
#include "emulation/emulated_device.hpp"
#include "sparse.hpp"

namespace fo::cuda {
namespace {

// The emulated device's memory: more than any test needs, and a bound, so that a request as
// large as a real GPU refuses (terabytes) fails as cudaMalloc does instead of taking the host.
constexpr std::size_t kCapacity = std::size_t{4} << 30;

struct Allocations {
  std::mutex mutex;
  std::map<std::uintptr_t, std::size_t> live;  // start -> bytes asked for
  std::size_t live_bytes = 0;
  long fail_after = -1;  // allocations left before they fail; < 0: never
};

Allocations& allocations() {
  static Allocations* a = new Allocations;  // never destroyed: static destructors may free
  return *a;
}

[[noreturn]] void fatal(const std::string& what) {
  std::fprintf(stderr, "fusedopt emulated device: %s\n", what.c_str());
  std::abort();
}

// The live allocation holding [p, p + bytes), or none (bytes 0: holding p).
bool inside_live(const void* p, std::size_t bytes) {
  const auto at = reinterpret_cast<std::uintptr_t>(p);
  Allocations& a = allocations();
  const std::lock_guard<std::mutex> lock(a.mutex);
  auto it = a.live.upper_bound(at);
  if (it == a.live.begin()) return false;
  --it;
  const std::size_t offset = at - it->first;
  return offset < std::max<std::size_t>(it->second, 1) && bytes <= it->second - offset;
}

void check_device_range(const void* p, std::size_t bytes, const char* who) {
  if (!inside_live(p, bytes))
    fatal(std::string(who) + ": " + std::to_string(bytes) +
          " bytes of device memory that are not inside one live allocation");
}

void check_host_range(const void* p, std::size_t bytes, const char* who) {
  if (!p) fatal(std::string(who) + ": a null host pointer");
  if (inside_live(p, 1) || (bytes > 0 && inside_live(static_cast<const char*>(p) + bytes - 1, 1)))
    fatal(std::string(who) + ": the host side is device memory");
}

[[noreturn]] void out_of_memory(std::size_t bytes) {
  throw Error(StatusCode::out_of_memory, "emulated cudaMalloc of " + std::to_string(bytes) +
                                             " bytes failed: cudaErrorMemoryAllocation");
}

void* raw_allocate(std::size_t bytes) {
  Allocations& a = allocations();
  {
    const std::lock_guard<std::mutex> lock(a.mutex);
    if (a.fail_after == 0 || bytes > kCapacity - a.live_bytes) out_of_memory(bytes);
    if (a.fail_after > 0) --a.fail_after;
    a.live_bytes += bytes;  // reserved
  }
  // The size asked for, not rounded up (as cudaMalloc's 256 bytes): AddressSanitizer then
  // sees a kernel that reads or writes one element past a buffer.
  void* p = nullptr;
  if (posix_memalign(&p, 256, std::max<std::size_t>(bytes, 1)) != 0) p = nullptr;  // as cudaMalloc
  const std::lock_guard<std::mutex> lock(a.mutex);
  if (!p) {
    a.live_bytes -= bytes;
    out_of_memory(bytes);
  }
  std::memset(p, 0xFF, bytes);  // cudaMalloc's memory is undefined: NaN, not zero
  a.live[reinterpret_cast<std::uintptr_t>(p)] = bytes;
  return p;
}

void raw_deallocate(void* p) {
  if (!p) return;
  Allocations& a = allocations();
  {
    const std::lock_guard<std::mutex> lock(a.mutex);
    const auto it = a.live.find(reinterpret_cast<std::uintptr_t>(p));
    if (it == a.live.end()) fatal("a free of a pointer that is not a live allocation");
    a.live_bytes -= it->second;
    a.live.erase(it);
  }
  std::free(p);
}

[[noreturn]] void unsupported(const char* what) {
  throw Error(StatusCode::unsupported, std::string("the emulated device has no ") + what);
}

}  // namespace

bool built_with_cuda() noexcept { return true; }
int device_count() noexcept { return 1; }

DeviceGuard::DeviceGuard(int device) {
  if (device > 0)  // cudaSetDevice's failure
    throw Error(StatusCode::device_error,
                "emulated cudaSetDevice(" + std::to_string(device) + ") failed: one device");
}
DeviceGuard::~DeviceGuard() = default;

void* allocate(std::size_t bytes, int device) {
  const DeviceGuard guard(device);
  return raw_allocate(bytes);
}
void deallocate(void* p, int) noexcept { raw_deallocate(p); }
void* allocate_async(std::size_t bytes, void*) { return raw_allocate(bytes); }
void deallocate_async(void* p, void*) noexcept { raw_deallocate(p); }

void memset_zero(void* p, std::size_t bytes, void*) {
  check_device_range(p, bytes, "memset_zero");
  std::memset(p, 0, bytes);
}

void copy_to_host(void* h_dst, const void* d_src, std::size_t bytes) {
  if (bytes == 0) return;
  check_device_range(d_src, bytes, "copy_to_host");
  check_host_range(h_dst, bytes, "copy_to_host");
  std::memcpy(h_dst, d_src, bytes);
}

void copy_from_host(void* d_dst, const void* h_src, std::size_t bytes, void*) {
  if (bytes == 0) return;
  check_device_range(d_dst, bytes, "copy_from_host");
  check_host_range(h_src, bytes, "copy_from_host");
  std::memcpy(d_dst, h_src, bytes);
}

void copy_device(void* d_dst, const void* d_src, std::size_t bytes, void*) {
  if (bytes == 0) return;
  check_device_range(d_dst, bytes, "copy_device");
  check_device_range(d_src, bytes, "copy_device");
  const auto dst = reinterpret_cast<std::uintptr_t>(d_dst),
             src = reinterpret_cast<std::uintptr_t>(d_src);
  if (dst < src + bytes && src < dst + bytes) fatal("copy_device: overlapping ranges");
  std::memcpy(d_dst, d_src, bytes);
}

void synchronize() {}

bool is_device_pointer(const void* p, int device) { return p && device < 1 && inside_live(p, 0); }

// ---------------------------------------------------------------- sparse steps without CUB

// sparse.cu sorts and run-length encodes the indices with CUB; here the host does it (the
// same stable order: equal indices keep their positions ascending) into device buffers, and
// the emulated row kernels (sparse_launch.cu) run over them.
std::int64_t sparse_first_bad_index(const detail::SparseStep& s, void* stream) {
  if (s.nnz == 0) return -1;
  check_device_range(s.indices, static_cast<std::size_t>(s.nnz) * dtype_size(s.index_dtype),
                     "sparse_first_bad_index");
  auto* d_first = static_cast<unsigned long long*>(raw_allocate(sizeof(unsigned long long)));
  *d_first = ULLONG_MAX;
  launch_first_bad_index(s, d_first, stream);
  const unsigned long long first = *d_first;
  raw_deallocate(d_first);
  return first == ULLONG_MAX ? -1 : static_cast<std::int64_t>(first);
}

namespace {

// Device memory freed at the end of the scope.
struct Scratch {
  explicit Scratch(std::size_t bytes) : p(raw_allocate(bytes)) {}
  ~Scratch() { raw_deallocate(p); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  void* p;
};

template <class A, class T>
void sparse_rows_from_host_sort(const typename A::Options& options, std::int64_t step,
                                const detail::SparseStep& s, void* stream) {
  const auto n = static_cast<std::size_t>(s.nnz);
  check_device_range(s.indices, n * sizeof(T), "sparse_step");
  check_device_range(s.grad_rows, n * static_cast<std::size_t>(s.dim) * sizeof(float),
                     "sparse_step");
  const T* indices = static_cast<const T*>(s.indices);
  Scratch rows(n * sizeof(T)), offsets(n * sizeof(SparsePos)), positions(n * sizeof(SparsePos)),
      runs(sizeof(SparsePos));
  auto* sorted = static_cast<SparsePos*>(positions.p);
  std::iota(sorted, sorted + n, 0);
  std::stable_sort(sorted, sorted + n, [&](SparsePos a, SparsePos b) {
    return indices[static_cast<std::size_t>(a)] < indices[static_cast<std::size_t>(b)];
  });
  auto* unique = static_cast<T*>(rows.p);
  auto* offset = static_cast<SparsePos*>(offsets.p);
  SparsePos count = 0;
  for (std::size_t k = 0; k < n; ++k) {
    const T row = indices[static_cast<std::size_t>(sorted[k])];
    if (count == 0 || unique[count - 1] != row) {
      unique[count] = row;
      offset[count++] = static_cast<SparsePos>(k);
    }
  }
  *static_cast<SparsePos*>(runs.p) = count;
  launch_sparse_rows<A>(options, step, s,
                        {unique, offset, sorted, static_cast<const SparsePos*>(runs.p)}, stream);
}

}  // namespace

template <class A>
void sparse_step(const typename A::Options& options, std::int64_t step, const detail::SparseStep& s,
                 void* stream) {
  if constexpr (!SparseCapable<A>::value) {
    throw Error(StatusCode::unsupported, std::string(A::kName) + " takes no sparse steps");
  } else {
    if (s.nnz == 0) return;
    if (s.nnz > INT_MAX)
      throw Error(StatusCode::invalid_argument, "sparse step: " + std::to_string(s.nnz) +
                                                    " indices; the CUDA backend takes at most " +
                                                    std::to_string(INT_MAX) + " per step");
    if (s.index_dtype == DType::i64)
      sparse_rows_from_host_sort<A, std::int64_t>(options, step, s, stream);
    else
      sparse_rows_from_host_sort<A, std::int32_t>(options, step, s, stream);
  }
}
FO_FOR_EACH_DENSE_ALGORITHM(FO_INSTANTIATE_CUDA_SPARSE_STEP)

// ---------------------------------------------------------------------- damped Newton's solve

void cholesky_solve_device(double*, double*, int, int, int*, void*) { unsupported("cuSOLVER"); }
void cholesky_solve_device(float*, float*, int, int, int*, void*) { unsupported("cuSOLVER"); }
void require_cusolver() { unsupported("cuSOLVER"); }

// ------------------------------------------------------- Muon's Newton-Schulz iteration (cuBLAS)

void newton_schulz_device(const void*, void*, DType, std::int64_t, std::int64_t, std::int64_t,
                          const NsCoefficients&, int, double, void*, std::size_t, void*) {
  unsupported("cuBLAS");
}
void require_cublas() { unsupported("cuBLAS"); }

}  // namespace fo::cuda

namespace fo::emulated_device {

std::size_t live_allocations() {
  cuda::Allocations& a = cuda::allocations();
  const std::lock_guard<std::mutex> lock(a.mutex);
  return a.live.size();
}

void fail_allocations_after(long n) {
  cuda::Allocations& a = cuda::allocations();
  const std::lock_guard<std::mutex> lock(a.mutex);
  a.fail_after = n;
}

}  // namespace fo::emulated_device
