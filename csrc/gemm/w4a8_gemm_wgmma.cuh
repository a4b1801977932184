// W4A8 GEMM for Hopper (sm_90a) at prefill sizes: warpgroup MMA (wgmma m64nBMk32 s8), INT32 accumulation
// over all of K, the float epilogue of docs/formats.md. Off by default (QOQ_GEMM_WGMMA, see w4a8_gemm.cu).
//
// The product is computed transposed, out^T[n, m] = W8'[n, :] . X[m, :], so that the dequantized weights are
// the wgmma A operand, taken from registers (no shared-memory round trip for the INT8 weights), and the
// activations are the B operand, read by the tensor cores from shared memory:
// - CTA tile: 128 weight rows (n) x BM activation rows (m) x 128 k; two consumer warpgroups, each owning 64
//   weight rows (one wgmma m64 tile), all 256 threads also issue the cp.async loads (no producer warp).
// - A operand (weights): the packed v2 layout makes ldmatrix.x4 of the packed rows deliver to lane (g, t)
//   the word with k 4t..4t+3 (low nibbles) and 16+4t..16+4t+3 (high nibbles) of rows g and g+8, which is
//   exactly the wgmma/mma.m16n8k32 A fragment {row g k 4t, row g+8 k 4t, row g k 16+4t, row g+8 k 16+4t}:
//   unpacking is a mask and a shift. Per channel the UINT4 values are the s8 operand (the zero point is the
//   epilogue's x_sum term). Per group the operand is the u8 product w4 * s2 (<= 240: one multiply scales four
//   weights) and the zero points are taken out of the K loop: the loop sums w4 * s2 * x and the epilogue adds
//   -sum_g z2 * s2 * sum_{k in g} x (add_zero_point_terms), so the total is the INT32 sum of (w4 - z2) * s2 * x,
//   exact as every INT32 sum here (mod 2^32). This keeps the K loop's per-group work at one multiply per four
//   weights (the bytewise (w4 - z2) * s2 took five instructions and made the loop issue-bound). The s2 of a
//   tile ride in its pipeline stage (zero_point_operands_kernel lays them out per weight tile).
// - B operand (activations): K-major, 128-byte rows (BK = 128 int8), 128-byte swizzle, one descriptor per
//   k step of 32 (start address + 32 bytes).
// - Pipeline: STAGES shared-memory stages filled by cp.async (running source pointers, one destination offset
//   per operand); a stage is refilled two iterations after it was read (wgmma.wait_group<1> keeps at most one
//   MMA in flight per warpgroup, so everything issued two iterations ago has completed before the barrier that
//   precedes the refill).
// - Split-K (grid z, when the output tiles alone leave SMs idle: prefill of a few hundred tokens): each split
//   sums its k tiles and stores its INT32 accumulators in fragment order; the last split of a tile to finish
//   (an atomic counter) adds the others' and runs the zero-point terms and the epilogue. INT32 sums are exact
//   in any order, so the result does not depend on the split count.
// - Epilogue: float math in registers, 16-bit results staged in shared memory, coalesced 16-byte stores.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common.cuh"
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
  static constexpr int kScaleStage = 256;           // per group: s2 of the 128 weight rows for up to two k blocks
  static constexpr int kScaleBytes = STAGES * kScaleStage;
  static constexpr int kLoopBytes = kPipeBytes + kScaleBytes;
  // +1024: the kernel aligns its base to the 1024-byte swizzle atom itself.
  static constexpr int kSmemBytes = (kLoopBytes > kOutBytes ? kLoopBytes : kOutBytes) + 1024;
  static constexpr int kPrefetch = STAGES - 2;      // tiles in flight beyond the one being computed
  // The per-group zero-point operands are staged, after the K loop, in the pipeline's shared memory: slabs of up
  // to kZpSlab k blocks (224 for BM = 128: K <= 28672 at g = 128 in one slab), rows of zs (128) and of both
  // digits (2 * BM), row pitch slab + 16 bytes (conflict-free fragment loads).
  static constexpr int kZpSlab = (kPipeBytes / (kBN + 2 * BM) - 16) / 32 * 32;
  static_assert(BM == 128 || BM == 256, "wgmma N (activation rows per CTA) must be 128 or 256");
  static_assert(STAGES >= 3, "the refill-two-iterations-later scheme needs >= 3 stages");
  static_assert(kAStage % 1024 == 0 && kStageBytes % 1024 == 0, "stages must keep 1024-byte alignment");
  static_assert(kZpSlab >= 32, "the staging region must hold one chunk of 32 k blocks");
};

