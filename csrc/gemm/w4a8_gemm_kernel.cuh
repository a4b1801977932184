// W4A8 GEMM main kernel (sm_80+): INT8 mma.sync m16n8k32, cp.async multi-stage pipeline, 4-bit weights
// turned into INT8 in registers, INT32 accumulation over the whole K, optional split-K with an exact INT32
// reduction, and the float epilogue of docs/formats.md.
//
// Weight layout (qoq_torch/ops/packing.py): in each 32-wide k block of a row, byte i holds w[i] in its low
// nibble and w[i+16] in its high nibble. The 16 bytes of a block are one ldmatrix row, so the word lane
// (g, t) receives holds exactly its B fragment of mma.m16n8k32 (k 4t..4t+3 in the low nibbles, k 16+4t..
// 16+4t+3 in the high ones, column g): unpacking is a mask and a shift, no shuffles.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common.cuh"
#include "gemm/mma_ptx.cuh"

namespace qoq {

enum BiasKind : int { kNoBias = 0, kBiasF32 = 1, kBiasF16 = 2, kBiasBF16 = 3 };

struct GemmParams {
  const int8_t* x_q;         // [M, K]
  const float* x_s;          // [M]
  const int32_t* x_sum;      // [M]    row sums of x_q (per group: read by the MMA kernels, see kGroupBias)
  const uint8_t* qweight;    // [N, K/2] packed
  const uint8_t* s2;         // [N, K/g] (per group)
  const uint8_t* z2;         // [N, K/g] (per group)
  const __half* wscale;      // [N]    s1 (per group) or scale (per channel)
  const uint8_t* zero;       // [N]    (per channel)
  const void* bias;          // [N] or nullptr
  int bias_kind;
  void* out;                 // [M, N] float16 / bfloat16
  bool out_bf16;
  int M, N, K, group_size, groups;
  int ktiles_per_split, splits;
  int split_groups;          // row stride of the (s2, z2) shared-memory table: groups one split can touch
  // Split-K / stream-K only. mma.sync kernel: [M, N] zeroed INT32 sums; wgmma kernel: [tiles][splits][BM / 2][256]
  // INT32 partial accumulators in fragment order (each split's or stream-K piece's, the last to finish adds them;
  // stream-K sets `splits` to the most pieces a tile has).
  int32_t* workspace;
  int32_t* counters;         // [tiles] zeroed: splits finished per output tile
  const void* residual;      // [M, N] in the output dtype, or nullptr: out = residual + y (y rounded first)
  const uint8_t* packed_scales;  // per group, wgmma kernels: [ceil(N/128), groups, 256] (ops.pack_scales)
  int l2_prefetch_tiles;     // wgmma kernel: k tiles of weights asked from L2 ahead of the stage copies (0: none)
};

// XOR swizzle of 16-byte chunks in a shared-memory tile with rows of ROW_BYTES bytes: the 8 rows one
// ldmatrix matrix reads (same logical chunk) land in 8 distinct bank groups.
template <int ROW_BYTES>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  constexpr int kChunks = ROW_BYTES / 16;
  constexpr int kRowsPerLine = ROW_BYTES >= 128 ? 1 : 128 / ROW_BYTES;
  constexpr int kMask = (kChunks < 8 ? kChunks : 8) - 1;
  return row * ROW_BYTES + ((chunk ^ ((row / kRowsPerLine) & kMask)) << 4);
}

// Per (column, group) constants of the progressive dequantization: s = s2 and c = (128 - z2 * s2) * 0x01010101
// (mod 2^32). nibbles4 * s + c is, as an exact integer, sum_j ((w4_j - z2) * s2 + 128) * 256^j, and every such
// digit lies in [0, 255] because (w4 - z2) * s2 lies in [-128, 127] (the format's guarantee): so the four bytes
// of the 32-bit multiply-add are those digits, with no carry between them. They are the INT8 weights biased by
// 128, a valid unsigned (u8) MMA operand: one instruction for four weights. The INT32 sum over K then holds an
// extra kGroupBias * x_sum[m], which the epilogue subtracts exactly as it subtracts the per-channel zero point
// (weight_zero: the per-group kernels' zero point is kGroupBias for every row).
constexpr uint32_t kGroupBias = 128;

