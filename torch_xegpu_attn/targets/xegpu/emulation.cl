// Intel-GPU-only builtins in portable OpenCL C, for running xegpu kernels on a CPU.
//
// Written from Intel's public extension specifications:
//   cl_intel_subgroup_2d_block_io                  2D block reads (plain, transposed,
//                                                  transformed), writes, prefetches
//   cl_intel_subgroup_matrix_multiply_accumulate   DPAS (f16 and bf16, K = 16)
//   cl_intel_bfloat16_conversions                  float <-> bf16
// for a sub-group of 16 work-items (the size the kernels require).
//
// 2D block messages: the region is `height` rows of `width` bytes, `pitch` bytes apart,
// starting at `base`; `coord` is (x in elements, y in rows) of the block's top-left
// element.  Reads outside the region give 0; writes outside it are dropped.  Lane i of
// the sub-group holds column i of the (transposed / transformed) block, row after row,
// and the blocks of a multi-block message follow each other in the row.
//
// The hardware faults (or reads garbage) when a message breaks its constraints; an
// emulation would not, so every message checks them here and records a violation in
// `xegpu_emu_status` (read and cleared by the kernel xegpu_emu_take_status):
//   bit 0  base address not 64-byte aligned
//   bit 1  width below 32 bytes or not a multiple of 4
//   bit 2  pitch below 32 bytes, not a multiple of 16, or below the width
//   bit 3  x offset (in bytes) not a multiple of 4
//   bit 4  width, height or pitch above 2^24

#pragma OPENCL EXTENSION cl_khr_fp16 : enable

#define SG 16

global volatile uint xegpu_emu_status = 0;

kernel void xegpu_emu_take_status(global uint* out) {
    if (get_global_id(0) == 0) {
        out[0] = xegpu_emu_status;
        xegpu_emu_status = 0;
    }
}

static void check_message(global const void* base, int width, int height, int pitch, int x, int elem_bytes) {
    uint bad = 0;
    if (((ulong)base) % 64) bad |= 1u;
    if (width < 32 || width % 4) bad |= 2u;
    if (pitch < 32 || pitch % 16 || pitch < width) bad |= 4u;
    if ((x * elem_bytes) % 4) bad |= 8u;
    if (width > (1 << 24) || height > (1 << 24) || pitch > (1 << 24)) bad |= 16u;
    if (bad) atomic_or(&xegpu_emu_status, bad);
}

// Element (x, y) of the region as raw bits (elements of 1, 2 or 4 bytes); 0 outside it.
static uint load_element(global const uchar* base, int width, int height, int pitch, int x, int y, int elem_bytes) {
    if (x < 0 || y < 0 || y >= height || (x + 1) * elem_bytes > width) return 0;
    global const uchar* p = base + (long)y * pitch + (long)x * elem_bytes;
    if (elem_bytes == 1) return *p;
    if (elem_bytes == 2) return *(global const ushort*)p;
    return *(global const uint*)p;
}

static void store_element(global uchar* base, int width, int height, int pitch, int x, int y, int elem_bytes, uint v) {
    if (x < 0 || y < 0 || y >= height || (x + 1) * elem_bytes > width) return;
    global uchar* p = base + (long)y * pitch + (long)x * elem_bytes;
    if (elem_bytes == 1) *p = (uchar)v;
    else if (elem_bytes == 2) *(global ushort*)p = (ushort)v;
    else *(global uint*)p = v;
}

// Plain read of `blocks` blocks of rows x SG elements: dst[b * rows + r] = E(x + b*SG + lane, y + r).
#define BLOCK_READ(EB, BITS, T, R, C, NB)                                                        \
    void __attribute__((overloadable, noinline)) intel_sub_group_2d_block_read_##BITS##b_##R##r##C##x##NB##c( \
        global void* base, int width, int height, int pitch, int2 coord, private T* dst) {      \
        check_message(base, width, height, pitch, coord.x, EB);                                  \
        int lane = get_sub_group_local_id();                                                     \
        for (int b = 0; b < NB; ++b)                                                             \
            for (int r = 0; r < R; ++r)                                                          \
                dst[b * R + r] = (T)load_element(base, width, height, pitch,                     \
                                                 coord.x + b * C + lane, coord.y + r, EB);       \
    }