#if QOQ_WGMMA_ENABLED
template <int BM, bool A_UNSIGNED>
__device__ __forceinline__ void wgmma_rs(uint32_t (&d)[BM / 2], const uint32_t (&a)[4], uint64_t desc) {
  if constexpr (BM == 128) {
    wgmma::wgmma_m64n128k32_rs<A_UNSIGNED>(d, a, desc);
  } else {
    wgmma::wgmma_m64n256k32_rs<A_UNSIGNED>(d, a, desc);
  }
}
#endif

// Bytes of the per-group operand buffer (zero_point_operands_kernel) for M activation rows.
__host__ __device__ inline size_t zp_operand_bytes(const GemmParams& p) {
  return (static_cast<size_t>(2 * p.M + p.N) + static_cast<size_t>((p.N + 127) / 128) * 128) * p.zp_blocks_pad;
}

// Work items of zero_point_operands_kernel: one per (activation row, k block), one per byte of the z2 * s2 rows,
// one per 16 rows of a weight tile's s2 (P = zp_blocks_pad is a multiple of 32).
__host__ __device__ inline size_t zp_operand_items(const GemmParams& p) {
  return (static_cast<size_t>(p.M) + p.N + static_cast<size_t>((p.N + 127) / 128) * 8) * p.zp_blocks_pad;
}

// The per-group operands of the wgmma kernel, P = zp_blocks_pad columns (k blocks of zp_block; padding blocks
// b >= K / zp_block are zero):
// - rows 0..M-1 / M..2M-1: the low (u8) / high (s8) base-256 digit of -sum(x_q[m, k block b]) (|sum| <= 128 * 128,
//   so the high digit fits s8), and rows 2M..2M+N-1: the u8 product z2 * s2 (<= 240) of weight row n for the group
//   of block b: the zero-point terms (add_zero_point_terms);
// - then [ceil(N / 128)][P][128]: s2 of the 128 rows of each weight tile, for block b, contiguous, so that each
//   pipeline stage copies its tile's scales with 16-byte cp.async (rows past N repeat row N - 1). A thread gathers
//   16 rows (one store; a thread per byte of this transpose was latency-bound: ~14 us for a 28672-row layer).
__global__ void __launch_bounds__(256) zero_point_operands_kernel(const GemmParams p) {
  pdl_wait();
  pdl_launch_dependents();
  const size_t item = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int P = p.zp_blocks_pad, blocks = p.K / p.zp_block;
  const size_t digit_items = static_cast<size_t>(p.M) * P, zs_items = static_cast<size_t>(p.N) * P;
  uint8_t* out = const_cast<uint8_t*>(p.zp_digits);
  if (item >= zp_operand_items(p)) return;
  if (item >= digit_items + zs_items) {  // s2 of rows n0 .. n0 + 15 of a weight tile, block b
    const size_t j = item - digit_items - zs_items;
    const int tile = static_cast<int>(j / (static_cast<size_t>(P) * 8));
    const int rest = static_cast<int>(j - static_cast<size_t>(tile) * P * 8);
    const int b = rest >> 3, n0 = tile * 128 + (rest & 7) * 16;
    const int group = b * p.zp_block / p.group_size;
    alignas(16) uint8_t bytes[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      bytes[i] = b < blocks ? __ldg(p.s2 + static_cast<size_t>(min(n0 + i, p.N - 1)) * p.groups + group) : 0;
    }
    *reinterpret_cast<uint4*>(out + 2 * digit_items + zs_items + 16 * j) = *reinterpret_cast<const uint4*>(bytes);
    return;
  }
  const int row = static_cast<int>(item / P), b = static_cast<int>(item - static_cast<size_t>(row) * P);
  const bool in_k = b < blocks;
  if (row >= p.M) {  // z2 * s2 of weight row n for block b
    const size_t g = static_cast<size_t>(row - p.M) * p.groups + b * p.zp_block / p.group_size;
    out[digit_items + item] = in_k ? static_cast<uint8_t>(p.s2[g] * p.z2[g]) : 0;
    return;
  }
  int32_t sum = 0;
  if (in_k) {
    const int4* src = reinterpret_cast<const int4*>(p.x_q + static_cast<size_t>(row) * p.K + b * p.zp_block);
#pragma unroll 8
    for (int i = 0; i < p.zp_block / 16; ++i) {
      const int4 v = __ldg(src + i);
      sum = __dp4a(v.x, 0x01010101, sum);
      sum = __dp4a(v.y, 0x01010101, sum);
      sum = __dp4a(v.z, 0x01010101, sum);
      sum = __dp4a(v.w, 0x01010101, sum);
    }
  }
  const int32_t v = -sum;
  out[item] = static_cast<uint8_t>(v & 0xFF);
  out[digit_items + item] = static_cast<uint8_t>((v >> 8) & 0xFF);
}

