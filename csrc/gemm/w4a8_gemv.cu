// Decode path (M <= 16) of qoq::w4a8_gemm_per_group / w4a8_gemm_per_channel: at small M the GEMM only has
// to stream the packed weights from HBM once, so this kernel is built around bytes in flight rather than
// tensor cores:
//   - a block owns BR = 4 * R output rows and all of K; its 8 warps split K, each lane owning R rows and
//     one 16-byte chunk (32 weights) per 64-chunk stride; a lane issues R * U independent 16-byte loads
//     (ld.global.nc, L1::no_allocate) before it uses any of them,
//   - activations (M x K int8, small) are read through the L1 cache, which the weights bypass,
//   - no dequantization: dp4a multiplies the raw UINT4 values (v2 packed layout: a chunk's word j holds k
//     4j..4j+3 in its low nibbles and k 16+4j..16+4j+3 in its high ones) with the activations, and the
//     per-group scale and zero are applied once per chunk in integers:
//       sum_k x * (w4 - z2) * s2 = s2 * (sum_k x * w4 - z2 * sum_k x),
//     which is the contract's INT32 accumulation exactly (uint32 arithmetic: wrap-around is harmless because
//     the final sum fits in int32),
//   - the K split is reduced exactly in shared memory (fixed order), so there is no workspace and no memset;
//     the epilogue is the contract's (float(acc) * x_s[m]) * float(s[n]) (+ bias[n]) with _rn float ops.
#include <algorithm>

#include "common.cuh"
#include "gemm/w4a8_gemv.cuh"

namespace qoq {
namespace {

constexpr int kMaxM = 16;
constexpr int kDefaultMaxM = 2;
constexpr int kWarps = 8, kThreads = kWarps * 32;
constexpr int kKLanes = 8;                      // lanes of a warp side by side along K (128 contiguous bytes)
constexpr int kRowLanes = 32 / kKLanes;         // lanes of a warp side by side along N
constexpr int kChunkStride = kKLanes * kWarps;  // 32-wide k chunks one pass of the block covers per row

__device__ __forceinline__ int dot8(const uint32_t (&lo)[4], const uint32_t (&hi)[4], const int4& x_lo,
                                    const int4& x_hi, int acc) {
  acc = __dp4a(static_cast<int>(lo[0]), x_lo.x, acc);
  acc = __dp4a(static_cast<int>(lo[1]), x_lo.y, acc);
  acc = __dp4a(static_cast<int>(lo[2]), x_lo.z, acc);
  acc = __dp4a(static_cast<int>(lo[3]), x_lo.w, acc);
  acc = __dp4a(static_cast<int>(hi[0]), x_hi.x, acc);
  acc = __dp4a(static_cast<int>(hi[1]), x_hi.y, acc);
  acc = __dp4a(static_cast<int>(hi[2]), x_hi.z, acc);
  acc = __dp4a(static_cast<int>(hi[3]), x_hi.w, acc);
  return acc;
}

// Sum of the 32 activations of a chunk (the zero-point term of the per-group factorization).
__device__ __forceinline__ int sum32(const int4& x_lo, const int4& x_hi) {
  constexpr int kOnes = 0x01010101;
  int s = __dp4a(x_lo.x, kOnes, 0);
  s = __dp4a(x_lo.y, kOnes, s);
  s = __dp4a(x_lo.z, kOnes, s);
  s = __dp4a(x_lo.w, kOnes, s);
  s = __dp4a(x_hi.x, kOnes, s);
  s = __dp4a(x_hi.y, kOnes, s);
  s = __dp4a(x_hi.z, kOnes, s);
  return __dp4a(x_hi.w, kOnes, s);
}

// MAXM: activation rows the accumulators hold (p.M <= MAXM); R: rows per lane; U: k chunks per lane per batch;
// MINB: blocks per SM the registers are limited for (more blocks: more loads in flight per SM).
template <bool PER_GROUP, int MAXM, int R, int U, int MINB>
__global__ void __launch_bounds__(kThreads, MINB) w4a8_gemv_kernel(const GemmParams p) {
  constexpr int BR = kRowLanes * R;
  __shared__ uint32_t partial[kWarps][MAXM][BR];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int kl = lane % kKLanes, rl = lane / kKLanes;
  const int n0 = blockIdx.x * BR;
  const int kchunks = p.K / 32;
  const size_t row_bytes = static_cast<size_t>(p.K) / 2;
  // Lane rows: n0 + rl + kRowLanes * r, so for each r the warp reads 4 whole 128-byte row segments.
  const uint8_t* w_base = p.qweight + static_cast<size_t>(n0 + rl) * row_bytes;

  // PDL (common.cuh): while the previous kernel may still run, the block's first batch of weights (U * 64 chunks of
  // each row; per group with its scales and zeros) is prefetched into L2 and the weight epilogue operands are loaded;
  // the activations and their scales / sums only after the wait.
  prefetch_first_weights<PER_GROUP, true>(p, n0, BR, U * kChunkStride * 16, threadIdx.x);
  constexpr int kEpilogueIters = (BR * MAXM + kThreads - 1) / kThreads;
  EpilogueOperands<kEpilogueIters> epi;
  load_epilogue_weights<PER_GROUP, !PER_GROUP>(epi, p, n0, BR, threadIdx.x, kThreads);
  pdl_wait();
  pdl_launch_dependents();
  load_epilogue_activations<PER_GROUP, !PER_GROUP>(epi, p, BR, threadIdx.x, kThreads);

  uint32_t acc[R][MAXM];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MAXM; ++m) acc[r][m] = 0;

