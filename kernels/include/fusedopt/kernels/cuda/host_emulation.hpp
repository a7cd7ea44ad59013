// Host emulation of the CUDA features the library's kernels use, so that the kernels' own
// source, and the launchers that plan and pack their arguments, compile as plain C++ and run
// on the CPU in CI (docs/host-emulation.md says what this can and cannot show).
//
// Included only where FO_CUDA_HOST_EMULATION is defined, instead of the CUDA headers. A launch
// runs its blocks one after another; each block's threads are real threads (blockDim of
// them), so __syncthreads is a real barrier and a block's shared memory really is shared.
// Warp shuffles exchange values through a per-warp slot array between two warp barriers:
// every lane named in the mask must arrive, as on the hardware, or the launch stops with a
// message instead of hanging (a shuffle or barrier reached by only some threads is a bug).
// Launch limits are checked as the driver checks them (block size, grid size, 32 KB of
// parameters) and reported through cudaGetLastError.
//
// Device memory is host memory: a "device pointer" is any pointer the test hands in.
#pragma once

#if !defined(FO_CUDA_HOST_EMULATION)
#error "host_emulation.hpp is for FO_CUDA_HOST_EMULATION builds only"
#endif

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <exception>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

// ---------------------------------------------------------------- CUDA's keywords and types

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One block runs at a time in the whole process, so a function-local static is the block's
// shared memory.
#define __shared__ static
// A __constant__ variable (namespace scope, constant-initialized) is a plain host global.
#define __constant__

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }

using std::isfinite;

// Each emulated thread's own indices; the launch sets them.
inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

// ------------------------------------------------------------- the runtime calls launchers use

// Named apart from the real runtime's enum so that no emulated symbol can meet a real one.
enum fo_emulated_cuda_error {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
};
using cudaError_t = fo_emulated_cuda_error;
struct fo_emulated_stream;
using cudaStream_t = fo_emulated_stream*;

namespace fo::emu {

inline thread_local cudaError_t tl_last_error = cudaSuccess;

inline const char* error_name(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
  }
  return "cudaErrorUnknown";
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = tl_last_error;
  tl_last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return tl_last_error; }
inline const char* cudaGetErrorName(cudaError_t e) { return error_name(e); }
inline const char* cudaGetErrorString(cudaError_t e) { return error_name(e); }

[[noreturn]] inline void fatal(const char* what) {
  std::fprintf(stderr, "fusedopt host emulation: %s\n", what);
  std::abort();
}

/// futex(2) on a 32-bit atomic word.
inline long futex(std::atomic<unsigned>* word, int op, unsigned value, const timespec* timeout) {
  static_assert(sizeof(std::atomic<unsigned>) == sizeof(int), "a futex word is 32 bits");
  return syscall(SYS_futex, reinterpret_cast<int*>(word), op, static_cast<int>(value), timeout,
                 nullptr, 0);
}

/// A barrier for n threads on a futex: the last thread to arrive bumps the generation and
/// wakes the rest, who then return without touching a lock (a mutex and condition variable
/// made every wake-up contend, about 4 ms a barrier for a 256-thread block on two cores).
/// A thread not released within a minute ends the process with `what`: on a GPU, a barrier
/// or shuffle that not every thread reaches is a hang or undefined behaviour.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void arrive_and_wait(const char* what) {
    const unsigned generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      futex(&generation_, FUTEX_WAKE_PRIVATE, INT_MAX, nullptr);
      return;
    }
    const timespec second{1, 0};
    for (int waited = 0; generation_.load(std::memory_order_acquire) == generation;) {
      if (futex(&generation_, FUTEX_WAIT_PRIVATE, generation, &second) != 0 && errno == ETIMEDOUT &&
          ++waited == 60)
        fatal(what);
    }
  }

 private:
  const int n_;
  std::atomic<int> arrived_{0};
  std::atomic<unsigned> generation_{0};
};

struct Warp {
  explicit Warp(int lanes) : size(lanes), barrier(lanes) {}
  int size;
  Barrier barrier;
  std::uint64_t slot[32] = {};
};

/// The running block: its barrier and its warps.
struct Block {
  explicit Block(int threads) : barrier(threads) {
    for (int first = 0; first < threads; first += 32)
      warps.emplace_back(new Warp(threads - first < 32 ? threads - first : 32));
  }
  ~Block() {
    for (Warp* w : warps) delete w;
  }
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;
  Barrier barrier;
  std::vector<Warp*> warps;
};

inline thread_local Block* tl_block = nullptr;
inline thread_local int tl_thread = 0;  // linear thread index in the block

/// A warp shuffle: every lane publishes `value`, then reads lane `source(lane)`'s (its own
/// where source is outside the warp). Full-warp masks only, as the library's kernels use.
template <class T, class Source>
T shuffle(unsigned mask, T value, Source source) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(std::uint64_t),
                "shuffles move 32- or 64-bit values");
  Warp& w = *tl_block->warps[tl_thread / 32];
  const int lane = tl_thread % 32;
  const unsigned all = w.size == 32 ? 0xffffffffu : (1u << w.size) - 1u;
  if ((mask & all) != all) fatal("a warp shuffle whose mask leaves out lanes of the warp");
  std::memcpy(&w.slot[lane], &value, sizeof(T));
  w.barrier.arrive_and_wait("a warp shuffle that not every lane of the warp reached");
  const int from = source(lane);
  T out = value;
  if (from >= 0 && from < w.size) std::memcpy(&out, &w.slot[from], sizeof(T));
  w.barrier.arrive_and_wait("a warp shuffle that not every lane of the warp left");
  return out;
}

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

