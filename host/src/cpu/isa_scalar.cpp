// The CPU kernels compiled for baseline x86-64 (or any other host): one lane.
#include "cpu/cpu_backend.hpp"
#include "fusedopt/kernels/cpu/simd_scalar.hpp"

using Io = fo::cpu::scalar::Io;
#define FO_ISA_KERNELS scalar_kernels
#include "cpu/kernel_table.inc"
#define FO_ISA_BF16_BLOCKS scalar_bf16_blocks
#include "cpu/bf16_blocks.inc"
