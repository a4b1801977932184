// W4A8 GEMM for Hopper (sm_90a) from a few dozen rows to prefill sizes: warpgroup MMA (wgmma m64nBMk32 u8 x s8),
// INT32 accumulation over all of K, the float epilogue of docs/formats.md. The default from M = 17 per group and
// M = 33 per channel on sm_90a (wgmma_default_min_m; QOQ_GEMM_WGMMA overrides, see w4a8_gemm.cu), with the narrow
// tiles (BM = 32 or 64 activation rows, memory-bound) up to M = 128 and BM = 128 above.
//
// The product is computed transposed, out^T[n, m] = W8'[n, :] . X[m, :], so that the dequantized weights are
// the wgmma A operand, taken from registers (no shared-memory round trip for the INT8 weights), and the
// activations are the B operand, read by the tensor cores from shared memory:
// - CTA tile: 128 weight rows (n) x BM activation rows (m) x 128 k; two consumer warpgroups, each owning 64
//   weight rows (one wgmma m64 tile), all 256 threads also issue the cp.async loads (no producer warp).
// - A operand (weights): the packed v2 layout makes ldmatrix.x4 of the packed rows deliver to lane (g, t)
//   the word with k 4t..4t+3 (low nibbles) and 16+4t..16+4t+3 (high nibbles) of rows g and g+8, which is
//   exactly the wgmma/mma.m16n8k32 A fragment {row g k 4t, row g+8 k 4t, row g k 16+4t, row g+8 k 16+4t}:
//   unpacking is a mask and a shift. Per channel the UINT4 values are the u8 operand (the zero point is the
//   epilogue's x_sum term). Per group the operand is the biased INT8 weight (w4 - z2) * s2 + 128, one
//   instruction for four weights (dequant4: a multiply-add that is carry-free by the format's guarantee), and
//   the epilogue takes 128 * x_sum off the INT32 sum, as per channel it takes zero * x_sum. The scales of the
//   tile's 128 weight rows and two 64-wide k halves ride in its pipeline stage, copied with 16-byte cp.async from the
//   packed scales (ops.pack_scales: per weight tile and group 256 bytes, one 32-bit word per pair of fragment rows g,
//   g + 8 with their s2 and 240 - z2 * s2, from which the dequantization constant (128 - z2 * s2) * 0x01010101 is a
//   byte permute and an add: one shared-memory load a half for both rows); with group_size % 128 == 0 both
//   halves lie in one group, and only the first half's are copied and read (ONE_GROUP).
// - B operand (activations): K-major, 128-byte rows (BK = 128 int8), 128-byte swizzle, one descriptor per
//   k step of 32 (start address + 32 bytes).
// - Pipeline: STAGES shared-memory stages filled by cp.async (running source pointers, one destination offset
//   per operand): 4 with two CTAs an SM, or 8 with one where the grid has at most one CTA an SM (w4a8_gemm.cu,
//   wgmma128_takes_deep_pipeline); a stage is refilled two iterations after it was read (a k tile's four wgmmas
//   are one commit group, which the next tile waits for before it builds its fragments, so everything issued two
//   iterations ago has completed before the barrier that precedes the refill).
// - Split-K (grid z, when the output tiles alone leave SMs idle: decode batches, prefill of a few hundred tokens):
//   each split sums its k tiles and stores its INT32 accumulators in fragment order; the last split of a tile to finish
//   (an atomic counter) adds the others' and runs the zero-point terms and the epilogue. INT32 sums are exact
//   in any order, so the result does not depend on the split count.
// - Stream-K (kStreamK, per group's deep-K grids that fill the SMs unevenly, w4a8_gemm.cu): equal shares of the
//   (weight tile, k tile) pairs in a row, each share's pieces merged as split K's are (see KPartition).
// - Epilogue: float math in registers, 16-bit results staged in shared memory, coalesced 16-byte stores.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common.cuh"
#include "gemm/bulk_ptx.cuh"
#include "gemm/mma_ptx.cuh"
#include "gemm/w4a8_gemm_kernel.cuh"
#include "gemm/wgmma_ptx.cuh"

