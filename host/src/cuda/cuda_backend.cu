// The CUDA backend's launchers: the multi-tensor step and the gradient-norm pass (launch plans
// from multi_tensor_plan, one kernel per algorithm and param storage; elementwise algorithms
// with 8- or 4-bit quantized states take quantized_step.cuh's kernel, one per algorithm, param
// storage and width), the Newton-Schulz iteration's scale (for newton_schulz.cu), and the
// fills, widenings and (de)quantizations of state buffers.
// Every launch is checked with cudaGetLastError; nothing here synchronizes with the host.
// Devices, memory and copies are in cuda_memory.cu.
//
// Also compiled as host C++ under FO_CUDA_HOST_EMULATION (tests/emulation), where the same
// planning and argument packing drive the kernels on CPU threads.
#include <algorithm>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "cuda/cuda_backend.hpp"
#include "cuda/cuda_check.hpp"
#include "cuda/newton_schulz_device.hpp"
#include "fusedopt/kernels/cuda/factored.cuh"
#include "fusedopt/kernels/cuda/matrix_step.cuh"
#include "fusedopt/kernels/cuda/multi_tensor.cuh"
#include "fusedopt/kernels/cuda/newton_schulz.cuh"
#include "fusedopt/kernels/cuda/quantized_step.cuh"
#include "fusedopt/kernels/cuda/runtime.hpp"
#include "fusedopt/kernels/cuda/trust_ratio.cuh"
#include "fusedopt/kernels/probe.hpp"
#include "fusedopt/kernels/registry.hpp"
#include "matrix/newton_schulz.hpp"
#include "multi_tensor_plan.hpp"

