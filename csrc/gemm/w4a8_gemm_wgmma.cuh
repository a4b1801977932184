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
//   dequantization is a mask, a shift and the bytewise (w4 - z2) * s2 of the mma.sync kernel.
// - B operand (activations): K-major, 128-byte rows (BK = 128 int8), 128-byte swizzle, one descriptor per
//   k step of 32 (start address + 32 bytes).
// - Pipeline: STAGES shared-memory stages filled by cp.async; a stage is refilled two iterations after it was
//   read (wgmma.wait_group<1> keeps at most one MMA in flight per warpgroup, so everything issued two
//   iterations ago has completed before the barrier that precedes the refill).
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
  // +1024: the kernel aligns its base to the 1024-byte swizzle atom itself.
  static constexpr int kSmemBytes = (kPipeBytes > kOutBytes ? kPipeBytes : kOutBytes) + 1024;
  static constexpr int kPrefetch = STAGES - 2;      // tiles in flight beyond the one being computed
  static_assert(BM == 128 || BM == 256, "wgmma N (activation rows per CTA) must be 128 or 256");
  static_assert(STAGES >= 3, "the refill-two-iterations-later scheme needs >= 3 stages");
  static_assert(kAStage % 1024 == 0 && kStageBytes % 1024 == 0, "stages must keep 1024-byte alignment");
};

#if QOQ_WGMMA_ENABLED
template <int BM>
__device__ __forceinline__ void wgmma_rs(uint32_t (&d)[BM / 2], const uint32_t (&a)[4], uint64_t desc) {
  if constexpr (BM == 128) {
    wgmma::wgmma_m64n128k32_s8_rs(d, a, desc);
  } else {
    wgmma::wgmma_m64n256k32_s8_rs(d, a, desc);
  }
}
#endif

// Returns QOQ_WGMMA_ENABLED as compiled for the running device (0 on builds without an sm_90a image).
__global__ void wgmma_probe_kernel(int* out) { *out = QOQ_WGMMA_ENABLED; }

template <int BM, int STAGES, int MIN_BLOCKS, bool PER_GROUP>
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
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const int nk = p.K / BK;

  auto stage_a = [&](int s) { return smem + s * T::kStageBytes; };
  auto stage_w = [&](int s) { return smem + s * T::kStageBytes + T::kAStage; };

  auto load_tile = [&](int s, int kt) {
    const int k0 = kt * BK;
    uint8_t* a = stage_a(s);
    uint8_t* w = stage_w(s);
#pragma unroll
    for (int it = 0; it < BM * 8 / T::kThreads; ++it) {  // BM rows x 8 chunks of 16 bytes
      const int i = tid + it * T::kThreads;
      const int row = i >> 3, chunk = i & 7;
      const bool ok = m0 + row < p.M;  // rows past M are zero-filled
      const int8_t* src = p.x_q + static_cast<size_t>(ok ? m0 + row : 0) * p.K + k0 + chunk * 16;
      ptx::cp_async_16(a + swizzle<128>(row, chunk), src, ok);  // = the wgmma 128-byte swizzle
    }
#pragma unroll
    for (int it = 0; it < BN * 4 / T::kThreads; ++it) {  // 128 rows x 4 chunks of 16 bytes
      const int i = tid + it * T::kThreads;
      const int row = i >> 2, chunk = i & 3;
      const bool ok = n0 + row < p.N;
      const uint8_t* src = p.qweight + static_cast<size_t>(ok ? n0 + row : 0) * (p.K / 2) + k0 / 2 + chunk * 16;
      ptx::cp_async_16(w + swizzle<64>(row, chunk), src, ok);
    }
  };

  // This thread's two weight rows (A fragment rows g and g + 8 of its warp's 16).
  const int row_local = wg * 64 + warp_in_wg * 16 + g;
  const int n_rows[2] = {min(n0 + row_local, p.N - 1), min(n0 + row_local + 8, p.N - 1)};

  // (s2, z2) of this thread's rows for the two 64-wide k halves of a tile (group_size % 64 == 0), fetched one
  // tile ahead so the loads are off the critical path.
  uint32_t sz_next[2][2] = {{0, 0}, {0, 0}};  // [row][half] = s2 | z2 << 8
  auto fetch_scales = [&](int kt) {
    if constexpr (PER_GROUP) {
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const size_t idx = static_cast<size_t>(n_rows[r]) * p.groups + (kt * BK + 64 * h) / p.group_size;
          sz_next[r][h] = __ldg(p.s2 + idx) | (static_cast<uint32_t>(__ldg(p.z2 + idx)) << 8);
        }
    }
  };

  uint32_t acc[BM / 2];
