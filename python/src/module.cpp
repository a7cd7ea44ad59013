// fusedopt._fusedopt: the Python bindings, a thin layer over the library's stateless list step
// (fusedopt/functional.hpp). Arrays cross as DLPack, so no libtorch is linked and torch,
// numpy, CuPy or JAX arrays all work: through the producer's DLPack C exchange API where it
// has one (torch 2.10+: `type(t).__dlpack_c_exchange_api__`, a C call per tensor), else through
// nanobind's nb::ndarray (`__dlpack__` or the buffer protocol). The first is what keeps a step
// over a long param list cheap: torch's `Tensor.__dlpack__` costs about 15 us a tensor here.
//
// Nothing here names an optimizer: the algorithm and its options arrive by name and go to
// fo::fused_step_list, whose registry table types them.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "fusedopt/fusedopt.hpp"

namespace nb = nanobind;
namespace dl = nanobind::dlpack;

namespace {

// The DLPack C exchange API (dlpack.h, DLPack 1.2+), declared here with nanobind's DLTensor
// (the same layout) for the two calls used: a non-owning view of a Python tensor, and the
// producer's current stream of a device.
struct DLPackVersion {
  std::uint32_t major, minor;
};
struct DLPackExchangeAPIHeader {
  DLPackVersion version;
  DLPackExchangeAPIHeader* prev_api;
};
struct DLPackExchangeAPI {
  DLPackExchangeAPIHeader header;
  void* managed_tensor_allocator;
  void* managed_tensor_from_py_object_no_sync;
  void* managed_tensor_to_py_object_no_sync;
  int (*dltensor_from_py_object_no_sync)(void* py_object, dl::dltensor* out);
  int (*current_work_stream)(int device_type, std::int32_t device_id, void** out_stream);
};

constexpr int kDLCPU = 1, kDLCUDA = 2, kDLCUDAManaged = 13;

/// The exchange API of a Python type, or null (looked up once per type).
const DLPackExchangeAPI* exchange_api(PyTypeObject* type) {
  static std::unordered_map<PyTypeObject*, const DLPackExchangeAPI*> cache;
  const auto it = cache.find(type);
  if (it != cache.end()) return it->second;
  const DLPackExchangeAPI* api = nullptr;
  PyObject* capsule =
      PyObject_GetAttrString(reinterpret_cast<PyObject*>(type), "__dlpack_c_exchange_api__");
  if (capsule && PyCapsule_IsValid(capsule, "dlpack_exchange_api")) {
    const auto* a =
        static_cast<const DLPackExchangeAPI*>(PyCapsule_GetPointer(capsule, "dlpack_exchange_api"));
    if (a && a->header.version.major == 1 && a->dltensor_from_py_object_no_sync) api = a;
  }
  Py_XDECREF(capsule);
  PyErr_Clear();
  cache.emplace(type, api);
  return api;
}

[[noreturn]] void raise_type(const std::string& msg) { throw nb::type_error(msg.c_str()); }
[[noreturn]] void raise_value(const std::string& msg) { throw nb::value_error(msg.c_str()); }

/// What a step needs of one array: where its elements are and what they are.
struct View {
  char* data = nullptr;
  fo::DType dtype = fo::DType::f32;
  int device_type = kDLCPU, device_id = 0;
  std::int64_t numel = 1;
  int ndim = 0;
  const std::int64_t* shape = nullptr;  // valid while the call holds the array
  bool contiguous = true;
  bool steppable = true;  // float32, bfloat16 or float16: dtype says which
  bool f64 = false;       // float64: only a step count may be one
  dl::dtype raw{};        // for messages
};

std::string dtype_text(const dl::dtype& t) {
  const char* kinds[] = {"int", "uint", "float", "opaque", "bfloat", "complex", "bool"};
  std::string s = (t.code < 7 ? std::string(kinds[t.code]) : "code " + std::to_string(t.code)) +
                  std::to_string(t.bits);
  if (t.lanes != 1) s += "x" + std::to_string(t.lanes);
  return s;
}

void fill_view(View& v, const dl::dltensor& t) {
  v.data = static_cast<char*>(t.data) + t.byte_offset;
  v.device_type = t.device.device_type;
  v.device_id = t.device.device_id;
  v.ndim = t.ndim;
  v.shape = t.shape;
  v.numel = 1;
  for (int i = 0; i < t.ndim; ++i) v.numel *= t.shape[i];
  v.contiguous = true;
  if (t.strides) {
    std::int64_t expect = 1;
    for (int i = t.ndim - 1; i >= 0; --i) {
      if (t.shape[i] != 1 && t.strides[i] != expect) v.contiguous = false;
      expect *= t.shape[i];
    }
  }
  const bool scalar = t.dtype.lanes == 1;
  v.steppable = scalar;
  v.f64 = false;
  if (scalar && t.dtype.code == 2 && t.dtype.bits == 32)
    v.dtype = fo::DType::f32;
  else if (scalar && t.dtype.code == 2 && t.dtype.bits == 16)
    v.dtype = fo::DType::f16;
  else if (scalar && t.dtype.code == 4 && t.dtype.bits == 16)
    v.dtype = fo::DType::bf16;
  else
    v.steppable = false, v.f64 = scalar && t.dtype.code == 2 && t.dtype.bits == 64;
  v.raw = t.dtype;
}

/// Views of Python arrays: the DLPack exchange API's (no reference kept: the caller's lists
/// hold the arrays), or nb::ndarray's (kept here for the call).
class Importer {
 public:
  void view(nb::handle obj, View& v, const char* what, std::size_t index) {
    if (const DLPackExchangeAPI* api = exchange_api(Py_TYPE(obj.ptr()))) {
      dl::dltensor t;
      if (api->dltensor_from_py_object_no_sync(obj.ptr(), &t) != 0) {
        PyErr_Clear();
        raise_type(std::string(what) + " " + std::to_string(index) +
                   " cannot be viewed through DLPack (a sparse or non-strided tensor?)");
      }
      fill_view(v, t);
      return;
    }
    nb::ndarray<> a;
    if (!nb::try_cast(obj, a, /*convert=*/false))
      raise_type(std::string(what) + " " + std::to_string(index) + " is a " +
                 nb::type_name(obj.type()).c_str() +
                 ", not an array that speaks DLPack (torch, numpy, CuPy, JAX) or is writable");
    dl::dltensor t{};
    t.data = a.data_handle();
    t.device.device_type = a.device_type();
    t.device.device_id = a.device_id();
    t.ndim = static_cast<std::int32_t>(a.ndim());
    t.dtype = a.dtype();
    t.shape = const_cast<std::int64_t*>(a.shape_ptr());
    t.strides = const_cast<std::int64_t*>(a.stride_ptr());
    t.byte_offset = a.byte_offset();
    fill_view(v, t);
    kept_.push_back(std::move(a));
  }

