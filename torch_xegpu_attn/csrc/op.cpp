// The ops xegpu::attention, xegpu::attention_with_lse and xegpu::attention_backward in C++:
// their schemas, their device and autograd kernels, and the replay of recorded calls.
//
// A model calls attention with the same shapes, strides and flags over and
// over, and trains with the same ones.  The Python frontend checks the first
// call of such a signature (SDPA's checks, the mapping to canonical views, the
// kernel from the cache), runs it and records it here: the kernel, the
// operands' descriptors (sizes and strides), the plan's task counts and
// workspaces, and where each operand's memory comes from (an argument's own
// memory, a dtype-converted copy of it, a new output, zeros, a drawn dropout
// seed).  A later call of the same op with the identical signature is
// replayed without Python: a hash lookup, the new tensors allocated, the
// bases patched into the recorded descriptors, the grids.  This is sound
// because every check and the whole mapping depend only on the signature
// (shapes, strides, dtypes, devices and flags), and a descriptor needs only
// the first element's address besides sizes and strides.  Calls that are not
// recorded go to the Python frontend (`set_slow_paths`), which runs every
// check: there is one implementation of the checks.
//
// Forward calls on other devices are replayed by their launcher (a separate
// extension, built where the device is), which hands this file its replay
// function (`set_device_replay`) and records the calls itself.
//
// Training stays in C++ too: xegpu::attention's autograd kernel lets calls
// that need no gradient through and sends the rest to attention_with_lse,
// whose autograd function saves the inputs, the output and the log-sum-exp
// and whose backward calls attention_backward.

#include "kernel.h"
#include "replay.h"

#include <ATen/core/grad_mode.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>
#include <unordered_map>

namespace xattn {
namespace {

// ----------------------------------------------------------------------------- recipes

// The ops whose CPU calls are recorded and replayed (one table, keyed by the op too).
enum class Op : int64_t { kForward = 0, kForwardLse = 1, kBackward = 2 };

// The backward's tensor arguments besides the forward's (null where absent or not an argument of the
// op): grad_out, grad_lse, out, lse, seed.  With the Call's q, k, v and mask they are numbered 0-8,
// the numbering of `Operand::argument` (frontend.ARGUMENTS).
using Extras = std::array<const at::Tensor*, 5>;
constexpr size_t kArguments = 4 + std::tuple_size<Extras>::value;

const at::Tensor* argument(const Call& call, const Extras& extras, size_t i) {
  switch (i) {
    case 0: return &call.q;
    case 1: return &call.k;
    case 2: return &call.v;
    case 3: return call.mask;
    default: return i < kArguments ? extras[i - 4] : nullptr;
  }
}

bool make_op_key(Op op, const Call& call, const Extras& extras, std::vector<int64_t>& key) {
  if (!make_key(call, key)) return false;
  key.push_back(static_cast<int64_t>(op));
  for (const at::Tensor* t : extras) {
    key.push_back(t != nullptr);
    if (t != nullptr && !encode(*t, key)) return false;
  }
  return true;
}

// Where a kernel operand's memory comes from when a recorded call is replayed.
enum class Source : int8_t {
  kView,   // the argument's own memory (a view of it starting at its first element)
  kCopy,   // a row-major copy of the argument in the operand's dtype (a dtype conversion)
  kNew,    // a new tensor the kernel writes (an output, or one the op returns)
  kZeros,  // a new tensor of zeros (a gradient the caller did not give)
  kSeed,   // the dropout generator's key, drawn from torch's default generator
};

struct Operand {
  Source source;
  int64_t argument = -1;       // kView, kCopy
  std::vector<int64_t> shape;  // kNew, kZeros (kNew: that of the result it is, if any)
  at::ScalarType dtype;
};

// One of the op's results: a new operand (or seed) of the kernel, or an empty tensor.
struct Result {
  int64_t operand = -1;  // -1: an empty tensor of `shape`
  std::vector<int64_t> shape;
  at::ScalarType dtype;
};

struct Recipe {
  std::shared_ptr<Kernel> kernel;
  Descriptors descriptors;  // the kernel's operands then workspaces: bases patched per call
  LaunchPlan plan;
  std::vector<Operand> operands;
  std::vector<Result> results;
  std::string choice;  // the kernel-choosing knobs when recorded (they key the memory cache)
};

constexpr size_t kMaxRecipes = 4096;
std::mutex recipes_mutex;
std::unordered_map<std::vector<int64_t>, std::shared_ptr<Recipe>, KeyHash> recipes;
std::atomic<int64_t> replays{0};
std::atomic<int64_t> empty_results{0};

// The dropout generator's key of one call: two int32 from torch's default generator, drawn as the
// frontend draws them (frontend.draw_seed), so that torch.manual_seed reproduces replayed calls too.
at::Tensor draw_seed() {
  return at::randint(std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max(), {2},
                     at::TensorOptions().dtype(at::kInt));
}

at::Tensor new_output(const std::vector<int64_t>& shape, at::ScalarType dtype, bool poison) {
  at::Tensor t = at::detail::empty_cpu(shape, dtype);
  if (poison) t.fill_(std::nan(""));
  return t;
}

// `t` in row-major order and `dtype` (t itself when it is both already).  Not `Tensor::to`: its
// contiguous format accepts an expanded (stride-0) tensor as it is.
at::Tensor row_major_copy(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype) return t.contiguous();
  at::Tensor copy = at::detail::empty_cpu(t.sizes().vec(), dtype);
  copy.copy_(t);
  return copy;
}

// The device launchers' replays, by device type (set_device_replay).
std::atomic<DeviceReplay> device_replays[static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)];

