// Streaming small-M path (sm_90) of qoq::w4a8_gemm_per_group / w4a8_gemm_per_channel. At small M the GEMM only has
// to read the packed weights once, so what matters is keeping HBM busy. The older small-M kernels (w4a8_gemv.cu,
// w4a8_skinny.cu) give each block one batch of register loads and then retire it, so a block's life is one DRAM
// round trip and the SMs idle between blocks (~1.5-2 TB/s). Here:
//   - the grid is persistent (one or two blocks per SM); a block walks its 16- or 32-row tiles of the output in turn,
//   - one producer warp streams each tile's weights, stages of the tile's rows x 2048 k (1 KB a row), into a ring
//     of shared-memory stages with the bulk copy engine (one copy per weight row, completion counted on the stage's
//     mbarrier; L2 evict-first, so the reused activations stay in L2); per group it also copies the stage's packed
//     scales (ops.pack_scales: s2 and 240 - z2 * s2 of the tile's rows, per group) with 16-byte cp.async tracked by
//     the same mbarrier, so that a consumer's two rows' dequantization constants are one 32-bit load. It runs up to
//     a ring's worth of stages (64-96 KB an SM) ahead, across tile boundaries, so the next tile's loads are in
//     flight while the consumers finish a tile,
//   - 8 or 16 consumer warps split each stage's k blocks and multiply on INT8 mma.sync with the operands swapped
//     (swapped_mma.cuh), release the stage through a second mbarrier, and at the end of a tile reduce their INT32
//     sums in shared memory in a fixed order (exact, deterministic, no workspace) and store the contract's epilogue,
//     whose per-row operands they loaded when the tile started. Per group the weights are dequantized to biased
//     INT8 in registers (H100 layer chain at g = 128: ~1% faster at M = 8 / 16 and the same below than multiplying
//     the raw UINT4 values and scaling each 128-wide group's INT32 sums; docs/benchmarks.md).
// Shared-memory weight rows are padded by 64 bytes so that the 8 lanes of each 16-byte access phase (rows g, g + 1,
// chunks t = 0..3) fall in distinct banks.
#include <algorithm>

#include <cuda_runtime.h>

#include "common.cuh"
#include "gemm/bulk_ptx.cuh"
#include "gemm/swapped_mma.cuh"
#include "gemm/w4a8_stream.cuh"

