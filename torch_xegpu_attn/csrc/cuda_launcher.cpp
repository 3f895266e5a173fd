// Launch path of the nvvm target: cubins loaded with the CUDA driver API, launched on torch's
// current CUDA stream.
//
// A compiled nvvm kernel is a cubin with one CUDA kernel per work-group loop of the shared IR.
// Each kernel takes every memref argument as MLIR's expanded descriptor
//     (allocated ptr, aligned ptr, offset, sizes[rank], strides[rank])
// of the operands q, k, v, [mask], out and then of the workspaces.  Grids and workspace sizes are
// functions of the operands' sizes, given as small postfix programs (see `evaluate`).  A call
// checks the operands against the kernel's dims (compiled-in extents and run-time extents that
// must agree across operands), copies an operand whose base or row strides break the 16-byte
// alignment the kernel's cp.async copies need, allocates the workspaces (one arena) from torch's
// caching allocator, and launches every kernel in order on the current stream: no host round trip, so a
// call can be captured into a CUDA graph.
//
// Replay (as op.cpp does for CPU calls, see replay.h): the first checked call of a signature is
// recorded here when its canonical operands start at its inputs' first elements: the functions,
// grids, the descriptor words with the bases left to patch, the workspaces' sizes.  A later call
// with the same signature (and 16-byte aligned inputs) is replayed without Python: a hash lookup,
// one output allocation, the bases patched in, the launches.  op.cpp calls `replay` through the
// capsule `replay_capsule` hands it, for the op's CUDA kernel and torch_xegpu_attn.attention.
//
// A kernel loads its cubin as one CUmodule per device, at its first call there, and unloads them
// when its last owner (the memory cache's Python object, a recorded call) lets go of it: once the
// streams its functions ran on have finished them.  A module whose functions were launched into
// a CUDA graph being captured stays loaded: the graph may launch them at any later time.

#include <torch/extension.h>

#include "replay.h"
#include "size_program.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/EmptyTensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

void check(CUresult result, const char* what) {
  if (result != CUDA_SUCCESS) {
    const char* name = nullptr;
    cuGetErrorName(result, &name);
    TORCH_CHECK(false, "torch_xegpu_attn (nvvm): ", what, " failed: ", name ? name : "unknown error");
  }
}

int64_t evaluate(const std::vector<int64_t>& program, const std::vector<at::Tensor>& operands) {
  return xattn::evaluate_size_program(program, operands, "nvvm");
}

void append_descriptor(std::vector<int64_t>& words, const at::Tensor& t) {
  const auto base = reinterpret_cast<int64_t>(t.data_ptr());
  words.push_back(base);  // allocated pointer
  words.push_back(base);  // aligned pointer
  words.push_back(0);     // offset
  for (int64_t d = 0; d < t.dim(); ++d) words.push_back(t.size(d));
  for (int64_t d = 0; d < t.dim(); ++d) words.push_back(t.stride(d));
}

const int64_t kWorkspaceItemSizes[] = {4, 2, 2, 1, 8};  // f32, f16, bf16, i8, f64 (runtime/cuda.py's codes)
constexpr int64_t kWorkspaceAlignment = 256;

// The workspaces of one call carved out of one allocation (an allocation costs more host time
// than a launch): their descriptors (contiguous, bases relative to the arena) and the arena's size.
struct WorkspaceLayout {
  std::vector<int64_t> words;
  std::vector<size_t> bases;     // where each descriptor's allocated pointer is in `words`
  std::vector<int64_t> offsets;  // bytes into the arena
  int64_t bytes = 0;