// A forward call on a device whose launcher recorded it.
std::optional<at::Tensor> replay_on_device(const Call& call) {
  const DeviceReplay fn = device_replays[static_cast<size_t>(call.q.device().type())].load(std::memory_order_acquire);
  at::Tensor out;
  if (fn == nullptr || !fn(call, &out)) return std::nullopt;
  replays.fetch_add(1, std::memory_order_relaxed);
  launches.fetch_add(1, std::memory_order_relaxed);
  return out;
}

// The results of a recorded CPU call of `op`, or nullopt when its signature was not recorded.
std::optional<std::vector<at::Tensor>> replay(Op op, const Call& call, const Extras& extras = {}) {
  if (!call.q.device().is_cpu()) {
    if (op != Op::kForward) return std::nullopt;
    auto out = replay_on_device(call);
    if (!out) return std::nullopt;
    return std::vector<at::Tensor>{std::move(*out)};
  }
  std::vector<int64_t> key;
  if (!make_op_key(op, call, extras, key)) return std::nullopt;
  std::shared_ptr<Recipe> recipe;
  {
    std::lock_guard<std::mutex> lock(recipes_mutex);
    auto found = recipes.find(key);
    if (found == recipes.end()) return std::nullopt;
    recipe = found->second;
  }
  if (!knobs_allow_replay(recipe->choice)) return std::nullopt;

  const bool poison = poison_outputs();
  Descriptors d = recipe->descriptors;
  std::vector<at::Tensor> made(recipe->operands.size());
  for (size_t i = 0; i < recipe->operands.size(); ++i) {
    const Operand& o = recipe->operands[i];
    switch (o.source) {
      case Source::kView:
        d.set_base(i, argument(call, extras, o.argument)->data_ptr());
        continue;
      case Source::kCopy:
        made[i] = row_major_copy(*argument(call, extras, o.argument), o.dtype);
        break;
      case Source::kNew:
        made[i] = new_output(o.shape, o.dtype, poison);
        break;
      case Source::kZeros:
        made[i] = at::zeros(o.shape, at::TensorOptions().dtype(o.dtype));
        break;
      case Source::kSeed:
        made[i] = draw_seed();
        break;
    }
    d.set_base(i, made[i].data_ptr());
  }
  recipe->kernel->touch();
  recipe->kernel->execute(d, recipe->operands.size(), recipe->plan);
  replays.fetch_add(1, std::memory_order_relaxed);
  std::vector<at::Tensor> results;
  results.reserve(recipe->results.size());
  for (const Result& r : recipe->results) {
    results.push_back(r.operand >= 0 ? made[r.operand]
                                     : at::detail::empty_cpu(r.shape, r.dtype));
  }
  return results;
}