/// The threads of the emulated blocks, kept between launches (starting a block's threads
/// for each launch cost several times the work of a typical test launch): worker t, parked
/// on its own futex word, runs thread t of every launch with more than t threads; the
/// launching thread runs thread 0. Never destroyed: the workers stay parked at exit.
class Workers {
 public:
  static Workers& get() {
    static Workers* w = new Workers;
    return *w;
  }
  /// job(t) for every t in [0, n): t = 0 on the calling thread, the rest on workers; returns
  /// when all have returned. One call at a time (the launch mutex).
  template <class Job>
  void run(int n, const Job& job) {
    if (getpid() != pid_) {  // a forked child has none of its parent's workers
      workers_.clear();
      pid_ = getpid();
    }
    while (static_cast<int>(workers_.size()) < n - 1) {
      workers_.push_back(new Worker);
      std::thread(&Workers::work, this, workers_.back(), static_cast<int>(workers_.size()))
          .detach();
    }
    call_ = [](const void* j, int t) { (*static_cast<const Job*>(j))(t); };
    job_ = &job;
    const unsigned done = done_.load(std::memory_order_relaxed);
    remaining_.store(n - 1, std::memory_order_relaxed);
    for (int t = 1; t < n; ++t) {
      Worker& w = *workers_[static_cast<std::size_t>(t - 1)];
      w.start.fetch_add(1, std::memory_order_release);
      futex(&w.start, FUTEX_WAKE_PRIVATE, 1, nullptr);
    }
    job(0);
    while (n > 1 && done_.load(std::memory_order_acquire) == done)
      futex(&done_, FUTEX_WAIT_PRIVATE, done, nullptr);
  }

 private:
  struct Worker {
    std::atomic<unsigned> start{0};  // bumped for each launch the worker takes part in
  };
  void work(Worker* w, int t) {
    for (unsigned seen = 0;; ++seen) {
      while (w->start.load(std::memory_order_acquire) == seen)
        futex(&w->start, FUTEX_WAIT_PRIVATE, seen, nullptr);
      call_(job_, t);
      if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        done_.fetch_add(1, std::memory_order_release);
        futex(&done_, FUTEX_WAKE_PRIVATE, 1, nullptr);
      }
    }
  }
  std::vector<Worker*> workers_;
  pid_t pid_ = getpid();
  void (*call_)(const void*, int) = nullptr;
  const void* job_ = nullptr;
  std::atomic<int> remaining_{0};
  std::atomic<unsigned> done_{0};
};

/// Runs `kernel` over `grid` blocks of `block` threads with `args` as its parameters, as a
/// kernel launch would (launch errors go to cudaGetLastError). Blocks run one at a time, in
/// order of their linear index; the threads of one block run concurrently.
template <class... Params, class... Args>
void launch(dim3 grid, dim3 block, void (*kernel)(Params...), Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "a kernel launch with the wrong arity");
  constexpr std::size_t kParamBytes = (std::size_t{0} + ... + sizeof(Params));
  const unsigned long long threads = static_cast<unsigned long long>(block.x) * block.y * block.z;
  const unsigned long long blocks = static_cast<unsigned long long>(grid.x) * grid.y * grid.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || blocks == 0 || grid.x > 0x7FFFFFFFu ||
      grid.y > 65535 || grid.z > 65535 || kParamBytes > 32764) {
    tl_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  // One launch at a time in the whole process: shared memory is function-local static storage.
  const std::lock_guard<std::mutex> lock(launch_mutex());

  // The parameters are copied once, as into the kernel's parameter space.
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  Block ctx(static_cast<int>(threads));
  const auto body = [&](int t) {
    try {
      tl_block = &ctx;
      tl_thread = t;
      threadIdx = dim3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
      blockDim = block;
      gridDim = grid;
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            blockIdx = dim3(x, y, z);
            std::apply(kernel, params);
            // The block is over for every thread before the next one reuses shared memory.
            ctx.barrier.arrive_and_wait("a thread that did not finish its block");
          }
      tl_block = nullptr;
    } catch (...) {
      fatal("an exception escaped a kernel");
    }
  };
  Workers::get().run(static_cast<int>(threads), body);
}

/// `kernel<<<grid, block, 0, stream>>>(args...)`, spelled as a call.
template <class Kernel>
struct Launch {
  Kernel kernel;
  dim3 grid, block;
  template <class... Args>
  void operator()(Args&&... args) const {
    launch(grid, block, kernel, std::forward<Args>(args)...);
  }
};
template <class Kernel>
Launch<Kernel> make_launch(Kernel kernel, dim3 grid, dim3 block) {
  return {kernel, grid, block};
}

}  // namespace fo::emu

using fo::emu::cudaGetErrorName;
using fo::emu::cudaGetErrorString;
using fo::emu::cudaGetLastError;
using fo::emu::cudaPeekAtLastError;

// --------------------------------------------------------------------- device intrinsics

inline void __syncthreads() {
  fo::emu::tl_block->barrier.arrive_and_wait("a __syncthreads that not every thread reached");
}

template <class T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta) {
  return fo::emu::shuffle(mask, value,
                          [delta](int lane) { return lane + static_cast<int>(delta); });
}

template <class T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  return fo::emu::shuffle(mask, value, [lane_mask](int lane) { return lane ^ lane_mask; });
}

template <class T>
T __shfl_sync(unsigned mask, T value, int source) {
  return fo::emu::shuffle(mask, value, [source](int) { return source; });
}

inline unsigned long long atomicMin(unsigned long long* address, unsigned long long value) {
  unsigned long long old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (value < old && !__atomic_compare_exchange_n(address, &old, value, true, __ATOMIC_RELAXED,
                                                     __ATOMIC_RELAXED)) {
  }
  return old;
}
