// Warp-specialised variant of the wgmma W4A8 GEMM (w4a8_gemm_wgmma.cuh) for large M: one CTA an SM with 256
// activation rows a tile (wgmma m64n256k32), so each dequantized weight fragment feeds twice the MMA work of the
// 128-row tile, and the K loop has no block-wide barrier:
// - a producer warpgroup (threads 256..383) fills STAGES shared-memory stages with cp.async (the same swizzled
//   layouts as the 128-row kernel), and once a stage has landed (wait_group, then a proxy fence so that the
//   tensor cores' async-proxy reads see it) arrives on the stage's `full` mbarrier;
// - two consumer warpgroups (threads 0..255, 64 weight rows each) wait on `full`, run the k tile (mma_k_tile: the
//   same dequantization and wgmma steps), and release a stage on its `empty` mbarrier as soon as the first wgmma
//   of the next tile has retired every MMA that read it.
// Per group the producer also copies each tile's packed scales into its stage. The epilogue (float epilogue,
// stores) is the 128-row kernel's, among the consumers only, and so is split-K (K_PART kSplitK, grid z: each split
// sums its k tiles, the last one of an output tile to finish adds the others' INT32 partials), for the few-tile grids
// of a few hundred rows; kTailSplit splits only the tiles of the grid's last, partial wave (tail_split_piece).
#pragma once
#include "gemm/bulk_ptx.cuh"
#include "gemm/w4a8_gemm_wgmma.cuh"

