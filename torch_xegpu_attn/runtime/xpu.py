"""Host side of the xegpu target: SPIR-V (or a native binary) submitted on a SYCL queue.

The launcher is C++ (csrc/xpu_launcher.cpp: SYCL with Level Zero and OpenCL
interop), built at the first xegpu launch against the SYCL runtime of the
environment (PyPI's intel-sycl-rt, which torch's XPU build depends on) and
the Level Zero headers.  On an Intel GPU it builds the module through Level
Zero (ocloc's native binary for the device when the cache entry has one, else
the SPIR-V in the register-file mode its metadata names), reads the kernels' spill size at
load (a warning when they spill), and submits on torch's current XPU queue
with torch's own USM pointers: stream order, no copies.  Under
XEGPU_ATTN_EMULATE=xpu the same submission runs the emulation-linked SPIR-V
on the Intel OpenCL CPU runtime's queue; CPU tensors are not USM there, so
they are staged through USM shared buffers (the emulation's only copies) and
the call waits, then checks the emulation's record of block-message
violations.

The 2D block messages constrain the operands (head bases 64-byte aligned,
row pitch a multiple of 16 bytes and at least 32, rows at least 32 bytes
wide, a multiple of 4 bytes): an operand that breaks them is copied into a
layout that keeps them (`conform`) before a launch (the output is written to a
buffer with rows appended, `conform_output`, and copied back): a kernel never
faults on its operands.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import warnings
from typing import Dict, List, Sequence

import torch

from .._native import build_extension, existing_sources
from ..targets.base import Kernel
from .cuda import postfix

_LOCK = threading.Lock()
#: 2D block message constraints (Intel's cl_intel_subgroup_2d_block_io, as MLIR's uArch states them).
BASE_ALIGNMENT = 64
PITCH_ALIGNMENT = 16
MIN_PITCH = 32
MIN_WIDTH = 32
#: the bits of the emulation's status word (emulation.cl).
STATUS_BITS = {1: "base address not 64-byte aligned", 2: "width below 32 bytes or not a multiple of 4",
               4: "pitch below 32 bytes, not a multiple of 16 or below the width",
               8: "x offset not a multiple of 4 bytes", 16: "width, height or pitch above 2^24"}
LEVEL_ZERO_INCLUDE = os.environ.get("XEGPU_ATTN_LEVEL_ZERO_INCLUDE", "/usr/include")


def _sycl_root() -> str:
    """The environment prefix holding the SYCL runtime's headers and libsycl (intel-sycl-rt)."""
    for root in (sys.prefix, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__))))):
        if os.path.exists(os.path.join(root, "include", "sycl", "sycl.hpp")):
            return root
    raise RuntimeError("the xegpu launcher needs the SYCL runtime's headers (PyPI intel-sycl-rt: "
                       "bash scripts/setup.sh --test installs it)")


def launcher_sources() -> List[str]:
    """The XPU launcher's source, then its header (the package's csrc/)."""
    return existing_sources(["xpu_launcher.cpp", "size_program.h"], "the XPU launcher")


@functools.lru_cache(maxsize=None)
def extension():
    """The C++ launcher, built (once per machine and torch) at first use."""
    source, header = launcher_sources()
    if not os.path.exists(os.path.join(LEVEL_ZERO_INCLUDE, "level_zero", "ze_api.h")):
        raise RuntimeError(f"the xegpu launcher needs the Level Zero headers ({LEVEL_ZERO_INCLUDE}/level_zero; "
                           f"apt-get install libze-dev)")
    root = _sycl_root()
    lib = os.path.join(root, "lib")
    with _LOCK:
        return build_extension("xpu_launcher", [source], [header],
                               extra_include_paths=[os.path.join(root, "include"), LEVEL_ZERO_INCLUDE],
                               extra_cflags=["-O2", "-std=c++17"],
                               extra_ldflags=[f"-L{lib}", "-lsycl", f"-Wl,-rpath,{lib}", "-ldl"])


def loaded_modules() -> int:
    """Built programs / kernel bundles alive now (one per kernel and SYCL context it ran on),
    released with their kernel when the memory cache evicts it."""
    return extension().loaded_modules() if extension.cache_info().currsize else 0


def staged_buffers() -> int:
    """USM buffers of the emulation's staging alive now (none between launches, even failed ones)."""
    return extension().staged_buffers() if extension.cache_info().currsize else 0


