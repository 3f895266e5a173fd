"""Host side of the xegpu target: SPIR-V kernels submitted on a SYCL queue through dpctl.

On an Intel GPU the queue is torch's current XPU stream (its sycl::queue,
wrapped by dpctl without a copy, so kernels run in stream order) and the
operands are torch's own USM allocations, passed as they are.  Under
XEGPU_ATTN_EMULATE=xpu the queue is the Intel OpenCL CPU runtime's and the
kernel is the emulation-linked SPIR-V; CPU tensors are not USM allocations
there, so they are copied into USM shared buffers for the launch and the
output copied back (the emulation's only copies).

dpctl is the maintained Python interop layer of SYCL (IntelPython); it builds
a kernel bundle from SPIR-V on any SYCL device.  The 2D block messages
constrain the operands (base 64-byte aligned, row pitch a multiple of 16 bytes
and at least 32, width at least 32 bytes): `check_block_io` refuses tensors
that break them before a launch, so a kernel never faults on them.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from typing import Dict, List, Sequence

import torch

from ..targets.outline import evaluate

_LOCK = threading.Lock()
#: 2D block message constraints (Intel's cl_intel_subgroup_2d_block_io, as MLIR's uArch states them).
BASE_ALIGNMENT = 64
PITCH_ALIGNMENT = 16
MIN_PITCH = 32
MIN_WIDTH = 32


def _intel_opencl_runtime() -> str:
    """libintelocl.so of PyPI's intel-opencl-rt (in the environment's lib directory)."""
    import sys
    for root in (sys.prefix, os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))):
        path = os.path.join(root, "lib", "libintelocl.so")
        if os.path.exists(path):
            return path
    raise RuntimeError("the xegpu emulation needs the Intel OpenCL CPU runtime (PyPI intel-opencl-rt; "
                       "bash scripts/setup.sh --test installs it)")


@functools.lru_cache(maxsize=None)
def emulation_queue():
    """The SYCL queue of the Intel OpenCL CPU device (created once)."""
    os.environ.setdefault("OCL_ICD_FILENAMES", _intel_opencl_runtime())
    import dpctl
    try:
        return dpctl.SyclQueue("opencl:cpu")
    except Exception as error:  # noqa: BLE001
        raise RuntimeError(f"the xegpu emulation found no OpenCL CPU device ({error}); is "
                           f"OCL_ICD_FILENAMES pointing at intel-opencl-rt's libintelocl.so?") from None


def torch_queue(device: torch.device):
    """torch's current XPU stream on `device` as a dpctl.SyclQueue (the same sycl::queue)."""
    import dpctl
    address = torch.xpu.current_stream(device).sycl_queue
    capsule_new = ctypes.pythonapi.PyCapsule_New
    capsule_new.restype = ctypes.py_object
    capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return dpctl.SyclQueue(capsule_new(address, b"SyclQueueRef", None))


def check_block_io(name: str, tensor: torch.Tensor) -> None:
    """Refuse an operand whose 2D views break the block-message constraints (rows are its last
    dim; every row-plane starts at base + k * stride(-3 ...))."""
    item = tensor.element_size()
    if tensor.stride(-1) != 1:
        raise ValueError(f"xegpu: operand {name} must have unit stride in its last dim")
    pitch = tensor.stride(-2) * item if tensor.dim() >= 2 and tensor.size(-2) > 1 else tensor.size(-1) * item
    width = tensor.size(-1) * item
    plane_strides = [tensor.stride(d) * item for d in range(tensor.dim() - 2) if tensor.size(d) > 1]
    problems = []
    if tensor.data_ptr() % BASE_ALIGNMENT or any(s % BASE_ALIGNMENT for s in plane_strides):
        problems.append(f"every head's base must be {BASE_ALIGNMENT}-byte aligned")
    if pitch % PITCH_ALIGNMENT or pitch < MIN_PITCH or pitch < width:
        problems.append(f"the row pitch ({pitch} bytes) must be a multiple of {PITCH_ALIGNMENT}, at least "
                        f"{MIN_PITCH} and at least the row width")
    if width < MIN_WIDTH:
        problems.append(f"a row must hold at least {MIN_WIDTH} bytes")
    if problems:
        raise ValueError(f"xegpu: operand {name} {tuple(tensor.shape)} (strides {tuple(tensor.stride())}) breaks "
                         f"the 2D block-message constraints: {'; '.join(problems)}")