namespace qoq {
namespace {

constexpr int kMaxM = 32;
// Defaults from the H100 layer chain (benchmarks/gemm.py --layer-chain, docs/benchmarks.md: a layer's four GEMMs back
// to back in a CUDA graph): 1 <= M <= 16 per channel, whose tile kernel is as fast at M = 17-24 and faster at 32
// (68.5-68.9 against 73.6-74.0 us a layer); 1 <= M <= 32 per group, where the small-M kernel ran 96-104 us a layer at
// M = 17-32 against 73-86 here (on sm_90a the wgmma kernel, tried first, takes M >= 17 per group by default:
// wgmma_default_min_m). (At M = 1 the dp4a decode kernel is faster timed alone; end to end the two are even.)
constexpr int kDefaultMinM = 1, kDefaultMaxM[2] = {16, 32};  // [per_group]
// Arrivals that complete a full stage: the producer's expect_tx, plus per group each producer lane's cp.async.
constexpr int full_arrivals(bool per_group) { return per_group ? 1 + 32 : 1; }

// Block geometry and shared-memory layout: TT token tiles of 8 (M <= 8 TT), RT row tiles of 16 (16 RT rows per
// tile), CW consumer warps (+ 1 producer warp), BLOCKS resident blocks per SM.
template <int TT, int RT, int CW, int BLOCKS>
struct StreamLayout {
  static constexpr int BR = 16 * RT, BT = 8 * TT;
  static constexpr int kConsumerWarps = CW, kConsumerThreads = 32 * CW, kThreads = kConsumerThreads + 32;
  static constexpr int KS = 2048;                         // k values of a stage: 16 RT KB of weights
  static constexpr int kStages = 6 / (RT * BLOCKS) > 2 ? 6 / (RT * BLOCKS) : 2;  // 64-96 KB in flight per SM
  static constexpr int kQuadsPerWarp = KS / 128 / CW;
  static constexpr int kRowStride = KS / 2 + 64;          // padded weight row (bank spread, see the header)
  static constexpr int kStageWeightBytes = BR * kRowStride;
  static constexpr int kMaxGroups = KS / 64;              // groups of a stage row (group_size >= 64)
  static constexpr int kGroupScaleBytes = 2 * BR;         // a group's packed scales of the BR rows (2 bytes a row)
  static constexpr int kStageScaleBytes = kGroupScaleBytes * kMaxGroups;
  static constexpr int kBarrierBytes = 128;
  static constexpr int kWeightsOffset = kBarrierBytes;
  static constexpr int kScalesOffset = kWeightsOffset + kStages * kStageWeightBytes;
  static constexpr int kPartialOffset = kScalesOffset + kStages * kStageScaleBytes;
  static constexpr int kSmemBytes = kPartialOffset + CW * BT * swapped::partial_stride(BR) * 4;
  static_assert(2 * kStages * 8 <= kBarrierBytes, "mbarriers fit their area");
  static_assert(kQuadsPerWarp >= 1 && kRowStride % 16 == 0 && kScalesOffset % 16 == 0, "stage geometry");
};

template <bool PER_GROUP, int TT, int RT, int CW, int BLOCKS>
__global__ void __launch_bounds__(StreamLayout<TT, RT, CW, BLOCKS>::kThreads, BLOCKS)
    w4a8_stream_kernel(const GemmParams p) {
#if QOQ_BULK_ENABLED
  using L = StreamLayout<TT, RT, CW, BLOCKS>;
  constexpr int kStages = L::kStages, kConsumerWarps = CW, kConsumerThreads = L::kConsumerThreads;
  extern __shared__ __align__(128) uint8_t smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem);
  uint64_t* empty = full + kStages;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      bulk::mbar_init(full + s, full_arrivals(PER_GROUP));
      bulk::mbar_init(empty + s, kConsumerWarps);
    }
    bulk::fence_mbar_init();
  }
  __syncthreads();

  const int tiles = p.N / L::BR;
  const int kstages = (p.K + L::KS - 1) / L::KS;

  if (warp == kConsumerWarps) {  // producer
    const uint64_t policy = bulk::evict_first_policy();
    const size_t row_bytes = static_cast<size_t>(p.K) / 2;
    uint32_t it = 0;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      const int n0 = tile * L::BR;
      for (int ks = 0; ks < kstages; ++ks, ++it) {
        const int slot = it % kStages;
        if (it >= kStages) bulk::mbar_wait(empty + slot, ((it / kStages) & 1) ^ 1);  // its previous use released
        const int k0 = ks * L::KS, klen = min(L::KS, p.K - k0);
        if (lane == 0) bulk::mbar_arrive_expect_tx(full + slot, L::BR * klen / 2);
        __syncwarp();
        uint8_t* wdst = smem + L::kWeightsOffset + slot * L::kStageWeightBytes;
        for (int r = lane; r < L::BR; r += 32)
          bulk::copy_bulk(wdst + r * L::kRowStride, p.qweight + (n0 + r) * row_bytes + k0 / 2, klen / 2, full + slot,
                          policy);
        if constexpr (PER_GROUP) {
          // The stage's groups: for each, the tile's 2 BR bytes of the packed scales (256 bytes per 128-row weight
          // tile and group, 32 per 16-row block; a tile's rows start at n0 % 128, a multiple of 16, so its blocks'
          // bytes are contiguous), as 16-byte copies spread over the lanes, laid out [group][the rows' bytes].
          constexpr int kCopiesPerGroup = L::kGroupScaleBytes / 16;
          const int groups = klen / p.group_size;
          const uint8_t* src_tile = p.packed_scales + (static_cast<size_t>(n0 / 128) * p.groups + k0 / p.group_size) *
                                                          256 + 2 * (n0 % 128);
          uint8_t* sdst = smem + L::kScalesOffset + slot * L::kStageScaleBytes;
          for (int i = lane; i < groups * kCopiesPerGroup; i += 32) {
            const int grp = i / kCopiesPerGroup, part = i % kCopiesPerGroup;
            bulk::copy_16(sdst + grp * L::kGroupScaleBytes + 16 * part, src_tile + grp * 256 + 16 * part);
          }
          bulk::arrive_after_copies(full + slot);
        }
      }
    }
    pdl_wait();  // PDL: the producer reads weights only, but no thread exits before the previous kernel is done
    return;
  }

  // Consumers. PDL: the producer streams the first stages of weights while the previous kernel still runs; the
  // consumers wait for it before their first activation (and activation scale) load.
  pdl_wait();
  pdl_launch_dependents();
  const int g = lane >> 2, t = lane & 3;
  int32_t* partial = reinterpret_cast<int32_t*>(smem + L::kPartialOffset);
  // Per group: the offset of the word of rows g and g + 8 for k block warp + u * CW of a stage, in the stage's
  // scales (rows 16 r on lie 32 r bytes on). It is the same at every stage, so the division by the runtime group size
  // runs once, not once a stage.
  int sz_offset[L::kQuadsPerWarp] = {};
  if constexpr (PER_GROUP) {
#pragma unroll
    for (int u = 0; u < L::kQuadsPerWarp; ++u) {
      sz_offset[u] = (4 * (warp + u * kConsumerWarps) + t) * 32 / p.group_size * L::kGroupScaleBytes + 4 * g;
    }
  }
  // launch_m takes the fewest token tiles for M, so every tile but the last of four holds a token
  const int M = p.M;
  __builtin_assume(M > (TT > 1 ? 4 * TT : 0));
  // The stage bookkeeping, kept incrementally rather than recomputed from a stage count at every stage: the ring
  // slot and its phase, the k blocks of a stage (only the last stage of a row may be short), and this warp's
  // activation rows at its first k block (advanced a stage at a time).
  const int8_t* x_rows[TT];
  swapped::activation_rows<TT>(x_rows, p, warp, g, t);
  const int full_stages = p.K / L::KS, tail_quads = (p.K % L::KS) / 128;
  int slot = 0;
  uint32_t phase = 0;
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int n0 = tile * L::BR;
    int32_t acc[RT][TT][4] = {};
    constexpr int kEpilogueIters = swapped::epilogue_iters(RT, TT, kConsumerThreads);
    EpilogueOperands<kEpilogueIters> epi;
    load_epilogue<PER_GROUP>(epi, p, n0, L::BR, threadIdx.x, kConsumerThreads);
    const int8_t* x_stage[TT];
