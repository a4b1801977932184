// Conversions between float and the 16-bit float types (__half, __nv_bfloat16) the kernels are templated on,
// one element or a pair packed in a 32-bit word (low half = lower index). Shared by the attention and quantize
// kernels so that every op rounds to 16 bits the same way (round to nearest even).
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace qoq {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The pair of T values held in the 32-bit word `bits`, as floats.
template <typename T> __device__ __forceinline__ float2 pair_to_float2(uint32_t bits);
template <> __device__ __forceinline__ float2 pair_to_float2<__half>(uint32_t bits) {
  return __half22float2(*reinterpret_cast<const __half2*>(&bits));
}
template <> __device__ __forceinline__ float2 pair_to_float2<__nv_bfloat16>(uint32_t bits) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&bits));
}

// (lo, hi) rounded to T and packed into one 32-bit word.
template <typename T> __device__ __forceinline__ uint32_t float2_to_pair(float lo, float hi);
template <> __device__ __forceinline__ uint32_t float2_to_pair<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t float2_to_pair<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

}  // namespace qoq