struct GroupDequant {
  uint32_t s, c;
};

__device__ __forceinline__ GroupDequant make_group_dequant(uint32_t s2, uint32_t z2) {
  return {s2, (kGroupBias - s2 * z2) * 0x01010101u};
}

// The same constants from the packed scales (ops.pack_scales): s2 and b = 240 - z2 * s2, so that
// (128 - z2 * s2) * 0x01010101 = b * 0x01010101 - 112 * 0x01010101 (mod 2^32) is one multiply-add.
constexpr uint32_t kMinus112x4 = 0x8F8F8F90u;  // -112 * 0x01010101 (mod 2^32)
__device__ __forceinline__ GroupDequant make_group_dequant_packed(uint32_t s2, uint32_t b) {
  return {s2, b * 0x01010101u + kMinus112x4};
}

// The same for rows g and g + 8 of a 16-row block from their word of the packed scales (s2 of both rows, then b of
// both), so that a thread's two fragment rows cost one 32-bit load: b * 0x01010101 is the b byte replicated.
__device__ __forceinline__ void make_group_dequant_pair(uint32_t word, GroupDequant& row_g, GroupDequant& row_g8) {
  row_g = {word & 0xFFu, __byte_perm(word, 0, 0x2222) + kMinus112x4};
  row_g8 = {(word >> 8) & 0xFFu, __byte_perm(word, 0, 0x3333) + kMinus112x4};
}

// nibbles4: four UINT4 weights of one row and group, one a byte; returns their biased values
// (w4 - z2) * s2 + kGroupBias, one unsigned byte each.
__device__ __forceinline__ uint32_t dequant4(uint32_t nibbles4, const GroupDequant& d) {
  return nibbles4 * d.s + d.c;
}

// The zero point the epilogue takes off the INT32 sum, times x_sum[m]: per channel the format's zero[n], per
// group the dequantization's bias (the MMA kernels; the dp4a decode kernel applies z2 per chunk instead).
template <bool PER_GROUP>
__device__ __forceinline__ uint32_t weight_zero(const GemmParams& p, int n) {
  if constexpr (PER_GROUP) {
    return kGroupBias;
  } else {
    return p.zero[n];
  }
}

__device__ __forceinline__ float load_bias(const GemmParams& p, int n) {
  switch (p.bias_kind) {
    case kBiasF32: return static_cast<const float*>(p.bias)[n];
    case kBiasF16: return __half2float(static_cast<const __half*>(p.bias)[n]);
    case kBiasBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p.bias)[n]);
    default: return 0.f;
  }
}

// y = (float(acc) * x_s[m]) * float(s[n]) (+ bias[n]); explicit _rn ops so nvcc cannot fuse into FMAs and
// the result matches the CPU reference bit for bit before the final cast.
__device__ __forceinline__ float epilogue_value(int32_t acc, float xs, float ws, bool has_bias, float bias) {
  float y = __fmul_rn(__fmul_rn(__int2float_rn(acc), xs), ws);
  if (has_bias) y = __fadd_rn(y, bias);
  return y;
}

__device__ __forceinline__ float epilogue_value(const GemmParams& p, int32_t acc, float xs, int n) {
  return epilogue_value(acc, xs, __half2float(p.wscale[n]), p.bias_kind != kNoBias,
                        p.bias_kind != kNoBias ? load_bias(p, n) : 0.f);
}

// The epilogue operands of the outputs one thread stores after a K loop, loaded before the loop so that their
// latency (a DRAM round trip for the per-row ones) hides behind it instead of following it. Output i of thread
// `tid` is idx = tid + i * nthreads when idx < rows * M: row idx % rows, token idx / rows.
template <int ITERS>
struct EpilogueOperands {
  float xs[ITERS], ws[ITERS], bias[ITERS];
  uint32_t zero_sum[ITERS];  // weight_zero(n) * x_sum[m], subtracted from the accumulator (ZERO_TERM kernels)
};