 private:
  std::vector<nb::ndarray<>> kept_;
};

std::string device_text(int type, int id) {
  if (type == kDLCPU) return "cpu";
  if (type == kDLCUDA) return "cuda:" + std::to_string(id);
  if (type == kDLCUDAManaged) return "cuda (managed):" + std::to_string(id);
  return "DLPack device type " + std::to_string(type) + ":" + std::to_string(id);
}

fo::NamedOptions named_options(const nb::dict& options) {
  fo::NamedOptions named;
  named.reserve(options.size());
  for (auto [k, v] : options) {
    if (!nb::isinstance<nb::str>(k)) raise_type("option names are strings");
    double value;
    if (!nb::try_cast(v, value))
      raise_type("option " + std::string(nb::str(k).c_str()) + " must be a number, got " +
                 nb::type_name(v.type()).c_str());
    named.emplace_back(nb::str(k).c_str(), value);
  }
  return named;
}

/// A step count: an int taken as is (the count of the step being taken), or a scalar array
/// (torch's state["step"]: the steps taken so far) read here, to be incremented after the
/// step (`counted`).
std::int64_t read_count(nb::handle c, View& sv, Importer& importer, std::size_t i, bool& counted) {
  counted = false;
  if (PyLong_Check(c.ptr())) return nb::cast<std::int64_t>(c);
  const auto at = [i] { return " of param " + std::to_string(i); };
  importer.view(c, sv, "step count", i);
  const bool f32 = sv.steppable && sv.dtype == fo::DType::f32;
  if (sv.device_type != kDLCPU || sv.numel != 1 || !(f32 || sv.f64))
    raise_value("the step count" + at() + " is a " + dtype_text(sv.raw) + " array of " +
                std::to_string(sv.numel) + " elements on " +
                device_text(sv.device_type, sv.device_id) +
                ": it must be one float32 or float64 on the CPU (torch's non-capturable "
                "state['step'])");
  const double now =
      f32 ? *reinterpret_cast<const float*>(sv.data) : *reinterpret_cast<const double*>(sv.data);
  if (!(now >= 0.0 && now < 9.0e15 && now == static_cast<double>(static_cast<std::int64_t>(now))))
    raise_value("the step count" + at() + " is " + std::to_string(now) +
                ": it must be a whole number >= 0");
  counted = true;
  return static_cast<std::int64_t>(now) + 1;
}

/// Writes a step count read by read_count back, incremented.
void write_count(const View& sv, std::int64_t count) {
  if (!sv.f64)
    *reinterpret_cast<float*>(sv.data) = static_cast<float>(count);
  else
    *reinterpret_cast<double*>(sv.data) = static_cast<double>(count);
}

/// Where a step on arrays of (device_type, device_id) runs: the CPU, or CUDA on `stream` (an
/// int) or, when None, the producer's current stream of that device (`first`'s type).
void set_exec(fo::Exec& exec, fo::StepControls& controls, int device_type, int device_id,
              const nb::object& stream, nb::handle first) {
  if (device_type == kDLCUDA || device_type == kDLCUDAManaged) {
    exec.device = fo::Device::cuda;
    exec.device_index = device_id;
    controls.buffers_on_device = true;  // DLPack said so
    if (!stream.is_none()) {
      exec.stream = reinterpret_cast<void*>(nb::cast<std::uintptr_t>(stream));
    } else if (first.is_valid()) {
      // The producer's current stream of the device (torch.cuda.current_stream()).
      const DLPackExchangeAPI* api = exchange_api(Py_TYPE(first.ptr()));
      if (api && api->current_work_stream &&
          api->current_work_stream(kDLCUDA, device_id, &exec.stream) != 0) {
        PyErr_Clear();
        exec.stream = nullptr;
      }
    }
  } else if (device_type != kDLCPU && first.is_valid()) {
    raise_value("arrays on " + device_text(device_type, device_id) +
                ": fusedopt steps arrays on the CPU and on CUDA");
  }
}

/// Views param i of a list and checks it: a dtype the library steps, contiguous, on the device
/// of param 0 (which i == 0 sets in device_type and device_id).
void view_param(Importer& importer, nb::handle obj, std::size_t i, View& p, int& device_type,
                int& device_id) {
  importer.view(obj, p, "param", i);
  if (!p.steppable)
    raise_type("param " + std::to_string(i) + " is " + dtype_text(p.raw) +
               ": fusedopt steps float32, bfloat16 and float16 params");
  if (!p.contiguous)
    raise_value("param " + std::to_string(i) +
                " is not contiguous: fusedopt steps a param's memory in place, which needs "
                "contiguous params");
  if (i == 0) device_type = p.device_type, device_id = p.device_id;
  if (p.device_type != device_type || p.device_id != device_id)
    raise_value("param " + std::to_string(i) + " is on " + device_text(p.device_type, p.device_id) +
                ", param 0 on " + device_text(device_type, device_id) +
                ": one step takes the params of one device (split the param group)");
}

/// Checks that `v` (the grad, a state or the EMA of param i) lies with the param `p`: on its
/// device, of its shape, contiguous, of a dtype the library takes. what(): the array's name,
/// built only for a message.
template <class What>
void check_with_param(const View& v, const View& p, std::size_t i, const What& what) {
  const auto at = [i] { return " of param " + std::to_string(i); };
  if (v.device_type != p.device_type || v.device_id != p.device_id)
    raise_value(what() + at() + " is on " + device_text(v.device_type, v.device_id) +
                ", the param on " + device_text(p.device_type, p.device_id));
  if (v.ndim != p.ndim || !std::equal(p.shape, p.shape + p.ndim, v.shape))
    raise_value(what() + at() + " has a different shape from the param");
  if (!v.contiguous) raise_value(what() + at() + " is not contiguous");
  if (!v.steppable)
    raise_type(
        what() + at() + " is " + dtype_text(v.raw) +
        ": fusedopt takes float32, bfloat16 or float16 grads and float32 or bfloat16 states");
}

/// check_with_param for a state of its own shape `dims` (a factored state in torch's layout).
template <class What>
void check_with_shape(const View& v, const View& p, const std::vector<std::int64_t>& dims,
                      std::size_t i, const What& what) {
  const auto at = [i] { return " of param " + std::to_string(i); };
  if (v.device_type != p.device_type || v.device_id != p.device_id)
    raise_value(what() + at() + " is on " + device_text(v.device_type, v.device_id) +
                ", the param on " + device_text(p.device_type, p.device_id));
  if (v.ndim != static_cast<int>(dims.size()) || !std::equal(dims.begin(), dims.end(), v.shape)) {
    std::string want;
    for (auto d : dims) want += (want.empty() ? "" : ", ") + std::to_string(d);
    raise_value(what() + at() + " has the wrong shape: it must be (" + want + ")");
  }
  if (!v.contiguous) raise_value(what() + at() + " is not contiguous");
  if (!v.steppable)
    raise_type(
        what() + at() + " is " + dtype_text(v.raw) +
        ": fusedopt takes float32, bfloat16 or float16 grads and float32 or bfloat16 states");
}

bool is_uint8(const View& v) { return v.raw.code == 1 && v.raw.bits == 8 && v.raw.lanes == 1; }

/// A call's `state_dtype`: None (the states' own dtype, float32 or bfloat16), or "int8" /
/// "int4": block-quantized states (docs/quantized-states.md), each a 1-D uint8 array of
/// quantized_state_bytes(numel, state_dtype) bytes.
fo::DType quantized_dtype(nb::handle state_dtype, const char* who) {
  if (state_dtype.is_none()) return fo::DType::f32;
  std::string name;
  if (nb::try_cast(state_dtype, name)) {
    if (name == "int8") return fo::DType::q8;
    if (name == "int4") return fo::DType::q4;
  }
  raise_value(std::string(who) +
              ": state_dtype must be None (float32 or bfloat16 states), "
              "'int8' or 'int4' (block-quantized uint8 buffers), got " +
              nb::repr(state_dtype).c_str());
}

/// Checks a block-quantized state `v` of param i (a 1-D contiguous uint8 array of the bytes
/// its `numel` values take in `q`, on the param's device).
template <class What>
void check_quantized(const View& v, const View& p, std::int64_t numel, fo::DType q, std::size_t i,
                     const What& what) {
  const auto at = [i] { return " of param " + std::to_string(i); };
  if (v.device_type != p.device_type || v.device_id != p.device_id)
    raise_value(what() + at() + " is on " + device_text(v.device_type, v.device_id) +
                ", the param on " + device_text(p.device_type, p.device_id));
  const auto bytes = static_cast<std::int64_t>(fo::quantized_state_bytes(q, numel));
  if (!is_uint8(v) || v.ndim != 1 || v.numel != bytes || !v.contiguous)
    raise_value(what() + at() + " is a " + (v.contiguous ? "" : "non-contiguous ") +
                dtype_text(v.raw) + " array of " + std::to_string(v.numel) +
                " elements: a block-quantized (" + fo::dtype_name(q) +
                ") state is one contiguous 1-D uint8 array of " + std::to_string(bytes) +
                " bytes (quantized_state_bytes)");
}

/// The per-state lists of a call (one list per state `specs` names, each one array per param).
std::vector<nb::list> state_lists(const std::string& who, const std::string& algorithm,
                                  const std::vector<fo::StateSpec>& specs, const nb::list& states,
                                  std::size_t n) {
  if (states.size() != specs.size())
    raise_value(who + ": " + algorithm + " with these options uses " +
                std::to_string(specs.size()) + " states, got " + std::to_string(states.size()) +
                " lists");
  std::vector<nb::list> lists;
  for (std::size_t j = 0; j < specs.size(); ++j) {
    nb::list l;
    if (!nb::try_cast(states[j], l))
      raise_type(who + ": the states of " + specs[j].name + " must be a list");
    if (l.size() != n)
      raise_value(who + ": the list of state " + specs[j].name + " has " +
                  std::to_string(l.size()) + " entries for " + std::to_string(n) + " params");
    lists.push_back(std::move(l));
  }
  return lists;
}

/// One list step, viewed and checked, ready to run.
struct Prepared {
  std::string algorithm;
  fo::NamedOptions named;
  std::vector<fo::DenseTensors> tensors;
  std::vector<std::int64_t> counts;
  std::vector<View> step_views;
  std::vector<bool> counted;  // counts[i] came from an array, to be written back
  fo::Exec exec;
  fo::StepControls controls;
};

/// Views every array of one list step and makes every check, the library's included.
/// `emas`: None, or one float32 array per param (its weight EMA, updated with `ema_decay`).
/// `scalars`: for an algorithm with scalar states (fo::step_scalars), one array per param of
/// kMaxScalars contiguous float64 values on the param's device, read and advanced by the step;
/// None for the others.
void prepare(Prepared& out, Importer& importer, const std::string& algorithm,
             const nb::dict& options, const nb::list& params, const nb::list& grads,
             const nb::list& states, const nb::list& steps, const nb::object& stream,
             nb::handle emas = nb::none(), double ema_decay = 0.0, nb::handle scalars = nb::none(),
             nb::handle state_dtype = nb::none()) {
  out.algorithm = algorithm;
  const fo::DType quantized = quantized_dtype(state_dtype, "step");
  const bool is_quantized = quantized != fo::DType::f32;
  out.named = named_options(options);
  const fo::NamedOptions& named = out.named;
  const std::vector<fo::StateSpec> specs = fo::step_states(algorithm, named);
  const std::size_t n = params.size();
  if (grads.size() != n || steps.size() != n)
    raise_value("step: " + std::to_string(n) + " params, " + std::to_string(grads.size()) +
                " grads and " + std::to_string(steps.size()) + " step counts");
  const std::vector<nb::list> lists = state_lists("step", algorithm, specs, states, n);
  nb::list ema_list;
  const bool with_ema = !emas.is_none();
  if (with_ema) {
    if (!nb::try_cast(emas, ema_list) || ema_list.size() != n)
      raise_value("step: emas must be None or a list of one float32 array per param");
  }
  const std::size_t num_scalars = fo::step_scalars(algorithm).size();
  nb::list scalar_list;
  if (num_scalars > 0) {
    if (!nb::try_cast(scalars, scalar_list) || scalar_list.size() != n)
      raise_value("step: " + algorithm +
                  " keeps scalar states per param (fusedopt.step_scalars): scalars must be a "
                  "list of one float64 array of " +
                  std::to_string(fo::kMaxScalars) + " values per param");
  } else if (!scalars.is_none()) {
    raise_value("step: " + algorithm + " has no scalar states: scalars must be None");
  }

  std::vector<fo::DenseTensors>& tensors = out.tensors;
  std::vector<std::int64_t>& counts = out.counts;
  std::vector<View>& step_views = out.step_views;
  std::vector<bool>& counted = out.counted;
  tensors.assign(n, fo::DenseTensors{});
  counts.assign(n, 0);
  step_views.assign(n, View{});
  counted.assign(n, false);
  int device_type = kDLCPU, device_id = 0;
  View p, g, s;
  std::vector<std::int64_t> state_dims;
  for (std::size_t i = 0; i < n; ++i) {
    const auto at = [i] { return " of param " + std::to_string(i); };
    view_param(importer, params[i], i, p, device_type, device_id);
    importer.view(grads[i], g, "grad", i);
    check_with_param(g, p, i, [] { return std::string("the grad"); });
    fo::DenseTensors& t = tensors[i];
    t.param = p.data;
    t.grad = g.data;
    t.numel = p.numel;
    t.param_dtype = p.dtype;
    t.grad_dtype = g.dtype;
    t.state_dtype = fo::DType::f32;
    t.view = fo::matrix_view(p.shape, p.ndim);
    bool first_state = true;
    for (std::size_t j = 0; j < specs.size(); ++j) {
      // A factored state (adafactor's row_var, col_var, variance) in torch's layout, and
      // None where the param's dimensions do not keep it.
      const bool kept = fo::state_shape(specs[j], p.shape, p.ndim, state_dims);
      if (!kept) {
        if (!lists[j][i].is_none())
          raise_value("state " + specs[j].name + at() + " must be None: a param of " +
                      std::to_string(p.ndim) + " dimensions does not keep it");
        continue;
      }
      importer.view(lists[j][i], s, "state", i);
      const auto name = [&] { return "state " + specs[j].name; };
      if (is_quantized) {
        std::int64_t count = 1;
        for (const std::int64_t d : state_dims) count *= d;
        check_quantized(s, p, count, quantized, i, name);
        t.states[specs[j].index] = s.data;
        t.state_dtype = quantized;
        continue;
      }
      if (is_uint8(s))
        raise_type(name() + at() +
                   " is uint8: a block-quantized state needs the call's state_dtype ('int8' or "
                   "'int4')");
      if (specs[j].shape == fo::StateShape::element || specs[j].shape == fo::StateShape::unfactored)
        check_with_param(s, p, i, name);
      else
        check_with_shape(s, p, state_dims, i, name);
      if (!first_state && s.dtype != t.state_dtype)
        raise_type("the states" + at() + " differ in dtype: one takes one dtype for all");
      t.states[specs[j].index] = s.data;
      t.state_dtype = s.dtype;
      first_state = false;
    }
    if (with_ema) {
      importer.view(ema_list[i], s, "ema", i);
      check_with_param(s, p, i, [] { return std::string("the ema"); });
      if (s.dtype != fo::DType::f32)
        raise_type("the ema" + at() + " is " + dtype_text(s.raw) + ": a weight EMA is float32");
      t.ema = reinterpret_cast<float*>(s.data);
    }
    if (num_scalars > 0) {
      importer.view(scalar_list[i], s, "scalar states", i);
      if (!s.f64)
        raise_type("the scalar states" + at() + " are " + dtype_text(s.raw) + ": they are float64");
      if (s.numel != fo::kMaxScalars || !s.contiguous || s.device_type != p.device_type ||
          s.device_id != p.device_id)
        raise_value("the scalar states" + at() + " are " + std::to_string(s.numel) +
                    (s.contiguous ? "" : " non-contiguous") + " values on " +
                    device_text(s.device_type, s.device_id) + ": they must be " +
                    std::to_string(fo::kMaxScalars) +
                    " contiguous float64 values on the param's device, " +
                    device_text(p.device_type, p.device_id));
      t.scalars = reinterpret_cast<double*>(s.data);
    }
    bool was_counted = false;
    counts[i] = read_count(steps[i], step_views[i], importer, i, was_counted);
    counted[i] = was_counted;
  }

  set_exec(out.exec, out.controls, device_type, device_id, stream,
           n > 0 ? nb::handle(params[0]) : nb::handle());
  out.controls.ema_decay = ema_decay;
  const fo::Exec& exec = out.exec;
  const fo::StepControls& controls = out.controls;
  fo::check_step_list(algorithm, named, tensors.data(), counts.data(), n, exec, controls);
}

/// Refuses a call in which two params share scalar states: each step reads its param's values
/// and writes their next ones, so a shared buffer would be advanced twice (on CUDA, by
/// concurrent blocks).
void check_scalars_apart(const std::vector<Prepared>& prepared) {
  std::vector<std::uintptr_t> at;
  for (const Prepared& s : prepared)
    for (const fo::DenseTensors& t : s.tensors)
      if (t.scalars) at.push_back(reinterpret_cast<std::uintptr_t>(t.scalars));
  std::sort(at.begin(), at.end());
  for (std::size_t i = 1; i < at.size(); ++i)
    if (at[i] - at[i - 1] < fo::kMaxScalars * sizeof(double))
      raise_value(
          "step: two params share (or overlap in) their scalar states: each param needs its own");
}

/// One sparse row step (an embedding table's), viewed and checked, ready to run.
struct PreparedSparse {
  std::string algorithm;
  fo::NamedOptions named;
  fo::SparseTensors tensors;
  std::int64_t count = 0;
  View step_view;
  bool counted = false;
  fo::Exec exec;
  fo::StepControls controls;
};

/// Views the arrays of a sparse step (the table `param`, its `indices` (int32 or int64, one
/// per gradient row, duplicates allowed) and `values` ([nnz, ...] gradient rows), its states in
/// sparse_step_states() order) and makes every check, the library's included.
void prepare_sparse(PreparedSparse& out, Importer& importer, const std::string& algorithm,
                    const nb::dict& options, nb::handle param, nb::handle indices,
                    nb::handle values, const nb::list& states, nb::handle step,
                    const nb::object& stream) {
  out.algorithm = algorithm;
  out.named = named_options(options);
  const std::vector<fo::StateSpec> specs = fo::sparse_step_states(algorithm, out.named);
  if (states.size() != specs.size())
    raise_value("sparse step: " + algorithm + " with these options uses " +
                std::to_string(specs.size()) + " states, got " + std::to_string(states.size()));
  View p, iv, gv, sv;
  importer.view(param, p, "param", 0);
  if (!p.steppable || p.dtype != fo::DType::f32)
    raise_type("a sparse step takes a float32 table, got " + dtype_text(p.raw));
  if (!p.contiguous) raise_value("the table of a sparse step is not contiguous");
  if (p.ndim < 1 || p.shape[0] == 0 || p.numel == 0)
    raise_value("the table of a sparse step must have rows and columns");
  const std::int64_t rows = p.shape[0], dim = p.numel / rows;
  importer.view(indices, iv, "indices", 0);
  const bool i32 = iv.raw.code == 0 && iv.raw.bits == 32 && iv.raw.lanes == 1;
  const bool i64 = iv.raw.code == 0 && iv.raw.bits == 64 && iv.raw.lanes == 1;
  if (!i32 && !i64) raise_type("sparse indices must be int32 or int64, got " + dtype_text(iv.raw));
  if (iv.ndim != 1 || !iv.contiguous)
    raise_value("sparse indices must be one contiguous row of indices");
  importer.view(values, gv, "gradient rows", 0);
  if (!gv.steppable || gv.dtype != fo::DType::f32)
    raise_type("sparse gradient rows must be float32, got " + dtype_text(gv.raw));
  if (!gv.contiguous) raise_value("the sparse gradient rows are not contiguous");
  if (gv.numel != iv.numel * dim)
    raise_value("the sparse gradient holds " + std::to_string(gv.numel) + " values for " +
                std::to_string(iv.numel) + " rows of " + std::to_string(dim));
  for (const View* v : {&iv, &gv})
    if (v->device_type != p.device_type || v->device_id != p.device_id)
      raise_value("the sparse gradient is on " + device_text(v->device_type, v->device_id) +
                  ", the table on " + device_text(p.device_type, p.device_id));
  fo::SparseTensors& t = out.tensors;
  t.table = reinterpret_cast<float*>(p.data);
  t.rows = rows;
  t.dim = dim;
  t.indices = iv.data;
  t.index_dtype = i32 ? fo::DType::i32 : fo::DType::i64;
  t.nnz = iv.numel;
  t.grad_rows = reinterpret_cast<const float*>(gv.data);
  for (std::size_t j = 0; j < specs.size(); ++j) {
    importer.view(states[j], sv, "state", j);
    const std::int64_t want = specs[j].per_row ? rows : p.numel;
    if (!sv.steppable || sv.dtype != fo::DType::f32 || !sv.contiguous || sv.numel != want ||
        sv.device_type != p.device_type || sv.device_id != p.device_id)
      raise_value("state " + specs[j].name + " of the sparse step must be " + std::to_string(want) +
                  " contiguous float32 values on the table's device");
    t.states[specs[j].index] = reinterpret_cast<float*>(sv.data);
  }
  out.count = read_count(step, out.step_view, importer, 0, out.counted);
  set_exec(out.exec, out.controls, p.device_type, p.device_id, stream, param);
  fo::check_sparse_step(algorithm, out.named, out.count, t, out.exec, out.controls);
}

/// Runs prepared steps, then writes the step counts back.
void run(std::vector<Prepared>& steps, std::vector<PreparedSparse>& sparse) {
  {
    nb::gil_scoped_release release;  // no Python object is touched: other threads may run
    for (const Prepared& s : steps)
      fo::fused_step_list(s.algorithm, s.named, s.tensors.data(), s.counts.data(), s.tensors.size(),
                          s.exec, s.controls);
    for (const PreparedSparse& s : sparse)
      fo::fused_sparse_step(s.algorithm, s.named, s.count, s.tensors, s.exec, s.controls);
  }
  for (const Prepared& s : steps)
    for (std::size_t i = 0; i < s.tensors.size(); ++i)
      if (s.counted[i]) write_count(s.step_views[i], s.counts[i]);
  for (const PreparedSparse& s : sparse)
    if (s.counted) write_count(s.step_view, s.count);
}

void step(const std::string& algorithm, const nb::dict& options, const nb::list& params,
          const nb::list& grads, const nb::list& states, const nb::list& steps,
          const nb::object& stream, const nb::object& emas, double ema_decay,
          const nb::object& scalars, const nb::object& state_dtype) {
  Importer importer;
  std::vector<Prepared> prepared(1);
  prepare(prepared[0], importer, algorithm, options, params, grads, states, steps, stream, emas,
          ema_decay, scalars, state_dtype);
  check_scalars_apart(prepared);
  std::vector<PreparedSparse> none;
  run(prepared, none);
}

/// Several list steps and sparse steps as one: all are checked before any runs.
/// A multiplier of every gradient of a step_groups call: a Python number (host), or one
/// float32 element in CUDA memory on the first group's device (read by the kernels: no sync).
void apply_grad_multiplier(std::vector<Prepared>& prepared, Importer& importer,
                           const nb::object& multiplier) {
  if (multiplier.is_none() || prepared.empty()) return;
  if (nb::isinstance<nb::float_>(multiplier) || nb::isinstance<nb::int_>(multiplier)) {
    const double host = nb::cast<double>(multiplier);
    if (!std::isfinite(host))
      raise_value("step_groups: grad_multiplier must be finite, got " + std::to_string(host));
    for (Prepared& s : prepared) s.controls.grad_multiplier *= static_cast<float>(host);
    return;
  }
  View v;
  importer.view(multiplier, v, "grad_multiplier", 0);
  const Prepared& first = prepared.front();
  if (!v.steppable || v.dtype != fo::DType::f32 || v.numel != 1 ||
      first.exec.device != fo::Device::cuda || v.device_type != kDLCUDA ||
      v.device_id != first.exec.device_index)
    raise_value(
        "step_groups: grad_multiplier must be a number, or one float32 element on the CUDA "
        "device of the params");
  for (Prepared& s : prepared) s.controls.d_grad_multiplier = reinterpret_cast<float*>(v.data);
}

void step_groups(const nb::list& groups, const nb::list& sparse_steps, const nb::object& stream,
                 const nb::object& grad_multiplier) {
  Importer importer;
  std::vector<Prepared> prepared(groups.size());
  for (std::size_t i = 0; i < groups.size(); ++i) {
    nb::tuple g;
    if (!nb::try_cast(groups[i], g) ||
        (g.size() != 6 && g.size() != 8 && g.size() != 9 && g.size() != 10))
      raise_type(
          "step_groups: each group is a tuple (algorithm, options, params, grads, "
          "states, steps[, emas, ema_decay[, scalars[, state_dtype]]])");
    const bool ema = g.size() >= 8;
    prepare(prepared[i], importer, nb::cast<std::string>(g[0]), nb::cast<nb::dict>(g[1]),
            nb::cast<nb::list>(g[2]), nb::cast<nb::list>(g[3]), nb::cast<nb::list>(g[4]),
            nb::cast<nb::list>(g[5]), stream, ema ? nb::handle(g[6]) : nb::handle(nb::none()),
            ema ? nb::cast<double>(g[7]) : 0.0,
            g.size() >= 9 ? nb::handle(g[8]) : nb::handle(nb::none()),
            g.size() == 10 ? nb::handle(g[9]) : nb::handle(nb::none()));
  }
  check_scalars_apart(prepared);
  std::vector<PreparedSparse> sparse(sparse_steps.size());
  for (std::size_t i = 0; i < sparse_steps.size(); ++i) {
    nb::tuple g;
    if (!nb::try_cast(sparse_steps[i], g) || g.size() != 7)
      raise_type(
          "step_groups: each sparse step is a tuple (algorithm, options, param, indices, "
          "values, states, step)");
    prepare_sparse(sparse[i], importer, nb::cast<std::string>(g[0]), nb::cast<nb::dict>(g[1]), g[2],
                   g[3], g[4], nb::cast<nb::list>(g[5]), g[6], stream);
  }
  apply_grad_multiplier(prepared, importer, grad_multiplier);
  run(prepared, sparse);
}

/// The evaluation form of params (fo::eval_params: sgd_schedule_free's and
/// adamw_schedule_free's x from y and z), written into the params in place. `states` as a
/// step takes them (one list per state step_states() names); checked like a step's arrays
/// first. CUDA arrays: on `stream`, or the producer's current stream of their device.
void eval_params(const std::string& algorithm, const nb::dict& options, const nb::list& params,
                 const nb::list& states, const nb::object& stream) {
  const fo::NamedOptions named = named_options(options);
  const std::vector<fo::StateSpec> specs = fo::step_states(algorithm, named);
  const std::size_t n = params.size();
  const std::vector<nb::list> lists = state_lists("eval_params", algorithm, specs, states, n);
  Importer importer;
  std::vector<fo::DenseTensors> tensors(n);
  int device_type = kDLCPU, device_id = 0;
  View p, s;
  for (std::size_t i = 0; i < n; ++i) {
    view_param(importer, params[i], i, p, device_type, device_id);
    fo::DenseTensors& t = tensors[i];
    t.param = p.data;
    t.numel = p.numel;
    t.param_dtype = t.grad_dtype = p.dtype;
    for (std::size_t j = 0; j < specs.size(); ++j) {
      importer.view(lists[j][i], s, "state", i);
      check_with_param(s, p, i, [&] { return "state " + specs[j].name; });
      if (j > 0 && s.dtype != t.state_dtype)
        raise_type("the states of param " + std::to_string(i) +
                   " differ in dtype: one takes one dtype for all");
      t.states[specs[j].index] = s.data;
      t.state_dtype = s.dtype;
    }
  }
  fo::Exec exec;
  fo::StepControls unused;
  set_exec(exec, unused, device_type, device_id, stream,
           n > 0 ? nb::handle(params[0]) : nb::handle());
  nb::gil_scoped_release release;
  fo::eval_params(algorithm, named, tensors.data(), n, exec);
}

/// Asks the kernel to back the whole 2 MiB pages inside a CPU array with transparent huge
/// pages (where THP is in `madvise` mode, the usual default): a step streams every byte of its
/// states, and 4 KiB pages cost it TLB misses (the library's own state buffers do the same,
/// host/src/buffer.cpp). Call it before the array's memory is first written. Advice only: arrays
/// under 2 MiB, on a GPU or on other systems are left alone; returns whether advice was given.
bool advise_huge_pages(nb::handle array) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  Importer importer;
  View v;
  importer.view(array, v, "array", 0);
  if (v.device_type != kDLCPU) return false;
  constexpr std::uintptr_t kHuge = std::uintptr_t{1} << 21;
  const std::size_t element = v.steppable ? fo::dtype_size(v.dtype) : v.raw.bits / 8;
  const auto begin = reinterpret_cast<std::uintptr_t>(v.data);
  const std::uintptr_t end = begin + static_cast<std::uintptr_t>(v.numel) * element;
  const std::uintptr_t first = (begin + kHuge - 1) / kHuge * kHuge, last = end / kHuge * kHuge;
  if (last <= first) return false;
  return madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE) == 0;
