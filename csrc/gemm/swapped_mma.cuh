// Device helpers of the small-M W4A8 kernels that swap the mma operands (w4a8_skinny.cu, w4a8_stream.cu): the
// weights are the A operand (16 output rows x 32 k) and the activations the B operand (32 k x 8 tokens).
//
// Lane (g, t) holds the 16-byte chunk 4q + t of weight rows g and g + 8 for a 128-wide k block q. Word w of a
// chunk holds k 4w..4w+3 (low nibbles) and 16+4w..16+4w+3 (high nibbles) of the chunk (packed layout v2); an mma
// takes one nibble half of two consecutive words (mma_chunk), which is an A fragment once the k order inside the mma
// is permuted; the activations are read under the same permutation (lane (g, t) reads the 32 bytes of chunk 4q + t
// of token g, each mma's B operand two consecutive words of them), and a dot product does not depend on the k
// order. Per group, a chunk lies in one group (group_size % 64 == 0), so the weights are dequantized to
// biased INT8 (w4 - z2) * s2 + 128 in registers with the bytewise dequant4 of the tile kernel; per channel the UINT4
// values are used as they are. Both are unsigned MMA operands, and the epilogue takes weight_zero * x_sum off.
#pragma once
#include "gemm/mma_ptx.cuh"
#include "gemm/w4a8_gemm_kernel.cuh"

namespace qoq {
namespace swapped {

// The lane's activation rows: token 8j + g from its chunk t of k block q on. A token past M reads the last row
// instead: the mma columns of such tokens are summed but never stored (reduce_and_store stores m < M), so their
// loads need neither a predicate nor zeroed registers.
template <int TT>
__device__ __forceinline__ void activation_rows(const int8_t* (&rows)[TT], const GemmParams& p, int q, int g, int t) {
#pragma unroll
  for (int j = 0; j < TT; ++j) {
    const int tok = min(8 * j + g, p.M - 1);
    rows[j] = p.x_q + static_cast<size_t>(tok) * p.K + 128 * q + 32 * t;
    asm volatile("" : "+l"(rows[j]));  // kept in registers: ptxas otherwise recomputes it before every load
  }
}

// xb[j][0..3]: k 0..15, xb[j][4..7]: k 16..31 of the chunk `k` bytes past rows[j] (k: whole k blocks); token
// tiles past M (warp-uniform) are not loaded (mma_chunk skips them).
template <int TT>
__device__ __forceinline__ void load_activations_at(uint32_t (&xb)[TT][8], const int8_t* const (&rows)[TT], uint32_t k,
                                                    int M) {
#pragma unroll
  for (int j = 0; j < TT; ++j) {
    int4 lo = make_int4(0, 0, 0, 0), hi = lo;
    if (j == 0 || 8 * j < M) {
      const int4* x = reinterpret_cast<const int4*>(rows[j] + k);
      lo = __ldg(x);
      hi = __ldg(x + 1);
    }
    xb[j][0] = lo.x, xb[j][1] = lo.y, xb[j][2] = lo.z, xb[j][3] = lo.w;
    xb[j][4] = hi.x, xb[j][5] = hi.y, xb[j][6] = hi.z, xb[j][7] = hi.w;
  }
}

// The same for k block q, from the parameters.
template <int TT>
__device__ __forceinline__ void load_activations(uint32_t (&xb)[TT][8], const GemmParams& p, int q, int g, int t) {
  const int8_t* rows[TT];
  activation_rows<TT>(rows, p, q, g, t);
  load_activations_at<TT>(xb, rows, 0, p.M);
}

// acc[j] += W * X_j over one 128-wide k block: w_g / w_g8 are the lane's chunks of rows g / g + 8; dq0 / dq1 their
// group's dequantization constants (per group only; make_group_dequant or make_group_dequant_pair). Token tiles
// past M are skipped (warp-uniform). The first tile always holds a token (M >= 1) and a later one is skipped by
// predicating its mma rather than by a branch: a branch per k-word split the loop into basic blocks (with a warp
// sync before each mma) that the scheduler could not interleave.
template <bool PER_GROUP, int TT>
__device__ __forceinline__ void mma_chunk(int32_t (&acc)[TT][4], const uint4& w_g, const uint4& w_g8,
                                          const GroupDequant& dq0, const GroupDequant& dq1, const uint32_t (&xb)[TT][8],
                                          int M) {
  const uint32_t w0[4] = {w_g.x, w_g.y, w_g.z, w_g.w};
  const uint32_t w1[4] = {w_g8.x, w_g8.y, w_g8.z, w_g8.w};
  // Each mma takes one nibble half h (low: k 0..15 of the chunk, high: k 16..31) of two consecutive words 2i and
  // 2i + 1 (k 4(2i).. and 4(2i+1)..), so that its B operand is the two consecutive activation words xb[j][4h + 2i],
  // xb[j][4h + 2i + 1]: an aligned register pair straight from the 16-byte loads (pairing a word's low and high
  // nibbles instead made the B operand two words 16 bytes apart, copied into a pair before every mma).
  // A fragment of m16n8k32: {row g, k 0..3}, {row g+8, k 0..3}, {row g, k 16..19}, {row g+8, k 16..19}.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int shift = 4 * h;
      uint32_t a[4] = {(w0[2 * i] >> shift) & 0x0F0F0F0Fu, (w1[2 * i] >> shift) & 0x0F0F0F0Fu,
                       (w0[2 * i + 1] >> shift) & 0x0F0F0F0Fu, (w1[2 * i + 1] >> shift) & 0x0F0F0F0Fu};
      if constexpr (PER_GROUP) {
        a[0] = dequant4(a[0], dq0);
        a[1] = dequant4(a[1], dq1);
        a[2] = dequant4(a[2], dq0);
        a[3] = dequant4(a[3], dq1);
      }
#pragma unroll
      for (int j = 0; j < TT; ++j) {
        if (j == 0 || 8 * j < M) ptx::mma_u8s8_16832(acc[j], a, xb[j][4 * h + 2 * i], xb[j][4 * h + 2 * i + 1]);
      }
    }
  }
}