namespace qoq {

template <int BM, int STAGES>
struct WgmmaTile {
  static constexpr int kThreads = 256;              // two consumer warpgroups
  static constexpr int kBN = 128, kBK = 128;        // weight rows, k per stage
  static constexpr int kAStage = BM * kBK;          // activations, int8, swizzled 128-byte rows
  static constexpr int kWStage = kBN * kBK / 2;     // packed weights, 64-byte rows
  static constexpr int kStageBytes = kAStage + kWStage;
  static constexpr int kOutPitch = kBN + 8;         // 16-bit elements per staged output row (+16 B: no bank conflicts)
  static constexpr int kOutBytes = BM * kOutPitch * 2;
  static constexpr int kPipeBytes = STAGES * kStageBytes;
  // Per group: the packed scales (ops.pack_scales, 256 bytes for the 128 weight rows) of both 64-wide k halves.
  static constexpr int kScaleStage = 2 * 256;
  static constexpr int kScaleBytes = STAGES * kScaleStage;
  static constexpr int kLoopBytes = kPipeBytes + kScaleBytes;
  // +1024: the kernel aligns its base to the 1024-byte swizzle atom itself.
  static constexpr int kSmemBytes = (kLoopBytes > kOutBytes ? kLoopBytes : kOutBytes) + 1024;
  static constexpr int kPrefetch = STAGES - 2;      // tiles in flight beyond the one being computed
  static_assert(BM == 16 || BM == 32 || BM == 64 || BM == 128 || BM == 256,
                "wgmma N (activation rows per CTA) must be 16, 32, 64, 128 or 256");
  static_assert(STAGES >= 3, "the refill-two-iterations-later scheme needs >= 3 stages");
  static_assert(kAStage % 1024 == 0 && kStageBytes % 1024 == 0, "stages must keep 1024-byte alignment");
};

#if QOQ_WGMMA_ENABLED
template <int BM>
__device__ __forceinline__ void wgmma_rs(uint32_t (&d)[BM / 2], const uint32_t (&a)[4], uint64_t desc) {
  if constexpr (BM == 16) {
    wgmma::wgmma_m64n16k32_rs(d, a, desc);
  } else if constexpr (BM == 32) {
    wgmma::wgmma_m64n32k32_rs(d, a, desc);
  } else if constexpr (BM == 64) {
    wgmma::wgmma_m64n64k32_rs(d, a, desc);
  } else if constexpr (BM == 128) {
    wgmma::wgmma_m64n128k32_rs(d, a, desc);
  } else {
    wgmma::wgmma_m64n256k32_rs(d, a, desc);
  }
}
#endif

// Barriers of the code after the K loop: the whole block, or (warp-specialised kernel) only its 256 consumer
// threads, named barrier 1 (the producer warpgroup has left by then).
struct BlockSync {
  __device__ static void sync() { __syncthreads(); }
};
struct ConsumerSync {
  __device__ static void sync() { asm volatile("bar.sync 1, 256;\n" ::: "memory"); }
};

// Per group: the scale group of one 64-wide k half through successive 128-wide k tiles, without a division per
// tile (group_size % 64 == 0, so a half never straddles two groups).
struct GroupCursor {
  int group, offset;  // the half's group, and its first k minus the group's first k
  __device__ GroupCursor(int k, int group_size) : group(k / group_size), offset(k - k / group_size * group_size) {}
  __device__ void next_tile(int group_size) {
    offset += 128;
    while (offset >= group_size) {
      offset -= group_size;
      ++group;
    }
  }
};

// Per group: the source of one 16-byte chunk of a k tile's packed scales (ops.pack_scales: 256 bytes per weight
// tile and group), for 64-wide half `half` of successive k tiles: thread `lane16 + 16 * half` of the loading
// threads copies chunk lane16 of that half's group into the stage's half slot.
struct PackedScaleSource {
  const uint8_t* tile_base;  // this weight tile's groups, plus the thread's chunk
  GroupCursor cursor;
  __device__ PackedScaleSource(const GemmParams& p, int weight_tile, int half, int lane16, int first_ktile,
                               int group_size)
      : tile_base(p.packed_scales + static_cast<size_t>(weight_tile) * p.groups * 256 + 16 * lane16),
        cursor(first_ktile * 128 + 64 * half, group_size) {}
  __device__ __forceinline__ const uint8_t* next(int group_size) {  // this tile's chunk, then advance a tile
    const uint8_t* src = tile_base + cursor.group * 256;
    cursor.next_tile(group_size);
    return src;
  }
};

#if QOQ_WGMMA_ENABLED
// Per group: the dequantization constants of this thread's weight rows (row_local, row_local + 8, with
// row_local % 16 < 8) for both 64-wide k halves of a tile, from the packed scales at `scales` ([half][256 bytes of
// ops.pack_scales]), whose 32-bit word a half holds both rows': one load and a byte permute and an add a row, or
// (BYTE_LOADS) its four bytes loaded one by one and a multiply-add a row.
// ONE_GROUP (group_size % 128 == 0): both halves lie in one group, so the second half's scales are not read.
// H100 layer chain, docs/benchmarks.md: the word load made per group 1-1.6% faster at M = 384 (128-row kernel, two
// CTAs an SM, whose warps wait on shared-memory loads); in the 256-row warp-specialised kernel it made the consumer
// loop 7 instructions longer and M = 768-1024 2.6% slower, so that kernel loads the bytes (as before the word).
template <bool ONE_GROUP = false, bool BYTE_LOADS = false>
__device__ __forceinline__ void load_group_dequant(GroupDequant (&dq)[2][2], const uint8_t* scales, int row_local) {
  const int word = 32 * (row_local >> 4) + 4 * (row_local & 7);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (ONE_GROUP && h == 1) {
      dq[0][1] = dq[0][0];
      dq[1][1] = dq[1][0];
      continue;
    }
    const uint8_t* at = scales + 256 * h + word;
    if constexpr (BYTE_LOADS) {
      dq[0][h] = make_group_dequant_packed(at[0], at[2]);
      dq[1][h] = make_group_dequant_packed(at[1], at[3]);
    } else {
      make_group_dequant_pair(*reinterpret_cast<const uint32_t*>(at), dq[0][h], dq[1][h]);
    }
  }
}

