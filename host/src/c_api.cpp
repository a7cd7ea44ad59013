// The C ABI: each entry point converts C arguments, calls the C++ API, and turns any
// exception into a status code and the calling thread's last-error message.
#include <new>
#include <string>
#include <vector>

#include "cuda/cuda_backend.hpp"
#include "fusedopt/fusedopt.h"
#include "fusedopt/optimizer.hpp"
#include "fusedopt/schedule.hpp"

struct fo_optimizer {
  fo::Optimizer impl;
};

namespace {

// 2: step settings, device scalars, grad_norm; 3: schedules; 4: fo_optimizer_state_numel;
// 5: the weight EMA (ema_decay, fo_optimizer_swap_ema, fo_optimizer_copy_ema_to_params)
// 6: Schedule-Free's eval and train (fo_optimizer_eval, fo_optimizer_train)
constexpr int kAbiVersion = 7;

thread_local std::string t_last_error;

template <class F>
fo_status guarded(F&& f) noexcept {
  try {
    f();
    t_last_error.clear();
    return FO_OK;
  } catch (const fo::Error& e) {
    t_last_error = e.what();
    return static_cast<fo_status>(e.code());
  } catch (const std::bad_alloc&) {
    t_last_error = "out of host memory";
    return FO_OUT_OF_MEMORY;
  } catch (const std::exception& e) {
    t_last_error = e.what();
    return FO_INVALID_ARGUMENT;
  } catch (...) {
    t_last_error = "unknown error";
    return FO_INVALID_ARGUMENT;
  }
}

[[noreturn]] void invalid(const std::string& msg) {
  throw fo::Error(fo::StatusCode::invalid_argument, msg);
}

void require(const void* p, const char* what) {
  if (!p) invalid(std::string(what) + " is null");
}

}  // namespace