Op op_named(const std::string& name) {
  if (name == "forward") return Op::kForward;
  if (name == "forward_lse") return Op::kForwardLse;
  if (name == "backward") return Op::kBackward;
  TORCH_CHECK(false, "torch_xegpu_attn: no op '", name, "' to record");
}

// Where operand `t` of a recorded call comes from, by the role the frontend gave it ("view", "copy"
// of an argument, "new", "zeros", "seed"); nullopt when the call cannot be replayed that way.
std::optional<Operand> operand_source(const at::Tensor& t, const std::string& role, const at::Tensor* arg) {
  Operand o{Source::kNew, -1, t.sizes().vec(), t.scalar_type()};
  if (role == "view" || role == "copy") {
    if (arg == nullptr || !arg->defined()) return std::nullopt;
    if (t.data_ptr() == arg->data_ptr()) {
      o.source = Source::kView;
      return o;
    }
    // a copy must be exactly what the replay makes: the argument in row-major order, in t's dtype
    if (role != "copy" || !t.is_contiguous() || t.numel() != arg->numel()) return std::nullopt;
    o.source = Source::kCopy;
    return o;
  }
  if (!t.is_contiguous()) return std::nullopt;
  if (role == "new") return o;
  if (role == "zeros") {
    o.source = Source::kZeros;
    return o;
  }
  if (role == "seed" && t.scalar_type() == at::kInt && t.numel() == 2) {
    o.source = Source::kSeed;
    return o;
  }
  return std::nullopt;
}

// Record a call of `op` that the Python frontend checked and ran: `arguments` are the op's tensors
// in kArguments' numbering (None where absent), `operands` the kernel's, each with its role (and
// the argument it views or copies), `results` what the op returned.  Nothing is recorded unless
// every operand and result can be made again from the arguments of a later call.
bool record(const std::string& op_name, const std::vector<std::optional<at::Tensor>>& arguments, double dropout_p,
            bool is_causal, std::optional<double> scale, bool enable_gqa, const std::shared_ptr<Kernel>& kernel,
            const std::vector<at::Tensor>& operands, const std::vector<std::pair<std::string, int64_t>>& roles,
            const std::vector<at::Tensor>& results) {
  const Op op = op_named(op_name);
  TORCH_CHECK(arguments.size() >= 3 && arguments.size() <= kArguments && operands.size() == roles.size() &&
                  kernel->n_operands() == operands.size(),
              "torch_xegpu_attn: record() takes the op's tensor arguments and the kernel's operands with their roles");
  const at::Tensor* given[kArguments] = {};
  for (size_t i = 0; i < arguments.size(); ++i) {
    if (arguments[i] && arguments[i]->defined()) given[i] = &*arguments[i];
  }
  if (given[0] == nullptr || given[1] == nullptr || given[2] == nullptr || !given[0]->device().is_cpu()) return false;
  const Call call{*given[0], *given[1], *given[2], given[3], dropout_p, is_causal, scale, enable_gqa};
  const Extras extras{given[4], given[5], given[6], given[7], given[8]};
  std::vector<int64_t> key;
  if (!make_op_key(op, call, extras, key)) return false;

  auto recipe = std::make_shared<Recipe>();
  for (size_t i = 0; i < operands.size(); ++i) {
    const auto& [role, index] = roles[i];
    const at::Tensor* arg = index >= 0 && static_cast<size_t>(index) < kArguments ? given[index] : nullptr;
    auto source = operand_source(operands[i], role, arg);
    if (!source) return false;
    source->argument = index;
    recipe->operands.push_back(std::move(*source));
  }
  for (const at::Tensor& r : results) {
    Result result{-1, r.sizes().vec(), r.scalar_type()};
    for (size_t i = 0; i < operands.size() && r.numel() > 0; ++i) {
      Operand& o = recipe->operands[i];
      const bool made = o.source == Source::kNew || o.source == Source::kSeed;
      if (made && operands[i].data_ptr() == r.data_ptr() && r.is_contiguous() && r.numel() == operands[i].numel() &&
          r.scalar_type() == o.dtype) {
        result.operand = static_cast<int64_t>(i);
        o.shape = result.shape;  // allocated in the result's shape (the same row-major memory)
        break;
      }
    }
    if (result.operand < 0 && r.numel() > 0) return false;
    recipe->results.push_back(std::move(result));
  }
  recipe->kernel = kernel;
  recipe->descriptors = kernel->describe(operands);
  recipe->plan = kernel->plan(recipe->descriptors);
  kernel->add_workspaces(recipe->descriptors, recipe->plan);
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

// ----------------------------------------------------------------------------- the ops' kernels

constexpr const char* kSchema =
    "attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, float dropout_p=0.0, "
    "bool is_causal=False, *, float? scale=None, bool enable_gqa=False) -> Tensor";
constexpr const char* kWithLseSchema =
    "attention_with_lse(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, float dropout_p=0.0, "
    "bool is_causal=False, float? scale=None, bool enable_gqa=False) -> (Tensor, Tensor, Tensor)";
constexpr const char* kBackwardSchema =
    "attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor query, Tensor key, Tensor value, "
    "Tensor? attn_mask, Tensor out, Tensor lse, Tensor seed, float dropout_p, bool is_causal, float? scale, "
    "bool enable_gqa) -> (Tensor, Tensor, Tensor)";

using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using AttentionFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const std::optional<at::Tensor>&, double, bool, std::optional<double>, bool);
using WithLseFn = Tensors3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           double, bool, std::optional<double>, bool);
using BackwardFn = Tensors3(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, double, bool, std::optional<double>, bool);

