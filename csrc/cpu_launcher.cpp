// Launch fast path of the cpu target.
//
// A compiled kernel is a plan function and a list of grid functions (MLIR's C
// interface: every memref is passed as a pointer to its descriptor
// {allocated, aligned, offset, sizes[R], strides[R]}):
//     void _mlir_ciface_attention_plan(Memref* q, ..., Memref* out, Memref* plan)
//         writes plan = [task count of each grid..., dynamic sizes of each workspace...]
//     void _mlir_ciface_attention_grid<i>(int64_t begin, int64_t end, Memref* q, ..., Memref* ws...)
//         runs work-group tasks [begin, end)
// `launch` checks and describes the tensors, calls the plan, carves the
// workspaces out of the calling thread's arena, then runs the grids in order,
// each split over torch's intra-op thread pool with at::parallel_for.  The GIL
// is released while the kernel runs.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

namespace {

using Word = void*;

// MLIR memref descriptor words of a strided view (sizes and strides in elements).
std::vector<int64_t> describe(void* base, const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides) {
  const size_t rank = sizes.size();
  std::vector<int64_t> words(3 + 2 * rank);
  words[0] = reinterpret_cast<int64_t>(base);  // allocated pointer (unused by the kernels)
  words[1] = reinterpret_cast<int64_t>(base);  // aligned pointer: the first element
  words[2] = 0;                                // offset, in elements
  for (size_t d = 0; d < rank; ++d) {
    words[3 + d] = sizes[d];
    words[3 + rank + d] = strides[d];
  }
  return words;
}

std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& sizes) {
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
    XATTN_CASE(4, Word, Word, Word, Word)
    XATTN_CASE(5, Word, Word, Word, Word, Word)
    XATTN_CASE(6, Word, Word, Word, Word, Word, Word)
    XATTN_CASE(7, Word, Word, Word, Word, Word, Word, Word)
    XATTN_CASE(8, Word, Word, Word, Word, Word, Word, Word, Word)
    XATTN_CASE(9, Word, Word, Word, Word, Word, Word, Word, Word, Word)
    XATTN_CASE(10, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word)
    XATTN_CASE(11, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word)
    XATTN_CASE(12, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word)
#undef XATTN_CASE
    default:
      TORCH_CHECK(false, "torch_xegpu_attn: kernel functions take 4 to 12 memrefs, got ", a.size());
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

  void* reserve(size_t wanted) {
    if (wanted > bytes) {
      const size_t rounded = (wanted + 63) / 64 * 64;
      data.reset(std::aligned_alloc(64, rounded));
      TORCH_CHECK(data, "torch_xegpu_attn: cannot allocate ", rounded, " bytes of workspace");
      bytes = rounded;
    }
    return data.get();
  }
};
thread_local Arena arena;

// Work per thread below which a grid runs on the calling thread only (waking
// the pool costs more than it saves on tiny problems).
constexpr double kMinParallelFlops = 2e6;

