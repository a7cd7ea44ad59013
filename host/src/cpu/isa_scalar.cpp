// The CPU kernels compiled for baseline x86-64 (or any other host): one lane.
#include "cpu/cpu_backend.hpp"
#include "fusedopt/kernels/cpu/simd_scalar.hpp"

using Io = fo::cpu::scalar::Io;
#include "cpu/kernel_table.inc"

const fo::cpu::KernelTable& fo::cpu::scalar_table() { return kTable; }
