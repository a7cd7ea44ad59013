// A dense index for each registered algorithm, used to pick a kernel from a backend's table.
#pragma once

#include "fusedopt/kernels/registry.hpp"

namespace fo::detail {

enum AlgorithmIndex : int {
#define FO_INDEX(A) kIndex##A,
  FO_FOR_EACH_DENSE_ALGORITHM(FO_INDEX)
#undef FO_INDEX
      kNumDenseAlgorithms
};

template <class A>
struct IndexOf;
#define FO_INDEX_OF(A)                      \
  template <>                               \
  struct IndexOf<A> {                       \
    static constexpr int value = kIndex##A; \
  };
FO_FOR_EACH_DENSE_ALGORITHM(FO_INDEX_OF)
#undef FO_INDEX_OF

}  // namespace fo::detail
