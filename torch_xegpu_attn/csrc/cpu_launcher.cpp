// Launch path of the cpu target: a loaded kernel library and its launches.
//
// `Kernel::run` checks and describes the tensors, calls the plan, carves the
// workspaces out of the calling thread's arena, then runs the grids in order,
// each split over torch's intra-op thread pool with at::parallel_for.  A
// recorded call (op.cpp) keeps the descriptors and the plan of its sizes and
// goes straight to `Kernel::execute`.

#include "kernel.h"
#include "replay.h"

#include <ATen/Parallel.h>
#include <dlfcn.h>

#include <cstdlib>
#include <memory>
#include <optional>

namespace xattn {

std::atomic<int64_t> launches{0};
std::atomic<int64_t> loaded_libraries{0};

namespace {

std::vector<int64_t> row_major_strides(c10::IntArrayRef sizes) {
  std::vector<int64_t> strides(sizes.size(), 1);
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 2; d >= 0; --d) strides[d] = strides[d + 1] * sizes[d + 1];
  return strides;
}

// Call a function taking `lead` leading int64 arguments then `a.size()` memref pointers.
template <typename... Lead>
void call(uintptr_t fn, const std::vector<Word>& a, Lead... lead) {
  switch (a.size()) {
#define XATTN_CASE(N, ...)                                                           \
  case N:                                                                            \
    reinterpret_cast<void (*)(Lead..., __VA_ARGS__)>(fn)(lead..., XATTN_ARGS_##N);   \
    return;
#define XATTN_ARGS_4 a[0], a[1], a[2], a[3]
#define XATTN_ARGS_5 XATTN_ARGS_4, a[4]
#define XATTN_ARGS_6 XATTN_ARGS_5, a[5]
#define XATTN_ARGS_7 XATTN_ARGS_6, a[6]
#define XATTN_ARGS_8 XATTN_ARGS_7, a[7]
#define XATTN_ARGS_9 XATTN_ARGS_8, a[8]
#define XATTN_ARGS_10 XATTN_ARGS_9, a[9]
#define XATTN_ARGS_11 XATTN_ARGS_10, a[10]
#define XATTN_ARGS_12 XATTN_ARGS_11, a[11]
#define XATTN_ARGS_13 XATTN_ARGS_12, a[12]
#define XATTN_ARGS_14 XATTN_ARGS_13, a[13]
#define XATTN_ARGS_15 XATTN_ARGS_14, a[14]
#define XATTN_ARGS_16 XATTN_ARGS_15, a[15]
    XATTN_CASE(4, Word, Word, Word, Word)
    XATTN_CASE(5, Word, Word, Word, Word, Word)
    XATTN_CASE(6, Word, Word, Word, Word, Word, Word)
    XATTN_CASE(7, Word, Word, Word, Word, Word, Word, Word)
    XATTN_CASE(8, Word, Word, Word, Word, Word, Word, Word, Word)
    XATTN_CASE(9, Word, Word, Word, Word, Word, Word, Word, Word, Word)
    XATTN_CASE(10, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word)
    XATTN_CASE(11, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word)
    XATTN_CASE(12, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word)
    XATTN_CASE(13, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word)
    XATTN_CASE(14, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word)
    XATTN_CASE(15, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word)
    XATTN_CASE(16, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word)
#undef XATTN_CASE
    default:
      TORCH_CHECK(false, "torch_xegpu_attn: kernel functions take 4 to 16 memrefs, got ", a.size());
  }
}

// The calling thread's workspace arena: reused across calls (a fresh buffer of
// tens of MB costs more in page faults than the transpose that fills it).
struct Arena {
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<void, Free> data;
  size_t bytes = 0;

  char* reserve(size_t wanted) {
    if (wanted > bytes) {
      const size_t rounded = (wanted + 63) / 64 * 64;
      data.reset(std::aligned_alloc(64, rounded));
      TORCH_CHECK(data, "torch_xegpu_attn: cannot allocate ", rounded, " bytes of workspace");
      bytes = rounded;
    }
    return static_cast<char*>(data.get());
  }
};
thread_local Arena arena;

// Work per thread below which a grid runs on the calling thread only (waking
// the pool costs more than it saves on tiny problems).
constexpr double kMinParallelFlops = 2e6;

uintptr_t symbol(void* handle, const std::string& name, const std::string& path) {
  const std::string full = "_mlir_ciface_" + name;
  void* address = dlsym(handle, full.c_str());
  TORCH_CHECK(address != nullptr, "torch_xegpu_attn: ", path, " has no symbol ", full);
  return reinterpret_cast<uintptr_t>(address);
}

}  // namespace

void Descriptors::add(const void* base, c10::IntArrayRef sizes, c10::IntArrayRef strides) {
  const size_t rank = sizes.size();
  starts.push_back(words.size());
  words.push_back(reinterpret_cast<int64_t>(base));  // allocated pointer (unused by the kernels)
  words.push_back(reinterpret_cast<int64_t>(base));  // aligned pointer: the first element
  words.push_back(0);                                // offset, in elements
  words.insert(words.end(), sizes.begin(), sizes.end());
  words.insert(words.end(), strides.begin(), strides.begin() + rank);
}

void Descriptors::add_contiguous(const void* base, c10::IntArrayRef sizes) {
  add(base, sizes, row_major_strides(sizes));
}

std::vector<Word> Descriptors::arguments() {
  std::vector<Word> args(starts.size());
  for (size_t i = 0; i < starts.size(); ++i) args[i] = words.data() + starts[i];
  return args;
}

Kernel::Kernel(const std::string& path, const std::vector<std::string>& grids, const std::string& plan,
               int64_t plan_length, std::vector<std::vector<int64_t>> dims, std::vector<int64_t> item_sizes,
               std::vector<std::vector<int64_t>> ws_shapes, std::vector<int64_t> ws_item_sizes)
    : plan_length_(plan_length), dims_(std::move(dims)), item_sizes_(std::move(item_sizes)),
      ws_shapes_(std::move(ws_shapes)), ws_item_sizes_(std::move(ws_item_sizes)) {
  TORCH_CHECK(dims_.size() == item_sizes_.size() && ws_shapes_.size() == ws_item_sizes_.size(),
              "torch_xegpu_attn: inconsistent kernel metadata");
  handle_ = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  TORCH_CHECK(handle_ != nullptr, "torch_xegpu_attn: cannot load ", path, ": ", dlerror());
  try {
    for (const auto& name : grids) grids_.push_back(symbol(handle_, name, path));
    plan_fn_ = symbol(handle_, plan, path);
  } catch (...) {
    dlclose(handle_);
    throw;
  }
  loaded_libraries.fetch_add(1, std::memory_order_relaxed);
  touch();
}

Kernel::~Kernel() {
  if (handle_ != nullptr && dlclose(handle_) == 0) loaded_libraries.fetch_sub(1, std::memory_order_relaxed);
}

void Kernel::touch() { last_use_.store(use_time(), std::memory_order_relaxed); }

Descriptors Kernel::describe(const std::vector<at::Tensor>& tensors) const {
  TORCH_CHECK(tensors.size() == dims_.size(), "torch_xegpu_attn: expected ", dims_.size(), " operands, got ",
              tensors.size());
  int64_t symbols[4] = {-1, -1, -1, -1};
  Descriptors d;
  for (size_t j = 0; j < tensors.size(); ++j) {
    const at::Tensor& t = tensors[j];
    const auto& dims = dims_[j];
    TORCH_CHECK(t.device().is_cpu() && t.layout() == c10::kStrided, "torch_xegpu_attn: operand ", j,
                " is not a dense CPU tensor");
    TORCH_CHECK(t.dim() == static_cast<int64_t>(dims.size()), "torch_xegpu_attn: operand ", j, " has rank ",
                t.dim(), ", the kernel takes ", dims.size());
    for (size_t i = 0; i < dims.size(); ++i) {
      const int64_t want = dims[i], have = t.size(i);
      if (want >= 0) {
        TORCH_CHECK(have == want, "torch_xegpu_attn: operand ", j, " has size ", have, " at dim ", i,
                    ", the kernel was compiled for ", want);
      } else {
        int64_t& bound = symbols[-want - 1];
        TORCH_CHECK(bound < 0 || bound == have, "torch_xegpu_attn: operand ", j, " has size ", have, " at dim ",
                    i, ", other operands give ", bound);
        bound = have;
      }
    }
    TORCH_CHECK(t.element_size() == item_sizes_[j], "torch_xegpu_attn: operand ", j, " has ", t.element_size(),
                "-byte elements, the kernel was compiled for ", item_sizes_[j]);
    TORCH_CHECK(!t.is_neg() && !t.is_conj(), "torch_xegpu_attn: operand ", j, " is a lazily negated view");
    TORCH_CHECK(t.dim() == 0 || t.stride(-1) == 1 || t.size(-1) == 1, "torch_xegpu_attn: operand ", j,
                " must have a unit innermost stride");
    d.add(t.data_ptr(), t.sizes(), t.strides());
  }
  for (int64_t s : symbols) TORCH_CHECK(s > 0, "torch_xegpu_attn: every run-time extent must be positive");
  return d;
}

LaunchPlan Kernel::plan(Descriptors& operands) const {
  std::vector<int64_t> counts(plan_length_);
  std::vector<Word> args = operands.arguments();
  Descriptors plan_memref;
  plan_memref.add_contiguous(counts.data(), {plan_length_});
  args.push_back(plan_memref.words.data());
  call(plan_fn_, args);

  LaunchPlan p;
  p.tasks.assign(counts.begin(), counts.begin() + grids_.size());
  size_t next = grids_.size();
  for (size_t w = 0; w < ws_shapes_.size(); ++w) {
    std::vector<int64_t> sizes = ws_shapes_[w];
    int64_t elements = 1;
    for (auto& s : sizes) {
      if (s < 0) s = counts.at(next++);
      elements *= s;
    }
    p.ws_offsets.push_back(p.ws_bytes);
    p.ws_bytes += (static_cast<size_t>(elements) * ws_item_sizes_[w] + 63) / 64 * 64;
    p.ws_sizes.push_back(std::move(sizes));
  }
  TORCH_CHECK(next == static_cast<size_t>(plan_length_), "torch_xegpu_attn: plan length mismatch");

  // q (B, H, G, L, E) and v (B, H, S, Ev): the flops of both contractions decide the threading.
  const int64_t* q = operands.words.data() + operands.starts[0] + 3;
  const int64_t* k = operands.words.data() + operands.starts[1] + 3;
  const int64_t* v = operands.words.data() + operands.starts[2] + 3;
  const double flops = 2.0 * q[0] * q[1] * q[2] * q[3] * k[2] * (q[4] + v[3]);
  p.parallel = flops / std::max(1, at::get_num_threads()) >= kMinParallelFlops;
  return p;
}

void Kernel::add_workspaces(Descriptors& descriptors, const LaunchPlan& plan) const {
  for (size_t w = 0; w < plan.ws_sizes.size(); ++w) {
    descriptors.add_contiguous(nullptr, plan.ws_sizes[w]);
  }
}

void Kernel::execute(Descriptors& descriptors, size_t n_operands, const LaunchPlan& plan) const {
  if (!plan.ws_sizes.empty()) {
    char* base = arena.reserve(plan.ws_bytes);
    for (size_t w = 0; w < plan.ws_sizes.size(); ++w) descriptors.set_base(n_operands + w, base + plan.ws_offsets[w]);
  }
  std::vector<Word> args = descriptors.arguments();
  launches.fetch_add(1, std::memory_order_relaxed);
  // Release the GIL (when this thread holds it) only for work worth other Python threads' while.
  std::optional<py::gil_scoped_release> no_gil;
  if (plan.parallel && PyGILState_Check()) no_gil.emplace();
  for (size_t g = 0; g < grids_.size(); ++g) {
    const uintptr_t fn = grids_[g];
    const int64_t tasks = plan.tasks[g];
    if (tasks <= 0) continue;
    if (!plan.parallel) {
      call(fn, args, int64_t{0}, tasks);
      continue;
    }
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) { call(fn, args, begin, end); });
  }
}

void Kernel::run(const std::vector<at::Tensor>& tensors) {
  touch();
  Descriptors d = describe(tensors);
  LaunchPlan p = plan(d);
  add_workspaces(d, p);
  execute(d, tensors.size(), p);
}

void release_workspaces() {
  arena.data.reset();
  arena.bytes = 0;
}

}  // namespace xattn