template <typename Fn>
c10::TypedOperatorHandle<Fn> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}
c10::TypedOperatorHandle<AttentionFn> attention_op() {
  static auto op = op_handle<AttentionFn>("xegpu::attention");
  return op;
}
c10::TypedOperatorHandle<WithLseFn> with_lse_op() {
  static auto op = op_handle<WithLseFn>("xegpu::attention_with_lse");
  return op;
}
c10::TypedOperatorHandle<BackwardFn> backward_op() {
  static auto op = op_handle<BackwardFn>("xegpu::attention_backward");
  return op;
}

// The Python frontend's checked calls of the three ops (ops.py), for calls not recorded; never freed.
struct SlowPaths {
  py::object forward, forward_lse, backward;
};
SlowPaths* slow_paths = nullptr;

const py::object& slow_path(py::object SlowPaths::*which) {
  TORCH_CHECK(slow_paths != nullptr, "torch_xegpu_attn: import torch_xegpu_attn to use the xegpu ops");
  return slow_paths->*which;
}

py::object none_or(const std::optional<at::Tensor>& t) { return t ? py::cast(*t) : py::none(); }
py::object none_or(std::optional<double> x) { return x ? py::cast(*x) : py::none(); }
const at::Tensor* pointer(const std::optional<at::Tensor>& t) { return t && t->defined() ? &*t : nullptr; }

Tensors3 as_tuple(std::vector<at::Tensor>&& t) { return {std::move(t[0]), std::move(t[1]), std::move(t[2])}; }

// xegpu::attention on every device (CPU, CUDA, XPU): a replay, or the Python frontend (checks,
// cache, launch, record).
at::Tensor attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double dropout_p, bool is_causal,
                            std::optional<double> scale, bool enable_gqa) {
  if (auto out = replay(Op::kForward, Call{q, k, v, pointer(mask), dropout_p, is_causal, scale, enable_gqa})) {
    return std::move((*out)[0]);
  }
  py::gil_scoped_acquire gil;
  return slow_path(&SlowPaths::forward)(q, k, v, none_or(mask), dropout_p, is_causal, none_or(scale), enable_gqa)
      .cast<at::Tensor>();
}

// xegpu::attention_with_lse: the forward that also returns each row's log-sum-exp and the dropout's
// seed (ops.py says what each is).
Tensors3 with_lse_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& mask, double dropout_p, bool is_causal,
                         std::optional<double> scale, bool enable_gqa) {
  if (auto out = replay(Op::kForwardLse, Call{q, k, v, pointer(mask), dropout_p, is_causal, scale, enable_gqa})) {
    return as_tuple(std::move(*out));
  }
  py::gil_scoped_acquire gil;
  return slow_path(&SlowPaths::forward_lse)(q, k, v, none_or(mask), dropout_p, is_causal, none_or(scale), enable_gqa)
      .cast<Tensors3>();
}

