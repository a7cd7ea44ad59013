// The CUDA backend as the host-compiled code sees it. Defined in cuda_backend.cu when the
// library is built with CUDA, and by cuda_stub.cpp (every call: fo::Error unsupported)
// otherwise, so no host file needs the CUDA headers.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "cuda/newton_schulz_device.hpp"
#include "fusedopt/kernels/config.hpp"
#include "fusedopt/kernels/matrix_step.hpp"
#include "fusedopt/kernels/registry.hpp"
#include "fusedopt/types.hpp"
#include "multi_tensor_plan.hpp"

namespace fo::cuda {

bool built_with_cuda() noexcept;
/// GPUs visible to this process; 0 without CUDA or without a driver.
int device_count() noexcept;

/// One tensor of a multi-tensor step; every pointer is device memory.
struct ListEntry {
  void* param;
  const void* grad;
  float* master;  // f32 master weights, or null
  void* states[kMaxStates];
  std::int64_t numel;
  std::int64_t step;     // the step being taken, when step counts live on the host
  int key;               // stable id of the param: its random stream and device step slot
  float* ema = nullptr;  // f32 weight EMA (ListSettings::ema_weight), or null
  // The algorithm's scalar states (ScalarList: kMaxScalars doubles), read by the step and
  // advanced after it on the stream; null where it keeps none.
  double* scalars = nullptr;
  MatrixView view{};  // the tensor as matrices (factored algorithms), or unset
};

/// Settings shared by every tensor of one step.
struct ListSettings {
  DType param_dtype = DType::f32;
  DType grad_dtype = DType::f32;
  DType state_dtype = DType::f32;
  bool stochastic = false;
  std::uint64_t seed = 0;
  float grad_multiplier = 1.0f;              // gradients are multiplied by this
  float ema_weight = 0.0f;                   // 1 - decay of the entries' weight EMAs
  const float* d_lr = nullptr;               // lr in device memory (capturable), or null
  std::int64_t* d_steps = nullptr;           // device step counts by key (read, then incremented)
  const float* d_grad_multiplier = nullptr;  // device multiplier of the gradients, or null
  const float* d_clip = nullptr;             // clipping coefficient, or null
  const float* d_found_inf = nullptr;        // skip the step where non-zero, or null
  void* d_workspace = nullptr;               // step_workspace() bytes of device memory
  std::size_t workspace_bytes = 0;
};

/// Bytes of a matrix step's iteration input X at the start of its workspace (float32 size;
/// 256-byte aligned, so the iteration's own workspace after it is too).
inline std::size_t matrix_input_bytes(std::int64_t numel) {
  return ns_align(static_cast<std::size_t>(numel) * sizeof(float));
}

/// Bytes of device workspace a step of algorithm A over these entries needs (ListSettings):
/// none for a one-pass algorithm; for a trust-ratio one (kernels/trust_ratio.hpp) two doubles
/// per block of kSumChunk elements and two per tensor, whichever launches the entries take;
/// for a factored one (kernels/factored.hpp) the largest tensor's chunk sums, row sums,
/// per-segment column sums and normalizers; for a matrix one (kernels/matrix_step.hpp) the
/// largest tensor's iteration input X and its Newton-Schulz workspace, sized for float32 (a
/// bf16 iteration uses less of it: the options are not known here).
template <class A>
std::size_t step_workspace(const ListEntry* entries, std::size_t n) {
  if constexpr (MatrixCapable<A>::value) {
    std::size_t bytes = 0;  // tensors step one after another: the largest one's need
    for (std::size_t i = 0; i < n; ++i) {
      const ListEntry& e = entries[i];
      const MatrixView& v = e.view;
      if (e.numel == 0 || !is_matrix_batch(v, e.numel)) continue;  // refused or nothing to do
      bytes =
          std::max(bytes, matrix_input_bytes(e.numel) +
                              newton_schulz_workspace_bytes(DType::f32, v.batch, v.rows, v.cols));
    }
    return bytes;
  } else if constexpr (FactoredCapable<A>::value) {
    // Tensors step one after another, each in all of it: the largest one's need.
    std::size_t doubles = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const ListEntry& e = entries[i];
      const MatrixView& v = e.view;
      std::size_t d = 2 + 2 * static_cast<std::size_t>((e.numel + kSumChunk - 1) / kSumChunk);
      if (v.factored())
        d += static_cast<std::size_t>(
            v.batch * v.rows + v.batch * v.cols +
            v.batch * ((v.rows + kColSegment - 1) / kColSegment) * v.cols + v.batch);
      doubles = std::max(doubles, d);
    }
    return doubles * sizeof(double);
  } else if constexpr (!TrustRatioCapable<A>::value) {
    (void)entries, (void)n;
    return 0;
  } else {
    std::size_t doubles = 0;
    for (std::size_t i = 0; i < n; ++i)
      doubles += 2 + 2 * static_cast<std::size_t>((entries[i].numel + kSumChunk - 1) / kSumChunk);
    return doubles * sizeof(double);
  }
}