def _intel_opencl_runtime() -> str:
    """libintelocl.so of PyPI's intel-opencl-rt (in the environment's lib directory)."""
    for root in (sys.prefix, _sycl_root()):
        path = os.path.join(root, "lib", "libintelocl.so")
        if os.path.exists(path):
            return path
    raise RuntimeError("the xegpu emulation needs the Intel OpenCL CPU runtime (PyPI intel-opencl-rt; "
                       "bash scripts/setup.sh --test installs it)")


@functools.lru_cache(maxsize=None)
def emulation_queue() -> int:
    """The address of the SYCL queue of the Intel OpenCL CPU device (created once)."""
    os.environ.setdefault("OCL_ICD_FILENAMES", _intel_opencl_runtime())
    try:
        return extension().cpu_queue()
    except RuntimeError as error:
        raise RuntimeError(f"the xegpu emulation found no OpenCL CPU device ({error}); is OCL_ICD_FILENAMES "
                           f"pointing at intel-opencl-rt's libintelocl.so?") from None


def torch_queue(device: torch.device) -> int:
    """The address of torch's current XPU stream's sycl::queue on `device`."""
    return int(torch.xpu.current_stream(device).sycl_queue)


def block_io_problems(tensor: torch.Tensor) -> List[str]:
    """What about a tensor's 2D views (its last two dims; every row-plane starts at base +
    k * stride(d) for the leading dims) breaks the 2D block-message constraints."""
    item = tensor.element_size()
    problems = []
    if tensor.size(-1) > 1 and tensor.stride(-1) != 1:
        problems.append("its last dim must have unit stride")
    width = tensor.size(-1) * item
    pitch = tensor.stride(-2) * item if tensor.dim() >= 2 and tensor.size(-2) > 1 else max(width, MIN_PITCH)
    planes = [tensor.stride(d) * item for d in range(tensor.dim() - 2) if tensor.size(d) > 1]
    if tensor.data_ptr() % BASE_ALIGNMENT or any(stride % BASE_ALIGNMENT for stride in planes):
        problems.append(f"every 2D plane's base must be {BASE_ALIGNMENT}-byte aligned")
    if pitch % PITCH_ALIGNMENT or pitch < MIN_PITCH or pitch < width:
        problems.append(f"the row pitch ({pitch} bytes) must be a multiple of {PITCH_ALIGNMENT}, at least "
                        f"{MIN_PITCH} and at least the row width")
    if width < MIN_WIDTH or width % 4:
        problems.append(f"a row must hold at least {MIN_WIDTH} bytes and a multiple of 4 (it holds {width})")
    return problems