#else
  (void)array;
  return false;
#endif
}

/// A CPU array's data for the quantized-state functions: `uint8` bytes or `float32` values,
/// contiguous, of `count` elements.
char* cpu_buffer(Importer& importer, nb::handle obj, const char* what, bool uint8,
                 std::int64_t count, const char* who) {
  View v;
  importer.view(obj, v, what, 0);
  const bool f32 = v.steppable && v.dtype == fo::DType::f32;
  if (v.device_type != kDLCPU || !v.contiguous || (uint8 ? !is_uint8(v) : !f32) || v.numel != count)
    raise_value(std::string(who) + ": " + what + " must be a contiguous CPU " +
                (uint8 ? "uint8" : "float32") + " array of " + std::to_string(count) +
                " elements, got " + dtype_text(v.raw) + " x " + std::to_string(v.numel) + " on " +
                device_text(v.device_type, v.device_id) +
                (v.contiguous ? "" : " (non-contiguous)"));
  return v.data;
}

std::int64_t quantized_bytes(std::int64_t numel, nb::handle state_dtype) {
  const fo::DType q = quantized_dtype(state_dtype, "quantized_state_bytes");
  if (q == fo::DType::f32) raise_value("quantized_state_bytes: state_dtype is 'int8' or 'int4'");
  if (numel < 0) raise_value("quantized_state_bytes: numel must be >= 0");
  return static_cast<std::int64_t>(fo::quantized_state_bytes(q, numel));
}