// The launchers (cuda_backend.cu): also compiled for the host emulation of the kernels.
FO_EMULATION_BEGIN

/// The launches of a list of tensors: which share a launch, and where each one's blocks start.
/// Depends on the tensors' sizes only, so a caller stepping the same tensors reuses it.
using ListPlan = std::vector<detail::LaunchGroup>;
ListPlan plan_list(const ListEntry* entries, std::size_t n);

/// Launches one step of algorithm A under valid `options` over `n` tensors planned as `plan`
/// (plan_list of the same entries), on `stream`. With settings.d_steps, each tensor's device
/// step count goes up by one after its launch (unless found_inf). Entries at different host
/// steps (no d_steps) are grouped by step and planned here. Throws fo::Error on a launch
/// failure.
template <class A>
void multi_tensor_step(const typename A::Options& options, const ListEntry* entries, std::size_t n,
                       const ListPlan& plan, const ListSettings& settings, void* stream);
// Its explicit instantiation for algorithm A (cuda_backend.cu, and the CPU-only stub).
#define FO_INSTANTIATE_MULTI_TENSOR_STEP(A)                                                    \
  template void multi_tensor_step<fo::A>(const fo::A::Options&, const ListEntry*, std::size_t, \
                                         const ListPlan&, const ListSettings&, void*);

/// The two elementwise passes of a matrix step of one tensor (A is MatrixCapable;
/// kernels/cuda/matrix_step.cuh) on their own, at host step entry.step unless settings'
/// device scalars say otherwise: prepare writes the iteration's input to d_x (`x_dtype`: f32
/// or bf16), apply reads its output from d_o. multi_tensor_step runs them around the
/// iteration; the emulation tests run them alone, with a fixed output, since the emulation
/// has no cuBLAS.
template <class A>
void matrix_prepare(const typename A::Options& options, const ListEntry& entry,
                    const ListSettings& settings, void* d_x, DType x_dtype, void* stream);
template <class A>
void matrix_apply(const typename A::Options& options, const ListEntry& entry,
                  const ListSettings& settings, const void* d_o, DType o_dtype, void* stream);
#define FO_INSTANTIATE_MATRIX_PASSES(A)                                                           \
  template void matrix_prepare<fo::A>(const fo::A::Options&, const ListEntry&,                    \
                                      const ListSettings&, void*, DType, void*);                  \
  template void matrix_apply<fo::A>(const fo::A::Options&, const ListEntry&, const ListSettings&, \
                                    const void*, DType, void*);

/// eval() of one tensor (algorithm A is EvalCapable): param (and its master weights) <-
/// A::EvalOp applied to it and its states (entry.states, `state` storage), stream-ordered.
template <class A>
void eval_params(const typename A::Options& options, const ListEntry& entry, DType param,
                 DType state, void* stream);
#define FO_INSTANTIATE_EVAL_PARAMS(A) \
  template void eval_params<fo::A>(const fo::A::Options&, const ListEntry&, DType, DType, void*);

/// The traffic probe (kernels/probe.hpp) through the same multi-tensor kernel, f32 only:
/// the bandwidth limit of a step with these streams.
void traffic_probe(const ListEntry* entries, std::size_t n, void* stream);

