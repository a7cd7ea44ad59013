// What an optimizer's math file declares besides its functor: its options (names, defaults,
// validation) and its state buffers (names, initial values, when they exist). Host-only
// helpers; the functor itself sees nothing but floats.
//
// An algorithm `A` provides:
//   static constexpr const char* kName;
//   struct A::Options { double ... ; bool ...; };         // documented defaults
//   static constexpr OptionField<Options> kOptions[];     // every option, by its documented name
//   static constexpr const char* kStates[];               // state names, functor order;
//                                                         // a stateless algorithm omits it
//   static bool has_state(const Options&, int k);         // is state k allocated?
//   static double state_init(const Options&, int k);      // its initial value
//   static void validate(const Options&, Validator&);     // its documented constraints
//   using Op = ...;  static Op make_op(const Options&, std::int64_t step);
// Optionally:
//   static constexpr bool kSparse = true;                 // takes sparse row steps
//   static const char* sparse_refusal(const Options&);    // why a sparse step refuses
//                                                         // these options ("" if it does not)
//   static const char* cpu_refusal(const Options&);       // why the CPU backend refuses
//                                                         // these options ("" if it does not)
//   static constexpr bool kMatrix = true;                 // steps of the matrix kind
//                                                         // (kernels/matrix_step.hpp)
//   using RowOp = ...;  static RowOp make_row_op(const Options&, std::int64_t step);
//   static bool rowwise(const Options&);                  // states per row, not per element
//   static StateShape state_shape(const Options&, int k); // see StateShape
//   static constexpr bool state_from_param(int k);        // state k starts as a copy of the
//                                                         // param, not at state_init
//   static constexpr const char* kScalars[];              // per-param scalar states (doubles):
//   static double scalar_init(int k);                     // then make_op is
//     static Op make_op(const Options&, std::int64_t step, const double* scalars, double* next);
//                                                         // reading them and writing their
//                                                         // values after the step to `next`
//   using EvalOp = ...;  static EvalOp make_eval_op(const Options&);
//                                                         // an evaluation form of the param
//                                                         // (eval(): p <- op(p, states))
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <type_traits>
#include <utility>

#include "fusedopt/kernels/config.hpp"

namespace fo {

/// One named option of an algorithm: a real number or a flag, bound to a member of Options.
template <class Options>
struct OptionField {
  using RealMember = double Options::*;
  using FlagMember = bool Options::*;
  const char* name;
  RealMember real;
  FlagMember flag;

  double get(const Options& o) const { return real ? o.*real : (o.*flag ? 1.0 : 0.0); }
  void set(Options& o, double v) const {
    if (real)
      o.*real = v;
    else
      o.*flag = v != 0.0;
  }
};

template <class Options>
constexpr OptionField<Options> real_option(const char* name, double Options::*m) {
  return {name, m, nullptr};
}
template <class Options>
constexpr OptionField<Options> flag_option(const char* name, bool Options::*m) {
  return {name, nullptr, m};
}

/// Collects the first violated constraint of a set of options as a message. Fixed storage
/// and printf formatting: the kernel headers need no host library beyond <cstdio>.
class Validator {
 public:
  bool ok() const { return message_[0] == '\0'; }
  const char* message() const { return message_; }

  /// Records `format` (printf-style, with args) unless a failure is already recorded.
  template <class... Args>
  void fail(const char* format, Args... args) {
    if (!ok()) return;
    if constexpr (sizeof...(Args) == 0)
      std::snprintf(message_, sizeof message_, "%s", format);
    else
      std::snprintf(message_, sizeof message_, format, args...);
  }
  void at_least(const char* name, double v, double lo) {
    if (!(v >= lo)) fail("%s must be >= %g, got %g", name, lo, v);
  }
  void in_unit_interval(const char* name, double v) {  // [0, 1)
    if (!(v >= 0.0 && v < 1.0)) fail("%s must be in [0, 1), got %g", name, v);
  }
  void in_open_unit_interval(const char* name, double v) {  // (0, 1)
    if (!(v > 0.0 && v < 1.0)) fail("%s must be in (0, 1), got %g", name, v);
  }
  void greater_than(const char* name, double v, double lo) {
    if (!(v > lo)) fail("%s must be > %g, got %g", name, lo, v);
  }

