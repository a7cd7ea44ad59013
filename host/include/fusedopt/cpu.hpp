// Controls of the CPU backend: thread count and instruction set.
#pragma once

namespace fo::cpu {

/// Instruction sets the CPU backend has kernels for.
enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2 };

/// Threads a CPU step may use (default: OpenMP's maximum). n >= 1, else fo::Error.
void set_num_threads(int n);
int num_threads() noexcept;

/// The best instruction set this CPU supports; the one in use (initially the best, or the
/// FUSEDOPT_CPU_ISA environment variable: scalar, avx2 or avx512); and a switch, which throws
/// fo::Error if this CPU or build lacks `isa`. Results are bitwise the same on every ISA.
Isa best_isa() noexcept;
Isa isa() noexcept;
void set_isa(Isa isa);
bool isa_supported(Isa isa) noexcept;
const char* isa_name(Isa isa) noexcept;

}  // namespace fo::cpu