  void add(const std::vector<int64_t>& sizes, int64_t item_size) {
    int64_t elements = 1;
    for (int64_t s : sizes) elements *= s;
    offsets.push_back(bytes);
    bytes += (elements * item_size + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment;
    bases.push_back(words.size());
    words.insert(words.end(), {0, 0, 0});
    words.insert(words.end(), sizes.begin(), sizes.end());
    std::vector<int64_t> strides(sizes.size(), 1);
    for (size_t d = sizes.size(); d-- > 1;) strides[d - 1] = strides[d] * sizes[d];
    words.insert(words.end(), strides.begin(), strides.end());
  }
};

// Allocate the arena of `layout` on `device` (from torch's caching allocator, in stream order) and
// point the workspace descriptors, which start at words[first], into it.
at::Tensor allocate_workspaces(const WorkspaceLayout& layout, std::vector<int64_t>& words, size_t first,
                               const c10::Device& device) {
  if (layout.offsets.empty()) return at::Tensor();
  at::Tensor arena = at::detail::empty_cuda({layout.bytes}, at::kByte, device, std::nullopt);
  const auto base = reinterpret_cast<int64_t>(arena.data_ptr());
  for (size_t w = 0; w < layout.offsets.size(); ++w) {
    words[first + layout.bases[w]] = words[first + layout.bases[w] + 1] = base + layout.offsets[w];
  }
  return arena;
}

bool aligned_base(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

bool aligned_rows(const at::Tensor& t) {
  const int64_t item = t.element_size();
  if (!aligned_base(t.data_ptr())) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && (t.stride(d) * item) % 16) return false;
  }
  return true;
}

// Modules loaded now, on every device (a bounded memory cache bounds them too).
std::atomic<int64_t> loaded_modules{0};

// No stream yet: a value no CUstream has (0 is the legacy default stream).
const CUstream kNoStream = reinterpret_cast<CUstream>(~uintptr_t{0});

// A kernel's module on one device and what its unloading waits for.
struct DeviceModule {
  CUcontext context = nullptr;
  CUmodule module = nullptr;
  std::vector<CUfunction> functions;
  std::vector<CUstream> streams;  // its functions were launched on these (guarded by the kernel's mutex)
  bool captured = false;          // ... and into a CUDA graph
  std::atomic<CUstream> last_stream{kNoStream};
};

// Whether `stream` is capturing a CUDA graph (an unknown state counts as capturing).
bool capturing(CUstream stream) {
  CUstreamCaptureStatus status = CU_STREAM_CAPTURE_STATUS_NONE;
  return cuStreamIsCapturing(stream, &status) != CUDA_SUCCESS || status != CU_STREAM_CAPTURE_STATUS_NONE;
}

// Unload a module, in its context, once the streams that ran its functions have finished them.
// It stays loaded when a CUDA graph captured its functions, when a stream cannot be waited for
// (being captured, or failed) and when the driver is shutting down (the process is exiting).
void unload(DeviceModule& m) {
  if (m.module == nullptr || m.captured) return;
  if (cuCtxPushCurrent(m.context) != CUDA_SUCCESS) return;
  bool idle = true;
  for (CUstream stream : m.streams) {
    idle = idle && !capturing(stream) && cuStreamSynchronize(stream) == CUDA_SUCCESS;
  }
  if (idle && cuModuleUnload(m.module) == CUDA_SUCCESS) {
    m.module = nullptr;
    loaded_modules.fetch_sub(1, std::memory_order_relaxed);
  }
  CUcontext popped = nullptr;
  cuCtxPopCurrent(&popped);
}

class CudaKernel;

// A recorded call (see the header comment).
struct Recipe {
  std::shared_ptr<CudaKernel> kernel;
  int64_t device_index = 0;
  DeviceModule* module = nullptr;     // the kernel's module on that device (lives as long as the kernel)
  std::vector<CUfunction> functions;  // those with work-groups, in launch order
  std::vector<unsigned> grids, threads, shared_bytes;
  std::vector<int64_t> words;  // descriptors of operands then workspaces; bases patched per call
  std::vector<size_t> bases;   // where each operand descriptor's allocated pointer is in `words`
  size_t n_inputs = 0;         // q, k, v, [mask]; then out
  std::vector<size_t> aligned_inputs;
  WorkspaceLayout workspaces;
  size_t workspace_words = 0;  // where the workspaces' descriptors start in `words`
  std::vector<int64_t> out_shape;
  std::string choice;  // the kernel-choosing knobs when recorded
};

constexpr size_t kMaxRecipes = 4096;
std::mutex recipes_mutex;
std::unordered_map<std::vector<int64_t>, std::shared_ptr<Recipe>, xattn::KeyHash> recipes;