  for (int c0 = warp * kKLanes + kl; c0 < kchunks; c0 += U * kChunkStride) {
    // Issue every load of the batch first: R * U * 16 bytes in flight per lane.
    uint4 w[U][R];
    uint32_t sz[U][R];  // per group: s2 | z2 << 16
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * kChunkStride;
      const bool ok = c < kchunks;
      const int group = PER_GROUP && ok ? c * 32 / p.group_size : 0;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        w[u][r] = ok ? load_weights_16(w_base + r * kRowLanes * row_bytes + 16 * static_cast<size_t>(c))
                     : make_uint4(0, 0, 0, 0);
        if constexpr (PER_GROUP) {
          const size_t idx = static_cast<size_t>(n0 + rl + r * kRowLanes) * p.groups + group;
          sz[u][r] = ok ? (static_cast<uint32_t>(__ldg(p.s2 + idx)) | (static_cast<uint32_t>(__ldg(p.z2 + idx)) << 16))
                        : 0u;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * kChunkStride;
      if (c >= kchunks) break;  // the later chunks of the batch are past K too
      uint32_t lo[R][4], hi[R][4];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint32_t words[4] = {w[u][r].x, w[u][r].y, w[u][r].z, w[u][r].w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          lo[r][j] = words[j] & 0x0F0F0F0Fu;         // k = 32c + 4j .. 4j+3
          hi[r][j] = (words[j] >> 4) & 0x0F0F0F0Fu;  // k = 32c + 16 + 4j .. 4j+3
        }
      }
#pragma unroll
      for (int m = 0; m < MAXM; ++m) {
        if (m >= p.M) break;
        const int4* x = reinterpret_cast<const int4*>(p.x_q + static_cast<size_t>(m) * p.K + 32 * c);
        const int4 x_lo = __ldg(x), x_hi = __ldg(x + 1);
        if constexpr (PER_GROUP) {
          const uint32_t xs = static_cast<uint32_t>(sum32(x_lo, x_hi));
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const uint32_t dot = static_cast<uint32_t>(dot8(lo[r], hi[r], x_lo, x_hi, 0));
            acc[r][m] += (sz[u][r] & 0xFFFFu) * (dot - (sz[u][r] >> 16) * xs);
          }
        } else {  // per channel: the zero point is applied once, in the epilogue
#pragma unroll
          for (int r = 0; r < R; ++r)
            acc[r][m] = static_cast<uint32_t>(dot8(lo[r], hi[r], x_lo, x_hi, static_cast<int>(acc[r][m])));
        }
      }
    }
  }

  // Exact reduction: over the 8 K lanes of the warp (shuffles), then over the warps in a fixed order.
#pragma unroll
  for (int m = 0; m < MAXM; ++m) {
    if (m >= p.M) break;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      uint32_t v = acc[r][m];
#pragma unroll
      for (int off = 1; off < kKLanes; off <<= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
      if (kl == 0) partial[warp][m][rl + r * kRowLanes] = v;
    }
  }
  __syncthreads();
#pragma unroll
  for (int it = 0; it < kEpilogueIters; ++it) {
    const int t = threadIdx.x + it * kThreads;
    if (t >= BR * p.M) break;
    const int row = t % BR, m = t / BR;
    uint32_t sum = 0;
#pragma unroll
    for (int i = 0; i < kWarps; ++i) sum += partial[i][m][row];
    if constexpr (!PER_GROUP) sum -= epi.zero_sum[it];
    store_one(p, m, n0 + row,
              epilogue_value(static_cast<int32_t>(sum), epi.xs[it], epi.ws[it], p.bias_kind != kNoBias, epi.bias[it]));
  }
}