// load_epilogue in two halves for PDL (common.cuh): the weight operands (s[n], bias[n], zero[n]) may be loaded
// before pdl_wait(), the activation ones (x_s[m], x_sum[m]) only after it. ZERO_TERM: the kernel's INT32 sum
// needs the weight_zero * x_sum correction (every kernel but the per-group dp4a one).
template <bool PER_GROUP, bool ZERO_TERM = true, int ITERS>
__device__ __forceinline__ void load_epilogue_weights(EpilogueOperands<ITERS>& e, const GemmParams& p, int n0,
                                                      int rows, int tid, int nthreads) {
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int idx = tid + i * nthreads;
    e.xs[i] = e.ws[i] = e.bias[i] = 0.f;
    e.zero_sum[i] = 0;
    if (idx < rows * p.M) {
      const int n = n0 + idx % rows;
      e.ws[i] = __half2float(p.wscale[n]);
      if (p.bias_kind != kNoBias) e.bias[i] = load_bias(p, n);
      if constexpr (ZERO_TERM) e.zero_sum[i] = weight_zero<PER_GROUP>(p, n);  // times x_sum[m] below
    }
  }
}

template <bool PER_GROUP, bool ZERO_TERM = true, int ITERS>
__device__ __forceinline__ void load_epilogue_activations(EpilogueOperands<ITERS>& e, const GemmParams& p, int rows,
                                                          int tid, int nthreads) {
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int idx = tid + i * nthreads;
    if (idx < rows * p.M) {
      const int m = idx / rows;
      e.xs[i] = p.x_s[m];
      if constexpr (ZERO_TERM) e.zero_sum[i] *= static_cast<uint32_t>(p.x_sum[m]);
    }
  }
}

template <bool PER_GROUP, bool ZERO_TERM = true, int ITERS>
__device__ __forceinline__ void load_epilogue(EpilogueOperands<ITERS>& e, const GemmParams& p, int n0, int rows,
                                              int tid, int nthreads) {
  load_epilogue_weights<PER_GROUP, ZERO_TERM>(e, p, n0, rows, tid, nthreads);
  load_epilogue_activations<PER_GROUP, ZERO_TERM>(e, p, rows, tid, nthreads);
}

// `residual + y` as the decoder adds them: y rounded to the output dtype, the float sum rounded by the store.
__device__ __forceinline__ float with_residual(const GemmParams& p, size_t idx, float y) {
  if (p.residual == nullptr) return y;
  if (p.out_bf16) {
    return __fadd_rn(__bfloat162float(__float2bfloat16_rn(y)),
                     __bfloat162float(static_cast<const __nv_bfloat16*>(p.residual)[idx]));
  }
  return __fadd_rn(__half2float(__float2half_rn(y)), __half2float(static_cast<const __half*>(p.residual)[idx]));
}

__device__ __forceinline__ void store_pair(const GemmParams& p, int m, int n, float y0, float y1) {
  const size_t idx = static_cast<size_t>(m) * p.N + n;
  y0 = with_residual(p, idx, y0);
  y1 = with_residual(p, idx + 1, y1);
  if (p.out_bf16) {
    *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(p.out) + idx) = __floats2bfloat162_rn(y0, y1);
  } else {
    *reinterpret_cast<__half2*>(static_cast<__half*>(p.out) + idx) = __floats2half2_rn(y0, y1);
  }
}

__device__ __forceinline__ void store_one(const GemmParams& p, int m, int n, float y) {
  const size_t idx = static_cast<size_t>(m) * p.N + n;
  y = with_residual(p, idx, y);
  if (p.out_bf16) {
    static_cast<__nv_bfloat16*>(p.out)[idx] = __float2bfloat16_rn(y);
  } else {
    static_cast<__half*>(p.out)[idx] = __float2half_rn(y);
  }
}

// 16 bytes of weights, read once (the small-M kernels): skip L1 so the activations stay cached there.
__device__ __forceinline__ uint4 load_weights_16(const uint8_t* ptr) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(ptr));
  return v;
}

