// Small-M tensor-core path (3 <= M <= 64) of qoq::w4a8_gemm_per_group / w4a8_gemm_per_channel. At these sizes the
// GEMM still only has to stream the packed weights once, so, like the decode kernel, a block owns a few output
// rows and all of K and its 8 warps split K; but the products run on INT8 mma.sync with the operands swapped
// (swapped_mma.cuh: the weights are the 16-row A operand, the tokens the 8-column B operand, so one weight fragment
// serves up to 8 token tiles and nothing is padded to a 16-row activation tile). Each lane loads its weight chunks
// straight from global memory (one 128-wide k block per warp step, the 4 lanes of a row reading 64 contiguous
// bytes, the next k block in the same batch); the 8 warps' INT32 sums are reduced in shared memory in a fixed order
// (exact, deterministic, no workspace) and the epilogue is the contract's (float(acc) * x_s[m]) * float(s[n])
// (+ bias[n]).
#include <algorithm>

#include "common.cuh"
#include "gemm/swapped_mma.cuh"
#include "gemm/w4a8_skinny.cuh"

namespace qoq {
namespace {

constexpr int kMaxM = 64;
// Defaults from the H100 sweep (benchmarks/gemm.py --sweep-skinny, docs/benchmarks.md): per group the kernel beats
// the tile kernel up to M = 32 (no shared-memory staging of the weights to dequantize), per channel up to M = 16.
constexpr int kDefaultMaxM[2] = {16, 32};  // [per channel, per group]
constexpr int kWarps = 8, kThreads = kWarps * 32;
// 128-wide k blocks a warp loads before it uses any: 4 while the accumulators are few, else 2 (registers).
constexpr int quads_in_flight(int tt, int rt) { return tt * rt <= 4 ? 4 : 2; }

// TT: 8-token tiles the accumulators hold (p.M <= 8 * TT); RT: 16-row tiles per block (rows per block 16 * RT).
template <bool PER_GROUP, int TT, int RT>
__global__ void __launch_bounds__(kThreads, 1) w4a8_skinny_kernel(const GemmParams p) {
  constexpr int BR = 16 * RT;
  constexpr int U = quads_in_flight(TT, RT);
  extern __shared__ int32_t partial[];  // [kWarps][8 * TT][partial_stride(BR)] (swapped::store_partials)

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * BR;
  const int quads = p.K / 128;
  const size_t row_bytes = static_cast<size_t>(p.K) / 2;

  int32_t acc[RT][TT][4] = {};
  constexpr int kEpilogueIters = swapped::epilogue_iters(RT, TT, kThreads);
  EpilogueOperands<kEpilogueIters> epi;
  // PDL (common.cuh): while the previous kernel may still run, the block's first batch of weights (U * kWarps k blocks
  // of 64 bytes of each row; per group with their scales and zeros) is prefetched into L2 and the weight epilogue
  // operands are loaded; the activations and their scales / sums only after the wait.
  prefetch_first_weights<PER_GROUP, false>(p, n0, BR, U * kWarps * 64, threadIdx.x);
  load_epilogue_weights<PER_GROUP>(epi, p, n0, BR, threadIdx.x, kThreads);
  pdl_wait();
  pdl_launch_dependents();
  load_epilogue_activations<PER_GROUP>(epi, p, BR, threadIdx.x, kThreads);

  // Batch u of a warp reads k block q0 + u % 2 + (u / 2) * 2 * kWarps: each warp reads 2 adjacent 128-wide k blocks
  // (128 contiguous bytes of each row) per pair, the 8 warps together 16 adjacent ones.
  static_assert(U % 2 == 0, "k blocks are read in adjacent pairs");
  for (int q0 = 2 * warp; q0 < quads; q0 += U * kWarps) {
    uint4 w[U][RT][2];      // [k block][row tile][row g, row g + 8]
    uint32_t sz[U][RT][2] = {};  // per group: s2 | z2 << 8
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int q = q0 + (u & 1) + (u >> 1) * 2 * kWarps;
      const bool ok = q < quads;
      const int chunk = 4 * q + t;
      const int group = PER_GROUP && ok ? chunk * 32 / p.group_size : 0;
#pragma unroll
      for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = n0 + 16 * r + 8 * h + g;
          w[u][r][h] = ok ? load_weights_16(p.qweight + row * row_bytes + 16 * static_cast<size_t>(chunk))
                          : make_uint4(0, 0, 0, 0);
          if constexpr (PER_GROUP) {
            const size_t idx = static_cast<size_t>(row) * p.groups + group;
            sz[u][r][h] = ok ? (static_cast<uint32_t>(__ldg(p.s2 + idx)) | (static_cast<uint32_t>(__ldg(p.z2 + idx)) << 8))
                             : 0u;
          }
        }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int q = q0 + (u & 1) + (u >> 1) * 2 * kWarps;
      if (q >= quads) break;  // q grows with u: the later blocks of the batch are past K too
      uint32_t xb[TT][8];
      swapped::load_activations<TT>(xb, p, q, g, t);
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        GroupDequant dq[2] = {};
        if constexpr (PER_GROUP) {
#pragma unroll
          for (int h = 0; h < 2; ++h) dq[h] = make_group_dequant(sz[u][r][h] & 0xFFu, sz[u][r][h] >> 8);
        }
        swapped::mma_chunk<PER_GROUP, TT>(acc[r], w[u][r][0], w[u][r][1], dq[0], dq[1], xb, p.M);
      }
    }
  }

  swapped::store_partials<RT, TT>(partial, acc, warp, g, t);
  __syncthreads();
  swapped::reduce_and_store<PER_GROUP, kWarps, RT, TT>(partial, p, n0, threadIdx.x, kThreads, epi);
}

