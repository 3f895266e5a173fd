"""The emulated Intel builtins (targets/xegpu/emulation.cl) against what the specifications say.

Each test runs a small OpenCL C kernel that calls one builtin on a sub-group of
16 work-items and compares every work-item's registers with expectations
computed here from Intel's public extension specifications
(cl_intel_subgroup_2d_block_io, cl_intel_subgroup_matrix_multiply_accumulate):
lane i holds column i of a block, row after row; blocks of a multi-block read
follow each other; the transformed (VNNI) read packs two rows of a column into
32 bits, the lower row in the low half; the transposed read gives lane i row i;
reads outside the region give 0, writes outside it are dropped; a message that
breaks the hardware's constraints is recorded.
"""

import ctypes
import os
import subprocess
import tempfile

import numpy as np
import pytest

from torch_xegpu_attn.targets import get_target
from torch_xegpu_attn.targets.xegpu import toolchain

xegpu = get_target("xegpu")
_WHY = None
try:
    toolchain.clang()
    toolchain.llvm_tool("llc")
    import dpctl  # noqa: F401
except Exception as error:  # noqa: BLE001
    _WHY = str(error)
if os.environ.get("CI") and _WHY:
    raise RuntimeError(f"CI must check the xegpu emulation, but: {_WHY}")
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"no xegpu toolchain: {_WHY}")

W, H = 40, 37  # a region of 37 rows x 40 elements; pitch = 48 elements (padded rows)
PITCH = 48


def _program(source: str):
    """SPIR-V of `source` linked with the emulation, as a dpctl program on the CPU device."""
    import dpctl.program as dpp
    with tempfile.TemporaryDirectory() as tmp:
        cl, bc, linked, spv = (os.path.join(tmp, n) for n in ("t.cl", "t.bc", "l.bc", "t.spv"))
        with open(cl, "w") as f:
            f.write(source)
        for cmd in ([toolchain.clang(), "-cl-std=CL2.0", "--target=spirv64", "-O1", "-c", "-emit-llvm", cl, "-o", bc],
                    [toolchain.llvm_tool("llvm-link"), bc, toolchain.emulation_bitcode(), "-o", linked],
                    [toolchain.llvm_tool("llc"), "-O1", "-mtriple=spirv64-unknown-unknown", "-filetype=obj", linked,
                     "-o", spv]):
            subprocess.run(cmd, check=True, capture_output=True)
        queue = _queue()
        return queue, dpp.create_program_from_spirv(queue, open(spv, "rb").read(), "")


def _queue():
    """A dpctl queue on the OpenCL CPU device (dpctl runs the unit kernels here; the op's
    launcher is csrc/xpu_launcher.cpp)."""
    import dpctl
    from torch_xegpu_attn.runtime.xpu import _intel_opencl_runtime
    os.environ.setdefault("OCL_ICD_FILENAMES", _intel_opencl_runtime())
    return dpctl.SyclQueue("opencl:cpu")


def _run(source: str, name: str, region: np.ndarray, out_words: int, offset_bytes: int = 0):
    """Run kernel `name`(region, out) on one sub-group; return (out as uint32 [16, out_words], status)."""
    import dpctl.memory as dpm
    queue, program = _program(source)
    buf = dpm.MemoryUSMShared(region.nbytes + 128, queue=queue, alignment=64)
    raw = np.zeros(region.nbytes + 128, np.uint8)
    raw[offset_bytes:offset_bytes + region.nbytes] = region.view(np.uint8).reshape(-1)
    buf.copy_from_host(raw)
    out = dpm.MemoryUSMShared(16 * out_words * 4, queue=queue, alignment=64)
    out.copy_from_host(np.zeros(16 * out_words, np.uint32).view(np.uint8))
    queue.submit(program.get_sycl_kernel(name), [buf, out, ctypes.c_int(offset_bytes)], [16], [16]).wait()
    status = dpm.MemoryUSMShared(4, queue=queue)
    queue.submit(program.get_sycl_kernel("xegpu_emu_take_status"), [status], [1], [1]).wait()
    result = np.frombuffer(bytes(out.copy_to_host()), np.uint32).reshape(16, out_words)
    region_after = np.frombuffer(bytes(buf.copy_to_host()), np.uint8)[offset_bytes:offset_bytes + region.nbytes]
    return result, int(np.frombuffer(bytes(status.copy_to_host()), np.uint32)[0]), region_after


