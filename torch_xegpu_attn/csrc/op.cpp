// The op xegpu::attention in C++: its schema, its device and autograd kernels,
// and the replay of recorded calls.
//
// A model calls attention with the same shapes, strides and flags over and
// over.  The Python frontend checks the first call of such a signature (SDPA's
// checks, the mapping to canonical views, the kernel from the cache) and,
// when every canonical operand is a view of its input starting at the input's
// first element, records it here: the kernel, the operands' descriptors
// (sizes and strides), the plan's task counts and workspaces, the output's
// shape.  A later call with the identical signature is replayed without
// Python: a hash lookup, one output allocation, the input pointers patched
// into the recorded descriptors, the grids.  This is sound because every check
// and the whole mapping depend only on the signature (shapes, strides, dtypes,
// devices and flags), and a descriptor needs only the first element's address
// besides sizes and strides.  Calls that are not recorded go to the Python
// frontend (`set_slow_path`), which runs every check: there is one
// implementation of the checks.
//
// Calls on other devices are replayed by their launcher (a separate extension,
// built where the device is), which hands this file its replay function
// (`set_device_replay`) and records the calls itself.
//
// Two entry points replay: the op's kernel (torch.ops.xegpu.attention,
// through the dispatcher) and `replay` (torch_xegpu_attn.attention, straight
// from Python, which returns None when the call is not recorded).  The
// autograd kernel lets calls that need no gradient through and sends the rest
// to xegpu::attention_with_lse, whose autograd (ops.py) runs the backward.

#include "kernel.h"
#include "replay.h"

#include <ATen/core/grad_mode.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>
#include <unordered_map>