namespace qoq {

template <int BM, int STAGES>
struct WgmmaWsTile : WgmmaTile<BM, STAGES> {
  using Base = WgmmaTile<BM, STAGES>;
  static constexpr int kConsumerThreads = 256, kProducerThreads = 128;
  static constexpr int kThreads = kConsumerThreads + kProducerThreads;
  // Stages whose copies a producer thread keeps in flight before it waits for the oldest one.
  static constexpr int kLag = STAGES - 2;
  // Registers a thread (setmaxnreg): the launch gives 168 each (384 threads); the producers hand theirs to the
  // consumers, whose 128 accumulators would otherwise make ptxas serialize the wgmmas.
  static constexpr int kProducerRegs = 40, kConsumerRegs = 232;
  // setmaxnreg.inc takes registers only from the CTA's pool, which the producers' setmaxnreg.dec fills: consumers
  // may grow by what the producers give up, 2 * (232 - 168) = 168 - 40 (asking for more, .inc waits forever).
  static_assert(kProducerRegs + 2 * kConsumerRegs <= 3 * 168, "register file");
  // full[STAGES], then empty[STAGES], then split-K's last-split flag (past the output tile, which reuses the loop's
  // shared memory while a slower consumer may still read the flag).
  static constexpr int kBarrierOffset = Base::kLoopBytes;
  static constexpr int kSmemBytes = Base::kSmemBytes + 2 * STAGES * 8 + 16;
  static_assert(Base::kOutBytes <= Base::kLoopBytes, "the output tile must not overlap the barriers");
};

template <int BM, int STAGES, bool PER_GROUP, int K_PART>
__global__ void __launch_bounds__(384, 1) w4a8_gemm_wgmma_ws_kernel(const GemmParams p) {
  pdl_wait();  // PDL (common.cuh): the producer's first stage reads the activations
  pdl_launch_dependents();
#if QOQ_WGMMA_ENABLED
  using T = WgmmaWsTile<BM, STAGES>;
  constexpr int BK = T::kBK, BN = T::kBN;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (ptx::smem_addr(smem_raw) & 1023)) & 1023);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + T::kBarrierOffset);
  uint64_t* empty = full + STAGES;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  KPiece piece{0, 0, p.K / BK, 0, 1, 0};  // whole K (kWholeK); the split modes set theirs below
  int2 tile;
  if constexpr (K_PART == kTailSplit) {
    const int m_tiles = (p.M + BM - 1) / BM, n_tiles = (p.N + BN - 1) / BN;
    piece = tail_split_piece(p, m_tiles * n_tiles, p.K / BK);
    tile = tile_coords<BM>(piece.tile, m_tiles, n_tiles);
  } else {
    tile = grouped_tile<BM>();
    if constexpr (K_PART == kSplitK) {
      piece.kt0 = blockIdx.z * p.ktiles_per_split;
      piece.nk = min(p.K / BK - piece.kt0, p.ktiles_per_split);
    }
  }
  const int m0 = tile.x * BM, n0 = tile.y * BN;
  const int kt0 = piece.kt0, nk = piece.nk;  // this CTA's k tiles: kt0 .. kt0 + nk - 1
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      bulk::mbar_init(&full[s], T::kProducerThreads);  // every producer thread, once its copies landed
      bulk::mbar_init(&empty[s], T::kConsumerThreads / 32);  // lane 0 of every consumer warp
    }
    bulk::fence_mbar_init();
  }
  __syncthreads();

  if (tid >= T::kConsumerThreads) {
    // ---- producer: activations BM rows x 8 chunks, weights 128 rows x 4 chunks, per group the packed scales ----
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(T::kProducerRegs));
    const int ptid = tid - T::kConsumerThreads;
    constexpr int kALoads = BM * 8 / T::kProducerThreads, kWLoads = BN * 4 / T::kProducerThreads;
    constexpr int kARowStep = T::kProducerThreads / 8, kWRowStep = T::kProducerThreads / 4;
    const uint32_t a_dst = swizzle<128>(ptid >> 3, ptid & 7);  // rows ptid / 8 + kARowStep * it: same swizzle
    const uint32_t w_dst = T::kAStage + swizzle<64>(ptid >> 2, ptid & 3);
    // Sources: a running pointer per operand plus 32-bit row offsets (M * K and N * K / 2 < 2^32, checked by the
    // launch), so the producer fits in kProducerRegs; rows past M / N read the last row with size 0 (zero-filled).
    // The activation rows' offsets are computed per copy rather than kept (16 registers of the producer's 40; an
    // intermediate version spilled with them): row offsets grow with the row, so clamping the offset clamps the row.
    const int8_t* a_src = p.x_q + kt0 * BK + (ptid & 7) * 16;
    const uint8_t* w_src = p.qweight + kt0 * (BK / 2) + (ptid & 3) * 16;
    const uint32_t a_first = static_cast<uint32_t>(m0 + (ptid >> 3)) * static_cast<uint32_t>(p.K);
    const uint32_t a_step = static_cast<uint32_t>(kARowStep) * static_cast<uint32_t>(p.K);
    const uint32_t a_last = static_cast<uint32_t>(p.M - 1) * static_cast<uint32_t>(p.K);
    uint32_t w_off[kWLoads];
    uint32_t w_ok = 0;  // bit it: the row exists