extern "C" {

int fo_abi_version(void) { return kAbiVersion; }

const char* fo_last_error(void) { return t_last_error.c_str(); }

int fo_cuda_device_count(void) { return fo::cuda::device_count(); }

fo_status fo_optimizer_create(const char* algorithm, fo_device device, int device_index,
                              fo_optimizer** out) {
  return guarded([&] {
    require(out, "out");
    require(algorithm, "algorithm");
    *out =
        new fo_optimizer{fo::Optimizer(algorithm, static_cast<fo::Device>(device), device_index)};
  });
}

void fo_optimizer_destroy(fo_optimizer* opt) { delete opt; }

fo_status fo_optimizer_set_option(fo_optimizer* opt, const char* key, double value) {
  return guarded([&] {
    require(opt, "optimizer");
    require(key, "key");
    opt->impl.set_option(key, value);
  });
}

fo_status fo_optimizer_get_option(const fo_optimizer* opt, const char* key, double* value) {
  return guarded([&] {
    require(opt, "optimizer");
    require(key, "key");
    require(value, "value");
    *value = opt->impl.option(key);
  });
}

fo_status fo_optimizer_add_param_with(fo_optimizer* opt, const char* name, const char* algorithm,
                                      void* data, fo_dtype dtype, int ndim, const int64_t* shape) {
  return guarded([&] {
    require(opt, "optimizer");
    require(name, "name");
    if (ndim < 0) invalid("ndim must be >= 0, got " + std::to_string(ndim));
    if (ndim > 0) require(shape, "shape");
    opt->impl.add_param(name, data, static_cast<fo::DType>(dtype),
                        std::vector<std::int64_t>(shape, shape + ndim), algorithm ? algorithm : "");
  });
}

fo_status fo_optimizer_add_param(fo_optimizer* opt, const char* name, void* data, fo_dtype dtype,
                                 int ndim, const int64_t* shape) {
  return fo_optimizer_add_param_with(opt, name, nullptr, data, dtype, ndim, shape);
}

fo_status fo_optimizer_param_algorithm(const fo_optimizer* opt, const char* name,
                                       const char** out) {
  return guarded([&] {
    require(opt, "optimizer");
    require(name, "name");
    require(out, "out");
    *out = opt->impl.param_algorithm(name).c_str();
  });
}

fo_status fo_optimizer_set_param_option(fo_optimizer* opt, const char* name, const char* key,
                                        double value) {
  return guarded([&] {
    require(opt, "optimizer");
    require(name, "name");
    require(key, "key");
    opt->impl.set_param_option(name, key, value);
  });
}

fo_status fo_optimizer_step(fo_optimizer* opt, const void* const* grads, void* stream) {
  return guarded([&] {
    require(opt, "optimizer");
    opt->impl.step(grads, stream);
  });
}

fo_status fo_optimizer_step_sparse(fo_optimizer* opt, const char* name, const void* indices,
                                   fo_dtype index_dtype, int64_t nnz, const void* grad_rows,
                                   void* stream) {
  return guarded([&] {
    require(opt, "optimizer");
    require(name, "name");
    opt->impl.step_sparse(name, indices, static_cast<fo::DType>(index_dtype), nnz, grad_rows,
                          stream);
  });
}

fo_status fo_optimizer_get_state(const fo_optimizer* opt, const char* name, const char* state,
                                 float* out, int64_t numel) {
  return guarded([&] {
    require(opt, "optimizer");
    require(name, "name");
    require(state, "state");
    opt->impl.get_state(name, state, out, numel);
  });
}

fo_status fo_optimizer_state_numel(const fo_optimizer* opt, const char* name, const char* state,
                                   int64_t* numel) {
  return guarded([&] {
    require(opt, "optimizer");
    require(name, "name");
    require(state, "state");
    require(numel, "numel");
    *numel = opt->impl.state_numel(name, state);
  });
}

fo_status fo_optimizer_step_count(const fo_optimizer* opt, const char* name, int64_t* step) {
  return guarded([&] {
    require(opt, "optimizer");
    require(name, "name");
    require(step, "step");
    *step = opt->impl.step_count(name);
  });
}

fo_status fo_optimizer_save(const fo_optimizer* opt, const char* path) {
  return guarded([&] {
    require(opt, "optimizer");
    require(path, "path");
    opt->impl.save(path);
  });
}

fo_status fo_optimizer_load(fo_optimizer* opt, const char* path) {
  return guarded([&] {
    require(opt, "optimizer");
    require(path, "path");
    opt->impl.load(path);
  });
}

fo_status fo_optimizer_set_device_scalars(fo_optimizer* opt, const float* d_lr,
                                          const float* d_grad_multiplier, float* d_found_inf) {
  return guarded([&] {
    require(opt, "optimizer");
    opt->impl.set_device_scalars(d_lr, d_grad_multiplier, d_found_inf);
  });
}

fo_status fo_optimizer_grad_norm(const fo_optimizer* opt, float* out) {
  return guarded([&] {
    require(opt, "optimizer");
    require(out, "out");
    *out = opt->impl.grad_norm();
  });
}

fo_status fo_optimizer_swap_ema(fo_optimizer* opt, void* stream) {
  return guarded([&] {
    require(opt, "optimizer");
    opt->impl.swap_ema(stream);
  });
}

fo_status fo_optimizer_copy_ema_to_params(fo_optimizer* opt, void* stream) {
  return guarded([&] {
    require(opt, "optimizer");
    opt->impl.copy_ema_to_params(stream);
  });
}

fo_status fo_optimizer_eval(fo_optimizer* opt, void* stream) {
  return guarded([&] {
    require(opt, "optimizer");
    opt->impl.eval(stream);
  });
}

fo_status fo_optimizer_train(fo_optimizer* opt, void* stream) {
  return guarded([&] {
    require(opt, "optimizer");
    opt->impl.train(stream);
  });
}

fo_status fo_schedule_lr(const char* spec, int64_t step, double* out) {
  return guarded([&] {
    require(spec, "spec");
    require(out, "out");
    *out = fo::scheduled_lr(fo::parse_schedule(spec), step);
  });
}

fo_status fo_schedule_to_device(const char* spec, const int64_t* d_step, float* d_lr,
                                void* stream) {
  return guarded([&] {
    require(spec, "spec");
    fo::schedule_to_device(fo::parse_schedule(spec), d_step, d_lr, stream);
  });
}

}  // extern "C"
