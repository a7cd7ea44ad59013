// Typed options of an algorithm A from and to the numbers the host API takes: one value per
// A::kOptions entry, flags as 0 or 1. Used where options change, never in a step.
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "fusedopt/functional.hpp"
#include "fusedopt/kernels/algorithm.hpp"
#include "messages.hpp"

namespace fo::detail {

/// "" if `o` is valid for A, else the reason, prefixed with A's name.
template <class A>
std::string options_error(const typename A::Options& o) {
  for (const auto& f : A::kOptions)
    if (f.real && !std::isfinite(o.*f.real))
      return std::string(A::kName) + ": option " + f.name + " must be finite, got " +
             format_number(o.*f.real);
  Validator v;
  A::validate(o, v);
  return v.ok() ? std::string() : std::string(A::kName) + ": " + v.message();
}

/// A::Options from values in kOptions order (flags: non-zero is true).
template <class A>
typename A::Options unpack(const std::vector<double>& values) {
  typename A::Options o;
  std::size_t i = 0;
  for (const auto& f : A::kOptions) f.set(o, values[i++]);
  return o;
}

/// A::Options from values by name over A's defaults; throws for an unknown name or a flag
/// that is not 0 or 1 (the rest is checked by check_options).
template <class A>
typename A::Options options_by_name(const NamedOptions& named) {
  typename A::Options o;
  for (const auto& [name, value] : named) {
    const OptionField<typename A::Options>* field = nullptr;
    for (const auto& f : A::kOptions)
      if (name == f.name) field = &f;
    if (!field) {
      std::vector<std::string> known;
      for (const auto& f : A::kOptions) known.emplace_back(f.name);
      invalid(std::string(A::kName) + ": unknown option '" + name +
              "' (known: " + detail::join(known) + ")");
    }
    if (field->flag && value != 0.0 && value != 1.0)
      invalid(std::string(A::kName) + ": option " + name + " is a flag and takes 0 or 1, got " +
              detail::format_number(value));
    field->set(o, value);
  }
  return o;
}

}  // namespace fo::detail
