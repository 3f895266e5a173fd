// Launch path of the xegpu target: SPIR-V (or Intel's native binary) loaded into a SYCL context
// and submitted on a SYCL queue: torch's current XPU queue on an Intel GPU, the Intel OpenCL CPU
// runtime's queue under emulation.
//
// A compiled xegpu kernel holds one SPIR-V kernel per work-group loop of the shared IR, each
// taking every operand as MLIR's expanded memref descriptor
//     (allocated ptr, aligned ptr, offset, sizes[rank], strides[rank])
// of the spec's operands (q, k, v, [mask], out for the forward), then of the workspaces the
// kernels share (the backward's Delta), allocated by the caller.  Grids are functions of the operands' sizes (postfix programs, as the
// nvvm launcher's).  Kernels are built once per SYCL context:
//   Level Zero (Intel GPUs)  zeModuleCreate from the native binary when one was compiled for the
//                            device, else from SPIR-V with the build options (mad enabled, the
//                            large register file where the kernel asks for it);
//                            zeKernelGetProperties gives the spill size, checked at load;
//                            the module and kernels are wrapped into SYCL objects (interop, as
//                            Triton's Intel backend does) and submitted on torch's queue: stream
//                            order, no host round trip, no copies.
//   OpenCL (the CPU device)  clCreateProgramWithIL + clBuildProgram, wrapped likewise.
// Level Zero and OpenCL entry points are looked up with dlopen at first use, so the extension
// loads on machines that have only one of them.  A kernel's builds are released with it (when
// the memory cache evicts it); the emulation's staging buffers with the launch that made them,
// however it ends.

#include <torch/extension.h>

#include "size_program.h"

#define SYCL_DISABLE_FSYCL_SYCLHPP_WARNING 1
#include <sycl/sycl.hpp>
#include <sycl/backend/opencl.hpp>
#include <level_zero/ze_api.h>
#include <sycl/ext/oneapi/backend/level_zero.hpp>
#include <CL/cl.h>

#include <dlfcn.h>

#include <atomic>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace {

void* symbol(const char* library, const char* name) {
  static std::mutex lock;
  static std::map<std::string, void*> handles;
  std::lock_guard<std::mutex> guard(lock);
  void*& handle = handles[library];
  if (!handle) handle = dlopen(library, RTLD_NOW | RTLD_GLOBAL);
  TORCH_CHECK(handle, "torch_xegpu_attn (xegpu): cannot load ", library, ": ", dlerror());
  void* found = dlsym(handle, name);
  TORCH_CHECK(found, "torch_xegpu_attn (xegpu): ", library, " has no ", name);
  return found;
}

template <typename F>
F ze(const char* name) { return reinterpret_cast<F>(symbol("libze_loader.so.1", name)); }
template <typename F>
F cl(const char* name) { return reinterpret_cast<F>(symbol("libOpenCL.so.1", name)); }

void check_ze(ze_result_t result, const char* what) {
  TORCH_CHECK(result == ZE_RESULT_SUCCESS, "torch_xegpu_attn (xegpu): ", what, " failed (Level Zero error 0x",
              std::hex, static_cast<unsigned>(result), ")");
}

void check_cl(cl_int result, const char* what, const std::string& log = "") {
  TORCH_CHECK(result == CL_SUCCESS, "torch_xegpu_attn (xegpu): ", what, " failed (OpenCL error ", result, ")",
              log.empty() ? "" : ": ", log);
}

int64_t evaluate(const std::vector<int64_t>& program, const std::vector<at::Tensor>& operands) {
  return xattn::evaluate_size_program(program, operands, "xegpu");
}

// Built programs / kernel bundles alive now (one per kernel and SYCL context), and USM buffers
// of the emulation's staging alive now: for tests and tools.
std::atomic<int64_t> loaded_modules{0};
std::atomic<int64_t> staged_buffers{0};

// The USM shared buffers one emulated launch stages its CPU operands through, freed however the
// launch ends: once the kernels submitted on them have finished.
class Staging {
 public:
  explicit Staging(sycl::queue& queue) : queue_(queue) {}
  Staging(const Staging&) = delete;
  Staging& operator=(const Staging&) = delete;
  ~Staging() {
    for (auto& event : submissions_) {
      try {
        event.wait();
      } catch (...) {  // the launch failed: its error is already on its way
      }
    }
    for (void* buffer : buffers_) sycl::free(buffer, queue_);
    staged_buffers.fetch_sub(static_cast<int64_t>(buffers_.size()), std::memory_order_relaxed);
  }