template <bool PER_GROUP, int MAXM, int R, int U, int MINB>
void launch_bucket(const GemmParams& p) {
  constexpr int BR = kRowLanes * R;
  static_assert(16 % BR == 0, "N is only guaranteed to be a multiple of 16");
  static_assert(BR * MAXM <= kThreads * 4, "epilogue loop bound");
  static int8_t sm90[64] = {0};
  launch_kernel(w4a8_gemv_kernel<PER_GROUP, MAXM, R, U, MINB>, sm90, {dim3(p.N / BR), dim3(kThreads)}, p);
}

// The (R, U, MINB) variants compiled for M <= 2: 0 = (4, 2, 2), 1 = (4, 2, 4), 2 = (2, 4, 4), 3 = (2, 2, 4),
// 4 = (4, 4, 2). Defaults from the H100 sweep (benchmarks/gemm.py --sweep-decode, docs/benchmarks.md): M = 1 runs
// 1 (four blocks per SM keep more loads in flight: layer sum 70.1 vs 77.9 us per-group), M = 2 runs 0 (config 1
// needs more registers there and spills).
constexpr int kDecodeConfigs = 5;
constexpr int kDefaultConfig[2] = {1, 0};

template <bool PER_GROUP, int MAXM>
void launch_small_m(const GemmParams& p, int config) {
  switch (config) {
    case 1: return launch_bucket<PER_GROUP, MAXM, 4, 2, 4>(p);
    case 2: return launch_bucket<PER_GROUP, MAXM, 2, 4, 4>(p);
    case 3: return launch_bucket<PER_GROUP, MAXM, 2, 2, 4>(p);
    case 4: return launch_bucket<PER_GROUP, MAXM, 4, 4, 2>(p);
    default: return launch_bucket<PER_GROUP, MAXM, 4, 2, 2>(p);
  }
}

}  // namespace

// The decode kernel takes M <= kMaxM; by default only M <= kDefaultMaxM, where it beat the tile kernel on the
// H100 (docs/benchmarks.md). QOQ_GEMM_DECODE=0 / QOQ_GEMM_DECODE_MAX_M=<m> override it, read at each call (a
// getenv, negligible next to the GEMM) so tests can reach every M.
int gemv_max_m() {
  if (env_int("QOQ_GEMM_DECODE", 1) == 0) return 0;
  return std::clamp(env_int("QOQ_GEMM_DECODE_MAX_M", kDefaultMaxM), 0, kMaxM);
}

template <bool PER_GROUP>
void launch_w4a8_gemv(const GemmParams& p) {
  TORCH_CHECK(p.M >= 1 && p.M <= kMaxM, "w4a8 decode kernel takes 1 <= M <= ", qoq::num(kMaxM), ", got M=",
              qoq::num(p.M));
  TORCH_CHECK(p.N % 16 == 0 && p.K % 64 == 0, "w4a8 decode kernel needs N % 16 == 0 and K % 64 == 0");
  // QOQ_GEMM_DECODE_CONFIG=<0..4> overrides the M <= 2 variant (benchmarks and tests).
  const int config = env_int("QOQ_GEMM_DECODE_CONFIG", p.M <= 1 ? kDefaultConfig[0] : kDefaultConfig[1]);
  TORCH_CHECK(config >= 0 && config < kDecodeConfigs, "QOQ_GEMM_DECODE_CONFIG must be 0..",
              qoq::num(kDecodeConfigs - 1), ", got ", qoq::num(config));
  // More rows per lane reuse each activation load more; fewer keep the accumulators in registers at large M.
  if (p.M <= 1) {
    launch_small_m<PER_GROUP, 1>(p, config);
  } else if (p.M <= 2) {
    launch_small_m<PER_GROUP, 2>(p, config);
  } else if (p.M <= 4) {
    launch_bucket<PER_GROUP, 4, 4, 2, 2>(p);
  } else if (p.M <= 8) {
    launch_bucket<PER_GROUP, 8, 2, 4, 2>(p);
  } else {
    launch_bucket<PER_GROUP, 16, 2, 4, 2>(p);
  }
}

template void launch_w4a8_gemv<true>(const GemmParams& p);
template void launch_w4a8_gemv<false>(const GemmParams& p);

}  // namespace qoq
