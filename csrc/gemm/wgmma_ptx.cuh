// Thin wrappers over the Hopper (sm_90a) PTX the wgmma W4A8 GEMM uses: warpgroup MMA with A in registers
// and B in shared memory (described by a matrix descriptor), its fences/commit/wait, and the proxy fence.
// Only usable in device code compiled for sm_90a (QOQ_WGMMA_ENABLED); the operand-list macros were generated
// (one output register per accumulator).
#pragma once
#include <cstdint>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define QOQ_WGMMA_ENABLED 1
#else
#define QOQ_WGMMA_ENABLED 0
#endif

namespace qoq {
namespace wgmma {

// Shared-memory matrix descriptor of a K-major operand tile stored with the 128-byte swizzle: rows of 128
// bytes (128 int8 k values), 8-row swizzle atoms of 1024 bytes stacked densely, atom base 1024-byte aligned.
// Fields (PTX ISA "Matrix Descriptor"): start address >> 4 in bits 0-13, leading byte offset >> 4 in 16-29
// (unused by swizzled K-major layouts; 1 by convention), stride byte offset >> 4 in 32-45 (1024 B between
// 8-row groups), base offset 0 (bits 49-51, atoms are 1024-aligned), layout type 1 = 128B swizzle (62-63).
// Stepping k by 32 within the 128-byte row adds 32 bytes to the start address (the swizzle is applied by
// the hardware to the final addresses, as for any K-major swizzled tile).
__device__ __forceinline__ uint64_t make_desc_k_sw128(uint32_t smem_byte_addr) {
  return static_cast<uint64_t>((smem_byte_addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

#if QOQ_WGMMA_ENABLED
// Orders this thread's earlier register writes (A fragments, accumulators) before the next wgmma.
__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit_group() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wait_group() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Makes this thread's generic-proxy shared-memory writes (cp.async, st.shared) visible to the async proxy
// (wgmma operand reads) once a barrier follows.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Keeps the compiler from moving reads/writes of `r` across wgmma issue/wait points.
__device__ __forceinline__ void fence_operand(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }

#define QOQ_WGMMA_REGS_8 "%0, %1, %2, %3, %4, %5, %6, %7"
#define QOQ_WGMMA_REGS_16 QOQ_WGMMA_REGS_8 ", %8, %9, %10, %11, %12, %13, %14, %15"
#define QOQ_WGMMA_REGS_32 \
  QOQ_WGMMA_REGS_16 ", %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define QOQ_WGMMA_REGS_64 \
  QOQ_WGMMA_REGS_32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define QOQ_WGMMA_REGS_128 \
  QOQ_WGMMA_REGS_64 ", " \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define QOQ_WGMMA_OUTS_8(o) \
  "+r"(d[(o) + 0]), "+r"(d[(o) + 1]), "+r"(d[(o) + 2]), "+r"(d[(o) + 3]), "+r"(d[(o) + 4]), "+r"(d[(o) + 5]), \
  "+r"(d[(o) + 6]), "+r"(d[(o) + 7])
#define QOQ_WGMMA_OUTS_64(o)                                                                              \
  QOQ_WGMMA_OUTS_8(o), QOQ_WGMMA_OUTS_8((o) + 8), QOQ_WGMMA_OUTS_8((o) + 16), QOQ_WGMMA_OUTS_8((o) + 24),       \
      QOQ_WGMMA_OUTS_8((o) + 32), QOQ_WGMMA_OUTS_8((o) + 40), QOQ_WGMMA_OUTS_8((o) + 48), QOQ_WGMMA_OUTS_8((o) + 56)

// D[64 x N] += A[64 x 32] (registers, u8: the weights) * B[32 x N] (shared memory via desc_b, s8), s32
// accumulators (N / 2 a thread): wgmma_m64n{16,32,64,128,256}k32_rs, the narrow tiles' and the prefill tiles'.
// Operand numbers: the accumulators first, then the 4 A registers, the descriptor and the scale-d predicate.
#define QOQ_WGMMA_RS(N, REGS, A_OPS, DESC_OP, PRED_OP, ...)                                                        \
  __device__ __forceinline__ void wgmma_m64n##N##k32_rs(uint32_t(&d)[(N) / 2], const uint32_t(&a)[4],            \
                                                        uint64_t desc_b) {                                       \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " PRED_OP ", 0;\n"                                            \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k32.s32.u8.s8 {" REGS "}, "                             \
                 "{" A_OPS "}, " DESC_OP ", p;\n}\n"                                                               \
                 : __VA_ARGS__                                                                                   \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));                             \
  }
QOQ_WGMMA_RS(16, QOQ_WGMMA_REGS_8, "%8, %9, %10, %11", "%12", "%13", QOQ_WGMMA_OUTS_8(0))
QOQ_WGMMA_RS(32, QOQ_WGMMA_REGS_16, "%16, %17, %18, %19", "%20", "%21", QOQ_WGMMA_OUTS_8(0), QOQ_WGMMA_OUTS_8(8))
QOQ_WGMMA_RS(64, QOQ_WGMMA_REGS_32, "%32, %33, %34, %35", "%36", "%37", QOQ_WGMMA_OUTS_8(0), QOQ_WGMMA_OUTS_8(8),
             QOQ_WGMMA_OUTS_8(16), QOQ_WGMMA_OUTS_8(24))
QOQ_WGMMA_RS(128, QOQ_WGMMA_REGS_64, "%64, %65, %66, %67", "%68", "%69", QOQ_WGMMA_OUTS_64(0))
QOQ_WGMMA_RS(256, QOQ_WGMMA_REGS_128, "%128, %129, %130, %131", "%132", "%133", QOQ_WGMMA_OUTS_64(0),
             QOQ_WGMMA_OUTS_64(64))
#undef QOQ_WGMMA_RS

#endif  // QOQ_WGMMA_ENABLED

}  // namespace wgmma
}  // namespace qoq
