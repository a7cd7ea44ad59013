// The C++ host API of fusedopt: everything a C++ training loop needs.
#pragma once

#include "fusedopt/cpu.hpp"
#include "fusedopt/functional.hpp"
#include "fusedopt/optimizer.hpp"
#include "fusedopt/schedule.hpp"
#include "fusedopt/types.hpp"
