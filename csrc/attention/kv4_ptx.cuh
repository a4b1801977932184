// PTX helpers of the KV4 attention kernels (sm_80+): cp.async, packed-half arithmetic, mma.sync m16n8k16,
// and the UINT4 -> 16-bit float conversions (the "magic number" trick: OR-ing a nibble into the mantissa
// of 1024.0 (fp16) or 128.0 (bf16) gives 1024 + n exactly, one FMA removes the offset).
#pragma once
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace qoq {
namespace kv4 {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Global -> shared copy of N (4, 8 or 16) bytes, asynchronous (completes at cp_async_wait).
template <int N>
__device__ __forceinline__ void cp_async(void* dst, const void* src) {
  static_assert(N == 4 || N == 8 || N == 16, "cp.async copies 4, 8 or 16 bytes");
  if constexpr (N == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(smem_addr(dst)), "l"(src), "n"(N));
  }
}

// Hint: fetch the 128-byte line holding `p` into L2 (no register, no completion; never faults on a valid address).
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// d = a * b + c on packed pairs, in the element type T (__half or __nv_bfloat16).
template <typename T>
__device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  if constexpr (std::is_same_v<T, __half>) {
    asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  } else {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  }
  return d;
}

// Constants of the nibble conversion, per element type: MAGIC | n is (BIAS + n); scaled by ONE, minus BIAS.
template <typename T> struct Nibble;
template <> struct Nibble<__half> {
  static constexpr uint32_t kMagic = 0x64006400u;      // 1024.0 in both halves
  static constexpr uint32_t kOne = 0x3C003C00u;        // 1.0
  static constexpr uint32_t kMinusBias = 0xE400E400u;  // -1024.0
  static constexpr uint32_t kSixteenth = 0x2C002C00u;  // 1/16
  static constexpr uint32_t kMinusBias16 = 0xD400D400u;  // -64.0 = -1024/16
};
template <> struct Nibble<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x43004300u;      // 128.0
  static constexpr uint32_t kOne = 0x3F803F80u;        // 1.0
  static constexpr uint32_t kMinusBias = 0xC300C300u;  // -128.0
};

// (x & MASK) | BITS in one LOP3 (written as C++, the compiler emits an AND and an OR).
template <uint32_t MASK, uint32_t BITS>
__device__ __forceinline__ uint32_t and_or(uint32_t x) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(x), "n"(MASK), "n"(BITS));
  return d;
}

// Nibbles at bits [0,4) and [16,20) of x -> the pair (n_lo, n_hi) as two exact T values.
template <typename T>
__device__ __forceinline__ uint32_t nibbles_0_16(uint32_t x) {
  return fma2<T>(and_or<0x000F000Fu, Nibble<T>::kMagic>(x), Nibble<T>::kOne, Nibble<T>::kMinusBias);
}

// Nibbles at bits [4,8) and [20,24) of x -> the pair as two exact T values.
template <typename T>
__device__ __forceinline__ uint32_t nibbles_4_20(uint32_t x) {
  if constexpr (std::is_same_v<T, __half>) {
    // 1024 + 16 n is exact in fp16 (10 mantissa bits): scale by 1/16 and remove 64 in one FMA.
    return fma2<T>(and_or<0x00F000F0u, Nibble<T>::kMagic>(x), Nibble<T>::kSixteenth, Nibble<T>::kMinusBias16);
  } else {
    // bf16 has 7 mantissa bits: bit 7 would hit the exponent, so shift the nibbles down first.
    return nibbles_0_16<T>(x >> 4);
  }
}

// Biased K codes for the QK MMA, one LOP3 each where exactness allows (the bias is removed once per score,
// see KBias): bits [0,4) / [16,20) of x -> bf16 (128 + n), fp16 exactly n (an exact FMA removes 1024: an
// fp16 bias of 1024 would leave the scores too few bits); bits [4,8) / [20,24) -> bf16 (128 + n) after a shift,
// fp16 (1024 + 16 n), paired with query elements pre-scaled by 1/16.
template <typename T>
__device__ __forceinline__ uint32_t k_codes_lo(uint32_t x) {
  if constexpr (std::is_same_v<T, __half>) {
    return nibbles_0_16<T>(x);
  } else {
    return and_or<0x000F000Fu, Nibble<T>::kMagic>(x);
  }
}
template <typename T>
__device__ __forceinline__ uint32_t k_codes_hi(uint32_t x) {
  if constexpr (std::is_same_v<T, __half>) {
    return and_or<0x00F000F0u, Nibble<T>::kMagic>(x);
  } else {
    return and_or<0x000F000Fu, Nibble<T>::kMagic>(x >> 4);
  }
}

// What k_codes_lo / k_codes_hi add to the true codes: q . k_codes = q . n + kLoBias * (sum of the q elements
// paired with lo codes) + kHiBias * (sum of the, for fp16 pre-scaled, q elements paired with hi codes).
template <typename T> struct KBias;
template <> struct KBias<__half> {
  static constexpr float kLo = 0.f, kHi = 1024.f, kHiQueryScale = 0.0625f;
};
template <> struct KBias<__nv_bfloat16> {
  static constexpr float kLo = 128.f, kHi = 128.f, kHiQueryScale = 1.f;
};

// Transpose of an 8x8 16-bit matrix held as one mma fragment (lane 4g + c: row g, columns 2c, 2c + 1).
__device__ __forceinline__ uint32_t transpose_8x8(uint32_t x) {
  uint32_t d;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(d) : "r"(x));
  return d;
}

// D(16x8, f32) += A(16x16, T row-major) * B(16x8, T column-major).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// 2^x with the hardware approximation (2 ulp; exact 1 at 0, +0 at -inf): the softmax exponentials.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Two float32 values -> packed fp16 pair (lo in the low half).
__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

}  // namespace kv4
}  // namespace qoq
