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
// alignment the kernel's cp.async copies need, allocates the workspaces from torch's caching
// allocator, and launches every kernel in order on the current stream: no host round trip, so a
// call can be captured into a CUDA graph.

#include <torch/extension.h>

#include "size_program.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda.h>

#include <map>
#include <string>
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

bool aligned_rows(const at::Tensor& t) {
  const int64_t item = t.element_size();
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && (t.stride(d) * item) % 16) return false;
  }
  return true;
}

class CudaKernel {
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

  // Run on q, k, v, [mask], out (canonical shapes, on one CUDA device; out is written).
  void call(std::vector<at::Tensor> operands) {
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
    // cp.async copies 16-byte chunks of rows: a base or a row stride off that grid is copied.
    for (int64_t j : aligned_) {
      if (!aligned_rows(operands[j])) operands[j] = operands[j].clone(at::MemoryFormat::Contiguous);
    }
    c10::cuda::CUDAGuard guard(device);
    const auto& functions = load(device.index());
    std::vector<int64_t> words;
    for (const auto& t : operands) append_descriptor(words, t);
    std::vector<at::Tensor> workspaces;
    static const at::ScalarType kDtypes[] = {at::kFloat, at::kHalf, at::kBFloat16, at::kChar, at::kDouble};
    for (size_t w = 0; w < workspaces_.size(); ++w) {
      std::vector<int64_t> sizes;
      for (const auto& program : workspaces_[w]) sizes.push_back(evaluate(program, operands));
      workspaces.push_back(at::empty(sizes, at::TensorOptions().dtype(kDtypes[workspace_dtypes_[w]]).device(device)));
      append_descriptor(words, workspaces.back());
    }
    std::vector<void*> args;
    args.reserve(words.size());
    for (auto& w : words) args.push_back(&w);
    CUstream stream = at::cuda::getCurrentCUDAStream(device.index()).stream();
    for (size_t k = 0; k < functions.size(); ++k) {
      const int64_t grid = evaluate(grids_[k], operands);
      if (grid <= 0) continue;
      TORCH_CHECK(grid < (int64_t{1} << 31), "torch_xegpu_attn (nvvm): ", grid, " work-groups exceed the grid");
      check(cuLaunchKernel(functions[k], static_cast<unsigned>(grid), 1, 1, static_cast<unsigned>(threads_[k]), 1,
                           1, static_cast<unsigned>(shared_bytes_[k]), stream, args.data(), nullptr),
            "cuLaunchKernel");
    }
  }

  // Registers and local memory of kernel k as the driver reports them (for tests and reports).
  std::vector<int64_t> attributes(int64_t device_index, int64_t k) {
    c10::cuda::CUDAGuard guard(device_index);
    CUfunction f = load(device_index).at(k);
    int registers = 0, local = 0, shared = 0;
    check(cuFuncGetAttribute(&registers, CU_FUNC_ATTRIBUTE_NUM_REGS, f), "cuFuncGetAttribute");
    check(cuFuncGetAttribute(&local, CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES, f), "cuFuncGetAttribute");
    check(cuFuncGetAttribute(&shared, CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, f), "cuFuncGetAttribute");
    return {registers, local, shared};
  }

 private:
  // The module and functions of one device, loaded at its first call.
  const std::vector<CUfunction>& load(int64_t device_index) {
    auto found = functions_.find(device_index);
    if (found != functions_.end()) return found->second;
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
    for (size_t k = 0; k < names_.size(); ++k) {
      CUfunction f;
      check(cuModuleGetFunction(&f, module, names_[k].c_str()), "cuModuleGetFunction");
      if (shared_bytes_[k] > 48 * 1024) {
        check(cuFuncSetAttribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                 static_cast<int>(shared_bytes_[k])),
              "cuFuncSetAttribute");
      }
      functions.push_back(f);
    }
    modules_[device_index] = module;
    return functions_[device_index] = std::move(functions);
  }

  std::string cubin_;
  std::vector<std::string> names_;
  std::vector<int64_t> threads_, shared_bytes_;
  std::vector<std::vector<int64_t>> grids_, dims_;
  std::vector<int64_t> item_sizes_, aligned_;
  std::vector<std::vector<std::vector<int64_t>>> workspaces_;
  std::vector<int64_t> workspace_dtypes_;
  std::map<int64_t, CUmodule> modules_;
  std::map<int64_t, std::vector<CUfunction>> functions_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "torch-xegpu-attn: nvvm kernels on torch's CUDA stream";
  py::class_<CudaKernel>(m, "CudaKernel")
      .def(py::init<std::string, std::vector<std::string>, std::vector<int64_t>, std::vector<int64_t>,
                    std::vector<std::vector<int64_t>>, std::vector<std::vector<int64_t>>, std::vector<int64_t>,
                    std::vector<int64_t>, std::vector<std::vector<std::vector<int64_t>>>, std::vector<int64_t>>())
      .def("__call__", &CudaKernel::call, py::call_guard<py::gil_scoped_release>())
      .def("attributes", &CudaKernel::attributes);
}