class XpuKernel:
    """A loaded xegpu kernel: call it with the canonical operand tensors (XPU tensors, or CPU
    tensors when the kernel is the emulated one)."""

    def __init__(self, binary_path: str, metadata: Dict):
        with open(binary_path, "rb") as f:
            self.spirv = f.read()
        self.metadata = metadata
        self.emulated = bool(metadata.get("emulated"))
        if metadata["workspaces"]:
            raise RuntimeError("xegpu: kernels with workspaces are not supported by the launcher yet")
        self._programs = {}

    def _kernels(self, queue) -> List:
        """The kernel objects of this binary in `queue`'s context (built once per context)."""
        import dpctl.program as dpp
        key = queue.sycl_context.addressof_ref()
        with _LOCK:
            kernels = self._programs.get(key)
            if kernels is None:
                program = dpp.create_program_from_spirv(queue, self.spirv, self._build_options(queue))
                kernels = [program.get_sycl_kernel(k["name"]) for k in self.metadata["kernels"]]
                if not self.emulated:
                    _check_private_memory(kernels)
                self._programs[key] = (kernels, queue)  # the queue keeps the context alive
            else:
                kernels = kernels[0]
        return kernels

    def _build_options(self, queue) -> str:
        """The driver's build options: the large register file the kernels were checked in (256
        GRF: no spills; 128 spills), on a GPU."""
        if self.emulated or not queue.sycl_device.is_gpu:
            return ""
        return "-ze-opt-large-register-file" if self.metadata.get("large_grf") else ""

    def __call__(self, operands: Sequence[torch.Tensor]) -> None:
        names = [o["name"] for o in self.metadata["operands"]]
        for name, tensor in zip(names, operands):
            if name != "mask":
                check_block_io(name, tensor)
        if self.emulated:
            self._run_emulated(list(operands))
        else:
            queue = torch_queue(operands[0].device)
            self._submit(queue, [_usm(t, queue) for t in operands], operands, wait=False)

    def _run_emulated(self, operands: List[torch.Tensor]) -> None:
        import dpctl.memory as dpm
        queue = emulation_queue()
        buffers = []
        for t in operands:
            # a USM allocation aligned like the tensor's data (the block constraints were checked on it)
            buffer = dpm.MemoryUSMShared(max(t.numel() * t.element_size(), 1), queue=queue, alignment=BASE_ALIGNMENT)
            if t.numel():
                buffer.copy_from_host(_bytes(t))
            buffers.append(buffer)
        self._submit(queue, buffers, operands, wait=True)
        self._check_emulated_messages(queue)
        out = operands[-1]
        if out.numel():
            host = torch.frombuffer(bytearray(buffers[-1].copy_to_host()), dtype=torch.uint8)
            span = torch.as_strided(out, (_span(out),), (1,), out.storage_offset())
            span.view(torch.uint8).copy_(host[:span.numel() * out.element_size()])

    def _check_emulated_messages(self, queue) -> None:
        """Raise if a block message of the last launch broke the hardware's constraints (the
        emulation records them, see emulation.cl): on a GPU that launch would have faulted."""
        import dpctl.memory as dpm
        import dpctl.program as dpp
        with _LOCK:
            status_kernel = self._programs.get(("status", queue.sycl_context.addressof_ref()))
            if status_kernel is None:
                program = dpp.create_program_from_spirv(queue, self.spirv, "")
                status_kernel = program.get_sycl_kernel("xegpu_emu_take_status")
                self._programs[("status", queue.sycl_context.addressof_ref())] = status_kernel
        result = dpm.MemoryUSMShared(4, queue=queue)
        queue.submit(status_kernel, [result], [1], [1]).wait()
        status = int.from_bytes(bytes(result.copy_to_host()), "little")
        if status:
            raise RuntimeError(f"xegpu (emulated): a 2D block message broke the hardware's constraints "
                               f"{describe_status(status)}; on an Intel GPU this launch would fault")

    def _submit(self, queue, pointers, operands: Sequence[torch.Tensor], wait: bool) -> None:
        sizes = [tuple(t.shape) for t in operands]
        args = []
        for pointer, t in zip(pointers, operands):
            # the memref descriptor ABI: allocated, aligned, offset, sizes, strides (in elements)
            args += [pointer, pointer, ctypes.c_longlong(0)]
            args += [ctypes.c_longlong(n) for n in t.shape] + [ctypes.c_longlong(s) for s in _strides(t)]
        events = []
        for kernel, info in zip(self._kernels(queue), self.metadata["kernels"]):
            groups = evaluate(info["grid"], sizes)
            threads = int(info["threads"])
            if groups == 0:
                continue
            events.append(queue.submit(kernel, args, [groups * threads], [threads]))
        if wait:
            for event in events:
                event.wait()


def _check_private_memory(kernels) -> None:
    """Warn when the driver's build of a kernel uses private memory (register spills)."""
    import warnings
    for kernel in kernels:
        size = kernel.private_mem_size
        if size:
            warnings.warn(f"xegpu: kernel {kernel.get_function_name()} spills ({size} bytes of private memory "
                          f"per work-item): expect it to run slowly", RuntimeWarning, stacklevel=3)


def _strides(t: torch.Tensor) -> List[int]:
    """Strides in elements; a contiguous copy's when the kernel reads the tensor as laid out."""
    return list(t.stride()) if t.numel() else [0] * t.dim()


def _bytes(t: torch.Tensor) -> memoryview:
    """The bytes of the tensor's storage span (its strided layout kept)."""
    span = _span(t)
    flat = torch.as_strided(t, (span,), (1,), t.storage_offset()).contiguous()
    return memoryview(flat.view(torch.uint8).numpy())


def _span(t: torch.Tensor) -> int:
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0


def _usm(t: torch.Tensor, queue):
    """An XPU tensor's data as a dpctl USM memory object in torch's SYCL context (no copy)."""
    import dpctl.memory as dpm

    class _Interface:
        __sycl_usm_array_interface__ = {"data": (t.data_ptr(), False), "shape": (max(_span(t), 1) * t.element_size(),),
                                        "typestr": "|u1", "version": 1, "syclobj": queue}
    return dpm.as_usm_memory(_Interface())


#: the bits of the emulation's status word (emulation.cl).
STATUS_BITS = {1: "base address not 64-byte aligned", 2: "width below 32 bytes or not a multiple of 4",
               4: "pitch below 32 bytes, not a multiple of 16 or below the width",
               8: "x offset not a multiple of 4 bytes", 16: "width, height or pitch above 2^24"}


def describe_status(status: int) -> str:
    return "(" + "; ".join(text for bit, text in STATUS_BITS.items() if status & bit) + ")"