namespace fo::cuda {
FO_EMULATION_BEGIN
namespace {

using cuda_kernels::kBlock;
using cuda_kernels::kMaxListTensors;
using cuda_kernels::StepConfig;
using cuda_kernels::TensorList;

// The largest functor and options travel beside the list (Adam's: under 100 bytes each).
static_assert(sizeof(TensorList) + sizeof(StepConfig) + 512 <= 32764,
              "kernel parameters over the 32 KB limit of CUDA 12.1+");

// Elements per block: 32 per thread, enough work to amortize a block's setup (finding its
// tensor, building the functor) while a 2^20-element tensor still spreads over 128 blocks.
constexpr std::int64_t kChunk = 8192;
static_assert(kChunk == kSumChunk, "a trust-ratio step's blocks are the chunks of its order");
static_assert(kChunk % kQuant8BlockSize == 0 && kChunk % kQuant4BlockSize == 0,
              "a quantized step's blocks own whole quantization blocks");
constexpr std::int64_t kMaxGrid = 0x7FFFFFFF;

int storage_code(DType t) { return static_cast<int>(t); }

bool is_quantized(DType t) { return t == DType::q8 || t == DType::q4; }

/// Whether algorithm A's step is refused over quantized states (kernels/quantize.hpp,
/// kOnePassStep).
template <class A>
constexpr bool kRefusesQuantized = !kOnePassStep<A>;
/// Whether it has the quantized kernel: the one-pass elementwise algorithms that keep states
/// (a stateless one steps through the elementwise kernel whatever its state dtype), except
/// those with a state that starts as a copy of the weights (Schedule-Free's z), which 8 or 4
/// bits cannot hold: every entry point refuses them quantized states (the Optimizer's
/// storage_problem, the functional layer's quantized_refusal, multi_tensor_step below), so
/// their quantized kernels would be compiled for nothing.
template <class A>
constexpr bool kQuantizable =
    StateList<A>::count > 0 && !kRefusesQuantized<A> && !StateFromParam<A>::any();

/// Why A's step refuses block-quantized states of dtype q, or "" where it takes them.
template <class A>
std::string quantized_refusal(DType q) {
  if (!is_quantized(q)) return "";
  if constexpr (kRefusesQuantized<A>) {  // (constexpr: nvcc warns of the loop unreachable)
    return std::string(A::kName) + ": states of dtype " + dtype_name(q) +
           " (block-quantized) are taken by the one-pass elementwise optimizers only; " +
           "a trust-ratio, factored or matrix step's states must be f32 or bf16";
  } else {
    for (int k = 0; k < StateList<A>::count; ++k)  // whatever the options: no kernel for them
      if (StateFromParam<A>::of(k))
        return std::string(A::kName) + "'s state '" + StateList<A>::name(k) +
               "' is a copy of the weights, which " + dtype_name(q) +
               " cannot hold (its states must be f32 or bf16)";
    return "";
  }
}

TensorList make_list(const ListEntry* entries, const detail::LaunchGroup& g) {
  TensorList list{};
  list.count = static_cast<int>(g.tensors.size());
  for (int j = 0; j < list.count; ++j) {
    const ListEntry& e = entries[g.tensors[j]];
    list.param[j] = e.param;
    list.grad[j] = e.grad;
    list.master[j] = e.master;
    list.ema[j] = e.ema;
    for (int k = 0; k < kMaxStates; ++k) list.state[k][j] = e.states[k];
    list.numel[j] = e.numel;
    list.block_start[j] = g.block_start[j];
    list.step[j] = e.step;
    list.key[j] = e.key;
    list.scalars[j] = e.scalars;
  }
  return list;
}

/// Launches one planned group of algorithm A's step for params stored as `param`. `host_step`:
/// the step every tensor of the list takes, for the functor built here, when
/// cfg.device_scalars is off. A trust-ratio algorithm's passes (trust_ratio.cuh) use
/// `workspace`: two doubles per block, then two per tensor.
template <class A, int kParam>
void launch_step(const typename A::Options& o, std::int64_t host_step, const TensorList& list,
                 std::int64_t blocks, const StepConfig& cfg, double* workspace,
                 cudaStream_t stream) {
  const typename A::Op host_op =
      cfg.device_scalars ? typename A::Op{} : make_step_op<A>(o, host_step, nullptr, nullptr);
  const auto grid = static_cast<unsigned>(blocks);
  if constexpr (TrustRatioCapable<A>::value) {
    const bool norms = A::make_op(o, 1).needs_norms();  // the options alone decide
    double* const partial = workspace;
    double* const tensor_norms = workspace + 2 * blocks;
    if (A::Op::kAdvanceStates || norms) {
      FO_LAUNCH(grid, kBlock, stream, cuda_kernels::trust_first_kernel<A, kParam>)
      (o, host_op, list, cfg, partial);
      FO_CUDA_CHECK(cudaGetLastError());
    }
    if (norms) {
      FO_LAUNCH(static_cast<unsigned>(list.count), kBlock, stream, cuda_kernels::trust_norms_kernel)
      (list, blocks, cfg, partial, tensor_norms);
      FO_CUDA_CHECK(cudaGetLastError());
    }
    FO_LAUNCH(grid, kBlock, stream, cuda_kernels::trust_second_kernel<A, kParam>)
    (o, host_op, list, cfg, tensor_norms);
  } else {
    (void)workspace;
    if constexpr (kQuantizable<A>) {
      if (cfg.state_storage == cuda_kernels::kQ8) {
        FO_LAUNCH(grid, kBlock, stream, cuda_kernels::multi_tensor_quant_step_kernel<A, kParam, 8>)
        (o, host_op, list, cfg);
        FO_CUDA_CHECK(cudaGetLastError());
        return;
      }
      if (cfg.state_storage == cuda_kernels::kQ4) {
        FO_LAUNCH(grid, kBlock, stream, cuda_kernels::multi_tensor_quant_step_kernel<A, kParam, 4>)
        (o, host_op, list, cfg);
        FO_CUDA_CHECK(cudaGetLastError());
        return;
      }
    }
    FO_LAUNCH(grid, kBlock, stream, cuda_kernels::multi_tensor_step_kernel<A, kParam>)
    (o, host_op, list, cfg);
  }
  FO_CUDA_CHECK(cudaGetLastError());
}

unsigned elementwise_grid(std::int64_t n) {
  return static_cast<unsigned>(std::clamp<std::int64_t>((n + kBlock - 1) / kBlock, 1, 65536));
}

/// The Newton-Schulz iteration's scale (newton_schulz.cuh) of `batch` matrices of `size`
/// elements: per group of at most 65535 matrices (gridDim.y), the chunks' sums, then the
/// scale over at most kScaleBlocks blocks per matrix (grid-stride beyond).
template <int kStorage>
void launch_ns_normalize(const void* d_in, void* d_x, std::int64_t batch, std::int64_t size,
                         double eps, double* d_partials, cudaStream_t stream) {
  constexpr std::int64_t kScaleBlocks = 1024, kMaxGridY = 65535;
  const std::int64_t elem = kStorage == cuda_kernels::kF32 ? 4 : 2;
  const std::int64_t chunks = sum_chunks(size);
  const auto scale_blocks =
      static_cast<unsigned>(std::min((size + kBlock - 1) / kBlock, kScaleBlocks));
  for (std::int64_t first = 0; first < batch; first += kMaxGridY) {
    const auto count = static_cast<unsigned>(std::min(batch - first, kMaxGridY));
    const std::int64_t offset = first * size * elem;
    const void* const in = static_cast<const char*>(d_in) + offset;
    void* const x = static_cast<char*>(d_x) + offset;
    double* const part = d_partials + first * chunks;
    FO_LAUNCH(dim3(static_cast<unsigned>(chunks), count), kBlock, stream,
              cuda_kernels::ns_sum_squares_kernel<kStorage>)
    (in, size, chunks, part);
    FO_CUDA_CHECK(cudaGetLastError());
    FO_LAUNCH(dim3(scale_blocks, count), kBlock, stream, cuda_kernels::ns_scale_kernel<kStorage>)
    (in, x, size, chunks, part, eps);
    FO_CUDA_CHECK(cudaGetLastError());
  }
}

/// A factored step (factored.cuh) of one tensor: its seven launches, in `workspace` (the
/// chunk sums, the row sums, the per-segment column sums, then the normalizers and the rate
/// as floats).
template <class A, int kParam>
void launch_factored(const typename A::Options& o, std::int64_t host_step, const ListEntry& e,
                     const StepConfig& cfg, double* workspace, cudaStream_t stream) {
  if (e.numel == 0) return;  // no element, no statistic: nothing moves
  using cuda_kernels::FactoredTensor;
  const FactoredTensor t{e.param, e.grad, e.master, e.ema, {e.states[0], e.states[1], e.states[2]},
                         e.numel, e.step, e.key,    e.view};
  const typename A::Op host_op =
      cfg.device_scalars ? typename A::Op{} : make_step_op<A>(o, host_step, nullptr, nullptr);
  const MatrixView& v = e.view;
  const std::int64_t chunks = (e.numel + kSumChunk - 1) / kSumChunk;
  double* const partial = workspace;
  double* const row_sq = partial + 2 * chunks;
  const std::int64_t rows = v.factored() ? v.batch * v.rows : 0;
  const std::int64_t per_matrix = v.factored() ? (v.rows + kColSegment - 1) / kColSegment : 0;
  double* const col_partial = row_sq + rows;
  float* const norms = reinterpret_cast<float*>(col_partial + v.batch * per_matrix * v.cols);
  float* const rate = norms + (v.factored() ? v.batch : 0);
  constexpr std::int64_t kWarps = kBlock / kRowLanes;
  if (v.factored()) {
    FO_LAUNCH(static_cast<unsigned>((rows + kWarps - 1) / kWarps), kBlock, stream,
              cuda_kernels::factored_rows_kernel<A>)
    (o, host_op, t, cfg, row_sq);
    FO_CUDA_CHECK(cudaGetLastError());
    const std::int64_t col_blocks = (v.cols + kBlock - 1) / kBlock;
    FO_LAUNCH(static_cast<unsigned>(v.batch * per_matrix * col_blocks), kBlock, stream,
              cuda_kernels::factored_cols_kernel<A>)
    (o, host_op, t, cfg, col_partial);
    FO_CUDA_CHECK(cudaGetLastError());
    FO_LAUNCH(elementwise_grid(rows + v.batch * v.cols), kBlock, stream,
              cuda_kernels::factored_blend_kernel<A>)
    (o, host_op, t, cfg, row_sq, col_partial);
    FO_CUDA_CHECK(cudaGetLastError());
    FO_LAUNCH(static_cast<unsigned>((v.batch + kWarps - 1) / kWarps), kBlock, stream,
              cuda_kernels::factored_norm_kernel<A>)
    (o, host_op, t, cfg, norms);
    FO_CUDA_CHECK(cudaGetLastError());
  }
  FO_LAUNCH(static_cast<unsigned>(chunks), kBlock, stream,
            cuda_kernels::factored_sums_kernel<A, kParam>)
  (o, host_op, t, cfg, norms, partial);
  FO_CUDA_CHECK(cudaGetLastError());
  FO_LAUNCH(1, kBlock, stream, cuda_kernels::factored_rate_kernel<A>)
  (o, host_op, t, cfg, partial, rate);
  FO_CUDA_CHECK(cudaGetLastError());
  FO_LAUNCH(elementwise_grid(e.numel), kBlock, stream,
            cuda_kernels::factored_apply_kernel<A, kParam>)
  (o, host_op, t, cfg, norms, rate);
  FO_CUDA_CHECK(cudaGetLastError());
}

cuda_kernels::MatrixTensor matrix_tensor(const ListEntry& e) {
  return {e.param, e.grad, e.master, e.ema, {e.states[0], e.states[1], e.states[2]},
          e.numel, e.step, e.key,    e.view};
}

template <class A>
void launch_matrix_prepare(const typename A::Options& o, const typename A::Op& host_op,
                           const ListEntry& e, const StepConfig& cfg, void* x, DType x_dtype,
                           cudaStream_t stream) {
  FO_LAUNCH(elementwise_grid(e.numel), kBlock, stream, cuda_kernels::matrix_prepare_kernel<A>)
  (o, host_op, matrix_tensor(e), cfg, x, storage_code(x_dtype));
  FO_CUDA_CHECK(cudaGetLastError());
}

template <class A>
void launch_matrix_apply(const typename A::Options& o, const typename A::Op& host_op,
                         const ListEntry& e, DType param, const StepConfig& cfg, const void* x,
                         DType x_dtype, cudaStream_t stream) {
  const cuda_kernels::MatrixTensor t = matrix_tensor(e);
  const unsigned grid = elementwise_grid(e.numel);
  const int xs = storage_code(x_dtype);
  switch (param) {
    case DType::f16:
      FO_LAUNCH(grid, kBlock, stream, cuda_kernels::matrix_apply_kernel<A, cuda_kernels::kF16>)
      (o, host_op, t, cfg, x, xs);
      break;
    case DType::bf16:
      FO_LAUNCH(grid, kBlock, stream, cuda_kernels::matrix_apply_kernel<A, cuda_kernels::kBF16>)
      (o, host_op, t, cfg, x, xs);
      break;
    default:
      FO_LAUNCH(grid, kBlock, stream, cuda_kernels::matrix_apply_kernel<A, cuda_kernels::kF32>)
      (o, host_op, t, cfg, x, xs);
  }
  FO_CUDA_CHECK(cudaGetLastError());
}

/// A matrix step (kernels/matrix_step.hpp) of one tensor: prepare into X at the start of
/// `workspace`, the Newton-Schulz iteration in place on cuBLAS with the rest of it, apply.
/// Nothing waits for the host and nothing is allocated: capturable. A skipped step
/// (found_inf) still iterates over a stale X, which nothing reads.
template <class A>
void launch_matrix(const typename A::Options& o, std::int64_t host_step, const ListEntry& e,
                   DType param, const StepConfig& cfg, void* workspace, std::size_t workspace_bytes,
                   cudaStream_t stream) {
  if (e.numel == 0) return;  // a 0-size matrix: nothing moves
  const typename A::Op host_op =
      cfg.device_scalars ? typename A::Op{} : make_step_op<A>(o, host_step, nullptr, nullptr);
  const NsConfig ns = A::ns_config(o);
  const DType x_dtype = ns.bf16 ? DType::bf16 : DType::f32;
  const MatrixView& v = e.view;
  auto* const x = static_cast<unsigned char*>(workspace);
  const std::size_t x_bytes = matrix_input_bytes(e.numel);
  launch_matrix_prepare<A>(o, host_op, e, cfg, x, x_dtype, stream);
  newton_schulz_device(x, x, x_dtype, v.batch, v.rows, v.cols, ns.coefficients, ns.steps, ns.eps,
                       x + x_bytes, workspace_bytes - x_bytes, stream);
  launch_matrix_apply<A>(o, host_op, e, param, cfg, x, x_dtype, stream);
}

/// After a list's step: its scalar states advance (algorithms that keep them), then its
/// device step counts go up (d_steps), both unless found_inf.
template <class A>
void finish_list(const typename A::Options& o, const TensorList& list, const StepConfig& cfg,
                 std::int64_t* d_steps, cudaStream_t stream) {
  if constexpr (ScalarList<A>::count > 0) {
    FO_LAUNCH(1, kBlock, stream, cuda_kernels::advance_scalars_kernel<A>)(o, list, cfg);
    FO_CUDA_CHECK(cudaGetLastError());
  }
  if (d_steps) {
    FO_LAUNCH(1, kBlock, stream, cuda_kernels::increment_steps_kernel)
    (d_steps, list, cfg.d_found_inf);
    FO_CUDA_CHECK(cudaGetLastError());
  }
}

/// Launches the step of entries [0, n) planned as `plan`, all taking `host_step` unless
/// cfg.device_scalars.
template <class A>
void launch_list(const typename A::Options& o, DType param, std::int64_t host_step,
                 const ListEntry* entries, const ListPlan& plan, const StepConfig& cfg,
                 double* workspace, std::size_t workspace_bytes, std::int64_t* d_steps,
                 cudaStream_t stream) {
  for (const auto& g : plan) {
    const TensorList list = make_list(entries, g);
    if constexpr (MatrixCapable<A>::value) {
      for (const std::size_t j : g.tensors)
        launch_matrix<A>(o, host_step, entries[j], param, cfg, workspace, workspace_bytes, stream);
    } else if constexpr (FactoredCapable<A>::value) {
      for (const std::size_t j : g.tensors) {
        const ListEntry& e = entries[j];
        switch (param) {
          case DType::f16:
            launch_factored<A, cuda_kernels::kF16>(o, host_step, e, cfg, workspace, stream);
            break;
          case DType::bf16:
            launch_factored<A, cuda_kernels::kBF16>(o, host_step, e, cfg, workspace, stream);
            break;
          default: launch_factored<A, cuda_kernels::kF32>(o, host_step, e, cfg, workspace, stream);
        }
      }
    } else {
      switch (param) {
        case DType::f16:
          launch_step<A, cuda_kernels::kF16>(o, host_step, list, g.blocks, cfg, workspace, stream);
          break;
        case DType::bf16:
          launch_step<A, cuda_kernels::kBF16>(o, host_step, list, g.blocks, cfg, workspace, stream);
          break;
        default:
          launch_step<A, cuda_kernels::kF32>(o, host_step, list, g.blocks, cfg, workspace, stream);
      }
    }
    finish_list<A>(o, list, cfg, d_steps, stream);
  }
}

template <class T>
__global__ void fill_kernel(T* p, T value, std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride)
    p[i] = value;
}

__global__ void widen_kernel(float* dst, const void* src, int storage, std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride)
    dst[i] = cuda_kernels::load_as_float(src, storage, i);
}