// The packed weight words of a k tile's 4 k steps by ldmatrix: [step][0] rows g, [step][1] rows g + 8 (lane t's
// word of each block).
__device__ __forceinline__ void load_packed_weights(uint32_t (&packed)[4][2], const uint8_t* w_stage, int wg,
                                                    int warp_in_wg, int lane) {
#pragma unroll
  for (int pair = 0; pair < 2; ++pair) {
    const int row = wg * 64 + warp_in_wg * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
    const int chunk = 2 * pair + (lane >> 4);
    uint32_t r[4];
    ptx::ldmatrix_x4(r, w_stage + swizzle<64>(row, chunk));
    packed[2 * pair][0] = r[0];
    packed[2 * pair][1] = r[1];
    packed[2 * pair + 1][0] = r[2];
    packed[2 * pair + 1][1] = r[3];
  }
}

// The A fragment of k step ks from its packed words: unpacked (per channel the UINT4 values 0..15 are already valid
// u8 operands) or, per group, dequantized to the biased INT8 weights.
template <bool PER_GROUP>
__device__ __forceinline__ void make_fragment(uint32_t (&frag)[4], const uint32_t (&packed)[2],
                                              const GroupDequant (&dq)[2][2], int ks) {
  uint32_t lo0 = packed[0] & 0x0F0F0F0Fu, lo1 = packed[1] & 0x0F0F0F0Fu;
  uint32_t hi0 = (packed[0] >> 4) & 0x0F0F0F0Fu, hi1 = (packed[1] >> 4) & 0x0F0F0F0Fu;
  if constexpr (PER_GROUP) {
    const int h = ks >> 1;  // k 32*ks..32*ks+31 lies in 64-wide half h, inside one scale group
    lo0 = dequant4(lo0, dq[0][h]);
    hi0 = dequant4(hi0, dq[0][h]);
    lo1 = dequant4(lo1, dq[1][h]);
    hi1 = dequant4(hi1, dq[1][h]);
  }
  frag[0] = lo0;  // row g,     k 4t..4t+3
  frag[1] = lo1;  // row g + 8, k 4t..4t+3
  frag[2] = hi0;  // row g,     k 16+4t..16+4t+3
  frag[3] = hi1;  // row g + 8, k 16+4t..16+4t+3
}

// One 128-wide k tile of the warp-specialised kernel's K loop (w4a8_gemm_wgmma_ws.cuh) for this thread's warpgroup
// (64 weight rows, BM activation rows): its packed weights by ldmatrix from `w_stage`, unpacked (per group:
// dequantized with the packed scales at `scales`, [half][256 bytes of ops.pack_scales]) into the register A
// operand, and four wgmma k steps against the activations at shared address `a_base`. At most one wgmma stays in
// flight (wait_group<1> after each), so the call returns with this tile's last step possibly running;
// after_first_step() runs once the first step's wait has retired every MMA of the previous tile.
template <int BM, bool PER_GROUP, class AfterFirstStep>
__device__ __forceinline__ void mma_k_tile(uint32_t (&acc)[BM / 2], const uint8_t* w_stage, uint32_t a_base,
                                           const uint8_t* scales, int wg, int warp_in_wg, int lane,
                                           AfterFirstStep&& after_first_step) {
  const int g = lane >> 2;
  const int row_local = wg * 64 + warp_in_wg * 16 + g;
  GroupDequant dq[2][2];  // [row g, g + 8][64-wide half]
  if constexpr (PER_GROUP) load_group_dequant</*ONE_GROUP=*/false, /*BYTE_LOADS=*/true>(dq, scales, row_local);
  uint32_t packed[4][2];
  load_packed_weights(packed, w_stage, wg, warp_in_wg, lane);

#pragma unroll
  for (int ks = 0; ks < 4; ++ks) {
    uint32_t frag[4];
    make_fragment<PER_GROUP>(frag, packed[ks], dq, ks);
#pragma unroll
    for (int i = 0; i < 4; ++i) wgmma::fence_operand(frag[i]);
#pragma unroll
    for (int i = 0; i < BM / 2; ++i) wgmma::fence_operand(acc[i]);
    wgmma::fence();
    wgmma_rs<BM>(acc, frag, wgmma::make_desc_k_sw128(a_base + 32 * ks));
    wgmma::commit_group();
#pragma unroll
    for (int i = 0; i < BM / 2; ++i) wgmma::fence_operand(acc[i]);
    wgmma::wait_group<1>();  // the previous step's MMA is done: its fragment registers may be reused
    if (ks == 0) after_first_step();
#pragma unroll
    for (int i = 0; i < 4; ++i) wgmma::fence_operand(frag[i]);
  }
}
#endif