#pragma unroll
    for (int j = 0; j < TT; ++j) x_stage[j] = x_rows[j];
    for (int ks = 0; ks < kstages; ++ks) {
      const int quads = ks < full_stages ? L::KS / 128 : tail_quads;
      // The activations do not depend on the stage: their loads overlap the wait for it.
      uint32_t xb[L::kQuadsPerWarp][TT][8];
#pragma unroll
      for (int u = 0; u < L::kQuadsPerWarp; ++u) {
        const int qq = warp + u * kConsumerWarps;
        if (qq < quads) swapped::load_activations_at<TT>(xb[u], x_stage, 128 * u * kConsumerWarps, M);
      }
#pragma unroll
      for (int j = 0; j < TT; ++j) x_stage[j] += L::KS;
      bulk::mbar_wait(full + slot, phase);
      const uint8_t* wsrc = smem + L::kWeightsOffset + slot * L::kStageWeightBytes;
      const uint8_t* scales = smem + L::kScalesOffset + slot * L::kStageScaleBytes;
#pragma unroll
      for (int u = 0; u < L::kQuadsPerWarp; ++u) {
        const int qq = warp + u * kConsumerWarps;
        if (qq >= quads) break;  // qq grows with u
        const int chunk = 4 * qq + t;  // the lane's 32-wide k chunk within the stage
#pragma unroll
        for (int r = 0; r < RT; ++r) {
          const int row = 16 * r + g;
          const uint8_t* src = wsrc + row * L::kRowStride + 16 * chunk;
          const uint4 w_g = *reinterpret_cast<const uint4*>(src);
          const uint4 w_g8 = *reinterpret_cast<const uint4*>(src + 8 * L::kRowStride);
          GroupDequant dq_g{}, dq_g8{};
          if constexpr (PER_GROUP) {
            const uint32_t word = *reinterpret_cast<const uint32_t*>(scales + sz_offset[u] + 32 * r);
            make_group_dequant_pair(word, dq_g, dq_g8);
          }
          swapped::mma_chunk<PER_GROUP, TT>(acc[r], w_g, w_g8, dq_g, dq_g8, xb[u], M);
        }
      }
      __syncwarp();
      if (lane == 0) bulk::mbar_arrive(empty + slot);
      if (++slot == kStages) slot = 0, phase ^= 1;
    }
    bulk::named_barrier(1, kConsumerThreads);  // the previous tile's reduction is done reading `partial`
    swapped::store_partials<RT, TT>(partial, acc, warp, g, t);
    bulk::named_barrier(1, kConsumerThreads);
    swapped::reduce_and_store<PER_GROUP, kConsumerWarps, RT, TT>(partial, p, n0, threadIdx.x, kConsumerThreads, epi);
  }
#endif
}

bool stream_image_available() {
  static int8_t cached[64] = {0};
  return runs_sm90_image(w4a8_stream_kernel<true, 1, 1, 8, 1>, cached);
}

template <bool PER_GROUP, int TT, int RT, int CW, int BLOCKS>
void launch_tiles(const GemmParams& p, int sms) {
  using L = StreamLayout<TT, RT, CW, BLOCKS>;
  auto kernel = w4a8_stream_kernel<PER_GROUP, TT, RT, CW, BLOCKS>;
  static bool opted_in[64] = {false};
  allow_dynamic_smem(kernel, L::kSmemBytes, opted_in);
  static int8_t sm90[64] = {0};
  launch_kernel(kernel, sm90, {dim3(std::min(p.N / L::BR, BLOCKS * sms)), dim3(L::kThreads), L::kSmemBytes}, p);
}