/// Floats of workspace grad_norm needs for a list planned as `plan`.
std::int64_t grad_norm_workspace(const ListPlan& plan);

/// The global L2 norm of all gradients (entries planned as `plan`) times grad_multiplier (and
/// *d_grad_multiplier), deterministic (squares summed in double, in a fixed order): writes *d_norm,
/// the clipping coefficient *d_clip (1 when max_norm <= 0) and, when check_finite, sets
/// *d_found_inf = 1 if any gradient is inf/nan. With no elements at all (an empty plan included)
/// the norm is 0.
void grad_norm(const ListEntry* entries, const ListPlan& plan, DType grad_dtype,
               float grad_multiplier, const float* d_grad_multiplier, float max_norm,
               bool check_finite, float* d_workspace, float* d_norm, float* d_clip,
               float* d_found_inf, void* stream);

/// Fills n elements of `storage` (f32, bf16, f16) with `value` rounded to nearest.
void fill(void* p, DType storage, float value, std::int64_t n, void* stream);
/// dst[i] = float(src[i]) for a bf16/f16/f32 source.
void widen(float* dst, const void* src, DType storage, std::int64_t n, void* stream);
/// dst[i] = src[i] rounded to nearest even into `storage` (f32, bf16, f16): a copy for f32.
void narrow(void* dst, DType storage, const float* src, std::int64_t n, void* stream);
/// dst[i] = src[i] converted from one storage to another (f32, bf16, f16), rounded to nearest.
void convert(void* dst, DType dst_storage, const void* src, DType src_storage, std::int64_t n,
             void* stream);
/// Exchanges a[i] and b[i], bitwise.
void swap(float* a, float* b, std::int64_t n, void* stream);

// Block-quantized states (q = DType::q8 or q4; kernels/quantize.hpp's state contract: one
// buffer of quant_state_bytes(n, bits), the codes then the absmax per block; the unsigned map
// where non_negative, else the signed one). Stream-ordered; n == 0 does nothing. Throw
// invalid_argument for another dtype.
/// The state `dst` <- n float32 values `src` (device memory), each block quantized to nearest
/// (step_code without stochastic rounding: quantize_block8 / quantize_block4's codes and absmax).
void quantize_state(void* dst, DType q, bool non_negative, const float* src, std::int64_t n,
                    void* stream);
/// dst[i] <- element i of the state `src` decoded: value[code] * its block's absmax.
void dequantize_state(float* dst, const void* src, DType q, bool non_negative, std::int64_t n,
                      void* stream);
/// The state `dst` <- quantize_state of n copies of `value`.
void fill_quantized(void* dst, DType q, bool non_negative, float value, std::int64_t n,
                    void* stream);

FO_EMULATION_END

// Devices, memory and copies (cuda_memory.cu): CUDA builds only.
void* allocate(std::size_t bytes, int device);  // throws out_of_memory / device_error
void deallocate(void* p, int device) noexcept;  // never throws; logs a failure
/// Stream-ordered scratch of the current device (cudaMallocAsync / cudaFreeAsync from its
/// default pool): neither call waits for the device. Where the device has no memory pools,
/// cudaMalloc, and a release that waits (cudaFree). allocate_async throws out_of_memory.
void* allocate_async(std::size_t bytes, void* stream);
void deallocate_async(void* p, void* stream) noexcept;
void memset_zero(void* p, std::size_t bytes, void* stream);
/// Waits for the device, then copies `bytes` to the host.
void copy_to_host(void* h_dst, const void* d_src, std::size_t bytes);
/// Stream-ordered copy of `bytes` between device buffers.
void copy_device(void* d_dst, const void* d_src, std::size_t bytes, void* stream);
/// Stream-ordered copy of `bytes` from the host.
void copy_from_host(void* d_dst, const void* h_src, std::size_t bytes, void* stream);
/// Waits for all work on the current device.
void synchronize();
/// True if `p` is device (or managed) memory of `device` (of any device when device < 0).
bool is_device_pointer(const void* p, int device);

/// Makes `device` current for the guard's lifetime (no-op without CUDA or for device < 0).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  [[maybe_unused]] int previous_ = -1;  // unused by the CPU-only stub
};

}  // namespace fo::cuda
