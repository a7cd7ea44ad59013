// Learning-rate schedules on the host: the spec parser and printer, validation, and the
// checked entry points over the shared formulas (fusedopt/kernels/schedule.hpp).
#include "fusedopt/schedule.hpp"

#include <charconv>
#include <cmath>
#include <cstdio>
#include <string>
#include <system_error>

#include "cuda/schedule_device.hpp"
#include "messages.hpp"

namespace fo {
namespace {

using detail::invalid;
const auto& fmt = detail::format_number;

constexpr std::int64_t kMaxInteger = std::int64_t{1} << 53;  // exact in double

// The parameters a kind takes, in spec order.
enum class Field {
  lr,
  min_lr,
  max_lr,
  gamma,
  pct_start,
  div_factor,
  final_div_factor,
  step_size,
  total,
  warmup
};

struct Key {
  const char* name;
  Field field;
  bool required;
};

bool is_integer_field(Field f) {
  return f == Field::step_size || f == Field::total || f == Field::warmup;
}

double* double_field(Schedule& s, Field f) {
  switch (f) {
    case Field::lr: return &s.lr;
    case Field::min_lr: return &s.min_lr;
    case Field::max_lr: return &s.max_lr;
    case Field::gamma: return &s.gamma;
    case Field::pct_start: return &s.pct_start;
    case Field::div_factor: return &s.div_factor;
    case Field::final_div_factor: return &s.final_div_factor;
    default: return nullptr;
  }
}

std::int64_t* integer_field(Schedule& s, Field f) {
  switch (f) {
    case Field::step_size: return &s.step_size;
    case Field::total: return &s.total;
    case Field::warmup: return &s.warmup;
    default: return nullptr;
  }
}

struct KindInfo {
  const char* name;
  ScheduleKind kind;
  int num_keys;
  Key keys[5];
};

constexpr bool kRequired = true;
constexpr bool kOptional = false;

// Indexed by ScheduleKind.
constexpr KindInfo kKinds[] = {
    {"constant", ScheduleKind::constant, 1, {{"lr", Field::lr, kRequired}}},
    {"step",
     ScheduleKind::step,
     3,
     {{"lr", Field::lr, kRequired},
      {"step_size", Field::step_size, kRequired},
      {"gamma", Field::gamma, kOptional}}},
    {"exponential",
     ScheduleKind::exponential,
     2,
     {{"lr", Field::lr, kRequired}, {"gamma", Field::gamma, kRequired}}},
    {"cosine",
     ScheduleKind::cosine,
     3,
     {{"lr", Field::lr, kRequired},
      {"total", Field::total, kRequired},
      {"min_lr", Field::min_lr, kOptional}}},
    {"linear_warmup",
     ScheduleKind::linear_warmup,
     2,
     {{"lr", Field::lr, kRequired}, {"warmup", Field::warmup, kRequired}}},
    {"warmup_cosine",
     ScheduleKind::warmup_cosine,
     4,
     {{"lr", Field::lr, kRequired},
      {"warmup", Field::warmup, kRequired},
      {"total", Field::total, kRequired},
      {"min_lr", Field::min_lr, kOptional}}},
    {"cyclic",
     ScheduleKind::cyclic,
     3,
     {{"min_lr", Field::min_lr, kRequired},
      {"max_lr", Field::max_lr, kRequired},
      {"step_size", Field::step_size, kOptional}}},
    {"one_cycle",
     ScheduleKind::one_cycle,
     5,
     {{"max_lr", Field::max_lr, kRequired},
      {"total", Field::total, kRequired},
      {"pct_start", Field::pct_start, kOptional},
      {"div_factor", Field::div_factor, kOptional},
      {"final_div_factor", Field::final_div_factor, kOptional}}},
};
constexpr int kNumKinds = static_cast<int>(sizeof kKinds / sizeof kKinds[0]);

constexpr bool kinds_in_enum_order() {
  for (int i = 0; i < kNumKinds; ++i)
    if (static_cast<int>(kKinds[i].kind) != i) return false;
  return true;
}
static_assert(kinds_in_enum_order(), "kKinds is indexed by ScheduleKind");

const KindInfo* find_kind(ScheduleKind k) {
  const int i = static_cast<int>(k);
  return i >= 0 && i < kNumKinds ? &kKinds[i] : nullptr;
}

std::string known_kinds() {
  std::string out;
  for (const KindInfo& k : kKinds) out += (out.empty() ? "" : ", ") + std::string(k.name);
  return out;
}

std::string keys_of(const KindInfo& k) {
  std::string out;
  for (int i = 0; i < k.num_keys; ++i) out += (i ? ", " : "") + std::string(k.keys[i].name);
  return out;
}

std::string_view trim(std::string_view s) {
  const auto space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; };
  while (!s.empty() && space(s.front())) s.remove_prefix(1);
  while (!s.empty() && space(s.back())) s.remove_suffix(1);
  return s;
}

}  // namespace