#pragma unroll
  for (int i = 0; i < BM / 2; ++i) acc[i] = 0;

#pragma unroll
  for (int s = 0; s < D; ++s) {
    if (s < nk) load_tile(s, s);
    ptx::cp_async_commit();
  }
  fetch_scales(0);

  for (int kt = 0; kt < nk; ++kt) {
    const int s = kt % STAGES;
    ptx::cp_async_wait<D - 1>();          // this thread's copies of tile kt have landed
    wgmma::fence_proxy_async_shared();    // ... and are visible to the tensor cores' (async proxy) reads
    __syncthreads();                      // everyone's copies; every MMA of tile kt - 2 has completed
    if (kt + D < nk) load_tile((kt + D) % STAGES, kt + D);  // refills the stage tile kt - 2 used
    ptx::cp_async_commit();

    GroupDequant dq[2][2];
    if constexpr (PER_GROUP) {
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) dq[r][h] = make_group_dequant(sz_next[r][h] & 0xFFu, sz_next[r][h] >> 8);
      if (kt + 1 < nk) fetch_scales(kt + 1);
    }

    // Packed words of the 4 k steps: [step][0] rows g, [step][1] rows g + 8 (lane t's word of each block).
    uint32_t packed[4][2];
    const uint8_t* w = stage_w(s);
#pragma unroll
    for (int pair = 0; pair < 2; ++pair) {
      const int row = wg * 64 + warp_in_wg * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
      const int chunk = 2 * pair + (lane >> 4);
      uint32_t r[4];
      ptx::ldmatrix_x4(r, w + swizzle<64>(row, chunk));
      packed[2 * pair][0] = r[0];
      packed[2 * pair][1] = r[1];
      packed[2 * pair + 1][0] = r[2];
      packed[2 * pair + 1][1] = r[3];
    }

    const uint32_t a_base = ptx::smem_addr(stage_a(s));
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
      uint32_t frag[4];
      uint32_t lo0 = packed[ks][0] & 0x0F0F0F0Fu, lo1 = packed[ks][1] & 0x0F0F0F0Fu;
      uint32_t hi0 = (packed[ks][0] >> 4) & 0x0F0F0F0Fu, hi1 = (packed[ks][1] >> 4) & 0x0F0F0F0Fu;
      if constexpr (PER_GROUP) {
        const int h = ks >> 1;  // k 32*ks..32*ks+31 lies in 64-wide half h, inside one scale group
        lo0 = dequant4(lo0, dq[0][h]);
        hi0 = dequant4(hi0, dq[0][h]);
        lo1 = dequant4(lo1, dq[1][h]);
        hi1 = dequant4(hi1, dq[1][h]);
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
      wgmma_rs<BM>(acc, frag, wgmma::make_desc_k_sw128(a_base + 32 * ks));
      wgmma::commit_group();
#pragma unroll
      for (int i = 0; i < BM / 2; ++i) wgmma::fence_operand(acc[i]);
      wgmma::wait_group<1>();  // the previous step's MMA is done: its fragment registers may be reused
#pragma unroll
      for (int i = 0; i < 4; ++i) wgmma::fence_operand(frag[i]);
    }
  }
  wgmma::wait_group<0>();
#pragma unroll
  for (int i = 0; i < BM / 2; ++i) wgmma::fence_operand(acc[i]);
  ptx::cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory is reused for the output tile below

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
  __syncthreads();
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
#endif  // QOQ_WGMMA_ENABLED
}

}  // namespace qoq