class CudaKernel : public std::enable_shared_from_this<CudaKernel> {
 public:
  CudaKernel(std::string cubin, std::vector<std::string> names, std::vector<int64_t> threads,
             std::vector<int64_t> shared_bytes, std::vector<std::vector<int64_t>> grids,
             std::vector<std::vector<int64_t>> dims, std::vector<int64_t> item_sizes,
             std::vector<int64_t> aligned_operands, std::vector<std::vector<std::vector<int64_t>>> workspaces,
             std::vector<int64_t> workspace_dtypes)
      : cubin_(std::move(cubin)), names_(std::move(names)), threads_(std::move(threads)),
        shared_bytes_(std::move(shared_bytes)), grids_(std::move(grids)), dims_(std::move(dims)),
        item_sizes_(std::move(item_sizes)), aligned_(std::move(aligned_operands)),
        workspaces_(std::move(workspaces)), workspace_dtypes_(std::move(workspace_dtypes)) {
    TORCH_CHECK(names_.size() == threads_.size() && names_.size() == shared_bytes_.size() &&
                    names_.size() == grids_.size(),
                "torch_xegpu_attn (nvvm): kernel lists differ in length");
  }
  CudaKernel(const CudaKernel&) = delete;
  CudaKernel& operator=(const CudaKernel&) = delete;

  // The last owner let go (the memory cache evicted the kernel, its recorded calls are gone).
  ~CudaKernel() {
    for (auto& entry : modules_) unload(entry.second);
  }

  // Run on q, k, v, [mask], out (canonical shapes, on one CUDA device; out is written).
  void call(std::vector<at::Tensor> operands) {
    validate(operands);
    touch();
    const auto device = operands[0].device();
    // cp.async copies 16-byte chunks of rows: a base or a row stride off that grid is copied.
    for (int64_t j : aligned_) {
      if (!aligned_rows(operands[j])) operands[j] = operands[j].clone(at::MemoryFormat::Contiguous);
    }
    c10::cuda::CUDAGuard guard(device);
    DeviceModule& module = load(device.index());
    const auto& functions = module.functions;
    std::vector<int64_t> words;
    for (const auto& t : operands) append_descriptor(words, t);
    const WorkspaceLayout layout = workspace_layout(operands);
    const size_t first = words.size();
    words.insert(words.end(), layout.words.begin(), layout.words.end());
    at::Tensor arena = allocate_workspaces(layout, words, first, device);
    std::vector<void*> args;
    args.reserve(words.size());
    for (auto& w : words) args.push_back(&w);
    CUstream stream = at::cuda::getCurrentCUDAStream(device.index()).stream();
    launching(module, stream);
    for (size_t k = 0; k < functions.size(); ++k) {
      const int64_t grid = evaluate(grids_[k], operands);
      if (grid <= 0) continue;
      TORCH_CHECK(grid < (int64_t{1} << 31), "torch_xegpu_attn (nvvm): ", grid, " work-groups exceed the grid");
      check(cuLaunchKernel(functions[k], static_cast<unsigned>(grid), 1, 1, static_cast<unsigned>(threads_[k]), 1,
                           1, static_cast<unsigned>(shared_bytes_[k]), stream, args.data(), nullptr),
            "cuLaunchKernel");
    }
  }