/// The three host conversions of a block-quantized state (fo::quantize_state and friends):
/// `state` a uint8 buffer of quantized_state_bytes(numel) bytes, `values` numel float32.
void quantize(nb::handle state, nb::handle values, nb::handle state_dtype, bool non_negative) {
  Importer importer;
  View v;
  importer.view(values, v, "values", 0);
  const std::int64_t bytes = quantized_bytes(v.numel, state_dtype);
  char* src = cpu_buffer(importer, values, "values", false, v.numel, "quantize_state");
  char* dst = cpu_buffer(importer, state, "state", true, bytes, "quantize_state");
  const fo::DType q = quantized_dtype(state_dtype, "quantize_state");
  nb::gil_scoped_release release;
  fo::quantize_state(dst, q, non_negative, reinterpret_cast<const float*>(src), v.numel);
}

void dequantize(nb::handle values, nb::handle state, nb::handle state_dtype, bool non_negative) {
  Importer importer;
  View v;
  importer.view(values, v, "values", 0);
  const std::int64_t bytes = quantized_bytes(v.numel, state_dtype);
  char* dst = cpu_buffer(importer, values, "values", false, v.numel, "dequantize_state");
  char* src = cpu_buffer(importer, state, "state", true, bytes, "dequantize_state");
  const fo::DType q = quantized_dtype(state_dtype, "dequantize_state");
  nb::gil_scoped_release release;
  fo::dequantize_state(reinterpret_cast<float*>(dst), src, q, non_negative, v.numel);
}