def conform(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or a copy of it whose rows start 64-byte aligned at a pitch the block messages
    take, when its own layout breaks their constraints (the GPU would fault on it).

    A mask tile's width is the mask's own key extent (its descriptor's shape): a mask whose rows
    are too narrow or not a multiple of 4 bytes is copied with its key dim widened to whole 64
    bytes, zeros past S.  The kernel masks keys >= S by the keys' count, so the widening never
    shows.  q, k and v keep their sizes (their extents are the problem's)."""
    problems = block_io_problems(tensor)
    if not problems:
        return tensor
    item = tensor.element_size()
    width = tensor.size(-1) * item
    padded = max(-(-width // BASE_ALIGNMENT), 1) * BASE_ALIGNMENT // item
    if name != "mask" and (width < MIN_WIDTH or width % 4):
        raise NotImplementedError(f"xegpu: operand {name} {tuple(tensor.shape)} has rows of {width} bytes; 2D "
                                  f"block messages need a multiple of 4, at least {MIN_WIDTH}")
    copy = torch.zeros(*tensor.shape[:-1], padded, dtype=tensor.dtype, device=tensor.device)
    copy[..., :tensor.size(-1)] = tensor
    return copy if name == "mask" else copy[..., :tensor.size(-1)]


def conform_output(out: torch.Tensor) -> torch.Tensor:
    """The frontend's (contiguous) output, or, where its (L, Ev) planes lie off the 64-byte grid
    (L * Ev * item bytes apart: rows of 32 * odd bytes and an odd L), a contiguous buffer with
    rows appended until they are on it, for the kernel to write (its output is contiguous: the
    planes' distance follows from the rows); the launcher copies the first L rows back.  Rows
    the kernel writes past L (a tile of the last row block) are dropped."""
    if not block_io_problems(out):
        return out
    rows, row_bytes = out.size(-2), out.size(-1) * out.element_size()
    while rows * row_bytes % BASE_ALIGNMENT:
        rows += 1
    padded = torch.empty(*out.shape[:-2], rows, out.size(-1), dtype=out.dtype, device=out.device)
    if block_io_problems(padded):
        raise NotImplementedError(f"xegpu: no output layout of {tuple(out.shape)} that 2D block messages can "
                                  f"write: {'; '.join(block_io_problems(padded))}")
    return padded


#: operands that are one value per query row (B, H, G, L): read by scattered loads and written by
#: scattered stores, never by 2D block messages.
ROW_VECTORS = ("lse", "dlse")
#: operands of a few values the kernel reads by scalar loads: dropout's (seed, offset).
SCALARS = ("seed",)
_WORKSPACE_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64}
_SIZE_OPS = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
             "ceildiv": lambda a, b: -(-a // b), "div": lambda a, b: a // b, "min": min, "max": max}


def _evaluate(expression, operands: Sequence[torch.Tensor]) -> int:
    """A size expression of the kernel's metadata (outline.size_expression) on the operands."""
    kind = expression[0]
    if kind == "const":
        return int(expression[1])
    if kind == "dim":
        return int(operands[expression[1]].size(expression[2]))
    return _SIZE_OPS[kind](_evaluate(expression[1], operands), _evaluate(expression[2], operands))


def describe_status(status: int) -> str:
    return "(" + "; ".join(text for bit, text in STATUS_BITS.items() if status & bit) + ")"


class XpuKernel(Kernel):
    """A loaded xegpu kernel: call it with the canonical operand tensors (XPU tensors, or CPU
    tensors when the kernel is the emulated one)."""

    def __init__(self, binary_path: str, metadata: Dict):
        import base64
        with open(binary_path, "rb") as f:
            spirv = f.read()
        natives = [base64.b64decode(n) for n in metadata.get("native", {}).values()]
        self.metadata = metadata
        self.emulated = bool(metadata.get("emulated"))
        kernels = metadata["kernels"]
        options = metadata["build_options"]  # the driver builds the SPIR-V as ocloc built the natives
        # operands read or written by 2D block messages: all but the row vectors (read and written
        # by scattered messages), the scalars and a mask that is not made of (..., L, S) tiles
        self._blocks = [o["name"] not in ROW_VECTORS + SCALARS
                        and (o["name"] != "mask" or tuple(o["dims"][-2:]) == ("L", "S"))
                        for o in metadata["operands"]]
        self._names = [o["name"] for o in metadata["operands"]]
        self._written = [i for i, name in enumerate(self._names) if name in metadata.get("writes", ["out"])]
        self._workspaces = [(w["dims"], _WORKSPACE_DTYPES[w["dtype"]]) for w in metadata["workspaces"]]
        self._native = extension().XpuKernel(
            spirv, natives, options, [k["name"] for k in kernels], [int(k["threads"]) for k in kernels],
            [postfix(k["grid"]) for k in kernels], self.emulated)
        self._checked = set()

    def __call__(self, arguments: Sequence[torch.Tensor]) -> None:
        if len(arguments) != len(self._names):
            raise ValueError(f"xegpu: the kernel takes {len(self._names)} operands ({', '.join(self._names)}), "
                             f"got {len(arguments)}")
        operands = list(arguments)
        for i, (name, blocks) in enumerate(zip(self._names, self._blocks)):
            if blocks:
                operands[i] = conform_output(operands[i]) if i in self._written else conform(name, operands[i])
        queue = emulation_queue() if self.emulated else torch_queue(operands[0].device)
        workspaces = [torch.empty([_evaluate(d, arguments) for d in dims], dtype=dtype, device=operands[0].device)
                      for dims, dtype in self._workspaces]
        status = self._native.run(queue, operands + workspaces, self._written)
        if status:
            raise RuntimeError(f"xegpu (emulated): a 2D block message broke the hardware's constraints "
                               f"{describe_status(status)}; on an Intel GPU this launch would fault")
        for i in self._written:
            if operands[i] is not arguments[i]:  # an output's planes broke the constraints: written to a copy
                arguments[i].copy_(operands[i][..., :arguments[i].size(-2), :])
        if queue not in self._checked:
            self._checked.add(queue)
            self._check_spills(queue)

    def properties(self, queue: int) -> Dict:
        """How the driver built the kernels for the queue's context: format, spill and private
        bytes per kernel (-1 where the backend does not say)."""
        form, spills, private = self._native.properties(queue)
        return {"format": form, "spill_bytes": list(spills), "private_bytes": list(private)}

    def _check_spills(self, queue: int) -> None:
        found = self.properties(queue)
        for name, spill in zip([k["name"] for k in self.metadata["kernels"]], found["spill_bytes"]):
            if spill > 0:
                warnings.warn(f"xegpu: the driver's build of {name} spills {spill} bytes per thread: expect it "
                              f"to run slowly", RuntimeWarning, stacklevel=3)