  // Record a checked call for replay: `operands` are its canonical q, k, v, [mask], out.
  // Nothing is recorded (false) unless each input operand starts at its input's first
  // element and no operand needs the alignment copy.
  bool record(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
              double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa,
              const std::vector<at::Tensor>& operands, const std::vector<int64_t>& out_shape) {
    const at::Tensor* mask_ptr = mask ? &*mask : nullptr;
    std::vector<int64_t> key;
    if (!xattn::make_key(xattn::Call{q, k, v, mask_ptr, dropout_p, is_causal, scale, enable_gqa}, key)) return false;
    validate(operands);
    const at::Tensor* inputs[4] = {&q, &k, &v, mask_ptr};
    const size_t n_inputs = mask ? 4 : 3;
    TORCH_CHECK(operands.size() == n_inputs + 1, "torch_xegpu_attn (nvvm): record() takes the canonical operands");
    for (size_t i = 0; i < n_inputs; ++i) {
      if (operands[i].data_ptr() != inputs[i]->data_ptr()) return false;
    }
    for (int64_t j : aligned_) {
      if (!aligned_rows(operands[j])) return false;
    }
    const at::Tensor& out = operands.back();
    TORCH_CHECK(out.is_contiguous(), "torch_xegpu_attn (nvvm): the output must be contiguous");

    auto recipe = std::make_shared<Recipe>();
    recipe->kernel = shared_from_this();
    recipe->device_index = out.device().index();
    recipe->n_inputs = n_inputs;
    recipe->out_shape = out_shape;
    recipe->choice = xattn::kernel_choice();
    for (int64_t j : aligned_) recipe->aligned_inputs.push_back(static_cast<size_t>(j));
    for (const auto& t : operands) {
      recipe->bases.push_back(recipe->words.size());
      append_descriptor(recipe->words, t);
    }
    recipe->workspaces = workspace_layout(operands);
    recipe->workspace_words = recipe->words.size();
    recipe->words.insert(recipe->words.end(), recipe->workspaces.words.begin(), recipe->workspaces.words.end());
    c10::cuda::CUDAGuard guard(out.device());
    recipe->module = &load(out.device().index());
    const auto& functions = recipe->module->functions;
    for (size_t k = 0; k < functions.size(); ++k) {
      const int64_t grid = evaluate(grids_[k], operands);
      if (grid <= 0) continue;
      if (grid >= (int64_t{1} << 31)) return false;  // the checked path raises
      recipe->functions.push_back(functions[k]);
      recipe->grids.push_back(static_cast<unsigned>(grid));
      recipe->threads.push_back(static_cast<unsigned>(threads_[k]));
      recipe->shared_bytes.push_back(static_cast<unsigned>(shared_bytes_[k]));
    }
    std::lock_guard<std::mutex> lock(recipes_mutex);
    if (recipes.size() >= kMaxRecipes) recipes.clear();  // bounded; recording again costs one checked call
    recipes[std::move(key)] = std::move(recipe);
    return true;
  }

  // Drop the recorded calls of this kernel (it leaves the memory cache).
  void forget() {
    std::lock_guard<std::mutex> lock(recipes_mutex);
    for (auto it = recipes.begin(); it != recipes.end();) {
      it = it->second->kernel.get() == this ? recipes.erase(it) : std::next(it);
    }
  }

  void touch() { last_use_.store(xattn::use_time(), std::memory_order_relaxed); }
  uint64_t last_use() const { return last_use_.load(std::memory_order_relaxed); }

  // Note the stream that `module`'s functions are about to be launched on (its unloading waits
  // for it) and whether it captures them into a graph.  A launch on the stream of the previous
  // one, not capturing, costs an atomic load and the capture query.
  void launching(DeviceModule& module, CUstream stream) {
    const bool captured = capturing(stream);
    if (!captured && module.last_stream.load(std::memory_order_relaxed) == stream) return;
    std::lock_guard<std::mutex> lock(load_mutex_);
    module.captured = module.captured || captured;
    if (std::find(module.streams.begin(), module.streams.end(), stream) == module.streams.end()) {
      module.streams.push_back(stream);
    }
    module.last_stream.store(stream, std::memory_order_relaxed);
  }

  // Registers and local memory of kernel k as the driver reports them (for tests and reports).
  std::vector<int64_t> attributes(int64_t device_index, int64_t k) {
    c10::cuda::CUDAGuard guard(device_index);
    CUfunction f = load(device_index).functions.at(k);
    int registers = 0, local = 0, shared = 0;
    check(cuFuncGetAttribute(&registers, CU_FUNC_ATTRIBUTE_NUM_REGS, f), "cuFuncGetAttribute");
    check(cuFuncGetAttribute(&local, CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES, f), "cuFuncGetAttribute");
    check(cuFuncGetAttribute(&shared, CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, f), "cuFuncGetAttribute");
    return {registers, local, shared};
  }

 private:
  WorkspaceLayout workspace_layout(const std::vector<at::Tensor>& operands) const {
    WorkspaceLayout layout;
    for (size_t w = 0; w < workspaces_.size(); ++w) {
      std::vector<int64_t> sizes;
      for (const auto& program : workspaces_[w]) sizes.push_back(evaluate(program, operands));
      layout.add(sizes, kWorkspaceItemSizes[workspace_dtypes_[w]]);
    }
    return layout;
  }

