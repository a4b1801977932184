// Per-token INT8 quantization of a float32 row held by one thread block (docs/formats.md, "Activations"):
// x_s = amax / 127 (IEEE division), x_q = clamp(rint(y / x_s), -127, 127), x_s == 0 -> 0, x_sum = sum of the codes
// (codes equal to those of the IEEE division y / x_s, see quantize_store).
// Shared by the quantize kernels and the attention kernel that quantizes its output for o_proj, so that every
// producer of a W4A8 GEMM input rounds exactly alike. Built without --use_fast_math ('/' is IEEE).
#pragma once
#include <cstdint>
#include <type_traits>

namespace qoq {
namespace rowq {

constexpr int kMaxWarps = 32;  // a block has at most 1024 threads

struct SumOp {
  template <typename V> __device__ __forceinline__ V operator()(V a, V b) const { return a + b; }
};
// Only used on non-negative values (|y|, each thread's running fmaxf from 0, so never NaN): 0 is its identity, and
// their bit patterns order them as the floats, so a warp takes their max in one redux.sync (sm_80+).
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// A warp's sum or max, the same value in every lane. Integer sums and the max of non-negative floats (exact in any
// order) are one redux.sync instruction instead of five dependent shuffle steps; float sums keep the fixed shuffle
// tree (their bits depend on the order).
template <typename V, typename Op>
__device__ __forceinline__ V warp_reduce(V v, Op op) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<Op, MaxOp>) {
    return __uint_as_float(__reduce_max_sync(0xffffffffu, __float_as_uint(v)));
  } else if constexpr (std::is_same_v<V, int> && std::is_same_v<Op, SumOp>) {
    return __reduce_add_sync(0xffffffffu, v);
  }
#endif
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide reduction (sum, or max of non-negative values); every thread gets the result, in a fixed order
// (deterministic). `scratch` holds kMaxWarps entries and must be this call's own: no other block_reduce of the kernel
// may use it, so no barrier is needed on entry (nothing can still be reading it). Each warp then folds the per-warp
// partials itself: no serial loop over the warps and no second barrier.
template <typename V, typename Op>
__device__ __forceinline__ V block_reduce(V v, V* scratch, Op op) {
  v = warp_reduce(v, op);
  const int lane = threadIdx.x & 31;
  if (lane == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  return warp_reduce(lane < static_cast<int>(blockDim.x >> 5) ? scratch[lane] : V(0), op);
}

// Two block-wide reductions with one barrier: the float sum `ss` (fixed order, as block_reduce) and the max `m` of
// non-negative values. `ss_scratch` and `m_scratch` (kMaxWarps entries each) follow block_reduce's rule.
__device__ __forceinline__ void block_reduce_sum_max(float& ss, float& m, float* ss_scratch, float* m_scratch) {
  ss = warp_reduce(ss, SumOp{});
  m = warp_reduce(m, MaxOp{});
  const int lane = threadIdx.x & 31;
  if (lane == 0) {
    ss_scratch[threadIdx.x >> 5] = ss;
    m_scratch[threadIdx.x >> 5] = m;
  }
  __syncthreads();
  const bool warp_in = lane < static_cast<int>(blockDim.x >> 5);
  ss = warp_reduce(warp_in ? ss_scratch[lane] : 0.f, SumOp{});
  m = warp_reduce(warp_in ? m_scratch[lane] : 0.f, MaxOp{});
}

// A row's scale x_s = amax / 127 (IEEE division, as the reference) and what quantize_store needs to round y / x_s
// without dividing: its reciprocal, usable when x_s is a normal float (then 1 / x_s <= 2^126 is finite and correctly
// rounded).
struct RowScale {
  float scale, inv;
  bool fast;
};

__device__ __forceinline__ RowScale make_row_scale(float amax) {
  const float scale = amax / 127.0f;
  return {scale, 1.0f / scale, scale >= 1.17549435e-38f};  // FLT_MIN
}

// Quantizes VEC values with the row's scale, stores the codes at `out` (one 4- or 8-byte store for VEC 4 / 8) and
// returns their sum. Each code is clamp(rint(y / x_s), -127, 127) as the IEEE division gives it (0 when x_s == 0),
// mostly without the division: |y| <= amax, so y / x_s lies within about 127 of 0, and t = y * (1 / x_s) is within
// 2.3e-5 of the correctly rounded quotient (two roundings of 2^-24 against one, relative to 127). rint can only
// differ at a half-integer, so where every t of the vector is more than 2^-14 from one, rint(t) are the codes; the
// rare rest (about 1 vector of 1000), NaN and infinities divide. One branch per vector keeps the common path
// straight-line code.
template <int VEC>
__device__ __forceinline__ int quantize_store(const float* y, const RowScale& s, int8_t* out) {
  float r[VEC];
  bool divide = !s.fast;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const float t = y[i] * s.inv;
    r[i] = rintf(t);
    divide |= !(fabsf(t - floorf(t) - 0.5f) > 6.103515625e-05f);  // 2^-14; NaN divides too
  }
  if (divide) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) r[i] = rintf(y[i] / s.scale);
  }
  // Quantized bytes packed into 32-bit words (VEC is 1, 4 or 8) so a vector row writes 4 or 8 bytes at once.
  uint32_t packed[(VEC + 3) / 4] = {};
  int sum = 0;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const int q = s.scale > 0.f ? static_cast<int>(fminf(fmaxf(r[i], -127.f), 127.f)) : 0;
    sum += q;
    packed[i / 4] |= (static_cast<uint32_t>(q) & 0xffu) << (8 * (i % 4));
  }
  if constexpr (VEC == 8) {
    *reinterpret_cast<uint2*>(out) = make_uint2(packed[0], packed[1]);
  } else if constexpr (VEC == 4) {
    *reinterpret_cast<uint32_t*>(out) = packed[0];
  } else {
    *out = static_cast<int8_t>(packed[0] & 0xffu);
  }
  return sum;
}

// The row's code sum without a block barrier after the codes: thread 0 zeroes `*row_sum` (clear_row_sum) before a
// barrier that every thread passes before its add (the amax reduction's; after the PDL wait, like every global
// write), then each warp adds its part with one atomic (add_row_sum). An integer sum: the same in any order.
__device__ __forceinline__ void clear_row_sum(int32_t* row_sum) {
  if (threadIdx.x == 0) *row_sum = 0;
}

__device__ __forceinline__ void add_row_sum(int sum, int32_t* row_sum) {
  sum = warp_reduce(sum, SumOp{});
  if ((threadIdx.x & 31) == 0 && sum != 0) atomicAdd(row_sum, sum);
}

// Quantizes the float32 row `ys[0..k)` (shared memory) whose amax is `amax` into `row_q [k]`, `*row_s` and
// `*row_sum` (which the caller cleared with clear_row_sum before its amax reduction). Each thread reads back only the
// vectors v = threadIdx.x + i * blockDim.x, so a caller that wrote ys with the same loop needs no barrier before
// (block_reduce's barrier orders the rest).
template <int VEC>
__device__ __forceinline__ void quantize_row(const float* ys, float amax, int64_t k, int8_t* row_q, float* row_s,
                                             int32_t* row_sum) {
  const RowScale scale = make_row_scale(amax);
  const int64_t nvec = k / VEC;
  int sum = 0;
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
    sum += quantize_store<VEC>(ys + v * VEC, scale, row_q + v * VEC);
  }
  if (threadIdx.x == 0) *row_s = scale.scale;
  add_row_sum(sum, row_sum);
}

}  // namespace rowq
}  // namespace qoq