 private:
  char message_[256] = {};
};

// The lengths of the descriptors' static arrays are taken with sizeof, never with
// std::extent_v<decltype(A::kStates)>: nvcc's front end (CUDA 13.0) gives a static constexpr
// array declared `kStates[] = {...}` in a class template (Adam's AdamFamily) its declared
// type, of unknown bound (extent 0), where decltype names it before the member's definition
// is instantiated: StateList<Adam>::count was 0 in device code and in the host code that
// cudafe++ emits, while the host compiler said 3. sizeof needs the complete type, which
// instantiates the definition first.
#define FO_ARRAY_LENGTH(a) static_cast<int>(sizeof(a) / sizeof((a)[0]))

/// Which of A's states are never negative (A::kNonNegativeStates), by StateList.
template <class A, class = void>
struct NonNegative {
  static constexpr bool of(int) { return false; }
};
template <class A>
struct NonNegative<A, std::void_t<decltype(A::kNonNegativeStates)>> {
  static_assert(FO_ARRAY_LENGTH(A::kNonNegativeStates) == FO_ARRAY_LENGTH(A::kStates),
                "one kNonNegativeStates flag per state");
  static constexpr bool of(int k) { return A::kNonNegativeStates[k]; }
};

/// A's state names (A::kStates, in the functor's order) and their number; an algorithm that
/// keeps no state declares no kStates (C++ has no zero-length arrays).
template <class A, class = void>
struct StateList {
  static constexpr int count = 0;
  static constexpr const char* name(int) { return ""; }
  static constexpr bool non_negative(int) { return false; }
};
template <class A>
struct StateList<A, std::void_t<decltype(A::kStates)>> {
  static constexpr int count = FO_ARRAY_LENGTH(A::kStates);
  static_assert(count > 0 && count <= kMaxStates,
                "one to kMaxStates states (more than the kernels carry, or a bound not seen)");
  static constexpr const char* name(int k) { return A::kStates[k]; }
  /// Whether state k is never negative (A::kNonNegativeStates, one flag per state; none: every
  /// state may be negative): a quantized state then takes the unsigned map.
  static constexpr bool non_negative(int k) { return NonNegative<A>::of(k); }
};

/// A's scalar states (A::kScalars): values per param, not per element, that a step reads and
/// advances (kMaxScalars at most), in double. An algorithm without them declares none.
inline constexpr int kMaxScalars = 2;
template <class A, class = void>
struct ScalarList {
  static constexpr int count = 0;
  static constexpr const char* name(int) { return ""; }
  static double init(int) { return 0.0; }
};
template <class A>
struct ScalarList<A, std::void_t<decltype(A::kScalars)>> {
  static constexpr int count = FO_ARRAY_LENGTH(A::kScalars);
  static_assert(count <= kMaxScalars, "more scalar states than the step carries (kMaxScalars)");
  static constexpr const char* name(int k) { return A::kScalars[k]; }
  static double init(int k) { return A::scalar_init(k); }
};

/// A's functor for step `step`: from its scalar states `scalars` where it has them (their
/// values after the step go to `next`; both may be null where it has none).
template <class A>
FO_HOST_DEVICE typename A::Op make_step_op(const typename A::Options& o, std::int64_t step,
                                           const double* scalars, double* next) {
  if constexpr (ScalarList<A>::count > 0) {
    return A::make_op(o, step, scalars, next);
  } else {
    (void)scalars, (void)next;
    return A::make_op(o, step);
  }
}

/// Whether A's state k starts as a copy of the param (A::state_from_param) rather than at
/// A::state_init. Constant expressions: any() decides at compile time whether A has such a
/// state (then A never keeps block-quantized states, which cannot hold weights, and the CUDA
/// backend compiles no quantized kernel for it).
template <class A, class = void>
struct StateFromParam {
  static constexpr bool of(int) { return false; }
  static constexpr bool any() { return false; }
};
template <class A>
struct StateFromParam<A, std::void_t<decltype(A::state_from_param(0))>> {
  static constexpr bool of(int k) { return A::state_from_param(k); }
  static constexpr bool any() {
    for (int k = 0; k < StateList<A>::count; ++k)
      if (A::state_from_param(k)) return true;
    return false;
  }
};

/// Whether A has an evaluation form of its params (A::EvalOp: eval() and train()).
template <class A, class = void>
struct EvalCapable : std::false_type {};
template <class A>
struct EvalCapable<A, std::void_t<typename A::EvalOp>> : std::true_type {};

/// Whether algorithm A takes sparse row steps (its descriptor sets kSparse = true).
template <class A, class = void>
struct SparseCapable : std::false_type {};
template <class A>
struct SparseCapable<A, std::void_t<decltype(A::kSparse)>> : std::bool_constant<A::kSparse> {};

/// Why a sparse step of algorithm A refuses options `o`, or "" (A declares sparse_refusal
/// where some options do not apply to sparse gradients).
template <class A, class = void>
struct SparseRefusal {
  static const char* of(const typename A::Options&) { return ""; }
};
template <class A>
struct SparseRefusal<
    A, std::void_t<decltype(A::sparse_refusal(std::declval<typename A::Options>()))>> {
  static const char* of(const typename A::Options& o) { return A::sparse_refusal(o); }
};

/// Why the CPU backend refuses options `o` of algorithm A, or "" (A declares cpu_refusal where
/// some options run on CUDA only).
template <class A, class = void>
struct CpuRefusal {
  static const char* of(const typename A::Options&) { return ""; }
};
template <class A>
struct CpuRefusal<A, std::void_t<decltype(A::cpu_refusal(std::declval<typename A::Options>()))>> {
  static const char* of(const typename A::Options& o) { return A::cpu_refusal(o); }
};

/// Whether algorithm A has a row-wise form (its descriptor declares RowOp, make_row_op and
/// rowwise): under options with rowwise(o), each state holds one value per table row, and a
/// sparse step calls RowOp::row once per touched row (kernels/rowwise.hpp).
template <class A, class = void>
struct RowwiseCapable : std::false_type {};
template <class A>
struct RowwiseCapable<A, std::void_t<typename A::RowOp>> : std::true_type {};

/// Whether options `o` make algorithm A row-wise (false where A has no row-wise form).
template <class A>
bool is_rowwise(const typename A::Options& o) {
  if constexpr (RowwiseCapable<A>::value)
    return A::rowwise(o);
  else
    return false;
}

/// How many values a state keeps, relative to its param of shape [d0, d1, ...]: one per
/// element, or one per row (d0 of them; row-wise AdaGrad); or, for factored second moments
/// (kernels/factored.hpp), where the param is a batch of matrices over its last two
/// dimensions: one per matrix row (numel / d_last) or per matrix column (numel / d_last-1),
/// kept by params of two or more dimensions only, or one per element kept by params of fewer
/// (unfactored). An algorithm whose states differ in shape declares
/// `static StateShape state_shape(const Options&, int k)`; otherwise its states are per row
/// where its options make it row-wise, per element elsewhere.
enum class StateShape : int {
  element = 0,
  row = 1,
  factor_rows = 2,
  factor_cols = 3,
  unfactored = 4
};

template <class A, class = void>
struct StateShapes {
  static StateShape of(const typename A::Options& o, int) {
    return is_rowwise<A>(o) ? StateShape::row : StateShape::element;
  }
};
template <class A>
struct StateShapes<A,
                   std::void_t<decltype(A::state_shape(std::declval<typename A::Options>(), 0))>> {
  static StateShape of(const typename A::Options& o, int k) { return A::state_shape(o, k); }
};

/// base^n for n >= 0 by binary exponentiation in double: the same IEEE multiplications in the
/// same order on the host and the device, so step scalars built on the GPU (capturable
/// steps) have the very bits the CPU's have, which pow() does not promise (CUDA's double pow
/// may differ from glibc's in the last bit). At most 2 log2(n) roundings: relative error
/// below 1e-14 for any step count a run reaches, far under the float the functor keeps.
FO_HOST_DEVICE double power(double base, std::int64_t n) {
  double result = 1.0;
  for (; n > 0; n >>= 1) {
    if (n & 1) result *= base;
    base *= base;
  }
  return result;
}

/// e^x - 1 and e^x in double from +, -, *, / and exact scaling by powers of two only, so that
/// step scalars built on the device have the host's very bits (exp() and pow() promise no
/// such thing between glibc and CUDA). Within a few ulp of the true value: a Taylor series to
/// r^17/17! on |r| <= ln(2)/2 (truncation below 2^-60), after x = n ln2 + r with ln2 split so
/// n * ln2_hi is exact. portable_expm1 keeps its relative accuracy for tiny |x|.
FO_HOST_DEVICE double exp_series_minus_one(double r) {  // e^r - 1 for |r| <= 0.35
  double term = r, sum = r;
  for (int k = 2; k <= 17; ++k) {
    term *= r / k;
    sum += term;
  }
  return sum;
}
FO_HOST_DEVICE double portable_exp(double x) {
  if (!(x > -746.0)) return x != x ? x : 0.0;  // NaN stays NaN; below the least subnormal: 0
  if (x > 709.8) return HUGE_VAL;
  const double n = floor(x * 1.4426950408889634 + 0.5);
  const double r = (x - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
  return ldexp(1.0 + exp_series_minus_one(r), static_cast<int>(n));
}
FO_HOST_DEVICE double portable_expm1(double x) {
  return x > -0.34 && x < 0.34 ? exp_series_minus_one(x) : portable_exp(x) - 1.0;
}

/// ln(x) in double in the same style (only +, -, *, / and exact scaling, so the device gets
/// the host's bits): x = m 2^e exactly by frexp, m moved into [sqrt(1/2), sqrt(2)); then
/// ln(m) = 2 atanh(f), f = (m - 1) / (m + 1) (m - 1 exact), |f| <= 0.172, whose odd series to
/// f^25/25 leaves under 2^-60; e ln2 with ln2 split so e * ln2_hi is exact. Within a few ulp
/// of the true value. ln(0) = -inf, ln(+inf) = +inf, NaN for x < 0 or NaN.
FO_HOST_DEVICE double portable_log(double x) {
  if (!(x > 0.0)) return x == 0.0 ? -HUGE_VAL : (x - x) / (x - x);  // x < 0, -inf, NaN: NaN
  if (x == HUGE_VAL) return x;
  int e = 0;
  double m = frexp(x, &e);  // [0.5, 1)
  if (m < 0.70710678118654752440) {
    m *= 2.0;
    --e;
  }
  const double f = (m - 1.0) / (m + 1.0);
  const double f2 = f * f;
  double s = 0.0;  // 1/3 + f2/5 + ... + f2^11/25
  for (int k = 12; k >= 1; --k) s = s * f2 + 1.0 / (2 * k + 1);
  const double n = e;
  return n * 6.93147180369123816490e-01 +
         (n * 1.90821492927058770002e-10 + (2.0 * f + 2.0 * f * (f2 * s)));
}

/// Precomputes a value the functor needs as float from a double computed on the host.
FO_HOST_DEVICE float to_f32(double v) { return static_cast<float>(v); }

}  // namespace fo