#if QOQ_WGMMA_ENABLED
// The k tile of w4a8_gemm_wgmma_kernel (the 16- to 128-row tiles): the four k steps go out back to back as one
// commit group, so the tensor cores pipeline them. All four fragments are built first, in `frag`, after waiting for
// the previous call's group (which read `frag`); the ldmatrix loads of this tile are issued before that wait, so they
// overlap the previous tile's MMAs. Returns with this tile's group in flight. (Two alternating fragment sets waited
// for with wait_group<1> made ptxas serialize the wgmmas, C7513, even with the fragments fenced after the wait.)
// H100, docs/benchmarks.md: against mma_k_tile's one wgmma in flight behind another, 1-4% faster a layer chained at
// M = 33-128 (narrow tiles) and +0.7-0.9% decode tok/s end to end at batch 256 (128-row tile).
template <int BM, bool PER_GROUP, bool ONE_GROUP>
__device__ __forceinline__ void mma_k_tile_batched(uint32_t (&acc)[BM / 2], uint32_t (&frag)[4][4],
                                                   const uint8_t* w_stage, uint32_t a_base, const uint8_t* scales,
                                                   int wg, int warp_in_wg, int lane) {
  const int g = lane >> 2;
  const int row_local = wg * 64 + warp_in_wg * 16 + g;
  GroupDequant dq[2][2];
  if constexpr (PER_GROUP) load_group_dequant<ONE_GROUP>(dq, scales, row_local);
  uint32_t packed[4][2];
  load_packed_weights(packed, w_stage, wg, warp_in_wg, lane);
  wgmma::wait_group<0>();  // the previous tile's group, which read `frag`
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) {  // nothing below may move above the wait
    wgmma::fence_operand(packed[ks][0]);
    wgmma::fence_operand(packed[ks][1]);
#pragma unroll
    for (int i = 0; i < 4; ++i) wgmma::fence_operand(frag[ks][i]);
  }
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) make_fragment<PER_GROUP>(frag[ks], packed[ks], dq, ks);
#pragma unroll
  for (int ks = 0; ks < 4; ++ks)
#pragma unroll
    for (int i = 0; i < 4; ++i) wgmma::fence_operand(frag[ks][i]);
#pragma unroll
  for (int i = 0; i < BM / 2; ++i) wgmma::fence_operand(acc[i]);
  wgmma::fence();
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) wgmma_rs<BM>(acc, frag[ks], wgmma::make_desc_k_sw128(a_base + 32 * ks));
  wgmma::commit_group();
#pragma unroll
  for (int i = 0; i < BM / 2; ++i) wgmma::fence_operand(acc[i]);
}
#endif

// Output tile (activation-row tile, weight-row tile) of the CTA at launch index `linear` (grouped_tile: of this CTA
// of a grid (m tiles, n tiles)). CTAs start roughly in launch order; taken as is, one wave of a long prefill streams all M activation rows once
// per few weight tiles, more than L2 holds from M = 16384 on. Grouped order: groups of kRasterRows activation rows,
// inside a group the m tiles first, then the next weight tile; with M <= kRasterRows this is the launch order.
template <int BM>
__device__ __forceinline__ int2 tile_coords(int linear, int m_tiles, int n_tiles) {
  constexpr int kRasterRows = 4096, kGroupTiles = kRasterRows / BM;
  const int per_group = kGroupTiles * n_tiles;
  const int first_m = linear / per_group * kGroupTiles;
  const int group_m = min(m_tiles - first_m, kGroupTiles);
  const int in_group = linear - linear / per_group * per_group;
  return make_int2(first_m + in_group % group_m, in_group / group_m);
}
template <int BM>
__device__ __forceinline__ int2 grouped_tile() {  // grid (m tiles, n tiles)
  return tile_coords<BM>(static_cast<int>(blockIdx.y * gridDim.x + blockIdx.x), static_cast<int>(gridDim.x),
                         static_cast<int>(gridDim.y));
}

// Split-K and stream-K: stores this piece's accumulators (fragment order: coalesced 1 KB rows) in slot `slot` of
// output tile `tile`'s `slots` slots, then returns true in the last of the tile's `pieces` pieces to finish, with
// the others' partial sums added to acc; false in the others. `tid` 0..255 are the threads that hold accumulators,
// Sync their barrier, `last` a shared int that nothing else writes until every one of them has returned.
template <int BM, class Sync>
__device__ __forceinline__ bool merge_k_partials(const GemmParams& p, uint32_t (&acc)[BM / 2], int tid, int* last,
                                                 int tile, int slot, int pieces, int slots) {
  constexpr int kWords = BM / 2 * 256;  // one piece's accumulators
  uint32_t* partials = reinterpret_cast<uint32_t*>(p.workspace) + static_cast<size_t>(tile) * slots * kWords;
  uint32_t* mine = partials + static_cast<size_t>(slot) * kWords;
#pragma unroll
  for (int i = 0; i < BM / 2; ++i) __stcg(mine + i * 256 + tid, acc[i]);
  Sync::sync();
  if (tid == 0) {
    // One acquire-release atomic: it releases the partials every thread stored before the barrier (device-wide,
    // before the counter moves) and, in the last piece, acquires the others' for the loads after the next barrier.
    // (A __threadfence in every thread instead: a MEMBAR.SC.GPU each.)
    uint32_t before;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;\n" : "=r"(before) : "l"(p.counters + tile) : "memory");
    const bool is_last = static_cast<int>(before) == pieces - 1;
    *last = is_last;
    if (is_last) p.counters[tile] = 0;  // every piece has counted: leave the counter at zero for the next GEMM
  }
  Sync::sync();
  if (!*last) return false;
  for (int z = 0; z < pieces; ++z) {
    if (z == slot) continue;
    const uint32_t* other = partials + static_cast<size_t>(z) * kWords;
#pragma unroll
    for (int i = 0; i < BM / 2; ++i) acc[i] += __ldcg(other + i * 256 + tid);
  }
  return true;
}