#pragma unroll
    for (int it = 0; it < kWLoads; ++it) {
      const int row = n0 + (ptid >> 2) + kWRowStep * it;
      w_off[it] = static_cast<uint32_t>(min(row, p.N - 1)) * static_cast<uint32_t>(p.K / 2);
      w_ok |= static_cast<uint32_t>(row < p.N) << it;
    }
    // Per group: producer threads 0..31 copy each k tile's packed scales into its stage with its copies.
    const bool scale_loader = PER_GROUP && ptid < 32;
    PackedScaleSource scale_src(p, PER_GROUP ? tile.y : 0, (ptid >> 4) & 1, ptid & 15, kt0,
                                PER_GROUP ? p.group_size : 128);
    const uint32_t smem_base = ptx::smem_addr(smem);
    for (int kt = 0; kt < nk; ++kt) {
      const int s = kt % STAGES;
      if (kt >= STAGES) bulk::mbar_wait(&empty[s], (kt / STAGES - 1) & 1);
      const uint32_t stage = smem_base + s * T::kStageBytes;
      uint32_t a_row_off = a_first;
      asm volatile("" : "+r"(a_row_off));  // opaque per pass, so the 16 offsets are not hoisted into registers
#pragma unroll
      for (int it = 0; it < kALoads; ++it) {
        const uint32_t off = a_row_off + it * a_step;
        ptx::cp_async_16_shared(stage + a_dst + it * kARowStep * BK, a_src + min(off, a_last), off <= a_last ? 16 : 0);
      }
#pragma unroll
      for (int it = 0; it < kWLoads; ++it) {
        ptx::cp_async_16_shared(stage + w_dst + it * kWRowStep * (BK / 2), w_src + w_off[it], (w_ok >> it & 1) * 16);
      }
      a_src += BK;
      w_src += BK / 2;
      if (scale_loader) {
        ptx::cp_async_16_shared(smem_base + T::kPipeBytes + s * T::kScaleStage + 16 * ptid,
                                scale_src.next(p.group_size), 16);
      }
      ptx::cp_async_commit();
      if (kt >= T::kLag) {  // tile kt - kLag has landed: publish it
        ptx::cp_async_wait<T::kLag>();
        wgmma::fence_proxy_async_shared();
        bulk::mbar_arrive(&full[(kt - T::kLag) % STAGES]);
      }
    }
    ptx::cp_async_wait<0>();
    wgmma::fence_proxy_async_shared();
    for (int kt = max(nk - T::kLag, 0); kt < nk; ++kt) bulk::mbar_arrive(&full[kt % STAGES]);
    return;
  }

  // ---- consumers ----
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(T::kConsumerRegs));
  const int wg = warp >> 2, warp_in_wg = warp & 3, g = lane >> 2, t = lane & 3;
  const int row_local = wg * 64 + warp_in_wg * 16 + g;
  uint32_t acc[BM / 2];
#pragma unroll
  for (int i = 0; i < BM / 2; ++i) acc[i] = 0;
  for (int kt = 0; kt < nk; ++kt) {
    const int s = kt % STAGES;
    bulk::mbar_wait(&full[s], (kt / STAGES) & 1);
    uint8_t* stage = smem + s * T::kStageBytes;
    mma_k_tile<BM, PER_GROUP>(acc, stage + T::kAStage, ptx::smem_addr(stage), smem + T::kPipeBytes + s * T::kScaleStage,
                              wg, warp_in_wg, lane, [&] {
                                // Lane 0 releases for its warp: every lane's reads of that stage fed the warp's
                                // wgmmas, which the wait before this retired. (A release by every thread, or a
                                // __syncwarp here, makes ptxas serialize the wgmmas: C7513.)
                                if (kt > 0 && lane == 0) bulk::mbar_arrive(&empty[(kt - 1) % STAGES]);
                              });
  }
  wgmma::wait_group<0>();
#pragma unroll
  for (int i = 0; i < BM / 2; ++i) wgmma::fence_operand(acc[i]);
  ConsumerSync::sync();  // every consumer is done with the pipeline's shared memory, reused below
  if constexpr (K_PART == kSplitK) {
    if (!merge_split_partials<BM, ConsumerSync>(p, acc, tid, reinterpret_cast<int*>(empty + STAGES))) return;
  } else if constexpr (K_PART == kTailSplit) {
    if (piece.pieces > 1 && !merge_k_partials<BM, ConsumerSync>(p, acc, tid, reinterpret_cast<int*>(empty + STAGES),
                                                                piece.partial, piece.slot, piece.pieces, p.splits)) {
      return;
    }
  }
  wgmma_epilogue<BM, STAGES, PER_GROUP, ConsumerSync>(p, acc, smem, m0, n0, row_local, g, t, tid);
#endif  // QOQ_WGMMA_ENABLED
}

}  // namespace qoq
