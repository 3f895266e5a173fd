// Launch fast path of the cpu target.
//
// A compiled kernel is a list of grid functions, each
//     void _mlir_ciface_attention_grid<i>(int64_t begin, int64_t end, Memref* a0, Memref* a1, ...)
// running work-group tasks [begin, end) (MLIR's C interface: every memref is
// passed as a pointer to {allocated, aligned, offset, sizes[R], strides[R]}).
// `launch` describes the tensors once, then runs the grids in order, each
// split over torch's intra-op thread pool with at::parallel_for.  The GIL is
// released for the whole launch.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

namespace {

// MLIR memref descriptor words of a strided tensor (sizes and strides in elements).
std::vector<int64_t> describe(const at::Tensor& t) {
  const int64_t rank = t.dim();
  std::vector<int64_t> words(3 + 2 * rank);
  const auto base = reinterpret_cast<int64_t>(t.data_ptr());
  words[0] = base;  // allocated pointer (unused by the kernels)
  words[1] = base;  // aligned pointer: the first element
  words[2] = 0;     // offset, in elements
  for (int64_t d = 0; d < rank; ++d) {
    words[3 + d] = t.size(d);
    words[3 + rank + d] = t.stride(d);
  }
  return words;
}

using Word = void*;

// Call a grid function with `args.size()` memref arguments.
void call_grid(uintptr_t fn, int64_t begin, int64_t end, const std::vector<Word>& a) {
  switch (a.size()) {
#define XATTN_CASE(N, ...)                                                      \
  case N:                                                                       \
    reinterpret_cast<void (*)(int64_t, int64_t, __VA_ARGS__)>(fn)(begin, end,  \
        XATTN_ARGS_##N);                                                        \
    return;
#define XATTN_ARGS_4 a[0], a[1], a[2], a[3]
#define XATTN_ARGS_5 XATTN_ARGS_4, a[4]
#define XATTN_ARGS_6 XATTN_ARGS_5, a[5]
#define XATTN_ARGS_7 XATTN_ARGS_6, a[6]
#define XATTN_ARGS_8 XATTN_ARGS_7, a[7]
#define XATTN_ARGS_9 XATTN_ARGS_8, a[8]
#define XATTN_ARGS_10 XATTN_ARGS_9, a[9]
    XATTN_CASE(4, Word, Word, Word, Word)
    XATTN_CASE(5, Word, Word, Word, Word, Word)
    XATTN_CASE(6, Word, Word, Word, Word, Word, Word)
    XATTN_CASE(7, Word, Word, Word, Word, Word, Word, Word)
    XATTN_CASE(8, Word, Word, Word, Word, Word, Word, Word, Word)
    XATTN_CASE(9, Word, Word, Word, Word, Word, Word, Word, Word, Word)
    XATTN_CASE(10, Word, Word, Word, Word, Word, Word, Word, Word, Word, Word)
#undef XATTN_CASE
    default:
      TORCH_CHECK(false, "torch_xegpu_attn: grid functions take 4 to 10 memrefs, got ", a.size());
  }
}

// Run the grids of one kernel over `tensors` (operands then workspaces).
//   fns[i], tasks[i], grains[i]: address, task count and parallel grain of grid i
//   shapes[j], item_sizes[j]: the static shape and element size tensor j must
//              have (checked: a mismatch would make the kernel read or write
//              out of bounds, or misread the data)
void launch(const std::vector<int64_t>& fns, const std::vector<int64_t>& tasks,
            const std::vector<int64_t>& grains, const std::vector<at::Tensor>& tensors,
            const std::vector<std::vector<int64_t>>& shapes, const std::vector<int64_t>& item_sizes) {
  TORCH_CHECK(fns.size() == tasks.size() && fns.size() == grains.size(),
              "torch_xegpu_attn: grid lists differ in length");
  TORCH_CHECK(tensors.size() == shapes.size() && tensors.size() == item_sizes.size(),
              "torch_xegpu_attn: expected ", shapes.size(), " buffers, got ", tensors.size());
  std::vector<std::vector<int64_t>> words;
  words.reserve(tensors.size());
  for (size_t j = 0; j < tensors.size(); ++j) {
    const at::Tensor& t = tensors[j];
    TORCH_CHECK(t.device().is_cpu(), "torch_xegpu_attn: buffer ", j, " is not on the CPU");
    TORCH_CHECK(t.sizes().vec() == shapes[j], "torch_xegpu_attn: buffer ", j, " has shape ",
                t.sizes(), ", the kernel was compiled for ", at::IntArrayRef(shapes[j]));
    TORCH_CHECK(t.element_size() == item_sizes[j], "torch_xegpu_attn: buffer ", j, " has ",
                t.element_size(), "-byte elements, the kernel was compiled for ", item_sizes[j]);
    TORCH_CHECK(!t.is_neg() && !t.is_conj(), "torch_xegpu_attn: buffer ", j, " is a lazily negated view");
    TORCH_CHECK(t.dim() == 0 || t.stride(-1) == 1 || t.size(-1) == 1,
                "torch_xegpu_attn: buffer ", j, " must have a unit innermost stride");
    words.push_back(describe(t));
  }
  std::vector<Word> args;
  for (auto& w : words) args.push_back(w.data());

  py::gil_scoped_release no_gil;
  for (size_t g = 0; g < fns.size(); ++g) {
    const uintptr_t fn = static_cast<uintptr_t>(fns[g]);
    at::parallel_for(0, tasks[g], grains[g], [&](int64_t begin, int64_t end) {
      call_grid(fn, begin, end, args);
    });
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "torch-xegpu-attn launch fast paths";
  m.def("launch_cpu", &launch, "Run a cpu kernel's grids over torch's intra-op thread pool",
        py::arg("fns"), py::arg("tasks"), py::arg("grains"), py::arg("tensors"), py::arg("shapes"),
        py::arg("item_sizes"));
}
