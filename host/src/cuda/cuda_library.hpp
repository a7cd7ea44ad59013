// The CUDA math libraries fusedopt calls (cuBLAS in newton_schulz.cu, cuSOLVER in
// newton_cusolver.cu), loaded on first use with dlopen rather than linked: a program that links
// fusedopt and steps on the CPU must start without the toolkit's libraries
// (tests/consumer/without_cuda.sh checks it). What loading, binding, error mapping and
// per-thread handles have in common; each library's file keeps its entry points and its
// status names. Included by .cu files only.
#pragma once

#include <cuda_runtime.h>
#include <dlfcn.h>

#include <cstddef>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/cuda_check.hpp"
#include "fusedopt/types.hpp"

#define FO_CUDA_LIBRARY_STR2(x) #x
#define FO_CUDA_LIBRARY_STR(x) FO_CUDA_LIBRARY_STR2(x)

namespace fo::cuda {

/// Opens the library `soname` the usual way (LD_LIBRARY_PATH, the loader cache), then in the
/// toolkit fusedopt was built with. Throws fo::Error (unsupported) naming `who` (the calling
/// function) and `what` (the library, e.g. "cuBLAS") when neither finds it. Never dlclose'd:
/// handles live until their threads exit, which may be after static destructors run.
inline void* open_cuda_library(const char* soname, const char* who, const char* what) {
  void* lib = dlopen(soname, RTLD_NOW | RTLD_LOCAL);
  std::string tried = soname;
#ifdef FO_CUDA_TOOLKIT_LIBRARY_DIR
  if (!lib) {
    const std::string path = std::string(FO_CUDA_TOOLKIT_LIBRARY_DIR) + "/" + soname;
    lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    tried += ", " + path;
  }
#endif
  if (!lib)
    throw Error(StatusCode::unsupported, std::string(who) + " needs " + what +
                                             ", which was not found (tried " + tried +
                                             "): install the CUDA toolkit's " + what +
                                             " or add its directory to LD_LIBRARY_PATH");
  return lib;
}

/// Points `fn` at the symbol `name` of `lib`; throws fo::Error (unsupported) if it lacks it.
template <class Fn>
void bind_cuda_symbol(void* lib, Fn& fn, const char* name, const char* who, const char* soname) {
  fn = reinterpret_cast<Fn>(dlsym(lib, name));
  if (!fn)
    throw Error(StatusCode::unsupported, std::string(who) + ": " + soname + " lacks " + name);
}

/// A failed library call as fo::Error: out_of_memory where the library failed to allocate,
/// device_error for anything else.
[[noreturn]] inline void throw_cuda_library_error(bool alloc_failed, const char* status_name,
                                                  const char* expr, const char* file, int line) {
  throw Error(
      alloc_failed ? StatusCode::out_of_memory : StatusCode::device_error,
      std::string(file) + ":" + std::to_string(line) + ": " + expr + " failed: " + status_name);
}

/// One library handle per thread and device, created on first use and destroyed when the
/// thread exits: creating one costs far more than a small call, and a handle must not be used
/// by two threads at once. Library::create() returns a new handle (throwing on failure) and
/// Library::destroy(h) frees one (its status ignored: nothing can be done about it at exit).
template <class Handle, class Library>
class HandleCache {
 public:
  HandleCache() = default;
  HandleCache(const HandleCache&) = delete;
  HandleCache& operator=(const HandleCache&) = delete;
  ~HandleCache() {
    for (Handle h : handles_)
      if (h) Library::destroy(h);
  }
  Handle get() {
    int device = 0;
    FO_CUDA_CHECK(cudaGetDevice(&device));
    if (handles_.size() <= static_cast<std::size_t>(device)) handles_.resize(device + 1, nullptr);
    if (!handles_[device]) handles_[device] = Library::create();
    return handles_[device];
  }

  /// This thread's handle for the current device.
  static Handle thread_handle() {
    thread_local HandleCache cache;
    return cache.get();
  }

 private:
  std::vector<Handle> handles_;
};

}  // namespace fo::cuda