void fill_quantized(nb::handle state, std::int64_t numel, nb::handle state_dtype, bool non_negative,
                    double value) {
  Importer importer;
  const std::int64_t bytes = quantized_bytes(numel, state_dtype);
  char* dst = cpu_buffer(importer, state, "state", true, bytes, "fill_quantized_state");
  const fo::DType q = quantized_dtype(state_dtype, "fill_quantized_state");
  nb::gil_scoped_release release;
  fo::fill_quantized_state(dst, q, non_negative, static_cast<float>(value), numel);
}

nb::list algorithms() {
  nb::list out;
  for (const fo::AlgorithmDescription& d : fo::dense_algorithms()) {
    nb::dict a;
    a["name"] = d.name;
    nb::dict defaults;
    for (std::size_t i = 0; i < d.options.size(); ++i)
      defaults[d.options[i].c_str()] =
          d.is_flag[i] ? nb::object(nb::bool_(d.defaults[i] != 0.0)) : nb::float_(d.defaults[i]);
    a["defaults"] = defaults;
    a["states"] = d.states;
    a["sparse"] = d.sparse;
    a["non_negative"] = d.non_negative;
    a["quantizable"] = d.quantizable;
    out.append(a);
  }
  return out;
}

}  // namespace

NB_MODULE(_fusedopt, m) {
  m.doc() = "fusedopt's fused optimizer steps over DLPack arrays (see fusedopt.torch)";

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const fo::Error& e) {
      switch (e.code()) {
        case fo::StatusCode::invalid_argument: PyErr_SetString(PyExc_ValueError, e.what()); break;
        case fo::StatusCode::unsupported: PyErr_SetString(PyExc_TypeError, e.what()); break;
        case fo::StatusCode::out_of_memory: PyErr_SetString(PyExc_MemoryError, e.what()); break;
        default: PyErr_SetString(PyExc_RuntimeError, e.what());
      }
    }
  });

  m.def("algorithms", &algorithms,
        "Every registered algorithm: name, option defaults (library names), states, sparse,\n"
        "non_negative (per state: a quantized state of it takes the unsigned map), quantizable\n"
        "(its states may be block-quantized: state_dtype 'int8' / 'int4').");
  m.def(
      "state_shapes",
      [](const std::string& algorithm, const nb::dict& options,
         const std::vector<std::int64_t>& shape) {
        std::vector<std::pair<std::string, std::optional<std::vector<std::int64_t>>>> out;
        std::vector<std::int64_t> dims;
        for (const fo::StateSpec& s : fo::step_states(algorithm, named_options(options))) {
          if (fo::state_shape(s, shape.data(), static_cast<int>(shape.size()), dims))
            out.emplace_back(s.name, dims);
          else
            out.emplace_back(s.name, std::nullopt);
        }
        return out;
      },
      nb::arg("algorithm"), nb::arg("options"), nb::arg("shape"),
      "The shape of each state step_states() names for a param of `shape`, in its order, as\n"
      "(name, shape): the param's shape, or for factored states (adafactor) torch's layout\n"
      "(row_var [..., rows, 1], col_var [..., 1, cols]), or None where a param of that many\n"
      "dimensions does not keep the state (its list entry in a step is then None).");
  m.def(
      "step_states",
      [](const std::string& algorithm, const nb::dict& options) {
        std::vector<std::tuple<std::string, int, double, bool>> out;
        for (const fo::StateSpec& s : fo::step_states(algorithm, named_options(options)))
          out.emplace_back(s.name, s.index, s.init, s.from_param);
        return out;
      },
      nb::arg("algorithm"), nb::arg("options"),
      "The states a step of `algorithm` under `options` uses, as (name, slot, initial value,\n"
      "from_param), in slot order; from_param: the state starts as a copy of the param (the\n"
      "schedule-free optimizers' z), not at the initial value. Raises ValueError for an unknown\n"
      "algorithm or option, or invalid values.");
  m.def(
      "step_scalars",
      [](const std::string& algorithm) {
        std::vector<std::pair<std::string, double>> out;
        for (const fo::ScalarSpec& s : fo::step_scalars(algorithm))
          out.emplace_back(s.name, s.init);
        return out;
      },
      nb::arg("algorithm"),
      "The per-param scalar states of `algorithm` (the schedule-free optimizers' lr_max and\n"
      "weight_sum; none for most), as (name, initial value) in the order a step reads them.");
  m.def(
      "eval_params", &eval_params, nb::arg("algorithm"), nb::arg("options"), nb::arg("params"),
      nb::arg("states"), nb::arg("stream") = nb::none(),
      "Writes into each param its evaluation form from itself and its states\n"
      "(sgd_schedule_free, adamw_schedule_free: x from y and z; docs/optimizers.md); `states` as\n"
      "step() takes them. The caller keeps the training values to restore them. Checked first:\n"
      "a call that raises has changed nothing. CUDA arrays run on `stream` or the producer's\n"
      "current stream of their device.");
  m.def("step", &step, nb::arg("algorithm"), nb::arg("options"), nb::arg("params"),
        nb::arg("grads"), nb::arg("states"), nb::arg("steps"), nb::arg("stream") = nb::none(),
        nb::arg("emas") = nb::none(), nb::arg("ema_decay") = 0.0, nb::arg("scalars") = nb::none(),
        nb::arg("state_dtype") = nb::none(),
        "One fused step of `algorithm` (a registered name) under `options` (a dict of its\n"
        "option names to numbers) over the arrays of `params` with `grads`. `states` holds one\n"
        "list per state step_states() names, in its order, each with one array per param.\n"
        "`steps[i]` is param i's step count: an int (the count of the step being taken), or a\n"
        "CPU scalar array holding the steps taken so far, which this call increments.\n"
        "Every array is checked before anything is written; a call that raises has changed\n"
        "nothing. CUDA arrays run on `stream` (an int cudaStream_t) or, when None, the\n"
        "producer's current stream of their device (torch: torch.cuda.current_stream()).\n"
        "`emas`: None, or one float32 array per param, its weight EMA, updated in the same\n"
        "pass after the step with `ema_decay` in [0, 1) (docs/optimizers.md, Weight EMA).\n"
        "`scalars`: for an algorithm with scalar states (step_scalars()), one float64 array of 2\n"
        "contiguous values per param on its device, starting at their initial values, which the\n"
        "step reads and advances (on CUDA stream-ordered); None for the others.\n"
        "`state_dtype`: None (the states are float32 or bfloat16 arrays of the param's shape),\n"
        "or 'int8' / 'int4': every state is block-quantized (docs/quantized-states.md), a\n"
        "contiguous 1-D uint8 array of quantized_state_bytes(param.numel(), state_dtype)\n"
        "bytes, 16-byte aligned, created by fill_quantized_state; elementwise algorithms only.");
  m.def("step_groups", &step_groups, nb::arg("groups"), nb::arg("sparse") = nb::list(),
        nb::arg("stream") = nb::none(), nb::arg("grad_multiplier") = nb::none(),
        "Several steps as one: `groups` is a list of tuples (algorithm, options, params, grads,\n"
        "states, steps[, emas, ema_decay[, scalars[, state_dtype]]]), each as step() takes\n"
        "them (emas None: no EMA); `sparse` a list of sparse row steps of\n"
        "embedding tables, tuples (algorithm, options, table, indices, values, states, step):\n"
        "int32/int64 row indices (duplicates summed), [nnz, ...] float32 gradient rows, the\n"
        "states sparse_step_states() names, a step count as step() takes one. Everything is\n"
        "checked before anything is stepped, so a call that raises has changed nothing.\n"
        "`grad_multiplier`: every dense gradient is multiplied by it first; a number, or one\n"
        "float32 element on the params' CUDA device (read there: no sync).");
  m.def(
      "sparse_step_states",
      [](const std::string& algorithm, const nb::dict& options) {
        std::vector<std::tuple<std::string, int, double, bool>> out;
        for (const fo::StateSpec& s : fo::sparse_step_states(algorithm, named_options(options)))
          out.emplace_back(s.name, s.index, s.init, s.per_row);
        return out;
      },
      nb::arg("algorithm"), nb::arg("options"),
      "The states a sparse step uses, as (name, slot, initial value, one value per row).");
  m.def("quantized_state_bytes", &quantized_bytes, nb::arg("numel"), nb::arg("state_dtype"),
        "The bytes of a block-quantized state of `numel` values, state_dtype 'int8' or 'int4':\n"
        "its codes, zero padding to 16 bytes, one float32 absmax per block of 256 (int8) or 128\n"
        "(int4) values (docs/quantized-states.md).");
  m.def("quantize_state", &quantize, nb::arg("state"), nb::arg("values"), nb::arg("state_dtype"),
        nb::arg("non_negative"),
        "Encodes the float32 CPU array `values` (to nearest, as a step writes) into `state`, a\n"
        "contiguous CPU uint8 array of quantized_state_bytes(values.numel(), state_dtype)\n"
        "bytes. non_negative: the state's map (algorithms()[...]['non_negative']).");
  m.def("dequantize_state", &dequantize, nb::arg("values"), nb::arg("state"),
        nb::arg("state_dtype"), nb::arg("non_negative"),
        "Decodes `state` (a CPU uint8 buffer) into the float32 CPU array `values`: exact.");
  m.def("fill_quantized_state", &fill_quantized, nb::arg("state"), nb::arg("numel"),
        nb::arg("state_dtype"), nb::arg("non_negative"), nb::arg("value"),
        "Writes into `state` (a CPU uint8 buffer) a state of `numel` copies of `value`: a\n"
        "state's first bytes before its first step (step_states' initial value).");
  m.def("advise_huge_pages", &advise_huge_pages, nb::arg("array"),
        "Advises transparent huge pages for the whole 2 MiB pages inside a CPU array (before it\n"
        "is first written); returns whether advice was given. Advice only.");
  m.def("cuda_device_count", &fo::cuda_device_count,
        "CUDA devices this build can use (0 when built without CUDA).");
}