template <bool PER_GROUP, int TT, int RT>
void launch_tiles(const GemmParams& p) {
  constexpr int BR = 16 * RT;
  constexpr int kSmemBytes = kWarps * 8 * TT * swapped::partial_stride(BR) * 4;
  auto kernel = w4a8_skinny_kernel<PER_GROUP, TT, RT>;
  if constexpr (kSmemBytes > 48 * 1024) {  // opt in above the default dynamic shared memory cap, once per device
    static bool opted_in[64] = {false};
    allow_dynamic_smem(kernel, kSmemBytes, opted_in);
  }
  static int8_t sm90[64] = {0};
  launch_kernel(kernel, sm90, {dim3(p.N / BR), dim3(kThreads), kSmemBytes}, p);
}

template <bool PER_GROUP, int TT>
void launch_rows(const GemmParams& p, int rt) {
  switch (rt) {
    case 4: return launch_tiles<PER_GROUP, TT, (TT < 8 ? 4 : 2)>(p);  // (8 token tiles x 4 row tiles: too many registers)
    case 2: return launch_tiles<PER_GROUP, TT, 2>(p);
    default: return launch_tiles<PER_GROUP, TT, 1>(p);
  }
}

}  // namespace

int skinny_max_m(bool per_group) {
  if (env_int("QOQ_GEMM_SKINNY", 1) == 0) return 0;
  return std::clamp(env_int("QOQ_GEMM_SKINNY_MAX_M", kDefaultMaxM[per_group ? 1 : 0]), 0, kMaxM);
}

bool skinny_supports(const GemmParams& p) { return p.M <= kMaxM && p.N % 16 == 0 && p.K % 128 == 0; }

int skinny_row_tiles(const GemmParams& p, int sms) {
  const int forced = env_int("QOQ_GEMM_SKINNY_RT", 0);
  int rt = 1;
  if (forced == 1 || forced == 2 || forced == 4) {
    rt = forced;
  } else if (p.M > 32) {
    // Up to M = 32, 16 rows a block (the most blocks) was fastest on the H100; beyond, the activation loads
    // dominate: the most rows per block (each activation load serves more rows) that still fill the SMs.
    for (int cand : {4, 2}) {
      if (p.N % (16 * cand) == 0 && p.N / (16 * cand) >= sms * 7 / 8) {
        rt = cand;
        break;
      }
    }
  }
  if (p.M > 32 && rt == 4) rt = 2;  // 8 token tiles take at most 2 row tiles (registers)
  while (p.N % (16 * rt) != 0) rt /= 2;
  return rt;
}

template <bool PER_GROUP>
void launch_w4a8_skinny(const GemmParams& p, int sms) {
  TORCH_CHECK(p.M >= 1 && skinny_supports(p), "w4a8 small-M kernel takes 1 <= M <= ", qoq::num(kMaxM),
              ", N % 16 == 0 and K % 128 == 0; got M=", qoq::num(p.M), ", N=", qoq::num(p.N), ", K=", qoq::num(p.K));
  const int rt = skinny_row_tiles(p, sms);
  if (p.M <= 8) {
    launch_rows<PER_GROUP, 1>(p, rt);
  } else if (p.M <= 16) {
    launch_rows<PER_GROUP, 2>(p, rt);
  } else if (p.M <= 32) {
    launch_rows<PER_GROUP, 4>(p, rt);
  } else {
    launch_rows<PER_GROUP, 8>(p, rt);
  }
}

template void launch_w4a8_skinny<true>(const GemmParams& p, int sms);
template void launch_w4a8_skinny<false>(const GemmParams& p, int sms);

}  // namespace qoq