__global__ void narrow_kernel(void* dst, int storage, const float* src, std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride)
    cuda_kernels::store_from_float(dst, storage, i, src[i], false, 0, 0, 0);
}

__global__ void convert_kernel(void* dst, int dst_storage, const void* src, int src_storage,
                               std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride)
    cuda_kernels::store_from_float(
        dst, dst_storage, i, cuda_kernels::load_as_float(src, src_storage, i), false, 0, 0, 0);
}

__global__ void swap_kernel(float* a, float* b, std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const float x = a[i];
    a[i] = b[i];
    b[i] = x;
  }
}

}  // namespace

ListPlan plan_list(const ListEntry* entries, std::size_t n) {
  std::vector<std::int64_t> numels(n);
  for (std::size_t i = 0; i < n; ++i) numels[i] = entries[i].numel;
  return detail::plan_launches(numels, kChunk, kMaxListTensors, kMaxGrid);
}

namespace {

template <class A>
StepConfig step_config(const ListSettings& s) {
  StepConfig cfg{};
  cfg.grad_storage = storage_code(s.grad_dtype);
  cfg.state_storage = storage_code(s.state_dtype);
  for (int k = 0; k < StateList<A>::count; ++k)
    if (StateList<A>::non_negative(k)) cfg.non_negative_states |= 1u << k;
  cfg.stochastic = s.stochastic;
  cfg.seed = s.seed;
  cfg.grad_multiplier = s.grad_multiplier;
  cfg.ema_weight = s.ema_weight;
  cfg.device_scalars = s.d_lr != nullptr || s.d_steps != nullptr || ScalarList<A>::count > 0;
  cfg.d_lr = s.d_lr;
  cfg.d_steps = s.d_steps;
  cfg.d_grad_multiplier = s.d_grad_multiplier;
  cfg.d_clip = s.d_clip;
  cfg.d_found_inf = s.d_found_inf;
  cfg.chunk = kChunk;
  return cfg;
}

}  // namespace