// Barriers of the code after the K loop: the whole block, or (warp-specialised kernel) only its 256 consumer
// threads, named barrier 1 (the producer warpgroup has left by then).
struct BlockSync {
  __device__ static void sync() { __syncthreads(); }
};
struct ConsumerSync {
  __device__ static void sync() { asm volatile("bar.sync 1, 256;\n" ::: "memory"); }
};

#if QOQ_WGMMA_ENABLED
// acc += -sum_g z2 * s2 * sum_{k in g} x_q for this thread's accumulators (weight rows row_local, row_local + 8 of
// the CTA's 128; activation rows of the wgmma D layout), once the K loop is done, from the operands of
// zero_point_operands_kernel staged in the pipeline's shared memory (`region`) in slabs of up to kZpSlab k blocks:
// per 8 activation rows and 32 k blocks one INT8 mma.sync m16n8k32 for each digit (its D fragment is the wgmma
// accumulator's layout for activation rows 8i .. 8i+7 of this warp's 16 weight rows), the digit sums in
// temporaries. After the loop, not before it: ptxas serializes every wgmma of the kernel when accumulators are
// rewritten by other instructions in a loop ahead of them. With two CTAs an SM the other CTA's K loop hides it.
template <int BM, int STAGES, class Sync>
__device__ __forceinline__ void add_zero_point_terms(const GemmParams& p, uint32_t (&acc)[BM / 2], uint8_t* region,
                                                      int m0, int n0, int row_local, int g, int t, int tid) {
  using T = WgmmaTile<BM, STAGES>;
  const int P = p.zp_blocks_pad;
  const uint8_t* lo_plane = p.zp_digits;
  const uint8_t* hi_plane = p.zp_digits + static_cast<size_t>(p.M) * P;
  const uint8_t* zs_plane = p.zp_digits + static_cast<size_t>(2 * p.M) * P;
  for (int b0 = 0; b0 < P; b0 += T::kZpSlab) {
    const int width = min(T::kZpSlab, P - b0), pitch = width + 16, row_chunks = width / 16;
    // rows: 0..127 zs of weight rows n0.., 128..128+BM-1 low digits of activation rows m0.., then the high digits
    for (int i = tid; i < (T::kBN + 2 * BM) * row_chunks; i += T::kThreads) {
      const int row = i / row_chunks, chunk = i - row * row_chunks;
      const uint8_t* src = row < T::kBN ? zs_plane + static_cast<size_t>(min(n0 + row, p.N - 1)) * P
                         : row < T::kBN + BM ? lo_plane + static_cast<size_t>(min(m0 + row - T::kBN, p.M - 1)) * P
                                             : hi_plane + static_cast<size_t>(min(m0 + row - T::kBN - BM, p.M - 1)) * P;
      ptx::cp_async_16(region + row * pitch + 16 * chunk, src + b0 + 16 * chunk, true);
    }
    ptx::cp_async_commit();
    ptx::cp_async_wait<0>();
    Sync::sync();
    const uint8_t* zs = region;
    const uint8_t* lo = region + T::kBN * pitch;
    const uint8_t* hi = region + (T::kBN + BM) * pitch;
    // Chunks of 32 blocks outside, not unrolled (unrolled inside the loop over rows it made the kernel ~10k
    // instructions, mostly remainder copies, and the epilogue slow); rows inside, unrolled (accumulator indices).
    // The low digit accumulates straight into acc, the high one (times 256) through a temporary.
#pragma unroll 1
    for (int c = 0; c < width / 32; ++c) {
      const int col = 32 * c + 4 * t;
      auto word = [&](const uint8_t* base, int row, int offset) {
        return *reinterpret_cast<const uint32_t*>(base + row * pitch + col + offset);
      };
      const uint32_t a[4] = {word(zs, row_local, 0), word(zs, row_local + 8, 0), word(zs, row_local, 16),
                             word(zs, row_local + 8, 16)};
#pragma unroll
      for (int i = 0; i < BM / 8; ++i) {
        const int tok = 8 * i + g;
        uint32_t sum_hi[4] = {0, 0, 0, 0};
        ptx::mma_u8_16832<true>(acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3], a, word(lo, tok, 0),
                                word(lo, tok, 16));
        ptx::mma_u8_16832<false>(sum_hi[0], sum_hi[1], sum_hi[2], sum_hi[3], a, word(hi, tok, 0), word(hi, tok, 16));
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[4 * i + j] += sum_hi[j] << 8;
      }
    }
    Sync::sync();  // the next slab (or the output tile) overwrites the region
  }
}
#endif

