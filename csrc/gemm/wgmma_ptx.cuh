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
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define QOQ_WGMMA_REGS_128 \
  QOQ_WGMMA_REGS_64 ", " \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define QOQ_WGMMA_OUTS_64(o) \
  "+r"(d[(o) + 0]), "+r"(d[(o) + 1]), "+r"(d[(o) + 2]), "+r"(d[(o) + 3]), "+r"(d[(o) + 4]), "+r"(d[(o) + 5]), \
  "+r"(d[(o) + 6]), "+r"(d[(o) + 7]), "+r"(d[(o) + 8]), "+r"(d[(o) + 9]), "+r"(d[(o) + 10]), "+r"(d[(o) + 11]), \
  "+r"(d[(o) + 12]), "+r"(d[(o) + 13]), "+r"(d[(o) + 14]), "+r"(d[(o) + 15]), "+r"(d[(o) + 16]), "+r"(d[(o) + 17]), \
  "+r"(d[(o) + 18]), "+r"(d[(o) + 19]), "+r"(d[(o) + 20]), "+r"(d[(o) + 21]), "+r"(d[(o) + 22]), "+r"(d[(o) + 23]), \
  "+r"(d[(o) + 24]), "+r"(d[(o) + 25]), "+r"(d[(o) + 26]), "+r"(d[(o) + 27]), "+r"(d[(o) + 28]), "+r"(d[(o) + 29]), \
  "+r"(d[(o) + 30]), "+r"(d[(o) + 31]), "+r"(d[(o) + 32]), "+r"(d[(o) + 33]), "+r"(d[(o) + 34]), "+r"(d[(o) + 35]), \
  "+r"(d[(o) + 36]), "+r"(d[(o) + 37]), "+r"(d[(o) + 38]), "+r"(d[(o) + 39]), "+r"(d[(o) + 40]), "+r"(d[(o) + 41]), \
  "+r"(d[(o) + 42]), "+r"(d[(o) + 43]), "+r"(d[(o) + 44]), "+r"(d[(o) + 45]), "+r"(d[(o) + 46]), "+r"(d[(o) + 47]), \
  "+r"(d[(o) + 48]), "+r"(d[(o) + 49]), "+r"(d[(o) + 50]), "+r"(d[(o) + 51]), "+r"(d[(o) + 52]), "+r"(d[(o) + 53]), \
  "+r"(d[(o) + 54]), "+r"(d[(o) + 55]), "+r"(d[(o) + 56]), "+r"(d[(o) + 57]), "+r"(d[(o) + 58]), "+r"(d[(o) + 59]), \
  "+r"(d[(o) + 60]), "+r"(d[(o) + 61]), "+r"(d[(o) + 62]), "+r"(d[(o) + 63])

#define QOQ_WGMMA_OUTS_8(o) \
  "+r"(d[(o) + 0]), "+r"(d[(o) + 1]), "+r"(d[(o) + 2]), "+r"(d[(o) + 3]), "+r"(d[(o) + 4]), "+r"(d[(o) + 5]), \
  "+r"(d[(o) + 6]), "+r"(d[(o) + 7])

// D[64 x N] += A[64 x 32] (registers, u8: the weights) * B[32 x N] (shared memory via desc_b, s8), s32
// accumulators, for the narrow tiles of few activation rows (N = 16, 32, 64: N / 2 accumulators a thread).
__device__ __forceinline__ void wgmma_m64n16k32_rs(uint32_t (&d)[8], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n16k32.s32.u8.s8 {" QOQ_WGMMA_REGS_8 "}, "
               "{%8, %9, %10, %11}, %12, p;\n}\n"
               : QOQ_WGMMA_OUTS_8(0)
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}
__device__ __forceinline__ void wgmma_m64n32k32_rs(uint32_t (&d)[16], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n32k32.s32.u8.s8 {" QOQ_WGMMA_REGS_16 "}, "
               "{%16, %17, %18, %19}, %20, p;\n}\n"
               : QOQ_WGMMA_OUTS_8(0), QOQ_WGMMA_OUTS_8(8)
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}
__device__ __forceinline__ void wgmma_m64n64k32_rs(uint32_t (&d)[32], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n64k32.s32.u8.s8 {" QOQ_WGMMA_REGS_32 "}, "
               "{%32, %33, %34, %35}, %36, p;\n}\n"
               : QOQ_WGMMA_OUTS_8(0), QOQ_WGMMA_OUTS_8(8), QOQ_WGMMA_OUTS_8(16), QOQ_WGMMA_OUTS_8(24)
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}

// D[64 x 128] += A[64 x 32] (registers, u8: the weights) * B[32 x 128] (shared memory via desc_b, s8),
// s32 accumulators.
__device__ __forceinline__ void wgmma_m64n128k32_rs(uint32_t (&d)[64], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n128k32.s32.u8.s8 {" QOQ_WGMMA_REGS_64 "}, "
               "{%64, %65, %66, %67}, %68, p;\n}\n"
               : QOQ_WGMMA_OUTS_64(0)
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}

// D[64 x 256] += A[64 x 32] (registers, u8: the weights) * B[32 x 256] (shared memory via desc_b, s8),
// s32 accumulators.
__device__ __forceinline__ void wgmma_m64n256k32_rs(uint32_t (&d)[128], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n256k32.s32.u8.s8 {" QOQ_WGMMA_REGS_128 "}, "
               "{%128, %129, %130, %131}, %132, p;\n}\n"
               : QOQ_WGMMA_OUTS_64(0), QOQ_WGMMA_OUTS_64(64)
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}

#endif  // QOQ_WGMMA_ENABLED

}  // namespace wgmma
}  // namespace qoq