template <class A>
void multi_tensor_step(const typename A::Options& options, const ListEntry* entries, std::size_t n,
                       const ListPlan& plan, const ListSettings& s, void* stream) {
  const auto st = static_cast<cudaStream_t>(stream);
  if (const std::string why = quantized_refusal<A>(s.state_dtype); !why.empty())
    throw Error(StatusCode::unsupported, why);  // before anything is launched
  const StepConfig cfg = step_config<A>(s);
  double* const workspace = static_cast<double*>(s.d_workspace);
  if constexpr (MatrixCapable<A>::value) {
    // Every tensor checked before the first launch: nothing moves when one is refused.
    const NsConfig ns = A::ns_config(options);
    for (std::size_t i = 0; i < n; ++i) {
      const MatrixView& v = entries[i].view;
      if (!is_matrix_batch(v, entries[i].numel))
        throw Error(StatusCode::invalid_argument,
                    std::string(A::kName) + ": tensor " + std::to_string(i) +
                        " is not viewed as a batch of matrices (a param of 2 or more dimensions)");
      detail::validate_newton_schulz(A::kName, v.batch, v.rows, v.cols, ns.coefficients, ns.steps,
                                     ns.eps);
    }
    // cuBLAS loaded (once per process) before the first launch, so that where it is missing
    // the step is refused with no state advanced.
    if (std::any_of(entries, entries + n, [](const ListEntry& e) { return e.numel > 0; }))
      require_cublas();
  }
  if (s.workspace_bytes < step_workspace<A>(entries, n))
    throw Error(StatusCode::invalid_argument,
                std::string(A::kName) + ": the step's workspace is missing or too small");
  if (ScalarList<A>::count > 0 &&
      std::any_of(entries, entries + n, [](const ListEntry& e) { return !e.scalars; }))
    throw Error(StatusCode::invalid_argument,
                std::string(A::kName) + ": a tensor's scalar states are missing");
  const bool one_step = n == 0 || std::all_of(entries, entries + n, [&](const ListEntry& e) {
                          return e.step == entries[0].step;
                        });
  if (cfg.device_scalars || one_step) {
    // Device scalars, or every tensor at the same host step (the usual case): the caller's
    // plan, no copies.
    launch_list<A>(options, s.param_dtype, n ? entries[0].step : 0, entries, plan, cfg, workspace,
                   s.workspace_bytes, s.d_steps, st);
  } else {
    // Host-counted steps that differ (params added or skipped at other times): one functor
    // per distinct step, built here, each list planned here.
    std::map<std::int64_t, std::vector<ListEntry>> by_step;
    for (std::size_t i = 0; i < n; ++i) by_step[entries[i].step].push_back(entries[i]);
    for (const auto& [step, list] : by_step)
      launch_list<A>(options, s.param_dtype, step, list.data(), plan_list(list.data(), list.size()),
                     cfg, workspace, s.workspace_bytes, nullptr, st);
  }
  // Empty tensors get no blocks in any launch, but their steps count all the same, and
  // their scalar states advance.
  if (s.d_steps || ScalarList<A>::count > 0) {
    TensorList empty{};
    for (std::size_t i = 0; i < n; ++i) {
      if (entries[i].numel != 0) continue;
      empty.key[empty.count] = entries[i].key;
      empty.step[empty.count] = entries[i].step;
      empty.scalars[empty.count++] = entries[i].scalars;
      if (empty.count == kMaxListTensors) {
        finish_list<A>(options, empty, cfg, s.d_steps, st);
        empty.count = 0;
      }
    }
    if (empty.count > 0) finish_list<A>(options, empty, cfg, s.d_steps, st);
  }
}

