// The CPU kernels compiled with -mavx512f -mfma: sixteen lanes.
#include "cpu/cpu_backend.hpp"
#include "fusedopt/kernels/cpu/simd_avx512.hpp"

using Io = fo::cpu::avx512::Io;
#define FO_ISA_KERNELS avx512_kernels
#include "cpu/kernel_table.inc"
