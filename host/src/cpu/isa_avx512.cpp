// The CPU kernels compiled with -mavx512f -mfma: sixteen lanes.
#include "cpu/cpu_backend.hpp"
#include "fusedopt/kernels/cpu/simd_avx512.hpp"

using Io = fo::cpu::avx512::Io;
#include "cpu/kernel_table.inc"

const fo::cpu::KernelTable& fo::cpu::avx512_table() { return kTable; }