FO_FOR_EACH_DENSE_ALGORITHM(FO_INSTANTIATE_MULTI_TENSOR_STEP)

template <class A>
void matrix_prepare(const typename A::Options& options, const ListEntry& e,
                    const ListSettings& settings, void* d_x, DType x_dtype, void* stream) {
  if constexpr (MatrixCapable<A>::value) {
    const StepConfig cfg = step_config<A>(settings);
    if (e.numel == 0) return;
    const typename A::Op host_op =
        cfg.device_scalars ? typename A::Op{} : make_step_op<A>(options, e.step, nullptr, nullptr);
    launch_matrix_prepare<A>(options, host_op, e, cfg, d_x, x_dtype,
                             static_cast<cudaStream_t>(stream));
  } else {
    (void)options, (void)e, (void)settings, (void)d_x, (void)x_dtype, (void)stream;
    throw Error(StatusCode::unsupported, std::string(A::kName) + " takes no matrix steps");
  }
}

template <class A>
void matrix_apply(const typename A::Options& options, const ListEntry& e,
                  const ListSettings& settings, const void* d_o, DType o_dtype, void* stream) {
  if constexpr (MatrixCapable<A>::value) {
    const StepConfig cfg = step_config<A>(settings);
    if (e.numel == 0) return;
    const typename A::Op host_op =
        cfg.device_scalars ? typename A::Op{} : make_step_op<A>(options, e.step, nullptr, nullptr);
    launch_matrix_apply<A>(options, host_op, e, settings.param_dtype, cfg, d_o, o_dtype,
                           static_cast<cudaStream_t>(stream));
  } else {
    (void)options, (void)e, (void)settings, (void)d_o, (void)o_dtype, (void)stream;
    throw Error(StatusCode::unsupported, std::string(A::kName) + " takes no matrix steps");
  }
}
FO_FOR_EACH_DENSE_ALGORITHM(FO_INSTANTIATE_MATRIX_PASSES)

