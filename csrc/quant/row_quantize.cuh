// Per-token INT8 quantization of a float32 row held by one thread block (docs/formats.md, "Activations"):
// x_s = amax / 127 (IEEE division), x_q = clamp(rint(y / x_s), -127, 127), x_s == 0 -> 0, x_sum = sum of the codes.
// Shared by the quantize kernels and the attention kernel that quantizes its output for o_proj, so that every
// producer of a W4A8 GEMM input rounds exactly alike. Built without --use_fast_math ('/' is IEEE).
#pragma once
#include <cstdint>

namespace qoq {
namespace rowq {

constexpr int kMaxWarps = 32;  // a block has at most 1024 threads

struct SumOp {
  template <typename V> __device__ __forceinline__ V operator()(V a, V b) const { return a + b; }
};
struct MaxOp {  // only used on non-negative values (|y|), so 0 is its identity
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <typename V, typename Op>
__device__ __forceinline__ V warp_reduce(V v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide reduction (sum, or max of non-negative values); every thread gets the result, in a fixed order
// (deterministic). `scratch` holds kMaxWarps entries and is reused, hence the barrier on entry (a previous
// reduction may still be reading it). Each warp then folds the per-warp partials itself with shuffles: no
// serial loop over the warps and no third barrier.
template <typename V, typename Op>
__device__ __forceinline__ V block_reduce(V v, V* scratch, Op op) {
  v = warp_reduce(v, op);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  if (lane == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  return warp_reduce(lane < static_cast<int>(blockDim.x >> 5) ? scratch[lane] : V(0), op);
}

// Quantizes VEC values with scale `scale`, stores the codes at `out` (one 4- or 8-byte store for VEC 4 / 8) and
// returns their sum.
template <int VEC>
__device__ __forceinline__ int quantize_store(const float* y, float scale, int8_t* out) {
  // Quantized bytes packed into 32-bit words (VEC is 1, 4 or 8) so a vector row writes 4 or 8 bytes at once.
  uint32_t packed[(VEC + 3) / 4] = {};
  int sum = 0;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    float r = 0.f;
    if (scale > 0.f) r = fminf(fmaxf(rintf(y[i] / scale), -127.f), 127.f);
    const int q = static_cast<int>(r);
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

// Quantizes the float32 row `ys[0..k)` (shared memory) whose amax is `amax` into `row_q [k]`, `*row_s` and
// `*row_sum`. Each thread reads back only the vectors v = threadIdx.x + i * blockDim.x, so a caller that wrote ys
// with the same loop needs no barrier before (block_reduce's barriers order the rest).
template <int VEC>
__device__ __forceinline__ void quantize_row(const float* ys, float amax, int64_t k, int8_t* row_q, float* row_s,
                                             int32_t* row_sum, int* iscratch) {
  const float scale = amax / 127.0f;  // IEEE division, as the reference
  const int64_t nvec = k / VEC;
  int sum = 0;
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
    sum += quantize_store<VEC>(ys + v * VEC, scale, row_q + v * VEC);
  }
  sum = block_reduce(sum, iscratch, SumOp{});
  if (threadIdx.x == 0) {
    *row_s = scale;
    *row_sum = sum;
  }
}

}  // namespace rowq
}  // namespace qoq