def _region16():
    rng = np.random.default_rng(1)
    return rng.integers(1, 60000, size=(H, PITCH), dtype=np.uint16)


def _element(region, x, y):
    return int(region[y, x]) if 0 <= x < W and 0 <= y < H else 0


READ = """
void __attribute__((overloadable)) intel_sub_group_2d_block_read_16b_{r}r16x{nb}c(global void*, int, int, int, int2, private ushort*);
__attribute__((intel_reqd_sub_group_size(16)))
kernel void t(global uchar* base, global uint* out, int off) {{
    ushort d[{n}];
    intel_sub_group_2d_block_read_16b_{r}r16x{nb}c(base + off, {w}, {h}, {p}, (int2)({x}, {y}), d);
    for (int i = 0; i < {n}; ++i) out[get_sub_group_local_id() * {n} + i] = d[i];
}}
"""


@pytest.mark.parametrize("rows,blocks,x,y", [(8, 1, 0, 0), (16, 2, 8, 4), (8, 2, 20, 33), (32, 1, -4, -3)])
def test_block_read_gives_lane_i_column_i(rows, blocks, x, y):
    region = _region16()
    n = rows * blocks
    src = READ.format(r=rows, nb=blocks, n=n, w=W * 2, h=H, p=PITCH * 2, x=x, y=y)
    got, status, _ = _run(src, "t", region, n)
    expected = np.array([[_element(region, x + b * 16 + lane, y + r) for b in range(blocks) for r in range(rows)]
                         for lane in range(16)], np.uint32)
    np.testing.assert_array_equal(got, expected)  # includes zeros outside the region
    assert status == 0


def test_transformed_read_packs_two_rows():
    region = _region16()
    src = """
void __attribute__((overloadable)) intel_sub_group_2d_block_read_transform_16b_32r16x2c(global void*, int, int, int, int2, private uint*);
__attribute__((intel_reqd_sub_group_size(16)))
kernel void t(global uchar* base, global uint* out, int off) {
    uint d[32];
    intel_sub_group_2d_block_read_transform_16b_32r16x2c(base, %d, %d, %d, (int2)(2, 3), d);
    for (int i = 0; i < 32; ++i) out[get_sub_group_local_id() * 32 + i] = d[i];
}""" % (W * 2, H, PITCH * 2)
    got, status, _ = _run(src, "t", region, 32)
    expected = np.array([[_element(region, 2 + b * 16 + lane, 3 + 2 * k) | _element(region, 2 + b * 16 + lane, 4 + 2 * k) << 16
                          for b in range(2) for k in range(16)] for lane in range(16)], np.uint32)
    np.testing.assert_array_equal(got, expected)
    assert status == 0


def test_transposed_read_gives_lane_i_row_i():
    region = _region16()
    words = region.view(np.uint32)  # 37 rows x 24 32-bit elements; region width 20 of them
    src = """
void __attribute__((overloadable)) intel_sub_group_2d_block_read_transpose_32b_16r8x1c(global void*, int, int, int, int2, private uint*);
__attribute__((intel_reqd_sub_group_size(16)))
kernel void t(global uchar* base, global uint* out, int off) {
    uint d[8];
    intel_sub_group_2d_block_read_transpose_32b_16r8x1c(base, %d, %d, %d, (int2)(14, 25), d);
    for (int i = 0; i < 8; ++i) out[get_sub_group_local_id() * 8 + i] = d[i];
}""" % (W * 2, H, PITCH * 2)
    got, status, _ = _run(src, "t", region, 8)

    def word(x, y):
        return int(words[y, x]) if 0 <= x < W // 2 and 0 <= y < H else 0
    expected = np.array([[word(14 + c, 25 + lane) for c in range(8)] for lane in range(16)], np.uint32)
    np.testing.assert_array_equal(got, expected)
    assert status == 0