// PDL prologue of the small-M kernels (common.cuh; sm_90+ code only, nothing elsewhere): while the previous kernel may
// still run, the first `bytes` of each of the block's weight rows n0 .. n0 + rows - 1 (what its first batch of loads
// reads) are prefetched into L2 by the bulk copy engine, one row per thread tid < rows, and per group the rows' s2 and
// z2 bytes, one 128-byte line per thread (tid). Nothing is held in registers across the wait. PREDICATED: the row
// prefetch is predicated in the asm instead of branched on tid < rows; with ptxas 13.0 that kept the register-capped
// decode kernel (w4a8_gemv.cu) from spilling, while the small-M kernel allocates fewer registers with the branch.
// The packed rows are 16-byte aligned (the host aligns qweight; K % 64 == 0).
template <bool PER_GROUP, bool PREDICATED>
__device__ __forceinline__ void prefetch_first_weights(const GemmParams& p, int n0, int rows, uint32_t bytes, int tid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const size_t row_bytes = static_cast<size_t>(p.K) / 2;
  const uint32_t row_prefix = static_cast<uint32_t>(min(static_cast<size_t>(bytes), row_bytes));
  if constexpr (PREDICATED) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.lt.s32 p, %2, %3;\n@p cp.async.bulk.prefetch.L2.global [%0], %1;\n}\n" ::"l"(
            p.qweight + static_cast<size_t>(n0 + tid) * row_bytes),
        "r"(row_prefix), "r"(tid), "r"(rows));
  } else if (tid < rows) {
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p.qweight + (n0 + tid) * row_bytes),
                 "r"(row_prefix));
  }
  if constexpr (PER_GROUP) {
    // rows x groups contiguous bytes of each array; thread tid takes their 128-byte line tid (the first line, rounded
    // down, stays on the same page, so it is mapped; lines past the block's threads are left to the loads: a hint)
    const size_t offset = static_cast<size_t>(n0) * p.groups, len = static_cast<size_t>(rows) * p.groups;
    auto prefetch_line = [&](const uint8_t* array) {
      const uintptr_t begin = reinterpret_cast<uintptr_t>(array + offset);
      const uintptr_t line = (begin & ~uintptr_t(127)) + 128 * static_cast<uintptr_t>(tid);
      asm volatile("{\n.reg .pred p;\nsetp.lt.u64 p, %0, %1;\n@p prefetch.global.L2 [%0];\n}\n" ::"l"(line),
                   "l"(begin + len));
    };
    prefetch_line(p.s2);
    prefetch_line(p.z2);
  }
#endif
}

template <int BM, int BN, int BK, int WARPS_M, int WARPS_N, int STAGES>
struct TileConfig {
  static constexpr int kThreads = WARPS_M * WARPS_N * 32;
  static constexpr int kWarpM = BM / WARPS_M, kWarpN = BN / WARPS_N;
  static constexpr int kMTiles = kWarpM / 16, kNTiles = kWarpN / 8;
  static constexpr int kChunks64 = BK / 64;  // 64-wide k chunks per tile; a scale group spans >= 1
  static constexpr int kARow = BK, kBRow = BK / 2;
  static constexpr int kAStage = BM * kARow, kBStage = BN * kBRow;
  static constexpr int kSmemBytes = STAGES * (kAStage + kBStage);
  static_assert(kWarpM % 16 == 0 && kWarpN % 16 == 0, "warp tile must be a multiple of 16x16");
  static_assert(BK % 64 == 0, "BK must be a multiple of 64");
  static constexpr int kAChunks = BM * BK / 16, kBChunks = BN * BK / 32;  // 16-byte copies per stage
};

