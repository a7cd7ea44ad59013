// The CPU kernels compiled with -mavx2 -mfma: eight lanes.
#include "cpu/cpu_backend.hpp"
#include "fusedopt/kernels/cpu/simd_avx2.hpp"

using Io = fo::cpu::avx2::Io;
#define FO_ISA_KERNELS avx2_kernels
#include "cpu/kernel_table.inc"
#define FO_ISA_BF16_BLOCKS avx2_bf16_blocks
#include "cpu/bf16_blocks.inc"
