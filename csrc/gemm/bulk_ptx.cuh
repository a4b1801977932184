// Thin wrappers over the sm_90 PTX of the streaming small-M GEMM, the cluster-split quantize kernel and the decode
// attention's cluster merge: shared-memory mbarriers (arrive, expected transaction bytes, parity wait), the bulk
// global->shared copy engine completing on an mbarrier, 4- and 16-byte stores into another cluster CTA's shared
// memory completing on its mbarrier, 4- and 16-byte cp.async tracked by an mbarrier, an L2 evict-first policy, and a
// named barrier. Only usable in device code compiled for sm_90 or newer (QOQ_BULK_ENABLED).
#pragma once
#include <cstdint>

#include "gemm/mma_ptx.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define QOQ_BULK_ENABLED 1
#else
#define QOQ_BULK_ENABLED 0
#endif

namespace qoq {
namespace bulk {

#if QOQ_BULK_ENABLED
using ptx::smem_addr;

// Asks L2 for `bytes` (a multiple of 16) of global memory from `src` (16-byte aligned); nothing waits for it.
__device__ __forceinline__ void prefetch_l2(const void* src, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(src), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

// Makes the initialised mbarriers visible to the copy engine (and the other threads, once a barrier follows).
__device__ __forceinline__ void fence_mbar_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(smem_addr(bar))
               : "memory");
}

// One arrival that also announces `bytes` more transaction bytes the phase must wait for.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}\n" ::"r"(
                   smem_addr(bar)),
               "r"(bytes)
               : "memory");
}

// Arms `bar` for one phase that completes once `bytes` have landed on it (st_async_cluster from the cluster's CTAs):
// the receiving side of a cluster exchange. One thread calls it; fence_mbar_init and a cluster barrier publish it.
__device__ __forceinline__ void mbar_arm_for_bytes(uint64_t* bar, uint32_t bytes) {
  mbar_init(bar, 1);
  mbar_arrive_expect_tx(bar, bytes);
}

// Returns once the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  } while (done == 0);
}

// Returns once the phase of parity `parity` has completed, acquiring at cluster scope what the other CTAs of the
// cluster released or stored into this CTA (st_async_cluster) for it.
__device__ __forceinline__ void mbar_wait_cluster(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  } while (done == 0);
}

// Stores `value` at `slot`'s offset in the shared memory of cluster CTA `rank`; the 4 bytes complete on the mbarrier
// at `bar`'s offset there (no fence and no cluster barrier: the receiver waits on its barrier's transaction count).
__device__ __forceinline__ void st_async_cluster(const void* slot, uint32_t value, uint64_t* bar, uint32_t rank) {
  asm volatile(
      "{\n.reg .b32 rslot, rbar;\nmapa.shared::cluster.u32 rslot, %0, %2;\nmapa.shared::cluster.u32 rbar, %1, %2;\n"
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [rslot], %3, [rbar];\n}\n" ::"r"(smem_addr(slot)),
      "r"(smem_addr(bar)), "r"(rank), "r"(value)
      : "memory");
}

// The same for 16 bytes (`slot` 16-byte aligned): four 32-bit words in one store.
__device__ __forceinline__ void st_async_cluster_v4(const void* slot, uint4 value, uint64_t* bar, uint32_t rank) {
  asm volatile(
      "{\n.reg .b32 rslot, rbar;\nmapa.shared::cluster.u32 rslot, %0, %2;\nmapa.shared::cluster.u32 rbar, %1, %2;\n"
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [rslot], {%3, %4, %5, %6}, [rbar];\n}\n" ::"r"(
          smem_addr(slot)),
      "r"(smem_addr(bar)), "r"(rank), "r"(value.x), "r"(value.y), "r"(value.z), "r"(value.w)
      : "memory");
}

// An L2 policy for data read once (the packed weights): evicted first, so the reused activations stay in L2.
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

// Copies `bytes` (a multiple of 16; both addresses 16-byte aligned) from global to shared memory with the bulk copy
// engine; the completed bytes count against `bar`'s expected transactions.
__device__ __forceinline__ void copy_bulk(void* dst, const void* src, uint32_t bytes, uint64_t* bar, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;\n" ::
          "r"(smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar)), "l"(policy)
      : "memory");
}

// 16-byte global -> shared copy (both addresses 16-byte aligned), cached in L2 only.
__device__ __forceinline__ void copy_16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}

// One arrival on `bar` once every earlier cp.async of this thread has landed (counted in the barrier's init count).
__device__ __forceinline__ void arrive_after_copies(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}

// Barrier `id` among `threads` threads (a multiple of 32) of the block.
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
#endif

}  // namespace bulk
}  // namespace qoq