template <int BM, int BN, int BK, int WARPS_M, int WARPS_N, int STAGES, int MIN_BLOCKS, bool PER_GROUP>
__global__ void __launch_bounds__(WARPS_M* WARPS_N * 32, MIN_BLOCKS)
    w4a8_gemm_kernel(const GemmParams p) {
  using C = TileConfig<BM, BN, BK, WARPS_M, WARPS_N, STAGES>;
  constexpr int MT = C::kMTiles, NT = C::kNTiles, KP = C::kChunks64;
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* smem_a = smem;
  uint8_t* smem_b = smem + STAGES * C::kAStage;
  // (s2 | z2 << 8) of the CTA's BN columns for every group its k range touches, loaded once up front so
  // the main loop never waits on a global scale load.
  uint16_t* smem_sz = reinterpret_cast<uint16_t*>(smem_b + STAGES * C::kBStage);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const int ktiles = p.K / BK;
  const int kt_begin = blockIdx.z * p.ktiles_per_split;
  const int kt_end = min(ktiles, kt_begin + p.ktiles_per_split);
  const int nk = kt_end - kt_begin;  // >= 1: the launcher never makes an empty split

  auto load_tile = [&](int stage, int kt) {
    const int k0 = kt * BK;
    uint8_t* a = smem_a + stage * C::kAStage;
    uint8_t* b = smem_b + stage * C::kBStage;
#pragma unroll
    for (int it = 0; it < (C::kAChunks + C::kThreads - 1) / C::kThreads; ++it) {
      const int i = tid + it * C::kThreads;
      if (C::kAChunks % C::kThreads != 0 && i >= C::kAChunks) break;
      const int row = i / (BK / 16), chunk = i % (BK / 16);
      const bool ok = m0 + row < p.M;  // rows past M are zero-filled, never read
      const int8_t* src = p.x_q + static_cast<size_t>(ok ? m0 + row : 0) * p.K + k0 + chunk * 16;
      ptx::cp_async_16(a + swizzle<C::kARow>(row, chunk), src, ok);
    }
#pragma unroll
    for (int it = 0; it < (C::kBChunks + C::kThreads - 1) / C::kThreads; ++it) {
      const int i = tid + it * C::kThreads;
      if (C::kBChunks % C::kThreads != 0 && i >= C::kBChunks) break;
      const int row = i / (BK / 32), chunk = i % (BK / 32);
      const bool ok = n0 + row < p.N;
      const uint8_t* src = p.qweight + static_cast<size_t>(ok ? n0 + row : 0) * (p.K / 2) + k0 / 2 + chunk * 16;
      ptx::cp_async_16(b + swizzle<C::kBRow>(row, chunk), src, ok);
    }
  };

  const int group_begin = PER_GROUP ? kt_begin * BK / p.group_size : 0;
  if constexpr (PER_GROUP) {
    const int group_end = min(p.groups, (kt_end * BK + p.group_size - 1) / p.group_size);
    const int ng = group_end - group_begin;  // <= p.split_groups by construction of the launch
    for (int i = tid; i < BN * ng; i += C::kThreads) {
      const int row = i / ng, j = i % ng;
      const size_t idx = static_cast<size_t>(min(n0 + row, p.N - 1)) * p.groups + group_begin + j;
      smem_sz[row * p.split_groups + j] =
          static_cast<uint16_t>(__ldg(p.s2 + idx) | (static_cast<uint32_t>(__ldg(p.z2 + idx)) << 8));
    }
  }  // made visible by the first __syncthreads of the main loop
  // PDL: the (s2, z2) table above is weights; the activations, the split-K workspace and every store come after.
  pdl_wait();
  pdl_launch_dependents();

  int32_t acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nk) load_tile(s, kt_begin + s);
    ptx::cp_async_commit();
  }

  for (int it = 0; it < nk; ++it) {
    ptx::cp_async_wait<STAGES - 2>();
    __syncthreads();
    {  // refill the stage every thread finished with in the previous iteration
      const int next = it + STAGES - 1;
      if (next < nk) load_tile(next % STAGES, kt_begin + next);
      ptx::cp_async_commit();
    }
    const uint8_t* a = smem_a + (it % STAGES) * C::kAStage;
    const uint8_t* b = smem_b + (it % STAGES) * C::kBStage;
#pragma unroll
    for (int kp = 0; kp < KP; ++kp) {
      uint32_t bw[NT][2];  // packed words: [n tile][k step of 32]
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        const int row = warp_n * C::kWarpN + np * 16 + (lane & 7) + ((lane >> 4) << 3);
        const int chunk = 2 * kp + ((lane >> 3) & 1);
        uint32_t r[4];
        ptx::ldmatrix_x4(r, b + swizzle<C::kBRow>(row, chunk));
        bw[2 * np][0] = r[0];
        bw[2 * np][1] = r[1];
        bw[2 * np + 1][0] = r[2];
        bw[2 * np + 1][1] = r[3];
      }
      GroupDequant dq[NT];
      if constexpr (PER_GROUP) {
        const int j = ((kt_begin + it) * BK + kp * 64) / p.group_size - group_begin;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const uint32_t sz = smem_sz[(warp_n * C::kWarpN + nt * 8 + (lane >> 2)) * p.split_groups + j];
          dq[nt] = make_group_dequant(sz & 0xFFu, sz >> 8);
        }
      }
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {
        uint32_t af[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const int row = warp_m * C::kWarpM + mt * 16 + (lane & 15);
          const int chunk = (2 * kp + ks) * 2 + (lane >> 4);
          ptx::ldmatrix_x4(af[mt], a + swizzle<C::kARow>(row, chunk));
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          uint32_t b0 = bw[nt][ks] & 0x0F0F0F0Fu;
          uint32_t b1 = (bw[nt][ks] >> 4) & 0x0F0F0F0Fu;
          if constexpr (PER_GROUP) {
            b0 = dequant4(b0, dq[nt]);
            b1 = dequant4(b1, dq[nt]);
          }  // per channel: the UINT4 values 0..15 are already valid u8 operands
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) ptx::mma_s8u8_16832(acc[mt][nt], af[mt], b0, b1);
        }
      }
    }
  }
  ptx::cp_async_wait<0>();

  const int row_base = m0 + warp_m * C::kWarpM + (lane >> 2);
  const int col_base = n0 + warp_n * C::kWarpN + 2 * (lane & 3);

  // Calls f(m, n, acc pair) for each pair of adjacent accumulators this thread holds inside the output.
  auto for_each_pair = [&](auto&& f) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int m = row_base + mt * 16 + 8 * h, n = col_base + nt * 8;
          if (m < p.M && n < p.N) f(m, n, acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
        }
  };

  if (p.splits > 1) {
    // Exact split-K: integer atomics into a zeroed workspace; the last CTA of the tile does the epilogue.
    for_each_pair([&](int m, int n, int32_t& a0, int32_t& a1) {
      int32_t* w = p.workspace + static_cast<size_t>(m) * p.N + n;
      atomicAdd(w, a0);
      atomicAdd(w + 1, a1);
    });
    __threadfence();
    __syncthreads();
    __shared__ int is_last;
    if (tid == 0) {
      const int tile = blockIdx.y * gridDim.x + blockIdx.x;
      is_last = atomicAdd(p.counters + tile, 1) == p.splits - 1;
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    for_each_pair([&](int m, int n, int32_t& a0, int32_t& a1) {
      const int32_t* w = p.workspace + static_cast<size_t>(m) * p.N + n;
      a0 = __ldcg(w);
      a1 = __ldcg(w + 1);
    });
  }

#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = row_base + mt * 16 + 8 * h;
      if (m >= p.M) continue;
      const float xs = p.x_s[m];
      const int32_t x_sum = p.x_sum[m];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int n = col_base + nt * 8;
        if (n >= p.N) continue;  // N is even, so n + 1 < N too
        const int32_t a0 = acc[mt][nt][2 * h] - static_cast<int32_t>(weight_zero<PER_GROUP>(p, n)) * x_sum;
        const int32_t a1 = acc[mt][nt][2 * h + 1] - static_cast<int32_t>(weight_zero<PER_GROUP>(p, n + 1)) * x_sum;
        store_pair(p, m, n, epilogue_value(p, a0, xs, n), epilogue_value(p, a1, xs, n + 1));
      }
    }
}

}  // namespace qoq