// Split-K (grid z): the piece of output tile blockIdx.(x, y) that split blockIdx.z computed; see merge_k_partials.
template <int BM, class Sync>
__device__ __forceinline__ bool merge_split_partials(const GemmParams& p, uint32_t (&acc)[BM / 2], int tid,
                                                     int* last) {
  return merge_k_partials<BM, Sync>(p, acc, tid, last, blockIdx.y * gridDim.x + blockIdx.x, blockIdx.z, p.splits,
                                    p.splits);
}

#if QOQ_WGMMA_ENABLED
// After the K loop (all MMAs done, the pipeline's shared memory free): the float epilogue of docs/formats.md for
// this thread's accumulators (weight rows row_local, row_local + 8 of the CTA's 128), staged in shared memory and
// stored in coalesced 16-byte chunks (with the residual when given).
// `tid` 0..255 are the threads that hold accumulators; Sync is their barrier.
template <int BM, int STAGES, bool PER_GROUP, class Sync>
__device__ __forceinline__ void wgmma_epilogue(const GemmParams& p, uint32_t (&acc)[BM / 2], uint8_t* smem, int m0,
                                               int n0, int row_local, int g, int t, int tid) {
  using T = WgmmaTile<BM, STAGES>;
  constexpr int BN = T::kBN;
  const int n_rows[2] = {min(n0 + row_local, p.N - 1), min(n0 + row_local + 8, p.N - 1)};

  // Accumulator d[4i + 2h + e]: weight row g + 8h, activation row 8i + 2t + e (wgmma D fragment layout).
  uint16_t* out_tile = reinterpret_cast<uint16_t*>(smem);
  float w_scale[2], w_bias[2];
  int32_t w_zero[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    w_scale[h] = __half2float(p.wscale[n_rows[h]]);
    w_bias[h] = load_bias(p, n_rows[h]);
    w_zero[h] = static_cast<int32_t>(weight_zero<PER_GROUP>(p, n_rows[h]));
  }
#pragma unroll
  for (int i = 0; i < BM / 8; ++i)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int m_local = 8 * i + 2 * t + e;
      const int m = min(m0 + m_local, p.M - 1);  // rows past M are computed but never stored
      const float xs = p.x_s[m];
      const int32_t x_sum = p.x_sum[m];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int32_t a = static_cast<int32_t>(acc[4 * i + 2 * h + e]) - w_zero[h] * x_sum;
        float y = __fmul_rn(__fmul_rn(__int2float_rn(a), xs), w_scale[h]);
        if (p.bias_kind != kNoBias) y = __fadd_rn(y, w_bias[h]);
        const uint16_t bits = p.out_bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(y))
                                         : __half_as_ushort(__float2half_rn(y));
        out_tile[m_local * T::kOutPitch + row_local + 8 * h] = bits;
      }
    }
  Sync::sync();
  uint16_t* out = static_cast<uint16_t*>(p.out);
#pragma unroll
  for (int it = 0; it < BM * (BN / 8) / T::kThreads; ++it) {  // BM rows x 16 chunks of 8 outputs
    const int i = tid + it * T::kThreads;
    const int m_local = i >> 4, chunk = i & 15;
    const int m = m0 + m_local, n = n0 + 8 * chunk;
    if (m < p.M && n < p.N) {  // N % 16 == 0: a chunk of 8 is entirely in or out
      const size_t idx = static_cast<size_t>(m) * p.N + n;
      uint4 v = *reinterpret_cast<const uint4*>(out_tile + m_local * T::kOutPitch + 8 * chunk);
      if (p.residual != nullptr) {  // the tile holds y already rounded: with_residual's rounding of it is exact
        uint16_t* y = reinterpret_cast<uint16_t*>(&v);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (p.out_bf16) {
            y[j] = __bfloat16_as_ushort(
                __float2bfloat16_rn(with_residual(p, idx + j, __bfloat162float(__ushort_as_bfloat16(y[j])))));
          } else {
            y[j] = __half_as_ushort(__float2half_rn(with_residual(p, idx + j, __half2float(__ushort_as_half(y[j])))));
          }
        }
      }
      *reinterpret_cast<uint4*>(out + idx) = v;
    }
  }
}
#endif

// Returns QOQ_WGMMA_ENABLED as compiled for the running device (0 on builds without an sm_90a image).
__global__ void wgmma_probe_kernel(int* out) { *out = QOQ_WGMMA_ENABLED; }