void validate_schedule(const Schedule& s) {
  const KindInfo* info = find_kind(s.kind);
  if (!info)
    invalid("schedule: unknown kind " + std::to_string(static_cast<int>(s.kind)) +
            " (known: " + known_kinds() + ")");
  const std::string who = std::string(info->name) + " schedule: ";
  Schedule copy = s;
  for (int i = 0; i < info->num_keys; ++i) {
    const Key& key = info->keys[i];
    if (const double* v = double_field(copy, key.field)) {
      if (!std::isfinite(*v)) invalid(who + key.name + " must be finite, got " + fmt(*v));
    } else {
      const std::int64_t n = *integer_field(copy, key.field);
      if (n > kMaxInteger) invalid(who + key.name + " must be <= 2^53, got " + std::to_string(n));
    }
  }
  const auto at_least = [&](const char* name, double v, double lo) {
    if (!(v >= lo)) invalid(who + name + " must be >= " + fmt(lo) + ", got " + fmt(v));
  };
  const auto positive = [&](const char* name, double v) {
    if (!(v > 0.0)) invalid(who + name + " must be > 0, got " + fmt(v));
  };
  const auto count_at_least = [&](const char* name, std::int64_t v, std::int64_t lo) {
    if (v < lo)
      invalid(who + name + " must be >= " + std::to_string(lo) + ", got " + std::to_string(v));
  };
  switch (s.kind) {
    case ScheduleKind::constant: at_least("lr", s.lr, 0.0); break;
    case ScheduleKind::step:
      at_least("lr", s.lr, 0.0);
      positive("gamma", s.gamma);
      count_at_least("step_size", s.step_size, 1);
      break;
    case ScheduleKind::exponential:
      at_least("lr", s.lr, 0.0);
      positive("gamma", s.gamma);
      break;
    case ScheduleKind::cosine:
    case ScheduleKind::warmup_cosine:
      at_least("lr", s.lr, 0.0);
      at_least("min_lr", s.min_lr, 0.0);
      if (s.min_lr > s.lr)
        invalid(who + "min_lr must be <= lr, got min_lr=" + fmt(s.min_lr) + ", lr=" + fmt(s.lr));
      count_at_least("total", s.total, 1);
      if (s.kind == ScheduleKind::warmup_cosine) {
        count_at_least("warmup", s.warmup, 0);
        if (s.warmup > s.total)
          invalid(who + "warmup must be <= total, got warmup=" + std::to_string(s.warmup) +
                  ", total=" + std::to_string(s.total));
      }
      break;
    case ScheduleKind::linear_warmup:
      at_least("lr", s.lr, 0.0);
      count_at_least("warmup", s.warmup, 1);
      break;
    case ScheduleKind::cyclic:
      at_least("min_lr", s.min_lr, 0.0);
      at_least("max_lr", s.max_lr, 0.0);
      if (s.min_lr > s.max_lr)
        invalid(who + "min_lr must be <= max_lr, got min_lr=" + fmt(s.min_lr) +
                ", max_lr=" + fmt(s.max_lr));
      count_at_least("step_size", s.step_size, 1);
      break;
    case ScheduleKind::one_cycle:
      at_least("max_lr", s.max_lr, 0.0);
      count_at_least("total", s.total, 1);
      if (!(s.pct_start >= 0.0 && s.pct_start <= 1.0))
        invalid(who + "pct_start must be in [0, 1], got " + fmt(s.pct_start));
      positive("div_factor", s.div_factor);
      positive("final_div_factor", s.final_div_factor);
      break;
  }
}

