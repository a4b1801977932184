// Thin wrappers over the PTX instructions the W4A8 GEMM uses (sm_80+): cp.async, ldmatrix, INT8 mma.sync.
#pragma once
#include <cstdint>

namespace qoq {
namespace ptx {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; when `valid` is false nothing is read and the 16 bytes are zero-filled.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}

// The same with a shared-memory byte address and a source size (16, or 0: nothing read, 16 zero bytes).
__device__ __forceinline__ void cp_async_16_shared(uint32_t dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices (8 rows of 16 bytes each); lane l gives the row address of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_addr)));
}

// D = A(16x32, row) * B(32x8, col) + D, int32 accumulators (every partial sum fits: 255 * 128 * K < 2^31 for the
// K <= 65536 the entry points allow). The weights are the unsigned operand (UINT4 values, or the biased INT8 of
// dequant4): A in the small-M kernels (u8s8), B in the tile kernel (s8u8).
#define QOQ_MMA_16832(NAME, ATYPE, BTYPE)                                                                        \
  __device__ __forceinline__ void NAME(int32_t(&d)[4], const uint32_t(&a)[4], uint32_t b0, uint32_t b1) {       \
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32." ATYPE "." BTYPE                                       \
                 ".s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"                    \
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])                                               \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                               \
  }
QOQ_MMA_16832(mma_u8s8_16832, "u8", "s8")
QOQ_MMA_16832(mma_s8u8_16832, "s8", "u8")
#undef QOQ_MMA_16832

}  // namespace ptx
}  // namespace qoq