  // The operands against the kernel's dims (compiled-in extents, run-time extents that agree
  // across operands), element sizes and unit innermost strides.
  void validate(const std::vector<at::Tensor>& operands) const {
    TORCH_CHECK(operands.size() == dims_.size(), "torch_xegpu_attn (nvvm): expected ", dims_.size(),
                " operands, got ", operands.size());
    const auto device = operands[0].device();
    int64_t symbols[4] = {-1, -1, -1, -1};
    for (size_t j = 0; j < operands.size(); ++j) {
      const at::Tensor& t = operands[j];
      TORCH_CHECK(t.is_cuda() && t.device() == device, "torch_xegpu_attn (nvvm): operand ", j,
                  " is not on ", device);
      TORCH_CHECK(t.dim() == static_cast<int64_t>(dims_[j].size()), "torch_xegpu_attn (nvvm): operand ", j,
                  " has rank ", t.dim(), ", the kernel takes ", dims_[j].size());
      for (size_t d = 0; d < dims_[j].size(); ++d) {
        const int64_t want = dims_[j][d], have = t.size(d);
        if (want >= 0) {
          TORCH_CHECK(have == want, "torch_xegpu_attn (nvvm): operand ", j, " has size ", have, " at dim ", d,
                      ", the kernel was compiled for ", want);
        } else {
          int64_t& bound = symbols[-want - 1];
          TORCH_CHECK(bound < 0 || bound == have, "torch_xegpu_attn (nvvm): operand ", j, " has size ", have,
                      " at dim ", d, ", other operands give ", bound);
          bound = have;
        }
      }
      TORCH_CHECK(t.element_size() == item_sizes_[j], "torch_xegpu_attn (nvvm): operand ", j, " has ",
                  t.element_size(), "-byte elements, the kernel was compiled for ", item_sizes_[j]);
      TORCH_CHECK(t.stride(-1) == 1 || t.size(-1) == 1, "torch_xegpu_attn (nvvm): operand ", j,
                  " must have a unit innermost stride");
    }
  }

  // The module and functions of one device, loaded at its first call (the reference stays valid
  // as long as the kernel: map nodes do not move).
  DeviceModule& load(int64_t device_index) {
    std::lock_guard<std::mutex> lock(load_mutex_);  // calls run with the GIL released
    auto found = modules_.find(device_index);
    if (found != modules_.end()) return found->second;
    CUcontext context = nullptr;
    check(cuCtxGetCurrent(&context), "cuCtxGetCurrent");
    if (context == nullptr) {  // torch made the primary context current on the stream's device
      CUdevice dev;
      check(cuDeviceGet(&dev, static_cast<int>(device_index)), "cuDeviceGet");
      check(cuDevicePrimaryCtxRetain(&context, dev), "cuDevicePrimaryCtxRetain");
      check(cuCtxSetCurrent(context), "cuCtxSetCurrent");
    }
    CUmodule module;
    check(cuModuleLoadData(&module, cubin_.data()), "cuModuleLoadData");
    std::vector<CUfunction> functions;
    try {
      for (size_t k = 0; k < names_.size(); ++k) {
        CUfunction f;
        check(cuModuleGetFunction(&f, module, names_[k].c_str()), "cuModuleGetFunction");
        // The opt-in for more than 48 KB counts the kernel's static shared memory too (the PTX
        // declares the dynamic buffer's symbol as one static byte): a kernel asking for
        // exactly 48 KB of dynamic shared memory needs it as well, so it is always given.
        if (shared_bytes_[k] > 0) {
          check(cuFuncSetAttribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                   static_cast<int>(shared_bytes_[k])),
                "cuFuncSetAttribute");
        }
        functions.push_back(f);
      }
    } catch (...) {
      cuModuleUnload(module);
      throw;
    }
    DeviceModule& loaded = modules_[device_index];
    loaded.context = context;
    loaded.module = module;
    loaded.functions = std::move(functions);
    loaded_modules.fetch_add(1, std::memory_order_relaxed);
    return loaded;
  }

  std::string cubin_;
  std::vector<std::string> names_;
  std::vector<int64_t> threads_, shared_bytes_;
  std::vector<std::vector<int64_t>> grids_, dims_;
  std::vector<int64_t> item_sizes_, aligned_;
  std::vector<std::vector<std::vector<int64_t>>> workspaces_;
  std::vector<int64_t> workspace_dtypes_;
  std::map<int64_t, DeviceModule> modules_;
  std::mutex load_mutex_;
  std::atomic<uint64_t> last_use_{0};
};