  char* allocate(size_t bytes) {
    char* buffer = static_cast<char*>(sycl::aligned_alloc_shared(64, bytes, queue_));
    TORCH_CHECK(buffer, "torch_xegpu_attn (xegpu): USM allocation of ", bytes, " bytes failed");
    buffers_.push_back(buffer);
    staged_buffers.fetch_add(1, std::memory_order_relaxed);
    return buffer;
  }
  // A submission that reads or writes the buffers.
  void submitted(sycl::event event) { submissions_.push_back(std::move(event)); }
  std::vector<sycl::event>& submissions() { return submissions_; }

 private:
  sycl::queue& queue_;
  std::vector<void*> buffers_;
  std::vector<sycl::event> submissions_;
};

struct Built {
  std::vector<sycl::kernel> kernels;
  std::vector<int64_t> spill_bytes;    // per kernel, Level Zero only (-1: unknown)
  std::vector<int64_t> private_bytes;
  std::string format;                   // "native" or "spirv"
};

class XpuKernel {
 public:
  XpuKernel(std::string spirv, std::vector<std::string> natives, std::string build_options,
            std::vector<std::string> names, std::vector<int64_t> threads, std::vector<std::vector<int64_t>> grids,
            bool emulated)
      : spirv_(std::move(spirv)), natives_(std::move(natives)), options_(std::move(build_options)),
        names_(std::move(names)), threads_(std::move(threads)), grids_(std::move(grids)), emulated_(emulated) {}
  XpuKernel(const XpuKernel&) = delete;
  XpuKernel& operator=(const XpuKernel&) = delete;
  ~XpuKernel() { loaded_modules.fetch_sub(static_cast<int64_t>(built_.size()), std::memory_order_relaxed); }

  // Launch on the queue at `queue_address` (a sycl::queue*): every kernel in order, asynchronously.
  // Emulated: the operands are CPU tensors, staged through USM shared buffers, and the call waits,
  // then copies the operands at `written` back; returns the emulation's status word (non-zero: a
  // block message broke the hardware's rules).
  int64_t run(int64_t queue_address, const std::vector<at::Tensor>& operands, const std::vector<int64_t>& written) {
    sycl::queue& queue = *reinterpret_cast<sycl::queue*>(queue_address);
    const Built& built = build(queue);
    std::vector<void*> pointers;
    Staging staging(queue);
    for (const auto& t : operands) {
      if (!emulated_) {
        pointers.push_back(t.data_ptr());
        continue;
      }
      // staged at the tensor's own offset from a 64-byte boundary: what the block messages see of
      // its alignment stays what the GPU would see
      const size_t misalignment = reinterpret_cast<uintptr_t>(t.data_ptr()) % 64;
      char* buffer = staging.allocate(span_bytes(t) + misalignment + 1);
      if (t.numel()) std::memcpy(buffer + misalignment, t.data_ptr(), span_bytes(t));
      pointers.push_back(buffer + misalignment);
    }
    for (size_t k = 0; k < built.kernels.size(); ++k) {
      const int64_t groups = evaluate(grids_[k], operands);
      if (groups <= 0) continue;
      const size_t local = static_cast<size_t>(threads_[k]);
      sycl::event submission = queue.submit([&](sycl::handler& h) {
        int index = 0;
        for (size_t i = 0; i < operands.size(); ++i) {
          const auto& t = operands[i];
          h.set_arg(index++, pointers[i]);
          h.set_arg(index++, pointers[i]);
          h.set_arg(index++, int64_t{0});
          for (int64_t d = 0; d < t.dim(); ++d) h.set_arg(index++, int64_t{t.size(d)});
          for (int64_t d = 0; d < t.dim(); ++d) h.set_arg(index++, int64_t{t.numel() ? t.stride(d) : 0});
        }
        h.parallel_for(sycl::nd_range<1>(sycl::range<1>(groups * local), sycl::range<1>(local)), built.kernels[k]);
      });
      if (emulated_) staging.submitted(std::move(submission));  // on a GPU: stream order, no wait
    }
    if (!emulated_) return 0;
    for (auto& e : staging.submissions()) e.wait_and_throw();
    for (const int64_t i : written) {
      const auto& out = operands.at(static_cast<size_t>(i));
      if (out.numel()) std::memcpy(out.data_ptr(), pointers.at(static_cast<size_t>(i)), span_bytes(out));
    }
    return take_status(queue);
  }

  // (format, spill bytes per kernel, private bytes per kernel) of the build for the queue's context.
  py::tuple properties(int64_t queue_address) {
    const Built& built = build(*reinterpret_cast<sycl::queue*>(queue_address));
    return py::make_tuple(built.format, built.spill_bytes, built.private_bytes);
  }