// Transformed (VNNI) read of 16-bit elements: each 32-bit value packs two consecutive rows
// of one column, the upper row in the high half.
#define BLOCK_READ_TRANSFORM_16(R, C, NB)                                                            \
    void __attribute__((overloadable, noinline)) intel_sub_group_2d_block_read_transform_16b_##R##r##C##x##NB##c( \
        global void* base, int width, int height, int pitch, int2 coord, private uint* dst) {       \
        check_message(base, width, height, pitch, coord.x, 2);                                       \
        int lane = get_sub_group_local_id();                                                         \
        for (int b = 0; b < NB; ++b)                                                                 \
            for (int k = 0; k < R / 2; ++k) {                                                        \
                int x = coord.x + b * C + lane;                                                      \
                uint lo = load_element(base, width, height, pitch, x, coord.y + 2 * k, 2);           \
                uint hi = load_element(base, width, height, pitch, x, coord.y + 2 * k + 1, 2);       \
                dst[b * (R / 2) + k] = lo | (hi << 16);                                              \
            }                                                                                        \
    }

// Transposed read of 32-bit elements, R rows x C columns: lane i receives row i of the block
// (dst[c] = E(x + c, y + lane)); R equals the sub-group size.
#define BLOCK_READ_TRANSPOSE_32(R, C)                                                             \
    void __attribute__((overloadable, noinline)) intel_sub_group_2d_block_read_transpose_32b_##R##r##C##x1c(  \
        global void* base, int width, int height, int pitch, int2 coord, private uint* dst) {    \
        check_message(base, width, height, pitch, coord.x, 4);                                    \
        int lane = get_sub_group_local_id();                                                      \
        for (int c = 0; c < C; ++c)                                                               \
            dst[c] = load_element(base, width, height, pitch, coord.x + c, coord.y + lane, 4);    \
    }

// Write of one block of R rows x SG elements: E(x + lane, y + r) = src[r].
#define BLOCK_WRITE(EB, BITS, T, R, C)                                                            \
    void __attribute__((overloadable, noinline)) intel_sub_group_2d_block_write_##BITS##b_##R##r##C##x1c(     \
        global void* base, int width, int height, int pitch, int2 coord, private T* src) {       \
        check_message(base, width, height, pitch, coord.x, EB);                                   \
        int lane = get_sub_group_local_id();                                                      \
        for (int r = 0; r < R; ++r)                                                               \
            store_element(base, width, height, pitch, coord.x + lane, coord.y + r, EB, src[r]);   \
    }

// Prefetch: no effect on results, but its message obeys the same constraints.
#define BLOCK_PREFETCH(EB, BITS, R, C, NB)                                                          \
    void __attribute__((overloadable, noinline)) intel_sub_group_2d_block_prefetch_##BITS##b_##R##r##C##x##NB##c( \
        global void* base, int width, int height, int pitch, int2 coord) {                         \
        check_message(base, width, height, pitch, coord.x, EB);                                     \
    }

