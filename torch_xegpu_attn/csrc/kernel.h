// A loaded cpu kernel and how it is launched (see cpu_launcher.cpp).
//
// A compiled kernel is a plan function and a list of grid functions (MLIR's C
// interface: every memref is passed as a pointer to its descriptor
// {allocated, aligned, offset, sizes[R], strides[R]}):
//     void _mlir_ciface_attention_plan(Memref* q, ..., Memref* out, Memref* plan)
//         writes plan = [task count of each grid..., dynamic sizes of each workspace...]
//     void _mlir_ciface_attention_grid<i>(int64_t begin, int64_t end, Memref* q, ..., Memref* ws...)
//         runs work-group tasks [begin, end)

#pragma once

#include <torch/extension.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

namespace xattn {

using Word = void*;

// Memref descriptors of a kernel's arguments, back to back in one buffer (one
// allocation per launch).  Sizes and strides are in elements.
struct Descriptors {
  std::vector<int64_t> words;
  std::vector<size_t> starts;  // where each descriptor begins in `words`

  void add(const void* base, c10::IntArrayRef sizes, c10::IntArrayRef strides);
  void add_contiguous(const void* base, c10::IntArrayRef sizes);
  // Point descriptor i at `base` (its allocated and aligned pointers).
  void set_base(size_t i, const void* base) {
    words[starts[i]] = words[starts[i] + 1] = reinterpret_cast<int64_t>(base);
  }
  std::vector<Word> arguments();  // one pointer per descriptor
  size_t size() const { return starts.size(); }
};

// What the plan function says for one set of operand sizes: task counts and
// the workspaces' shapes and places in the arena.
struct LaunchPlan {
  std::vector<int64_t> tasks;                  // per grid
  std::vector<std::vector<int64_t>> ws_sizes;  // per workspace
  std::vector<size_t> ws_offsets;              // byte offsets in the arena, 64-byte aligned
  size_t ws_bytes = 0;
  bool parallel = false;  // enough work per thread to use torch's intra-op pool
};

// A kernel library: opened with dlopen (RTLD_LOCAL: kernels of different specs
// export the same symbol names), closed when the last owner lets go of it.
class Kernel {
 public:
  Kernel(const std::string& path, const std::vector<std::string>& grids, const std::string& plan,
         int64_t plan_length, std::vector<std::vector<int64_t>> dims, std::vector<int64_t> item_sizes,
         std::vector<std::vector<int64_t>> ws_shapes, std::vector<int64_t> ws_item_sizes);
  ~Kernel();
  Kernel(const Kernel&) = delete;
  Kernel& operator=(const Kernel&) = delete;

  // Checks `tensors` (q, k, v, [mask], out in canonical shapes) against the
  // compiled operand dims and element sizes; their descriptors.
  Descriptors describe(const std::vector<at::Tensor>& tensors) const;
  // Runs the plan function on operand descriptors.
  LaunchPlan plan(Descriptors& operands) const;
  // Appends the workspaces' descriptors (bases relative to a null arena).
  void add_workspaces(Descriptors& descriptors, const LaunchPlan& plan) const;
  // Runs the grids; `descriptors` hold the operands then the workspaces, whose
  // bases this rebases onto the calling thread's arena.
  void execute(Descriptors& descriptors, size_t n_operands, const LaunchPlan& plan) const;
  // describe + plan + execute.
  void run(const std::vector<at::Tensor>& tensors);

  size_t n_operands() const { return dims_.size(); }
  // When the kernel last ran (replay.h's use_time: one clock with the other launchers' kernels,
  // for the memory cache's least-recently-used order).
  uint64_t last_use() const { return last_use_.load(std::memory_order_relaxed); }
  void touch();

 private:
  void* handle_ = nullptr;
  std::vector<uintptr_t> grids_;
  uintptr_t plan_fn_ = 0;
  int64_t plan_length_;
  std::vector<std::vector<int64_t>> dims_;  // >= 0 compiled in, < 0 a run-time extent (-1 B, -2 H, -3 L, -4 S)
  std::vector<int64_t> item_sizes_;
  std::vector<std::vector<int64_t>> ws_shapes_;  // -1 where the plan gives the size
  std::vector<int64_t> ws_item_sizes_;
  std::atomic<uint64_t> last_use_{0};
};

// Counts of launches, for tests and tools.
extern std::atomic<int64_t> launches;
// Kernel libraries open now (a Kernel closes its library when its last owner lets go: the
// memory cache's bound is a bound on these too).
extern std::atomic<int64_t> loaded_libraries;

void release_workspaces();

}  // namespace xattn