void newton_schulz_normalize(const void* d_in, void* d_x, DType dtype, std::int64_t batch,
                             std::int64_t size, double eps, double* d_partials, void* stream) {
  if (batch <= 0 || size <= 0) return;
  const auto st = static_cast<cudaStream_t>(stream);
  if (dtype == DType::f32)
    launch_ns_normalize<cuda_kernels::kF32>(d_in, d_x, batch, size, eps, d_partials, st);
  else if (dtype == DType::bf16)
    launch_ns_normalize<cuda_kernels::kBF16>(d_in, d_x, batch, size, eps, d_partials, st);
  else
    throw Error(StatusCode::invalid_argument,
                std::string("newton_schulz_normalize: dtype must be f32 or bf16, got ") +
                    dtype_name(dtype));
}

template <class A>
void eval_params(const typename A::Options& options, const ListEntry& e, DType param, DType state,
                 void* stream) {
  if constexpr (EvalCapable<A>::value) {
    if (is_quantized(state))
      throw Error(StatusCode::unsupported,
                  std::string(A::kName) + ": eval() over states of dtype " + dtype_name(state) +
                      " (block-quantized) is not implemented on CUDA; f32 or bf16 states only");
    if (e.numel == 0) return;
    const auto st = static_cast<cudaStream_t>(stream);
    const typename A::EvalOp op = A::make_eval_op(options);
    const unsigned grid = elementwise_grid(e.numel);
    const int sc = storage_code(state);
    switch (param) {
      case DType::f16:
        FO_LAUNCH(grid, kBlock, st, cuda_kernels::eval_kernel<A, cuda_kernels::kF16>)
        (op, e.param, e.master, e.states[0], e.states[1], e.states[2], sc, e.numel);
        break;
      case DType::bf16:
        FO_LAUNCH(grid, kBlock, st, cuda_kernels::eval_kernel<A, cuda_kernels::kBF16>)
        (op, e.param, e.master, e.states[0], e.states[1], e.states[2], sc, e.numel);
        break;
      default:
        FO_LAUNCH(grid, kBlock, st, cuda_kernels::eval_kernel<A, cuda_kernels::kF32>)
        (op, e.param, e.master, e.states[0], e.states[1], e.states[2], sc, e.numel);
    }
    FO_CUDA_CHECK(cudaGetLastError());
  } else {
    (void)options, (void)e, (void)param, (void)state, (void)stream;
    throw Error(StatusCode::unsupported, std::string(A::kName) + " has no evaluation form");
  }
}
FO_FOR_EACH_DENSE_ALGORITHM(FO_INSTANTIATE_EVAL_PARAMS)