// xegpu::attention_backward: the gradients of q, k and v of a forward that returned (out, lse, seed).
Tensors3 backward_kernel(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
                         const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
                         const at::Tensor& out, const at::Tensor& lse, const at::Tensor& seed, double dropout_p,
                         bool is_causal, std::optional<double> scale, bool enable_gqa) {
  const Call call{q, k, v, pointer(mask), dropout_p, is_causal, scale, enable_gqa};
  if (auto grads = replay(Op::kBackward, call, Extras{&grad_out, pointer(grad_lse), &out, &lse, &seed})) {
    return as_tuple(std::move(*grads));
  }
  py::gil_scoped_acquire gil;
  return slow_path(&SlowPaths::backward)(grad_out, none_or(grad_lse), q, k, v, none_or(mask), out, lse, seed,
                                         dropout_p, is_causal, none_or(scale), enable_gqa)
      .cast<Tensors3>();
}

// ----------------------------------------------------------------------------- autograd

bool any_requires_grad(std::initializer_list<const at::Tensor*> tensors) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : tensors) {
    if (t != nullptr && t->defined() && t->requires_grad()) return true;
  }
  return false;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The training forward: saves the inputs, the output and the log-sum-exp; its backward runs
// xegpu::attention_backward.
struct AttentionFunction : torch::autograd::Function<AttentionFunction> {
  // compiled autograd may trace the backward: it reads saved values and calls dispatcher ops
  static constexpr bool is_traceable = true;

  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& mask, double dropout_p, bool is_causal,
                               std::optional<double> scale, bool enable_gqa) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse, seed] = with_lse_op().call(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa);
    ctx->save_for_backward({q, k, v, mask.value_or(at::Tensor()), out, lse, seed});
    // the seed (int32) has no gradient anyway; an output left without one stays undefined (an
    // lse nobody used costs no zeros)
    ctx->set_materialize_grads(false);
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["enable_gqa"] = enable_gqa;
    return {out, lse, seed};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &mask = saved[3], &out = saved[4];
    // the mask, when given, is the fourth variable input
    TORCH_CHECK_NOT_IMPLEMENTED(!mask.defined() || !ctx->needs_input_grad(3),
                                "xegpu::attention: the gradient with respect to attn_mask is not implemented; "
                                "detach the mask (attn_mask.detach()) or compute the masked attention with SDPA");
    const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(out);
    const std::optional<at::Tensor> grad_lse = grads[1].defined() ? std::optional<at::Tensor>(grads[1]) : std::nullopt;
    const std::optional<double> scale = ctx->saved_data["scale"].toOptional<double>();
    auto [dq, dk, dv] = backward_op().call(grad_out, grad_lse, q, k, v,
                                           mask.defined() ? std::optional<at::Tensor>(mask) : std::nullopt, out,
                                           saved[5], saved[6], ctx->saved_data["dropout_p"].toDouble(),
                                           ctx->saved_data["is_causal"].toBool(), scale,
                                           ctx->saved_data["enable_gqa"].toBool());
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The backward as a differentiable function only to say that it is not (create_graph=True).
struct BackwardFunction : torch::autograd::Function<BackwardFunction> {
  static variable_list forward(AutogradContext*, const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse,
                               const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse,
                               const at::Tensor& seed, double dropout_p, bool is_causal, std::optional<double> scale,
                               bool enable_gqa) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dq, dk, dv] = backward_op().call(grad_out, grad_lse, q, k, v, mask, out, lse, seed, dropout_p, is_causal,
                                           scale, enable_gqa);
    return {dq, dk, dv};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK_NOT_IMPLEMENTED(false, "xegpu::attention: the backward pass is not differentiable (no double backward)");
  }
};