def test_write_is_clipped_to_the_region():
    region = _region16()
    src = """
void __attribute__((overloadable)) intel_sub_group_2d_block_write_16b_8r16x1c(global void*, int, int, int, int2, private ushort*);
__attribute__((intel_reqd_sub_group_size(16)))
kernel void t(global uchar* base, global uint* out, int off) {
    ushort d[8];
    for (int r = 0; r < 8; ++r) d[r] = (ushort)(1000 * r + get_sub_group_local_id());
    intel_sub_group_2d_block_write_16b_8r16x1c(base, %d, %d, %d, (int2)(32, 33), d);
}""" % (W * 2, H, PITCH * 2)
    _, status, after = _run(src, "t", region, 1)
    after = after.view(np.uint16).reshape(H, PITCH)
    expected = region.copy()
    for r in range(8):
        for lane in range(16):
            if 32 + lane < W and 33 + r < H:
                expected[33 + r, 32 + lane] = 1000 * r + lane
    np.testing.assert_array_equal(after, expected)  # nothing past column 40 or row 37 written
    assert status == 0


@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_dpas_k16(kind):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((8, 16)).astype(np.float32)
    b = rng.standard_normal((16, 16)).astype(np.float32)
    c = rng.standard_normal((8, 16)).astype(np.float32)
    if kind == "f16":
        a16, b16 = a.astype(np.float16).view(np.uint16), b.astype(np.float16).view(np.uint16)
        a, b = a16.view(np.float16).astype(np.float64), b16.view(np.float16).astype(np.float64)
    else:
        a16 = (a.view(np.uint32) >> 16).astype(np.uint16)
        b16 = (b.view(np.uint32) >> 16).astype(np.uint16)
        a = (a16.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        b = (b16.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    # region: A (8x16 halfs), then B in VNNI (8 x 16 words), then C (8x16 floats)
    packed_b = (b16[0::2].astype(np.uint32) | (b16[1::2].astype(np.uint32) << 16))
    region = np.concatenate([a16.view(np.uint8).reshape(-1), packed_b.view(np.uint8).reshape(-1),
                             c.view(np.uint8).reshape(-1)])
    src = """
float8 __attribute__((overloadable)) intel_sub_group_%s_%s_matrix_mad_k16(short8, int8, float8);
__attribute__((intel_reqd_sub_group_size(16)))
kernel void t(global uchar* base, global uint* out, int off) {
    int lane = get_sub_group_local_id();
    global short* A = (global short*)base;
    global int* B = (global int*)(base + 256);
    global float* C = (global float*)(base + 768);
    short8 av; int8 bv; float8 cv;
    for (int m = 0; m < 8; ++m) { ((short*)&av)[m] = A[m * 16 + lane]; ((float*)&cv)[m] = C[m * 16 + lane]; }
    for (int j = 0; j < 8; ++j) ((int*)&bv)[j] = B[j * 16 + lane];
    float8 r = intel_sub_group_%s_%s_matrix_mad_k16(av, bv, cv);
    for (int m = 0; m < 8; ++m) out[lane * 8 + m] = as_uint(((float*)&r)[m]);
}""" % (kind, kind, kind, kind)
    got, status, _ = _run(src, "t", region, 8)
    result = got.view(np.float32).T  # [m, n]
    np.testing.assert_allclose(result, a @ b + c, rtol=1e-5, atol=1e-5)
    assert status == 0


@pytest.mark.parametrize("offset,pitch,width,bit", [(2, 96, 80, 1), (0, 88, 80, 4), (0, 24, 16, 2 | 4),
                                                     (0, 96, 80, 8)])
def test_constraint_violations_are_recorded(offset, pitch, width, bit):
    region = _region16()
    x = 1 if bit == 8 else 0  # an odd 16-bit x offset is not 4-byte aligned
    src = READ.format(r=8, nb=1, n=8, w=width, h=H, p=pitch, x=x, y=0)
    _, status, _ = _run(src, "t", region, 8, offset_bytes=offset)
    assert status & bit == bit