void traffic_probe(const ListEntry* entries, std::size_t n, void* stream) {
  StepConfig cfg{};
  cfg.grad_multiplier = 1.0f;
  cfg.chunk = kChunk;
  launch_list<TrafficProbe>({}, DType::f32, 1, entries, plan_list(entries, n), cfg, nullptr, 0,
                            nullptr, static_cast<cudaStream_t>(stream));
}

std::int64_t grad_norm_workspace(const ListPlan& plan) {
  std::int64_t blocks = 0;
  for (const auto& g : plan) blocks += g.blocks;
  return 4 * std::max<std::int64_t>(blocks, 1);  // two doubles per block, in floats
}

void grad_norm(const ListEntry* entries, const ListPlan& plan, DType grad_dtype,
               float grad_multiplier, const float* d_grad_multiplier, float max_norm,
               bool check_finite, float* d_workspace, float* d_norm, float* d_clip,
               float* d_found_inf, void* stream) {
  const auto st = static_cast<cudaStream_t>(stream);
  std::int64_t offset = 0;
  for (const auto& g : plan) {
    FO_LAUNCH(static_cast<unsigned>(g.blocks), kBlock, st, cuda_kernels::grad_sumsq_kernel)
    (make_list(entries, g), storage_code(grad_dtype), grad_multiplier, d_grad_multiplier, kChunk,
     reinterpret_cast<double*>(d_workspace), offset);
    FO_CUDA_CHECK(cudaGetLastError());
    offset += g.blocks;
  }
  // With no gradient elements at all (every tensor empty), the finalize pass still runs over
  // zero partials: the norm is 0 and the clipping coefficient 1, never unwritten memory.
  FO_LAUNCH(1, kBlock, st, cuda_kernels::finalize_norm_kernel)
  (reinterpret_cast<const double*>(d_workspace), offset, max_norm, check_finite, d_norm, d_clip,
   d_found_inf);
  FO_CUDA_CHECK(cudaGetLastError());
}

namespace {
/// The elementwise helpers take f32, bf16 and f16; a quantized state has its own (below).
void refuse_quantized(DType t, const char* what) {
  if (is_quantized(t))
    throw Error(StatusCode::invalid_argument,
                std::string(what) + ": dtype " + dtype_name(t) +
                    " is block-quantized; use quantize_state, dequantize_state or fill_quantized");
}
}  // namespace