namespace xattn {
namespace {

constexpr const char* kSchema =
    "attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, float dropout_p=0.0, "
    "bool is_causal=False, *, float? scale=None, bool enable_gqa=False) -> Tensor";

// ----------------------------------------------------------------------------- recipes

struct Recipe {
  std::shared_ptr<Kernel> kernel;
  Descriptors descriptors;  // q, k, v, [mask], out, then workspaces: bases patched per call
  LaunchPlan plan;
  std::vector<int64_t> out_shape;  // the user-facing output, contiguous
  std::string choice;              // the kernel-choosing knobs when recorded (they key the memory cache)
};

constexpr size_t kMaxRecipes = 4096;
std::mutex recipes_mutex;
std::unordered_map<std::vector<int64_t>, std::shared_ptr<Recipe>, KeyHash> recipes;
std::atomic<int64_t> replays{0};
std::atomic<int64_t> empty_results{0};
py::object* slow_path = nullptr;  // the Python frontend; never freed (lives until exit)

// The device launchers' replays, by device type (set_device_replay).
std::atomic<DeviceReplay> device_replays[static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)];

// A call on a device whose launcher recorded it.
std::optional<at::Tensor> replay_on_device(const Call& call) {
  const DeviceReplay fn = device_replays[static_cast<size_t>(call.q.device().type())].load(std::memory_order_acquire);
  at::Tensor out;
  if (fn == nullptr || !fn(call, &out)) return std::nullopt;
  replays.fetch_add(1, std::memory_order_relaxed);
  launches.fetch_add(1, std::memory_order_relaxed);
  return out;
}

std::optional<at::Tensor> replay(const Call& call) {
  if (!call.q.device().is_cpu()) return replay_on_device(call);
  std::vector<int64_t> key;
  if (!make_key(call, key)) return std::nullopt;
  std::shared_ptr<Recipe> recipe;
  {
    std::lock_guard<std::mutex> lock(recipes_mutex);
    auto found = recipes.find(key);
    if (found == recipes.end()) return std::nullopt;
    recipe = found->second;
  }
  if (!knobs_allow_replay(recipe->choice)) return std::nullopt;

  at::Tensor out = at::detail::empty_cpu(recipe->out_shape, call.q.scalar_type());
  if (poison_outputs()) out.fill_(std::nan(""));
  Descriptors d = recipe->descriptors;
  const at::Tensor* inputs[4] = {&call.q, &call.k, &call.v, call.mask};
  const size_t n_operands = recipe->kernel->n_operands();
  for (size_t i = 0; i + 1 < n_operands; ++i) d.set_base(i, inputs[i]->data_ptr());
  d.set_base(n_operands - 1, out.data_ptr());
  recipe->kernel->touch();
  recipe->kernel->execute(d, n_operands, recipe->plan);
  replays.fetch_add(1, std::memory_order_relaxed);
  return out;
}

// Record a call the Python frontend checked and mapped: `operands` are its
// canonical q, k, v, [mask], out.  Nothing is recorded unless each input
// operand starts at its input's first element.
bool record(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
            double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa,
            const std::shared_ptr<Kernel>& kernel, const std::vector<at::Tensor>& operands,
            const std::vector<int64_t>& out_shape) {
  const at::Tensor* mask_ptr = mask ? &*mask : nullptr;
  std::vector<int64_t> key;
  if (!q.device().is_cpu() || !make_key(Call{q, k, v, mask_ptr, dropout_p, is_causal, scale, enable_gqa}, key)) {
    return false;
  }
  const at::Tensor* inputs[4] = {&q, &k, &v, mask_ptr};
  const size_t n_inputs = mask ? 4 : 3;
  TORCH_CHECK(operands.size() == n_inputs + 1 && kernel->n_operands() == operands.size(),
              "torch_xegpu_attn: record() takes the canonical operands of the call");
  for (size_t i = 0; i < n_inputs; ++i) {
    if (operands[i].data_ptr() != inputs[i]->data_ptr()) return false;
  }
  const at::Tensor& out = operands.back();
  int64_t elements = 1;
  for (int64_t s : out_shape) elements *= s;
  TORCH_CHECK(out.is_contiguous() && out.numel() == elements, "torch_xegpu_attn: the output must be contiguous");

  auto recipe = std::make_shared<Recipe>();
  recipe->kernel = kernel;
  recipe->descriptors = kernel->describe(operands);
  recipe->plan = kernel->plan(recipe->descriptors);
  kernel->add_workspaces(recipe->descriptors, recipe->plan);
  recipe->out_shape = out_shape;
  recipe->choice = kernel_choice();
  std::lock_guard<std::mutex> lock(recipes_mutex);
  if (recipes.size() >= kMaxRecipes) recipes.clear();  // bounded; recording again costs one checked call
  recipes[std::move(key)] = std::move(recipe);
  return true;
}

void forget_kernel(const std::shared_ptr<Kernel>& kernel) {
  std::lock_guard<std::mutex> lock(recipes_mutex);
  for (auto it = recipes.begin(); it != recipes.end();) {
    it = it->second->kernel == kernel ? recipes.erase(it) : std::next(it);
  }
}

void clear_recipes() {
  std::lock_guard<std::mutex> lock(recipes_mutex);
  recipes.clear();
}

// ----------------------------------------------------------------------------- the op's kernels

c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const std::optional<at::Tensor>&, double, bool, std::optional<double>, bool)>
attention_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("xegpu::attention", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, double, bool, std::optional<double>,
                                         bool)>();
  return op;
}

py::object none_or(const std::optional<at::Tensor>& t) { return t ? py::cast(*t) : py::none(); }
py::object none_or(std::optional<double> x) { return x ? py::cast(*x) : py::none(); }

// The kernel of every device (CPU, CUDA, XPU): a replay, or the Python
// frontend (checks, cache, launch, record).
at::Tensor attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double dropout_p, bool is_causal,
                            std::optional<double> scale, bool enable_gqa) {
  if (auto out = replay(Call{q, k, v, mask ? &*mask : nullptr, dropout_p, is_causal, scale, enable_gqa})) return *out;
  py::gil_scoped_acquire gil;
  TORCH_CHECK(slow_path != nullptr, "torch_xegpu_attn: import torch_xegpu_attn to use xegpu::attention");
  py::object out = (*slow_path)(q, k, v, none_or(mask), dropout_p, is_causal, none_or(scale), enable_gqa);
  return out.cast<at::Tensor>();
}