Schedule parse_schedule(std::string_view spec) {
  const std::string quoted = "'" + std::string(spec) + "'";
  const std::size_t colon = spec.find(':');
  const std::string_view kind_name = trim(spec.substr(0, colon));
  if (kind_name.empty())
    invalid("schedule spec " + quoted + " has no kind (known: " + known_kinds() + ")");
  const KindInfo* info = nullptr;
  for (const KindInfo& k : kKinds)
    if (kind_name == k.name) info = &k;
  if (!info)
    invalid("schedule spec " + quoted + ": unknown kind '" + std::string(kind_name) +
            "' (known: " + known_kinds() + ")");
  const std::string who = std::string(info->name) + " schedule: ";

  Schedule s;
  s.kind = info->kind;
  bool seen[5] = {};
  std::string_view rest =
      colon == std::string_view::npos ? std::string_view{} : spec.substr(colon + 1);
  while (colon != std::string_view::npos) {
    const std::size_t comma = rest.find(',');
    const std::string_view item = trim(rest.substr(0, comma));
    const std::size_t eq = item.find('=');
    if (eq == std::string_view::npos)
      invalid(who + "expected key=value, got '" + std::string(item) + "' in " + quoted);
    const std::string_view name = trim(item.substr(0, eq));
    const std::string_view text = trim(item.substr(eq + 1));
    int index = -1;
    for (int i = 0; i < info->num_keys; ++i)
      if (name == info->keys[i].name) index = i;
    if (index < 0)
      invalid(who + "unknown key '" + std::string(name) + "' (" + info->name + " takes " +
              keys_of(*info) + ")");
    if (seen[index]) invalid(who + "key '" + std::string(name) + "' given twice");
    seen[index] = true;

    double v = 0.0;
    const char* end = text.data() + text.size();
    const auto [ptr, ec] = std::from_chars(text.data(), end, v);
    if (text.empty() || ec != std::errc() || ptr != end)
      invalid(who + std::string(name) + " must be a number, got '" + std::string(text) + "'");
    const Field field = info->keys[index].field;
    if (is_integer_field(field)) {
      if (!(std::fabs(v) <= static_cast<double>(kMaxInteger)) || v != std::floor(v))
        invalid(who + std::string(name) + " must be an integer with |value| <= 2^53, got '" +
                std::string(text) + "'");
      *integer_field(s, field) = static_cast<std::int64_t>(v);
    } else {
      *double_field(s, field) = v;
    }
    if (comma == std::string_view::npos) break;
    rest.remove_prefix(comma + 1);
  }
  for (int i = 0; i < info->num_keys; ++i)
    if (info->keys[i].required && !seen[i])
      invalid(who + "missing required key '" + info->keys[i].name + "' (" + info->name + " takes " +
              keys_of(*info) + ")");
  validate_schedule(s);
  return s;
}

std::string format_schedule(const Schedule& s) {
  const KindInfo* info = find_kind(s.kind);
  if (!info) invalid("schedule: unknown kind " + std::to_string(static_cast<int>(s.kind)));
  std::string out = std::string(info->name) + ":";
  Schedule copy = s;
  for (int i = 0; i < info->num_keys; ++i) {
    const Key& key = info->keys[i];
    char buf[40];
    if (const double* v = double_field(copy, key.field))
      std::snprintf(buf, sizeof buf, "%.17g", *v);
    else
      std::snprintf(buf, sizeof buf, "%lld",
                    static_cast<long long>(*integer_field(copy, key.field)));
    out += (i ? "," : "") + std::string(key.name) + "=" + buf;
  }
  return out;
}

double scheduled_lr(const Schedule& s, std::int64_t step) {
  if (step < 1) invalid("schedule: step must be >= 1, got " + std::to_string(step));
  validate_schedule(s);
  return schedule_lr(s, step);
}

void schedule_to_device(const Schedule& s, const std::int64_t* d_step, float* d_lr, void* stream) {
  validate_schedule(s);
  if (!d_step) invalid("schedule_to_device: d_step is null");
  if (!d_lr) invalid("schedule_to_device: d_lr is null");
  cuda::schedule_to_device(s, d_step, d_lr, stream);
}

}  // namespace fo