#if QOQ_WGMMA_ENABLED
// One 128-wide k tile of the K loop for this thread's warpgroup (64 weight rows, BM activation rows): its packed
// weights by ldmatrix from `w_stage`, unpacked (per group: times s2 from `s2_stage`) into the register A operand,
// and four wgmma k steps against the activations at shared address `a_base`. At most one wgmma stays in flight
// (wait_group<1> after each), so the call returns with this tile's last step possibly running;
// after_first_step() runs once the first step's wait has retired every MMA of the previous tile.
template <int BM, bool PER_GROUP, class AfterFirstStep>
__device__ __forceinline__ void mma_k_tile(uint32_t (&acc)[BM / 2], const uint8_t* w_stage, uint32_t a_base,
                                           const uint8_t* s2_stage, int s2_half, int wg, int warp_in_wg, int lane,
                                           AfterFirstStep&& after_first_step) {
  const int g = lane >> 2;
  const int row_local = wg * 64 + warp_in_wg * 16 + g;
  uint32_t s_cur[2][2];  // [row][64-wide half]
  if constexpr (PER_GROUP) {
    const uint8_t* sc = s2_stage;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      s_cur[r][0] = sc[row_local + 8 * r];
      s_cur[r][1] = sc[s2_half + row_local + 8 * r];
    }
  }

  // Packed words of the 4 k steps: [step][0] rows g, [step][1] rows g + 8 (lane t's word of each block).
  uint32_t packed[4][2];
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