// xegpu::attention_with_lse (defined and given its autograd in ops.py): the forward that also
// returns the log-sum-exp the backward needs.
c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                            const std::optional<at::Tensor>&, double, bool,
                                                            std::optional<double>, bool)>
attention_with_lse_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("xegpu::attention_with_lse", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const std::optional<at::Tensor>&,
                                                                 double, bool, std::optional<double>, bool)>();
  return op;
}

// The autograd kernel: calls that need a gradient go to attention_with_lse (whose autograd saves
// the output and the log-sum-exp and runs the backward kernel); the rest go straight below
// autograd to the inference kernel, which writes no log-sum-exp.
at::Tensor attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& mask, double dropout_p, bool is_causal,
                              std::optional<double> scale, bool enable_gqa) {
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (q.requires_grad() || k.requires_grad() || v.requires_grad() ||
                           (mask && mask->defined() && mask->requires_grad()));
  if (needs_grad) {
    // its output is in the accumulator's type (what the backward reads): the caller's is q's
    return std::get<0>(attention_with_lse_op().call(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa))
        .to(q.scalar_type());
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return attention_op().call(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa);
}

// ----------------------------------------------------------------------------- replay from Python

// A Python number as a double (int or float, not bool); false otherwise.
bool as_double(PyObject* x, double& out) {
  if (PyFloat_CheckExact(x)) {
    out = PyFloat_AS_DOUBLE(x);
    return true;
  }
  if (PyLong_CheckExact(x)) {
    out = PyLong_AsDouble(x);
    if (out == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    return true;
  }
  return false;
}

// The plain tensor behind `x` when it is exactly a torch.Tensor (or Parameter).
const at::Tensor* plain_tensor(PyObject* x) { return THPVariable_CheckExact(x) ? &THPVariable_Unpack(x) : nullptr; }

// torch_xegpu_attn.attention's fast path: the output of a recorded call, or
// None (then the caller takes the checked path).  Plain tensors only, no
// gradient to record, no dispatch mode active.
py::object replay_py(py::handle q, py::handle k, py::handle v, py::handle mask, py::handle dropout_p,
                     py::handle is_causal, py::handle scale, py::handle enable_gqa) {
  const at::Tensor* tq = plain_tensor(q.ptr());
  const at::Tensor* tk = plain_tensor(k.ptr());
  const at::Tensor* tv = plain_tensor(v.ptr());
  const at::Tensor* tm = mask.is_none() ? nullptr : plain_tensor(mask.ptr());
  if (tq == nullptr || tk == nullptr || tv == nullptr || (tm == nullptr && !mask.is_none())) return py::none();
  if (!PyBool_Check(is_causal.ptr()) || !PyBool_Check(enable_gqa.ptr())) return py::none();
  double p = 0.0, s = 0.0;
  if (!as_double(dropout_p.ptr(), p)) return py::none();
  std::optional<double> scale_value;
  if (!scale.is_none()) {
    if (!as_double(scale.ptr(), s)) return py::none();
    scale_value = s;
  }
  if (at::GradMode::is_enabled() &&
      (tq->requires_grad() || tk->requires_grad() || tv->requires_grad() || (tm && tm->requires_grad()))) {
    return py::none();
  }
  // A dispatch mode (or functionalization, vmap...) adds keys to the thread's defaults.
  if (!(c10::impl::tls_local_dispatch_key_set().included_ - c10::default_included_set).empty()) return py::none();
  auto out = replay(Call{*tq, *tk, *tv, tm, p, is_causal.ptr() == Py_True, scale_value, enable_gqa.ptr() == Py_True});
  if (!out) return py::none();
  return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(*out)));
}

}  // namespace
}  // namespace xattn