// Run one kernel on `tensors` (q, k, v, [mask], out in canonical shapes).
//   fns              addresses of the grid functions, in launch order
//   plan_fn, plan_length   the plan function and how many int64 it writes
//   dims[j]          operand j's dims: >= 0 compiled in, < 0 a run-time extent
//                    (-1 B, -2 H, -3 L, -4 S) that must agree across operands
//   item_sizes[j]    operand j's element size
//   ws_shapes[w]     workspace w's dims, -1 where the plan gives the size
//   ws_item_sizes[w] its element size
void launch(const std::vector<int64_t>& fns, int64_t plan_fn, int64_t plan_length,
            const std::vector<at::Tensor>& tensors, const std::vector<std::vector<int64_t>>& dims,
            const std::vector<int64_t>& item_sizes, const std::vector<std::vector<int64_t>>& ws_shapes,
            const std::vector<int64_t>& ws_item_sizes) {
  TORCH_CHECK(tensors.size() == dims.size() && tensors.size() == item_sizes.size(),
              "torch_xegpu_attn: expected ", dims.size(), " operands, got ", tensors.size());
  int64_t symbols[4] = {-1, -1, -1, -1};
  std::vector<std::vector<int64_t>> words;
  words.reserve(tensors.size() + ws_shapes.size() + 1);
  for (size_t j = 0; j < tensors.size(); ++j) {
    const at::Tensor& t = tensors[j];
    TORCH_CHECK(t.device().is_cpu(), "torch_xegpu_attn: operand ", j, " is not on the CPU");
    TORCH_CHECK(t.dim() == static_cast<int64_t>(dims[j].size()), "torch_xegpu_attn: operand ", j, " has rank ",
                t.dim(), ", the kernel takes ", dims[j].size());
    for (size_t d = 0; d < dims[j].size(); ++d) {
      const int64_t want = dims[j][d], have = t.size(d);
      if (want >= 0) {
        TORCH_CHECK(have == want, "torch_xegpu_attn: operand ", j, " has size ", have, " at dim ", d,
                    ", the kernel was compiled for ", want);
      } else {
        int64_t& bound = symbols[-want - 1];
        TORCH_CHECK(bound < 0 || bound == have, "torch_xegpu_attn: operand ", j, " has size ", have,
                    " at dim ", d, ", other operands give ", bound);
        bound = have;
      }
    }
    TORCH_CHECK(t.element_size() == item_sizes[j], "torch_xegpu_attn: operand ", j, " has ",
                t.element_size(), "-byte elements, the kernel was compiled for ", item_sizes[j]);
    TORCH_CHECK(!t.is_neg() && !t.is_conj(), "torch_xegpu_attn: operand ", j, " is a lazily negated view");
    TORCH_CHECK(t.dim() == 0 || t.stride(-1) == 1 || t.size(-1) == 1,
                "torch_xegpu_attn: operand ", j, " must have a unit innermost stride");
    words.push_back(describe(t.data_ptr(), t.sizes().vec(), t.strides().vec()));
  }
  for (int64_t s : symbols) TORCH_CHECK(s > 0, "torch_xegpu_attn: every run-time extent must be positive");

  std::vector<Word> args;
  for (auto& w : words) args.push_back(w.data());
  std::vector<int64_t> plan(plan_length);
  auto plan_words = describe(plan.data(), {plan_length}, {1});
  std::vector<Word> plan_args = args;
  plan_args.push_back(plan_words.data());
  call(static_cast<uintptr_t>(plan_fn), plan_args);

  // Workspaces, back to back in the arena, 64-byte aligned.
  size_t next = fns.size();
  std::vector<std::vector<int64_t>> ws_sizes;
  std::vector<size_t> ws_offsets;
  size_t total = 0;
  for (size_t w = 0; w < ws_shapes.size(); ++w) {
    std::vector<int64_t> sizes = ws_shapes[w];
    int64_t elements = 1;
    for (auto& s : sizes) {
      if (s < 0) s = plan.at(next++);
      elements *= s;
    }
    ws_offsets.push_back(total);
    total += (static_cast<size_t>(elements) * ws_item_sizes[w] + 63) / 64 * 64;
    ws_sizes.push_back(std::move(sizes));
  }
  TORCH_CHECK(next == static_cast<size_t>(plan_length), "torch_xegpu_attn: plan length mismatch");
  char* base = static_cast<char*>(arena.reserve(total));
  for (size_t w = 0; w < ws_shapes.size(); ++w) {
    words.push_back(describe(base + ws_offsets[w], ws_sizes[w], contiguous_strides(ws_sizes[w])));
  }
  args.clear();
  for (auto& w : words) args.push_back(w.data());

  const at::Tensor& q = tensors[0];
  const double flops = 2.0 * q.size(0) * q.size(1) * q.size(2) * q.size(3) * tensors[1].size(2) *
                       (q.size(4) + tensors[2].size(3));
  const bool parallel = flops / std::max(1, at::get_num_threads()) >= kMinParallelFlops;

  py::gil_scoped_release no_gil;
  for (size_t g = 0; g < fns.size(); ++g) {
    const uintptr_t fn = static_cast<uintptr_t>(fns[g]);
    const int64_t tasks = plan[g];
    if (tasks <= 0) continue;
    at::parallel_for(0, tasks, parallel ? 1 : tasks, [&](int64_t begin, int64_t end) {
      call(fn, args, begin, end);
    });
  }
}

void release_workspaces() {
  arena.data.reset();
  arena.bytes = 0;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "torch-xegpu-attn launch fast paths";
  m.def("launch_cpu", &launch, "Run a cpu kernel's grids over torch's intra-op thread pool",
        py::arg("fns"), py::arg("plan_fn"), py::arg("plan_length"), py::arg("tensors"), py::arg("dims"),
        py::arg("item_sizes"), py::arg("ws_shapes"), py::arg("ws_item_sizes"));
  m.def("release_workspaces", &release_workspaces, "Free the calling thread's workspace arena");
}