// Variants (rows per tile, consumer warps, blocks per SM): 0 = (16, 8, 1), 1 = (32, 8, 1), 2 = (32, 8, 2),
// 3 = (32, 16, 1). Every variant computes the same sums. (Also measured, not kept: 3 with five stages, and 2 and 3
// with each warp loading the next stage's activations before working on the current one: none was faster.)
constexpr int kVariants = 4;

template <bool PER_GROUP, int TT>
void launch_variant(const GemmParams& p, int sms, int variant) {
  switch (variant) {
    case 1: return launch_tiles<PER_GROUP, TT, 2, 8, 1>(p, sms);
    case 2: return launch_tiles<PER_GROUP, TT, 2, 8, 2>(p, sms);
    case 3: return launch_tiles<PER_GROUP, TT, 2, 16, 1>(p, sms);
    default: return launch_tiles<PER_GROUP, TT, 1, 8, 1>(p, sms);
  }
}

template <bool PER_GROUP>
void launch_m(const GemmParams& p, int sms, int variant) {
  if (p.M <= 8) {
    launch_variant<PER_GROUP, 1>(p, sms, variant);
  } else if (p.M <= 16) {
    launch_variant<PER_GROUP, 2>(p, sms, variant);
  } else {
    launch_variant<PER_GROUP, 4>(p, sms, variant);
  }
}

}  // namespace

int stream_max_m(bool per_group) {
  if (env_int("QOQ_GEMM_STREAM", 1) == 0) return 0;
  return std::clamp(env_int("QOQ_GEMM_STREAM_MAX_M", kDefaultMaxM[per_group ? 1 : 0]), 0, kMaxM);
}

int stream_min_m() { return std::max(1, env_int("QOQ_GEMM_STREAM_MIN_M", kDefaultMinM)); }

bool stream_may_take(int64_t M, bool per_group) {
  return M >= stream_min_m() && M <= stream_max_m(per_group) && stream_image_available();
}

bool stream_supports(const GemmParams& p, bool per_group) {
  if (p.M < 1 || p.M > kMaxM || p.N % 16 != 0 || p.K % 128 != 0) return false;
  if (per_group) {
    if (p.group_size != 64 && p.group_size != 128) return false;
    if (p.packed_scales == nullptr || reinterpret_cast<uintptr_t>(p.packed_scales) % 16 != 0) return false;
  }
  return stream_image_available();
}

template <bool PER_GROUP>
void launch_w4a8_stream(const GemmParams& p, int sms) {
  TORCH_CHECK(stream_supports(p, PER_GROUP), "w4a8 streaming kernel: unsupported shape or device (M=", qoq::num(p.M),
              ", N=", qoq::num(p.N), ", K=", qoq::num(p.K), ")");
  // QOQ_GEMM_STREAM_VARIANT=<0..3> overrides the variant (benchmarks and tests); 32-row tiles need N % 32 == 0.
  // Defaults from the H100 layer chain (docs/benchmarks.md), where each GEMM's start overlaps the previous one's tail:
  // one block an SM with 16 consumer warps (3) per channel at every shape, and per group for long rows (K >= 4
  // stages: three stages in flight, e.g. down_proj); two 8-warp blocks an SM (2) per group otherwise; per group at
  // M > 8 one block an SM with 8 consumer warps (1) at every shape: each warp then takes two k blocks of a stage
  // (independent mma chains) and a tile's reduction adds 8 warps' sums, not 16 (layer chain at M = 16 on the
  // kernels of this rule: 51.2-51.6 us against 52.5-52.8 with 3 everywhere).
  // Timed each shape back to back with itself, two blocks were faster on the short GEMMs (per channel M = 1: qkv 5.03
  // vs 5.81 us, o 3.81 vs 4.55), but in the chain a GEMM whose block shape differs from its predecessor's starts
  // later: per channel with variant 3 everywhere ran 48.5-49.0 us a layer at M = 16 against 50.7-51.0 for the mixed
  // rule before it, and no slower at M = 1-8. Per group at M <= 8, gate_up ran faster on two blocks (21.97 vs 25.33
  // us at M = 1), and its mixed rule beat both uniform ones in the chain (M = 1: 46.4 against 49.1 / 51.2 us).
  const int rule = PER_GROUP && p.M > 8 ? 1 : (!PER_GROUP || p.K >= 4 * 2048 ? 3 : 2);
  int variant = env_int("QOQ_GEMM_STREAM_VARIANT", rule);
  if (variant < 0 || variant >= kVariants || p.N % 32 != 0) variant = 0;
  launch_m<PER_GROUP>(p, sms, variant);
}

template void launch_w4a8_stream<true>(const GemmParams& p, int sms);
template void launch_w4a8_stream<false>(const GemmParams& p, int sms);

}  // namespace qoq