// Row stride (int32 words) of the partial sums in shared memory, [warp][token][row]. A store of store_partials puts
// lane (g, t) at token 2t (+1) and row g (+8): with a stride of BR + 4 (4 mod 16) the token offsets 2t * stride
// fall on banks 0 / 8 / 16 / 24 and the 8 rows after each, so the 32 lanes hit 32 banks (BR + 1: up to 4 lanes a
// bank); reduce_and_store reads consecutive rows of a token (conflict-free from 32 rows a tile).
constexpr int partial_stride(int br) { return br + 4; }

// Writes a warp's D fragments to partial[(warp * BT + token) * partial_stride(BR) + row].
// acc[r][j][i] is row 16r + g + 8 * (i / 2), token 8j + 2t + i % 2.
template <int RT, int TT>
__device__ __forceinline__ void store_partials(int32_t* partial, const int32_t (&acc)[RT][TT][4], int warp, int g,
                                               int t) {
  constexpr int BR = 16 * RT, BT = 8 * TT, kStride = partial_stride(BR);
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int j = 0; j < TT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = 16 * r + g + 8 * (i >> 1), tok = 8 * j + 2 * t + (i & 1);
        partial[(warp * BT + tok) * kStride + row] = acc[r][j][i];
      }
}

constexpr int epilogue_iters(int rt, int tt, int nthreads) { return (16 * rt * 8 * tt + nthreads - 1) / nthreads; }

// Sums the WARPS partials of each (token, row) in a fixed order (exact, deterministic) and stores the contract's
// epilogue for output rows n0 .. n0 + BR; thread `tid` of `nthreads` stores the outputs `e` was loaded for
// (load_epilogue with the same n0, 16 * RT rows, tid and nthreads).
template <bool PER_GROUP, int WARPS, int RT, int TT, int ITERS>
__device__ __forceinline__ void reduce_and_store(const int32_t* partial, const GemmParams& p, int n0, int tid,
                                                 int nthreads, const EpilogueOperands<ITERS>& e) {
  constexpr int BR = 16 * RT, BT = 8 * TT, kStride = partial_stride(BR);
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int idx = tid + it * nthreads;
    if (idx >= BR * p.M) break;
    const int row = idx % BR, m = idx / BR;
    uint32_t sum = 0;  // wrap-around is harmless: the exact sum fits in int32
#pragma unroll
    for (int i = 0; i < WARPS; ++i) sum += static_cast<uint32_t>(partial[(i * BT + m) * kStride + row]);
    sum -= e.zero_sum[it];
    store_one(p, m, n0 + row,
              epilogue_value(static_cast<int32_t>(sum), e.xs[it], e.ws[it], p.bias_kind != kNoBias, e.bias[it]));
  }
}

}  // namespace swapped
}  // namespace qoq
