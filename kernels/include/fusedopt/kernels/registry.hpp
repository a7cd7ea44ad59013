// The list of optimizers. Registering a new one is one line here (and its math file): every
// backend, the host API, the C ABI, the tests and the benchmarks enumerate this list. Each
// has a dense step; those whose descriptor sets kSparse = true also take sparse row steps.
#pragma once

#include "fusedopt/kernels/ops/adadelta.hpp"
#include "fusedopt/kernels/ops/adafactor.hpp"
#include "fusedopt/kernels/ops/adagrad.hpp"
#include "fusedopt/kernels/ops/adam.hpp"
#include "fusedopt/kernels/ops/adamax.hpp"
#include "fusedopt/kernels/ops/adamw.hpp"
#include "fusedopt/kernels/ops/ademamix.hpp"
#include "fusedopt/kernels/ops/lamb.hpp"
#include "fusedopt/kernels/ops/lars.hpp"
#include "fusedopt/kernels/ops/lazyadam.hpp"
#include "fusedopt/kernels/ops/lion.hpp"
#include "fusedopt/kernels/ops/muon.hpp"
#include "fusedopt/kernels/ops/nadam.hpp"
#include "fusedopt/kernels/ops/radam.hpp"
#include "fusedopt/kernels/ops/rmsprop.hpp"
#include "fusedopt/kernels/ops/rprop.hpp"
#include "fusedopt/kernels/ops/schedule_free.hpp"
#include "fusedopt/kernels/ops/sgd.hpp"
#include "fusedopt/kernels/ops/signsgd.hpp"

// X(Algorithm): the algorithm type of each dense optimizer, in a fixed order.
#define FO_FOR_EACH_DENSE_ALGORITHM(X) \
  X(Sgd)                               \
  X(Adagrad)                           \
  X(Adadelta)                          \
  X(Rmsprop)                           \
  X(Adam)                              \
  X(AdamW)                             \
  X(Rprop)                             \
  X(Lion)                              \
  X(LazyAdam)                          \
  X(Adamax)                            \
  X(SignSgd)                           \
  X(NAdam)                             \
  X(RAdam)                             \
  X(AdEMAMix)                          \
  X(Lamb)                              \
  X(Lars)                              \
  X(SgdScheduleFree)                   \
  X(AdamWScheduleFree)                 \
  X(Adafactor)                         \
  X(Muon)