TORCH_LIBRARY(xegpu, m) {
  m.set_python_module("torch_xegpu_attn.ops");
  m.def(xattn::kSchema);
}

// One C++ kernel for every device: the dispatcher's round trip into a Python
// kernel would cost more host time than SDPA's whole call.
TORCH_LIBRARY_IMPL(xegpu, CPU, m) { m.impl("attention", &xattn::attention_kernel); }
TORCH_LIBRARY_IMPL(xegpu, CUDA, m) { m.impl("attention", &xattn::attention_kernel); }
TORCH_LIBRARY_IMPL(xegpu, XPU, m) { m.impl("attention", &xattn::attention_kernel); }

TORCH_LIBRARY_IMPL(xegpu, Autograd, m) { m.impl("attention", &xattn::attention_autograd); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace xattn;
  m.doc() = "torch-xegpu-attn: the op's C++ kernels, the cpu launcher and the replay of recorded calls";
  py::class_<Kernel, std::shared_ptr<Kernel>>(m, "Kernel")
      .def(py::init<const std::string&, const std::vector<std::string>&, const std::string&, int64_t,
                    std::vector<std::vector<int64_t>>, std::vector<int64_t>, std::vector<std::vector<int64_t>>,
                    std::vector<int64_t>>(),
           py::arg("path"), py::arg("grids"), py::arg("plan"), py::arg("plan_length"), py::arg("dims"),
           py::arg("item_sizes"), py::arg("ws_shapes"), py::arg("ws_item_sizes"))
      .def("run", &Kernel::run, "Run on q, k, v, [mask], out (canonical shapes; out is written)")
      .def("last_use", &Kernel::last_use);
  m.def("replay", &replay_py, "The output of a recorded call, or None");
  m.def("record", &record, "Record a checked call for replay", py::arg("query"), py::arg("key"), py::arg("value"),
        py::arg("attn_mask"), py::arg("dropout_p"), py::arg("is_causal"), py::arg("scale"), py::arg("enable_gqa"),
        py::arg("kernel"), py::arg("operands"), py::arg("out_shape"));
  m.def("set_device_replay", [](const std::string& device_type, py::capsule replay) {
    TORCH_CHECK(std::strcmp(replay.name(), kDeviceReplayCapsule) == 0, "torch_xegpu_attn: not a device replay");
    const c10::DeviceType type = c10::Device(device_type).type();
    device_replays[static_cast<size_t>(type)].store(reinterpret_cast<DeviceReplay>(replay.get_pointer()),
                                                    std::memory_order_release);
  }, "Install a device launcher's replay of the calls it recorded (a capsule of its DeviceReplay)");
  m.def("count_launch", [] { launches.fetch_add(1, std::memory_order_relaxed); },
        "Count a launch of a device kernel on the checked path");
  m.def("set_slow_path", [](py::object fn) { slow_path = new py::object(std::move(fn)); },
        "The Python function the CPU kernel calls for calls it has not recorded");
  m.def("forget_kernel", &forget_kernel, "Drop the recorded calls of a kernel");
  m.def("clear_recipes", &clear_recipes, "Drop every recorded call");
  m.def("count_empty_result", [] { empty_results.fetch_add(1, std::memory_order_relaxed); });
  m.def("counters", [] {
    std::lock_guard<std::mutex> lock(recipes_mutex);
    py::dict d;
    d["launches"] = launches.load();
    d["replays"] = replays.load();
    d["empty_results"] = empty_results.load();
    d["recipes"] = recipes.size();
    d["loaded_libraries"] = loaded_libraries.load();
    return d;
  }, "Kernel launches (all paths), replays, calls answered without a kernel, recorded signatures, "
     "kernel libraries open");
  m.def("release_workspaces", &release_workspaces, "Free the calling thread's workspace arena");
}