// xegpu::attention's autograd kernel: calls that need a gradient go to attention_with_lse (whose
// autograd saves the output and the log-sum-exp and runs the backward kernel); the rest go straight
// below autograd to the inference kernel, which writes no log-sum-exp.
at::Tensor attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& mask, double dropout_p, bool is_causal,
                              std::optional<double> scale, bool enable_gqa) {
  if (any_requires_grad({&q, &k, &v, pointer(mask)})) {
    // its output is in the accumulator's type (what the backward reads): the caller's is q's
    return std::get<0>(with_lse_op().call(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa))
        .to(q.scalar_type());
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return attention_op().call(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa);
}

Tensors3 with_lse_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& mask, double dropout_p, bool is_causal,
                           std::optional<double> scale, bool enable_gqa) {
  if (any_requires_grad({&q, &k, &v, pointer(mask)})) {
    return as_tuple(AttentionFunction::apply(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa));
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return with_lse_op().call(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa);
}

Tensors3 backward_autograd(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
                           const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
                           const at::Tensor& out, const at::Tensor& lse, const at::Tensor& seed, double dropout_p,
                           bool is_causal, std::optional<double> scale, bool enable_gqa) {
  if (any_requires_grad({&grad_out, pointer(grad_lse), &q, &k, &v, pointer(mask), &out, &lse})) {
    return as_tuple(BackwardFunction::apply(grad_out, grad_lse, q, k, v, mask, out, lse, seed, dropout_p, is_causal,
                                            scale, enable_gqa));
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return backward_op().call(grad_out, grad_lse, q, k, v, mask, out, lse, seed, dropout_p, is_causal, scale,
                            enable_gqa);
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
  auto out = replay(Op::kForward,
                    Call{*tq, *tk, *tv, tm, p, is_causal.ptr() == Py_True, scale_value, enable_gqa.ptr() == Py_True});
  if (!out) return py::none();
  return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move((*out)[0])));
}

}  // namespace
}  // namespace xattn

TORCH_LIBRARY(xegpu, m) {
  m.set_python_module("torch_xegpu_attn.ops");  // the fake (meta) kernels
  m.def(xattn::kSchema);
  m.def(xattn::kWithLseSchema, {at::Tag::pt2_compliant_tag});
  m.def(xattn::kBackwardSchema, {at::Tag::pt2_compliant_tag});
}

// C++ kernels for every device and for autograd: the dispatcher's round trip into a Python kernel
// would cost more host time than SDPA's whole call.
#define XATTN_DEVICE_KERNELS(DEVICE)                                  \
  TORCH_LIBRARY_IMPL(xegpu, DEVICE, m) {                              \
    m.impl("attention", &xattn::attention_kernel);                   \
    m.impl("attention_with_lse", &xattn::with_lse_kernel);           \
    m.impl("attention_backward", &xattn::backward_kernel);           \
  }
XATTN_DEVICE_KERNELS(CPU)
XATTN_DEVICE_KERNELS(CUDA)
XATTN_DEVICE_KERNELS(XPU)
#undef XATTN_DEVICE_KERNELS

TORCH_LIBRARY_IMPL(xegpu, Autograd, m) {
  m.impl("attention", &xattn::attention_autograd);
  m.impl("attention_with_lse", &xattn::with_lse_autograd);
  m.impl("attention_backward", &xattn::backward_autograd);
}

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
  m.def("record", &record, "Record a call the frontend checked and ran, for replay", py::arg("op"),
        py::arg("arguments"), py::arg("dropout_p"), py::arg("is_causal"), py::arg("scale"), py::arg("enable_gqa"),
        py::arg("kernel"), py::arg("operands"), py::arg("roles"), py::arg("results"));
  m.def("set_device_replay", [](const std::string& device_type, py::capsule replay) {
    TORCH_CHECK(std::strcmp(replay.name(), kDeviceReplayCapsule) == 0, "torch_xegpu_attn: not a device replay");
    const c10::DeviceType type = c10::Device(device_type).type();
    device_replays[static_cast<size_t>(type)].store(reinterpret_cast<DeviceReplay>(replay.get_pointer()),
                                                    std::memory_order_release);
  }, "Install a device launcher's replay of the calls it recorded (a capsule of its DeviceReplay)");
  m.def("count_launch", [] { launches.fetch_add(1, std::memory_order_relaxed); },
        "Count a launch of a device kernel on the checked path");
  m.def("set_slow_paths", [](py::object forward, py::object forward_lse, py::object backward) {
    slow_paths = new SlowPaths{std::move(forward), std::move(forward_lse), std::move(backward)};
  }, "The Python functions the ops' kernels call for calls not recorded (attention, attention_with_lse, "
     "attention_backward)");
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