// How the wgmma kernel divides K among its CTAs:
// - kWholeK: one CTA an output tile (grid x, y: m tiles, n tiles);
// - kSplitK: grid z splits every tile's k tiles into p.splits equal pieces (p.ktiles_per_split each);
// - kStreamK: groups of m-tiles CTAs (gridDim.x = groups * m tiles) take equal shares of the (n tile, k tile) pairs
//   in a row, each CTA of a group for its m tile, so that a share may end part-way through one tile and go on with
//   the next; the pieces of a tile are merged like split K's, by the last to finish. Where the output tiles fill the
//   SMs unevenly (96 or 160 tiles of 128 x 128 on 132 SMs) every CTA still gets the same k work;
// - kTailSplit (the 256-row kernel, grid x only): whole tiles for the full waves, and the tiles of the last, partial
//   wave split in K (tail_split_piece).
enum KPartition : int { kWholeK = 0, kSplitK = 1, kStreamK = 2, kTailSplit = 3 };

// One CTA's share of a kTailSplit grid: output tile `tile` (linear, see tile_coords), k tiles kt0 .. kt0 + nk - 1,
// piece `slot` of `pieces`, its partials and counter at index `partial` (the tail tile's index).
struct KPiece {
  int tile, kt0, nk, slot, pieces, partial;
};
// kTailSplit: of `tiles` output tiles, the last `tail` are split in K into p.splits pieces of p.ktiles_per_split k
// tiles, so the grid is tiles + tail * (p.splits - 1) CTAs (from which `tail` is derived); CTAs 0 .. tiles - tail - 1
// take whole tiles. The split CTAs come last in launch order, so they run once the full waves' CTAs leave SMs.
__device__ __forceinline__ KPiece tail_split_piece(const GemmParams& p, int tiles, int ktiles) {
  const int cta = static_cast<int>(blockIdx.x);
  const int tail = (static_cast<int>(gridDim.x) - tiles) / (p.splits - 1), whole = tiles - tail;
  if (cta < whole) return {cta, 0, ktiles, 0, 1, 0};
  const int r = cta - whole, slot = r % p.splits, kt0 = slot * p.ktiles_per_split;
  return {whole + r / p.splits, kt0, min(ktiles - kt0, p.ktiles_per_split), slot, p.splits, r / p.splits};
}

// Stream-K: the first of the flattened iterations that group `group` of `groups` takes (group = groups: the end).
__host__ __device__ __forceinline__ int64_t stream_k_begin(int group, int groups, int64_t iterations) {
  return static_cast<int64_t>(group) * iterations / groups;
}
// Stream-K: the group whose share holds iteration `it` (the largest g with stream_k_begin(g) <= it).
__host__ __device__ __forceinline__ int stream_k_group_of(int64_t it, int groups, int64_t iterations) {
  return static_cast<int>(((it + 1) * groups - 1) / iterations);
}