#pragma unroll
  for (int ks = 0; ks < 4; ++ks) {
    uint32_t frag[4];
    uint32_t lo0 = packed[ks][0] & 0x0F0F0F0Fu, lo1 = packed[ks][1] & 0x0F0F0F0Fu;
    uint32_t hi0 = (packed[ks][0] >> 4) & 0x0F0F0F0Fu, hi1 = (packed[ks][1] >> 4) & 0x0F0F0F0Fu;
    if constexpr (PER_GROUP) {
      const int h = ks >> 1;  // k 32*ks..32*ks+31 lies in 64-wide half h, inside one scale group
      lo0 *= s_cur[0][h];     // w4 * s2 <= 240: four u8 products, no carries between bytes
      hi0 *= s_cur[0][h];
      lo1 *= s_cur[1][h];
      hi1 *= s_cur[1][h];
    }  // per channel: the UINT4 values 0..15 are already valid s8 operands
    frag[0] = lo0;  // row g,     k 4t..4t+3
    frag[1] = lo1;  // row g + 8, k 4t..4t+3
    frag[2] = hi0;  // row g,     k 16+4t..16+4t+3
    frag[3] = hi1;  // row g + 8, k 16+4t..16+4t+3
#pragma unroll
    for (int i = 0; i < 4; ++i) wgmma::fence_operand(frag[i]);
#pragma unroll
    for (int i = 0; i < BM / 2; ++i) wgmma::fence_operand(acc[i]);
    wgmma::fence();
    wgmma_rs<BM, PER_GROUP>(acc, frag, wgmma::make_desc_k_sw128(a_base + 32 * ks));
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

// Output tile (activation-row tile, weight-row tile) of this CTA. The grid is (m tiles, n tiles) and CTAs start
// roughly in launch order (x fastest); taken as is, one wave of a long prefill streams all M activation rows once
// per few weight tiles, more than L2 holds from M = 16384 on. Grouped order: groups of kRasterRows activation rows,
// inside a group the m tiles first, then the next weight tile; with M <= kRasterRows this is the launch order.
template <int BM>
__device__ __forceinline__ int2 grouped_tile() {
  constexpr int kRasterRows = 4096, kGroupTiles = kRasterRows / BM;
  const int m_tiles = static_cast<int>(gridDim.x);
  const int linear = static_cast<int>(blockIdx.y * gridDim.x + blockIdx.x);
  const int per_group = kGroupTiles * static_cast<int>(gridDim.y);
  const int first_m = linear / per_group * kGroupTiles;
  const int group_m = min(m_tiles - first_m, kGroupTiles);
  const int in_group = linear - linear / per_group * per_group;
  return make_int2(first_m + in_group % group_m, in_group / group_m);
}

// Split-K: stores this split's accumulators (fragment order: coalesced 1 KB rows), then returns true in the last
// split of the output tile to finish, with the other splits' partial sums added to acc; false in the others.
template <int BM>
__device__ __forceinline__ bool merge_split_partials(const GemmParams& p, uint32_t (&acc)[BM / 2], int tid) {
  constexpr int kWords = BM / 2 * 256;  // one split's accumulators
  const int tile = blockIdx.y * gridDim.x + blockIdx.x;
  uint32_t* partials = reinterpret_cast<uint32_t*>(p.workspace) + static_cast<size_t>(tile) * p.splits * kWords;
  uint32_t* mine = partials + static_cast<size_t>(blockIdx.z) * kWords;
#pragma unroll
  for (int i = 0; i < BM / 2; ++i) __stcg(mine + i * 256 + tid, acc[i]);
  __threadfence();  // this thread's partials are visible device-wide before the tile's counter moves
  __syncthreads();
  if (!__syncthreads_or(tid == 0 && atomicAdd(p.counters + tile, 1) == p.splits - 1)) return false;
  __threadfence();
  for (int z = 0; z < p.splits; ++z) {
    if (z == static_cast<int>(blockIdx.z)) continue;
    const uint32_t* other = partials + static_cast<size_t>(z) * kWords;
#pragma unroll
    for (int i = 0; i < BM / 2; ++i) acc[i] += __ldcg(other + i * 256 + tid);
  }
  return true;
}

#if QOQ_WGMMA_ENABLED
// After the K loop (all MMAs done, the pipeline's shared memory free): per group the zero-point terms, then the
// float epilogue of docs/formats.md for this thread's accumulators (weight rows row_local, row_local + 8 of the
// CTA's 128), staged in shared memory and stored in coalesced 16-byte chunks (with the residual when given).
// `tid` 0..255 are the threads that hold accumulators; Sync is their barrier.
template <int BM, int STAGES, bool PER_GROUP, class Sync>
__device__ __forceinline__ void wgmma_epilogue(const GemmParams& p, uint32_t (&acc)[BM / 2], uint8_t* smem, int m0,
                                               int n0, int row_local, int g, int t, int tid) {
  using T = WgmmaTile<BM, STAGES>;
  constexpr int BN = T::kBN;
  const int n_rows[2] = {min(n0 + row_local, p.N - 1), min(n0 + row_local + 8, p.N - 1)};
  if constexpr (PER_GROUP) add_zero_point_terms<BM, STAGES, Sync>(p, acc, smem, m0, n0, row_local, g, t, tid);

  // Accumulator d[4i + 2h + e]: weight row g + 8h, activation row 8i + 2t + e (wgmma D fragment layout).
  uint16_t* out_tile = reinterpret_cast<uint16_t*>(smem);
  float w_scale[2], w_bias[2];
  int32_t w_zero[2] = {0, 0};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    w_scale[h] = __half2float(p.wscale[n_rows[h]]);
    w_bias[h] = load_bias(p, n_rows[h]);
    if constexpr (!PER_GROUP) w_zero[h] = p.zero[n_rows[h]];
  }
#pragma unroll
  for (int i = 0; i < BM / 8; ++i)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int m_local = 8 * i + 2 * t + e;
      const int m = min(m0 + m_local, p.M - 1);  // rows past M are computed but never stored
      const float xs = p.x_s[m];
      const int32_t x_sum = PER_GROUP ? 0 : p.x_sum[m];
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

// SPLIT_K: a separate instantiation, so that the unsplit kernel keeps its K loop: with the split offsets and the
// merge compiled in, ptxas emits 13-16 more SASS instructions a k tile (120 -> 136 per channel, 168 -> 181 per group;
// the same with 255 registers allowed, so not register pressure).
template <int BM, int STAGES, int MIN_BLOCKS, bool PER_GROUP, bool SPLIT_K>
__global__ void __launch_bounds__(256, MIN_BLOCKS) w4a8_gemm_wgmma_kernel(const GemmParams p) {
  pdl_wait();  // PDL (common.cuh): the first stage loads activations with the weights, so wait at the top
  pdl_launch_dependents();
#if QOQ_WGMMA_ENABLED
  using T = WgmmaTile<BM, STAGES>;
  constexpr int BK = T::kBK, BN = T::kBN, D = T::kPrefetch;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (ptx::smem_addr(smem_raw) & 1023)) & 1023);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2, warp_in_wg = warp & 3;
  const int g = lane >> 2, t = lane & 3;
  const int2 tile = grouped_tile<BM>();
  const int m0 = tile.x * BM, n0 = tile.y * BN;
  const int kt0 = SPLIT_K ? blockIdx.z * p.ktiles_per_split : 0;  // this split's k tiles: kt0 .. kt0 + nk - 1
  const int nk = SPLIT_K ? min(p.K / BK - kt0, p.ktiles_per_split) : p.K / BK;

  auto stage_a = [&](int s) { return smem + s * T::kStageBytes; };
  auto stage_w = [&](int s) { return smem + s * T::kStageBytes + T::kAStage; };
  auto stage_s2 = [&](int s) { return smem + T::kPipeBytes + s * T::kScaleStage; };

  // This thread's cp.async sources, as running pointers (load_tile is called for kt = 0, 1, 2, ... in order),
  // and destinations (byte offsets inside a stage): BM activation rows x 8 chunks of 16 bytes, 128 weight rows
  // x 4 chunks of 16; rows past M / N read row 0 with size 0 (zero-filled).
  constexpr int kALoads = BM * 8 / T::kThreads, kWLoads = BN * 4 / T::kThreads;
  // Load `it` covers row (tid >> 3) + 32 it (activations) or (tid >> 2) + 64 it (weights), and the swizzles depend
  // on the row only through row % 8, so one destination per operand plus a fixed stride.
  const uint32_t a_dst = swizzle<128>(tid >> 3, tid & 7);  // = the wgmma 128-byte swizzle
  const uint32_t w_dst = T::kAStage + swizzle<64>(tid >> 2, tid & 3);
  const int8_t* a_src[kALoads];
  uint32_t a_ok = 0, w_ok = 0;  // bit it: the row exists