 private:
  static size_t span_bytes(const at::Tensor& t) {
    if (!t.numel()) return 0;
    int64_t span = 1;
    for (int64_t d = 0; d < t.dim(); ++d) span += (t.size(d) - 1) * t.stride(d);
    return static_cast<size_t>(span) * t.element_size();
  }

  const Built& build(sycl::queue& queue) {
    std::lock_guard<std::mutex> guard(lock_);
    const sycl::context context = queue.get_context();
    for (const auto& entry : built_)
      if (entry.first == context) return *entry.second;
    auto built = std::make_unique<Built>(queue.get_backend() == sycl::backend::ext_oneapi_level_zero
                                             ? build_level_zero(queue) : build_opencl(queue));
    built_.emplace_back(context, std::move(built));
    loaded_modules.fetch_add(1, std::memory_order_relaxed);
    return *built_.back().second;
  }

  // A Level Zero module of the first native binary the driver takes for the device (a binary made
  // for another device is refused by the driver), else of the SPIR-V.
  ze_module_handle_t create_module(ze_context_handle_t context, ze_device_handle_t device, std::string& format) {
    auto create = ze<decltype(&zeModuleCreate)>("zeModuleCreate");
    auto log_text = ze<decltype(&zeModuleBuildLogGetString)>("zeModuleBuildLogGetString");
    auto log_destroy = ze<decltype(&zeModuleBuildLogDestroy)>("zeModuleBuildLogDestroy");
    std::vector<std::pair<const std::string*, bool>> candidates;
    for (const auto& n : natives_) candidates.emplace_back(&n, true);
    candidates.emplace_back(&spirv_, false);
    std::string text;
    for (const auto& [binary, native] : candidates) {
      ze_module_desc_t desc = {ZE_STRUCTURE_TYPE_MODULE_DESC};
      desc.format = native ? ZE_MODULE_FORMAT_NATIVE : ZE_MODULE_FORMAT_IL_SPIRV;
      desc.inputSize = binary->size();
      desc.pInputModule = reinterpret_cast<const uint8_t*>(binary->data());
      desc.pBuildFlags = native ? "" : options_.c_str();
      ze_module_handle_t module = nullptr;
      ze_module_build_log_handle_t log = nullptr;
      const ze_result_t created = create(context, device, &desc, &module, &log);
      if (log && created != ZE_RESULT_SUCCESS) {
        size_t size = 0;
        log_text(log, &size, nullptr);
        text.assign(size, '\0');
        log_text(log, &size, text.data());
      }
      if (log) log_destroy(log);
      if (created == ZE_RESULT_SUCCESS) {
        format = native ? "native" : "spirv";
        return module;
      }
    }
    TORCH_CHECK(false, "torch_xegpu_attn (xegpu): the driver did not build the SPIR-V module: ", text);
  }

  Built build_level_zero(sycl::queue& queue) {
    const sycl::context context = queue.get_context();
    auto ze_context = sycl::get_native<sycl::backend::ext_oneapi_level_zero>(context);
    auto ze_device = sycl::get_native<sycl::backend::ext_oneapi_level_zero>(queue.get_device());
    Built built;
    ze_module_handle_t module = create_module(ze_context, ze_device, built.format);
    auto bundle = sycl::make_kernel_bundle<sycl::backend::ext_oneapi_level_zero, sycl::bundle_state::executable>(
        {module, sycl::ext::oneapi::level_zero::ownership::transfer}, context);
    for (const auto& name : names_) {
      ze_kernel_desc_t kdesc = {ZE_STRUCTURE_TYPE_KERNEL_DESC};
      kdesc.pKernelName = name.c_str();
      ze_kernel_handle_t kernel = nullptr;
      check_ze(ze<decltype(&zeKernelCreate)>("zeKernelCreate")(module, &kdesc, &kernel), "zeKernelCreate");
      ze_kernel_properties_t props = {ZE_STRUCTURE_TYPE_KERNEL_PROPERTIES};
      check_ze(ze<decltype(&zeKernelGetProperties)>("zeKernelGetProperties")(kernel, &props), "zeKernelGetProperties");
      built.spill_bytes.push_back(props.spillMemSize);
      built.private_bytes.push_back(props.privateMemSize);
      built.kernels.push_back(sycl::make_kernel<sycl::backend::ext_oneapi_level_zero>(
          {bundle, kernel, sycl::ext::oneapi::level_zero::ownership::transfer}, context));
    }
    return built;
  }