#if QOQ_WGMMA_ENABLED
// The K loop of one piece of an output tile: k tiles kt0 .. kt0 + nk - 1 of weight rows n0.. (weight tile
// `weight_tile`) against activation rows m0.., summed into acc (zeroed first). Returns with every MMA done and the
// pipeline's shared memory free for reuse.
template <int BM, int STAGES, bool PER_GROUP, bool ONE_GROUP>
__device__ __forceinline__ void wgmma_k_loop(const GemmParams& p, uint8_t* smem, uint32_t (&acc)[BM / 2], int m0,
                                             int n0, int weight_tile, int kt0, int nk) {
  using T = WgmmaTile<BM, STAGES>;
  constexpr int BK = T::kBK, BN = T::kBN, D = T::kPrefetch;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2, warp_in_wg = warp & 3;

  auto stage_a = [&](int s) { return smem + s * T::kStageBytes; };
  auto stage_w = [&](int s) { return smem + s * T::kStageBytes + T::kAStage; };
  auto stage_scales = [&](int s) { return smem + T::kPipeBytes + s * T::kScaleStage; };

  // This thread's cp.async sources, as running pointers (load_activations and load_weights are each called for
  // kt = 0, 1, 2, ... in order), and destinations (byte offsets inside a stage): BM activation rows x 8 chunks of
  // 16 bytes, 128 weight rows x 4 chunks of 16; rows past M / N read row 0 with size 0 (zero-filled).
  // Fewer than 32 activation rows (BM * 8 < 256 chunks): only the first BM * 8 threads copy activations.
  constexpr int kALoads = BM * 8 >= T::kThreads ? BM * 8 / T::kThreads : 1, kWLoads = BN * 4 / T::kThreads;
  const bool a_loader = BM * 8 >= T::kThreads || tid < BM * 8;
  // Load `it` covers row (tid >> 3) + 32 it (activations) or (tid >> 2) + 64 it (weights), and the swizzles depend
  // on the row only through row % 8, so one destination per operand plus a fixed stride.
  const uint32_t a_dst = swizzle<128>(tid >> 3, tid & 7);  // = the wgmma 128-byte swizzle
  const uint32_t w_dst = T::kAStage + swizzle<64>(tid >> 2, tid & 3);
  const int8_t* a_src[kALoads];
  uint32_t a_ok = 0, w_ok = 0;  // bit it: the row exists
#pragma unroll
  for (int it = 0; it < kALoads; ++it) {
    const int row = (tid >> 3) + 32 * it;
    const bool ok = a_loader && m0 + row < p.M;
    a_src[it] = p.x_q + static_cast<size_t>(ok ? m0 + row : 0) * p.K + kt0 * BK + (tid & 7) * 16;
    a_ok |= static_cast<uint32_t>(ok) << it;
  }
  const uint8_t* w_src[kWLoads];
#pragma unroll
  for (int it = 0; it < kWLoads; ++it) {
    const int row = (tid >> 2) + 64 * it;
    const bool ok = n0 + row < p.N;
    w_src[it] = p.qweight + static_cast<size_t>(ok ? n0 + row : 0) * (p.K / 2) + kt0 * (BK / 2) + (tid & 3) * 16;
    w_ok |= static_cast<uint32_t>(ok) << it;
  }
  // Per group: threads 0..31 copy each k tile's packed scales (16 bytes each, two 64-wide halves) into its stage;
  // ONE_GROUP: threads 0..15, the first half's.
  const bool scale_loader = PER_GROUP && tid < (ONE_GROUP ? 16 : 32);
  PackedScaleSource scale_src(p, PER_GROUP ? weight_tile : 0, (tid >> 4) & 1, tid & 15, kt0,
                              PER_GROUP ? p.group_size : 128);
  const uint32_t smem_base = ptx::smem_addr(smem);

  auto load_activations = [&](int s) {
    const uint32_t stage = smem_base + s * T::kStageBytes;
#pragma unroll
    for (int it = 0; it < kALoads; ++it) {
      if (a_loader) ptx::cp_async_16_shared(stage + a_dst + it * 32 * BK, a_src[it], (a_ok >> it & 1) * 16);
      a_src[it] += BK;
    }
  };
  auto load_weights = [&](int s) {
    const uint32_t stage = smem_base + s * T::kStageBytes;
#pragma unroll
    for (int it = 0; it < kWLoads; ++it) {
      ptx::cp_async_16_shared(stage + w_dst + it * 64 * (BK / 2), w_src[it], (w_ok >> it & 1) * 16);
      w_src[it] += BK / 2;
    }
    if (scale_loader) ptx::cp_async_16_shared(smem_base + T::kPipeBytes + s * T::kScaleStage + 16 * tid,
                                              scale_src.next(p.group_size), 16);
  };

#pragma unroll
  for (int i = 0; i < BM / 2; ++i) acc[i] = 0;

  // L2 prefetch of the weights, l2_prefetch_tiles k tiles beyond the stage copies (which keep only D tiles in
  // flight): threads 0..127 ask for their weight row's next kL2Chunk tiles (64 bytes a tile) every kL2Chunk tiles,
  // within this split's k range; the first window (tiles D .. ahead - 1) before the PDL wait.
  constexpr int kL2Chunk = 4;
  const int ahead = D + p.l2_prefetch_tiles;
  const bool l2_loader = p.l2_prefetch_tiles > 0 && tid < BN && n0 + tid < p.N;
  const uint8_t* l2_row = p.qweight + static_cast<size_t>(min(n0 + tid, p.N - 1)) * (p.K / 2) + kt0 * (BK / 2);
  auto prefetch_weights = [&](int first, int count) {  // tiles first .. first + count - 1 of this split
    count = min(count, nk - first);
    if (l2_loader && count > 0) bulk::prefetch_l2(l2_row + first * (BK / 2), count * (BK / 2));
  };
  prefetch_weights(D, ahead - D);

  // The first D tiles' weights (and scales) do not depend on the previous kernel: under PDL they are copied
  // before its results are waited for, as one cp.async group older than every later one, so that the waits
  // below count the same groups.
#pragma unroll
  for (int s = 0; s < D; ++s)
    if (s < nk) load_weights(s);
  ptx::cp_async_commit();
  pdl_wait();  // PDL (common.cuh): the activations are the previous kernel's output
#pragma unroll
  for (int s = 0; s < D; ++s) {
    if (s < nk) load_activations(s);
    ptx::cp_async_commit();
  }
  auto next_tile = [&](int kt) {  // tile kt's stage is ready to read, and tile kt + D's copies are issued
    ptx::cp_async_wait<D - 1>();          // this thread's copies of tile kt have landed
    wgmma::fence_proxy_async_shared();    // ... and are visible to the tensor cores' (async proxy) reads
    __syncthreads();                      // everyone's copies; every MMA of tile kt - 2 has completed
    if (kt + D < nk) {  // tile kt + D, into the stage tile kt - 2 used
      load_activations((kt + D) % STAGES);
      load_weights((kt + D) % STAGES);
    }
    ptx::cp_async_commit();
    if (kt % kL2Chunk == 0) prefetch_weights(kt + ahead, kL2Chunk);
  };
  // Each k tile's four wgmmas go out as one group (mma_k_tile_batched), which the next tile waits for before it
  // rewrites `frag`; so every MMA of tile kt - 1 has completed before the barrier of tile kt + 1 and the refill
  // after it (stage of tile kt - 1), as the refill-two-iterations-later scheme needs.
  uint32_t frag[4][4];
  for (int kt = 0; kt < nk; ++kt) {
    const int s = kt % STAGES;
    next_tile(kt);
    mma_k_tile_batched<BM, PER_GROUP, ONE_GROUP>(acc, frag, stage_w(s), ptx::smem_addr(stage_a(s)), stage_scales(s),
                                                 wg, warp_in_wg, lane);
  }
  wgmma::wait_group<0>();
#pragma unroll
  for (int i = 0; i < BM / 2; ++i) wgmma::fence_operand(acc[i]);
  ptx::cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory is reused below (output tile)
}
#endif

