// The registry at run time: each dense algorithm behind one type-erased record, so the
// optimizer objects and the C ABI can work by name with options as arrays of doubles.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "cuda/cuda_backend.hpp"
#include "fusedopt/functional.hpp"
#include "fusedopt/optimizer.hpp"
#include "sparse.hpp"

namespace fo::detail {

struct AlgorithmInfo {
  AlgorithmDescription desc;
  /// "" if the options (desc.options order) are valid, else the reason.
  std::string (*validate)(const std::vector<double>& options);
  bool (*has_state)(const std::vector<double>& options, int k);
  double (*state_init)(const std::vector<double>& options, int k);
  void (*step)(const std::vector<double>& options, std::int64_t step, const DenseTensors& t,
               const Exec& exec, const StepControls& controls);
  /// A multi-tensor step on CUDA of tensors sharing these options (already validated).
  void (*cuda_list_step)(const std::vector<double>& options, const cuda::ListEntry* entries,
                         std::size_t n, const cuda::ListSettings& settings, void* stream);

  /// Whether these options make the algorithm row-wise (each state one value per table row;
  /// sparse steps only), or null when it has no row-wise form.
  bool (*rowwise)(const std::vector<double>& options);

  /// Why a sparse step refuses these options, or "" (SparseRefusal).
  std::string (*sparse_refusal)(const std::vector<double>& options);

  /// A sparse step at step count `step` (validated options and indices), or null when the
  /// algorithm has none. Sets s.rowwise from the options.
  void (*sparse_step)(const std::vector<double>& options, std::int64_t step, const SparseStep& s,
                      Device device, void* stream);

  int option_index(std::string_view key) const;  // -1 if unknown
  int state_index(std::string_view name) const;  // -1 if unknown
};

/// The record of `name`, or null.
const AlgorithmInfo* find_algorithm(std::string_view name);
const std::vector<AlgorithmInfo>& algorithm_infos();

}  // namespace fo::detail