  Built build_opencl(sycl::queue& queue) {
    TORCH_CHECK(queue.get_backend() == sycl::backend::opencl,
                "torch_xegpu_attn (xegpu): a queue of an unsupported SYCL backend");
    const sycl::context context = queue.get_context();
    cl_context cl_ctx = sycl::get_native<sycl::backend::opencl>(context);
    cl_device_id device = sycl::get_native<sycl::backend::opencl>(queue.get_device());
    cl_int error = CL_SUCCESS;
    cl_program program = cl<decltype(&clCreateProgramWithIL)>("clCreateProgramWithIL")(
        cl_ctx, spirv_.data(), spirv_.size(), &error);
    check_cl(error, "clCreateProgramWithIL");
    const cl_int built_status = cl<decltype(&clBuildProgram)>("clBuildProgram")(
        program, 1, &device, options_.c_str(), nullptr, nullptr);
    if (built_status != CL_SUCCESS) {
      size_t size = 0;
      auto info = cl<decltype(&clGetProgramBuildInfo)>("clGetProgramBuildInfo");
      info(program, device, CL_PROGRAM_BUILD_LOG, 0, nullptr, &size);
      std::string text(size, '\0');
      info(program, device, CL_PROGRAM_BUILD_LOG, size, text.data(), nullptr);
      check_cl(built_status, "building the SPIR-V program", text.substr(text.size() > 4000 ? text.size() - 4000 : 0));
    }
    Built built;
    built.format = "spirv";
    auto names = names_;
    if (emulated_) names.push_back("xegpu_emu_take_status");
    for (const auto& name : names) {
      cl_kernel kernel = cl<decltype(&clCreateKernel)>("clCreateKernel")(program, name.c_str(), &error);
      check_cl(error, "clCreateKernel");
      built.kernels.push_back(sycl::make_kernel<sycl::backend::opencl>(kernel, context));
      cl<decltype(&clReleaseKernel)>("clReleaseKernel")(kernel);  // the SYCL kernel holds its own reference
      built.spill_bytes.push_back(-1);
      built.private_bytes.push_back(-1);
    }
    cl<decltype(&clReleaseProgram)>("clReleaseProgram")(program);
    if (emulated_) {
      status_kernel_ = built.kernels.back();
      built.kernels.pop_back();
      built.spill_bytes.pop_back();
      built.private_bytes.pop_back();
    }
    return built;
  }

  int64_t take_status(sycl::queue& queue) {
    Staging staging(queue);
    auto* status = reinterpret_cast<uint32_t*>(staging.allocate(sizeof(uint32_t)));
    *status = 0;
    staging.submitted(queue.submit([&](sycl::handler& h) {
      h.set_arg(0, status);
      h.parallel_for(sycl::nd_range<1>(sycl::range<1>(1), sycl::range<1>(1)), *status_kernel_);
    }));
    staging.submissions().back().wait_and_throw();
    return *status;
  }

  std::string spirv_, options_;
  std::vector<std::string> natives_;
  std::vector<std::string> names_;
  std::vector<int64_t> threads_;
  std::vector<std::vector<int64_t>> grids_;
  bool emulated_;
  std::mutex lock_;
  std::vector<std::pair<sycl::context, std::unique_ptr<Built>>> built_;  // one build per SYCL context
  std::optional<sycl::kernel> status_kernel_;
};

// A SYCL queue on the OpenCL CPU device (the emulation's), created once; its address.  In order,
// as torch's XPU queues are: a kernel that reads what an earlier one wrote (the backward's Delta)
// starts after it.
int64_t cpu_queue() {
  static sycl::queue* queue = new sycl::queue(sycl::cpu_selector_v, sycl::property::queue::in_order());
  TORCH_CHECK(queue->get_backend() == sycl::backend::opencl,
              "torch_xegpu_attn (xegpu): the CPU SYCL device is not an OpenCL one");
  return reinterpret_cast<int64_t>(queue);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<XpuKernel>(m, "XpuKernel")
      .def(py::init([](py::bytes spirv, std::vector<py::bytes> natives, std::string options,
                       std::vector<std::string> names, std::vector<int64_t> threads,
                       std::vector<std::vector<int64_t>> grids, bool emulated) {
             std::vector<std::string> binaries(natives.begin(), natives.end());
             return new XpuKernel(std::string(spirv), std::move(binaries), std::move(options), std::move(names),
                                  std::move(threads), std::move(grids), emulated);
           }))
      .def("run", &XpuKernel::run, py::call_guard<py::gil_scoped_release>())
      .def("properties", &XpuKernel::properties);
  m.def("cpu_queue", &cpu_queue, "The emulation's SYCL queue (OpenCL CPU device), as an address");
  m.def("loaded_modules", [] { return loaded_modules.load(); },
        "Built programs / kernel bundles alive now (per kernel and SYCL context)");
  m.def("staged_buffers", [] { return staged_buffers.load(); },
        "USM buffers of emulated launches alive now (0 between launches)");
}