#define ROWS_16B(M) M(1) M(2) M(4) M(8) M(16) M(32)
#define READ_16B_1(R) BLOCK_READ(2, 16, ushort, R, 16, 1)
#define READ_16B_2(R) BLOCK_READ(2, 16, ushort, R, 16, 2)
#define WRITE_16B(R) BLOCK_WRITE(2, 16, ushort, R, 16)
#define PREFETCH_16B_1(R) BLOCK_PREFETCH(2, 16, R, 16, 1)
#define PREFETCH_16B_2(R) BLOCK_PREFETCH(2, 16, R, 16, 2)
ROWS_16B(READ_16B_1)
#define READ_8B_1(R) BLOCK_READ(1, 8, uchar, R, 16, 1)
ROWS_16B(READ_8B_1)
ROWS_16B(READ_16B_2)
ROWS_16B(PREFETCH_16B_1)
ROWS_16B(PREFETCH_16B_2)
#define PREFETCH_32B_1(R) BLOCK_PREFETCH(4, 32, R, 16, 1)
ROWS_16B(PREFETCH_32B_1)
WRITE_16B(1) WRITE_16B(2) WRITE_16B(4) WRITE_16B(8)
BLOCK_READ(4, 32, uint, 1, 16, 1) BLOCK_READ(4, 32, uint, 2, 16, 1) BLOCK_READ(4, 32, uint, 4, 16, 1)
BLOCK_READ(4, 32, uint, 8, 16, 1) BLOCK_READ(4, 32, uint, 16, 16, 1) BLOCK_READ(4, 32, uint, 32, 16, 1)
BLOCK_WRITE(4, 32, uint, 1, 16) BLOCK_WRITE(4, 32, uint, 2, 16) BLOCK_WRITE(4, 32, uint, 4, 16)
BLOCK_WRITE(4, 32, uint, 8, 16)
BLOCK_READ_TRANSFORM_16(16, 16, 1) BLOCK_READ_TRANSFORM_16(32, 16, 1)
BLOCK_READ_TRANSFORM_16(16, 16, 2) BLOCK_READ_TRANSFORM_16(32, 16, 2)
BLOCK_READ_TRANSPOSE_32(16, 1) BLOCK_READ_TRANSPOSE_32(16, 2) BLOCK_READ_TRANSPOSE_32(16, 4)
BLOCK_READ_TRANSPOSE_32(16, 8)

// DPAS, M = 8 rows, K = 16, N = 16 columns (one per lane).  Lane k holds A[m][k] in a[m]
// (16-bit values); lane n holds B[2j][n] | B[2j+1][n] << 16 in b[j]; acc[m] = C[m][n].
static float half_bits_to_float(ushort h) { return vload_half(0, (const private half*)&h); }
static float bf16_bits_to_float(ushort h) { return as_float(((uint)h) << 16); }

#define MAD_K16(NAME, TO_FLOAT)                                                                     \
    float8 __attribute__((overloadable, noinline)) NAME(short8 a, int8 b, float8 acc) {                       \
        short av[8] = {a.s0, a.s1, a.s2, a.s3, a.s4, a.s5, a.s6, a.s7};                            \
        int bv[8] = {b.s0, b.s1, b.s2, b.s3, b.s4, b.s5, b.s6, b.s7};                              \
        float cv[8] = {acc.s0, acc.s1, acc.s2, acc.s3, acc.s4, acc.s5, acc.s6, acc.s7};             \
        for (int m = 0; m < 8; ++m) {                                                               \
            float sum = cv[m];                                                                      \
            for (int k = 0; k < 16; ++k) {                                                          \
                ushort am = (ushort)sub_group_shuffle(av[m], (uint)k);                              \
                ushort bk = (ushort)(((uint)bv[k / 2]) >> (16 * (k % 2)));                          \
                sum = fma(TO_FLOAT(am), TO_FLOAT(bk), sum);                                         \
            }                                                                                       \
            cv[m] = sum;                                                                            \
        }                                                                                           \
        return (float8)(cv[0], cv[1], cv[2], cv[3], cv[4], cv[5], cv[6], cv[7]);                   \
    }
MAD_K16(intel_sub_group_f16_f16_matrix_mad_k16, half_bits_to_float)
MAD_K16(intel_sub_group_bf16_bf16_matrix_mad_k16, bf16_bits_to_float)

// bf16 conversions (round to nearest even; NaN stays NaN).  The kernels' LLVM IR calls
// xegpu_emu_convert_bfloat16_as_ushort where the GPU build calls the Intel builtin: llc turns
// the builtin into an instruction of SPV_INTEL_bfloat16_conversion, which the CPU runtime lacks.
ushort xegpu_emu_convert_bfloat16_as_ushort(float f) {
    uint u = as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (ushort)((u >> 16) | 0x40u);
    return (ushort)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
ushort __attribute__((overloadable)) intel_convert_bfloat16_as_ushort(float f) {
    return xegpu_emu_convert_bfloat16_as_ushort(f);
}
float __attribute__((overloadable)) intel_convert_as_bfloat16_float(ushort h) { return bf16_bits_to_float(h); }
