// The CPU kernels compiled with -mavx2 -mfma: eight lanes.
#include "cpu/cpu_backend.hpp"
#include "fusedopt/kernels/cpu/simd_avx2.hpp"

using Io = fo::cpu::avx2::Io;
#include "cpu/kernel_table.inc"

const fo::cpu::KernelTable& fo::cpu::avx2_table() { return kTable; }