void fill(void* p, DType storage, float value, std::int64_t n, void* stream) {
  refuse_quantized(storage, "fill");
  if (n == 0) return;
  const auto st = static_cast<cudaStream_t>(stream);
  switch (storage) {
    case DType::bf16:
      FO_LAUNCH(elementwise_grid(n), kBlock, st, fill_kernel<bf16>)
      (static_cast<bf16*>(p), to_bf16(value), n);
      break;
    case DType::f16:
      FO_LAUNCH(elementwise_grid(n), kBlock, st, fill_kernel<f16>)
      (static_cast<f16*>(p), to_f16(value), n);
      break;
    default:
      FO_LAUNCH(elementwise_grid(n), kBlock, st, fill_kernel<float>)
      (static_cast<float*>(p), value, n);
  }
  FO_CUDA_CHECK(cudaGetLastError());
}

void widen(float* dst, const void* src, DType storage, std::int64_t n, void* stream) {
  refuse_quantized(storage, "widen");
  if (n == 0) return;
  FO_LAUNCH(elementwise_grid(n), kBlock, static_cast<cudaStream_t>(stream), widen_kernel)
  (dst, src, storage_code(storage), n);
  FO_CUDA_CHECK(cudaGetLastError());
}

void narrow(void* dst, DType storage, const float* src, std::int64_t n, void* stream) {
  refuse_quantized(storage, "narrow");
  if (n == 0) return;
  FO_LAUNCH(elementwise_grid(n), kBlock, static_cast<cudaStream_t>(stream), narrow_kernel)
  (dst, storage_code(storage), src, n);
  FO_CUDA_CHECK(cudaGetLastError());
}

void convert(void* dst, DType dst_storage, const void* src, DType src_storage, std::int64_t n,
             void* stream) {
  refuse_quantized(dst_storage, "convert");
  refuse_quantized(src_storage, "convert");
  if (n == 0) return;
  FO_LAUNCH(elementwise_grid(n), kBlock, static_cast<cudaStream_t>(stream), convert_kernel)
  (dst, storage_code(dst_storage), src, storage_code(src_storage), n);
  FO_CUDA_CHECK(cudaGetLastError());
}

namespace {

/// The grid of a whole-tensor (de)quantization: one warp per quantization block, 8 warps a
/// thread block, grid-stride beyond 65536 thread blocks.
unsigned quant_grid(std::int64_t n, int bits) {
  constexpr std::int64_t kWarps = kBlock / 32;
  return static_cast<unsigned>(
      std::clamp<std::int64_t>((quant_blocks(n, bits) + kWarps - 1) / kWarps, 1, 65536));
}

int quant_bits(DType q, const char* what) {
  if (q == DType::q8) return 8;
  if (q == DType::q4) return 4;
  throw Error(StatusCode::invalid_argument,
              std::string(what) + ": dtype must be q8 or q4, got " + dtype_name(q));
}

void launch_quantize(void* dst, DType q, bool non_negative, const float* src, float value,
                     std::int64_t n, void* stream, const char* what) {
  const int bits = quant_bits(q, what);
  if (n == 0) return;
  const auto st = static_cast<cudaStream_t>(stream);
  if (bits == 8) {
    FO_LAUNCH(quant_grid(n, 8), kBlock, st, cuda_kernels::quantize_state_kernel<8>)
    (dst, non_negative, src, value, n);
  } else {
    FO_LAUNCH(quant_grid(n, 4), kBlock, st, cuda_kernels::quantize_state_kernel<4>)
    (dst, non_negative, src, value, n);
  }
  FO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void quantize_state(void* dst, DType q, bool non_negative, const float* src, std::int64_t n,
                    void* stream) {
  launch_quantize(dst, q, non_negative, src, 0.0f, n, stream, "quantize_state");
}

void fill_quantized(void* dst, DType q, bool non_negative, float value, std::int64_t n,
                    void* stream) {
  launch_quantize(dst, q, non_negative, nullptr, value, n, stream, "fill_quantized");
}

void dequantize_state(float* dst, const void* src, DType q, bool non_negative, std::int64_t n,
                      void* stream) {
  const int bits = quant_bits(q, "dequantize_state");
  if (n == 0) return;
  const auto st = static_cast<cudaStream_t>(stream);
  if (bits == 8) {
    FO_LAUNCH(quant_grid(n, 8), kBlock, st, cuda_kernels::dequantize_state_kernel<8>)
    (dst, src, non_negative, n);
  } else {
    FO_LAUNCH(quant_grid(n, 4), kBlock, st, cuda_kernels::dequantize_state_kernel<4>)
    (dst, src, non_negative, n);
  }
  FO_CUDA_CHECK(cudaGetLastError());
}

void swap(float* a, float* b, std::int64_t n, void* stream) {
  if (n == 0) return;
  FO_LAUNCH(elementwise_grid(n), kBlock, static_cast<cudaStream_t>(stream), swap_kernel)(a, b, n);
  FO_CUDA_CHECK(cudaGetLastError());
}

FO_EMULATION_END
}  // namespace fo::cuda