// SPLIT_K / STREAM_K (K_PART): separate instantiations, so that the unsplit kernel keeps its K loop: with the split
// offsets and the merge compiled in, ptxas emits 13-16 more SASS instructions a k tile (120 -> 136 per channel,
// 168 -> 181 per group; the same with 255 registers allowed, so not register pressure).
template <int BM, int STAGES, int MIN_BLOCKS, bool PER_GROUP, int K_PART, bool ONE_GROUP>
__global__ void __launch_bounds__(256, MIN_BLOCKS) w4a8_gemm_wgmma_kernel(const GemmParams p) {
  pdl_launch_dependents();
#if QOQ_WGMMA_ENABLED
  using T = WgmmaTile<BM, STAGES>;
  constexpr int BK = T::kBK, BN = T::kBN;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (ptx::smem_addr(smem_raw) & 1023)) & 1023);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  // This thread's two weight rows (A fragment rows g and g + 8 of its warp's 16).
  const int row_local = (warp >> 2) * 64 + (warp & 3) * 16 + g;
  const int ktiles = p.K / BK;
  uint32_t acc[BM / 2];
  __shared__ int last_piece;

  if constexpr (K_PART == kStreamK) {
    // CTA = group * m_tiles + m tile: the CTAs of a group take the same (n tile, k tile) share of their m tiles, so
    // they read each weight k tile at about the same time (from L2 after the first), as the unsplit grid does.
    const int m_tiles = (p.M + BM - 1) / BM, m_tile = static_cast<int>(blockIdx.x) % m_tiles;
    const int groups = static_cast<int>(gridDim.x) / m_tiles, group = static_cast<int>(blockIdx.x) / m_tiles;
    const int64_t iterations = static_cast<int64_t>((p.N + BN - 1) / BN) * ktiles;  // (n tile, k tile) pairs
    const int64_t end = stream_k_begin(group + 1, groups, iterations);
    for (int64_t it = stream_k_begin(group, groups, iterations); it < end;) {
      const int n_tile = static_cast<int>(it / ktiles);
      const int kt0 = static_cast<int>(it - static_cast<int64_t>(n_tile) * ktiles);
      const int nk = static_cast<int>(min(static_cast<int64_t>(ktiles - kt0), end - it));
      const int m0 = m_tile * BM, tile = n_tile * m_tiles + m_tile;
      wgmma_k_loop<BM, STAGES, PER_GROUP, ONE_GROUP>(p, smem, acc, m0, n_tile * BN, n_tile, kt0, nk);
      it += nk;
      const int64_t tile_begin = static_cast<int64_t>(n_tile) * ktiles;
      const int first = stream_k_group_of(tile_begin, groups, iterations);
      const int pieces = stream_k_group_of(tile_begin + ktiles - 1, groups, iterations) - first + 1;
      if (pieces == 1 ||
          merge_k_partials<BM, BlockSync>(p, acc, tid, &last_piece, tile, group - first, pieces, p.splits)) {
        wgmma_epilogue<BM, STAGES, PER_GROUP, BlockSync>(p, acc, smem, m0, n_tile * BN, row_local, g, t, tid);
      }
      __syncthreads();  // the output tile's shared memory is the next piece's pipeline
    }
  } else {
    const int2 tile = grouped_tile<BM>();
    const int m0 = tile.x * BM, n0 = tile.y * BN;
    const int kt0 = K_PART == kSplitK ? blockIdx.z * p.ktiles_per_split : 0;  // k tiles kt0 .. kt0 + nk - 1
    const int nk = K_PART == kSplitK ? min(ktiles - kt0, p.ktiles_per_split) : ktiles;
    wgmma_k_loop<BM, STAGES, PER_GROUP, ONE_GROUP>(p, smem, acc, m0, n0, tile.y, kt0, nk);
    if constexpr (K_PART == kSplitK) {
      if (!merge_split_partials<BM, BlockSync>(p, acc, tid, &last_piece)) return;
    }
    wgmma_epilogue<BM, STAGES, PER_GROUP, BlockSync>(p, acc, smem, m0, n0, row_local, g, t, tid);
  }
#endif  // QOQ_WGMMA_ENABLED
}

}  // namespace qoq