#pragma unroll
  for (int it = 0; it < kALoads; ++it) {
    const int row = (tid >> 3) + 32 * it;
    const bool ok = m0 + row < p.M;
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
  // Per group: the tile's s2 (128 rows, one or two k blocks) from the operand kernel's relayout, 16 bytes a thread.
  const bool s2_loader = PER_GROUP && tid < BK / p.zp_block * 8;
  const int s2_stride = PER_GROUP ? BK / p.zp_block * 128 : 0;
  const uint8_t* s2_src = PER_GROUP ? p.zp_digits + (static_cast<size_t>(2 * p.M + p.N) +
                                                    static_cast<size_t>(tile.y) * 128) * p.zp_blocks_pad +
                                          static_cast<size_t>(kt0) * s2_stride + 16 * tid
                                    : nullptr;
  const uint32_t smem_base = ptx::smem_addr(smem);

  auto load_tile = [&](int s) {
    const uint32_t stage = smem_base + s * T::kStageBytes;
#pragma unroll
    for (int it = 0; it < kALoads; ++it) {
      ptx::cp_async_16_shared(stage + a_dst + it * 32 * BK, a_src[it], (a_ok >> it & 1) * 16);
      a_src[it] += BK;
    }
#pragma unroll
    for (int it = 0; it < kWLoads; ++it) {
      ptx::cp_async_16_shared(stage + w_dst + it * 64 * (BK / 2), w_src[it], (w_ok >> it & 1) * 16);
      w_src[it] += BK / 2;
    }
    if (s2_loader) {
      ptx::cp_async_16_shared(smem_base + T::kPipeBytes + s * T::kScaleStage + 16 * tid, s2_src, 16);
      s2_src += s2_stride;
    }
  };

  // This thread's two weight rows (A fragment rows g and g + 8 of its warp's 16).
  const int row_local = wg * 64 + warp_in_wg * 16 + g;

  const int s2_half = PER_GROUP && p.zp_block == 64 ? 128 : 0;  // offset of the second 64-wide half's block

  uint32_t acc[BM / 2];
#pragma unroll
  for (int i = 0; i < BM / 2; ++i) acc[i] = 0;

#pragma unroll
  for (int s = 0; s < D; ++s) {
    if (s < nk) load_tile(s);
    ptx::cp_async_commit();
  }

  for (int kt = 0; kt < nk; ++kt) {
    const int s = kt % STAGES;
    ptx::cp_async_wait<D - 1>();          // this thread's copies of tile kt have landed
    wgmma::fence_proxy_async_shared();    // ... and are visible to the tensor cores' (async proxy) reads
    __syncthreads();                      // everyone's copies; every MMA of tile kt - 2 has completed
    if (kt + D < nk) load_tile((kt + D) % STAGES);  // tile kt + D, into the stage tile kt - 2 used
    ptx::cp_async_commit();

    mma_k_tile<BM, PER_GROUP>(acc, stage_w(s), ptx::smem_addr(stage_a(s)), stage_s2(s), s2_half, wg, warp_in_wg, lane,
                              [] {});
  }
  wgmma::wait_group<0>();
#pragma unroll
  for (int i = 0; i < BM / 2; ++i) wgmma::fence_operand(acc[i]);
  ptx::cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory is reused below (zero-point operands, output tile)
  if constexpr (SPLIT_K) {
    if (!merge_split_partials<BM>(p, acc, tid)) return;
  }
  wgmma_epilogue<BM, STAGES, PER_GROUP, BlockSync>(p, acc, smem, m0, n0, row_local, g, t, tid);
#endif  // QOQ_WGMMA_ENABLED
}

}  // namespace qoq