// The replay op.cpp calls (xattn::DeviceReplay): a recorded call's launches on the current stream.
bool replay(const xattn::Call& call, at::Tensor* out) {
  std::vector<int64_t> key;
  if (!xattn::make_key(call, key)) return false;
  std::shared_ptr<Recipe> r;
  {
    std::lock_guard<std::mutex> lock(recipes_mutex);
    auto found = recipes.find(key);
    if (found == recipes.end()) return false;
    r = found->second;
  }
  if (!xattn::knobs_allow_replay(r->choice)) return false;
  const at::Tensor* inputs[4] = {&call.q, &call.k, &call.v, call.mask};
  for (size_t j : r->aligned_inputs) {
    if (!aligned_base(inputs[j]->data_ptr())) return false;  // the checked path copies it
  }
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(r->device_index));
  const c10::Device device(c10::kCUDA, static_cast<c10::DeviceIndex>(r->device_index));
  at::Tensor result = at::detail::empty_cuda(r->out_shape, call.q.scalar_type(), device, std::nullopt);
  if (xattn::poison_outputs()) result.fill_(std::nan(""));
  std::vector<int64_t> words = r->words;
  auto patch = [&](size_t i, const void* base) {
    words[r->bases[i]] = words[r->bases[i] + 1] = reinterpret_cast<int64_t>(base);
  };
  for (size_t i = 0; i < r->n_inputs; ++i) patch(i, inputs[i]->data_ptr());
  patch(r->n_inputs, result.data_ptr());
  at::Tensor arena = allocate_workspaces(r->workspaces, words, r->workspace_words, device);
  std::vector<void*> args(words.size());
  for (size_t i = 0; i < words.size(); ++i) args[i] = &words[i];
  CUstream stream = at::cuda::getCurrentCUDAStream(device.index()).stream();
  r->kernel->launching(*r->module, stream);
  for (size_t k = 0; k < r->functions.size(); ++k) {
    check(cuLaunchKernel(r->functions[k], r->grids[k], 1, 1, r->threads[k], 1, 1, r->shared_bytes[k], stream,
                         args.data(), nullptr),
          "cuLaunchKernel");
  }
  r->kernel->touch();
  *out = std::move(result);
  return true;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "torch-xegpu-attn: nvvm kernels on torch's CUDA stream";
  py::class_<CudaKernel, std::shared_ptr<CudaKernel>>(m, "CudaKernel")
      .def(py::init<std::string, std::vector<std::string>, std::vector<int64_t>, std::vector<int64_t>,
                    std::vector<std::vector<int64_t>>, std::vector<std::vector<int64_t>>, std::vector<int64_t>,
                    std::vector<int64_t>, std::vector<std::vector<std::vector<int64_t>>>, std::vector<int64_t>>())
      .def("__call__", &CudaKernel::call, py::call_guard<py::gil_scoped_release>())
      .def("attributes", &CudaKernel::attributes)
      .def("record", &CudaKernel::record, "Record a checked call for replay", py::arg("query"), py::arg("key"),
           py::arg("value"), py::arg("attn_mask"), py::arg("dropout_p"), py::arg("is_causal"), py::arg("scale"),
           py::arg("enable_gqa"), py::arg("operands"), py::arg("out_shape"))
      .def("forget", &CudaKernel::forget, "Drop the recorded calls of this kernel")
      .def("last_use", &CudaKernel::last_use);
  m.def("replay_capsule", [] {
    return py::capsule(reinterpret_cast<void*>(static_cast<xattn::DeviceReplay>(&replay)),
                       xattn::kDeviceReplayCapsule);
  }, "This launcher's replay, for torch_xegpu_attn._C.set_device_replay");
  m.def("clear_recipes", [] {
    std::lock_guard<std::mutex> lock(recipes_mutex);
    recipes.clear();
  }, "Drop every recorded call");
  m.def("recipes", [] {
    std::lock_guard<std::mutex> lock(recipes_mutex);
    return recipes.size();
  }, "Recorded signatures");
  m.def("loaded_modules", [] { return loaded_modules.load(); }, "CUDA modules loaded now (per kernel and device)");
}
