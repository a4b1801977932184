// CUDA impl of qoq::kv4_append (docs/formats.md, "KV cache (KV4)"): quantizes each new K and V vector
// ([B, H_kv, S, D], float16/bfloat16) to UINT4 with a float16 (scale, min) and writes it at slot
// cache_position[s] of every row and head. One warp per vector; bit-exact with the CPU reference
// (fp16 rounding of scale/min, IEEE division, round-half-to-even).
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"

namespace qoq {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kMaxPairsPerLane = 4;  // D <= 2 * 32 * 4 = 256
constexpr int kMaxHeadDim = 2 * 32 * kMaxPairsPerLane;

template <typename T> struct Pair;
template <> struct Pair<__half> {
  using type = __half2;
  static __device__ __forceinline__ float2 to_float2(type v) { return __half22float2(v); }
};
template <> struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static __device__ __forceinline__ float2 to_float2(type v) { return __bfloat1622float2(v); }
};

struct AppendArgs {
  const void* src[2];         // k, v: [B, H, S, D] with element stride 1 along D
  int64_t src_stride[2][3];   // element strides of dims B, H, S
  uint8_t* cache[2];          // [B, H, T, D/2] contiguous
  __half* params[2];          // [B, H, T, 2] contiguous
  const int64_t* positions;   // [S]
  int64_t b, h, s, t, d;
};

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ uint32_t quantize_nibble(float x, float mn, float scale) {
  if (!(scale > 0.f)) return 0u;  // the reference's q = 0 where scale == 0
  const float q = fminf(fmaxf(rintf((x - mn) / scale), 0.f), 15.f);
  return static_cast<uint32_t>(q);
}

// Vector index = ((which * B + b) * H + h) * S + s, which = 0 for K and 1 for V.
template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) kv4_append_kernel(AppendArgs a) {
  using P = Pair<T>;
  const int lane = threadIdx.x & 31;
  const int64_t vec = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const int64_t per_tensor = a.b * a.h * a.s;
  if (vec >= 2 * per_tensor) return;
  const int which = vec >= per_tensor ? 1 : 0;
  int64_t rem = vec - which * per_tensor;
  const int64_t s = rem % a.s;
  rem /= a.s;
  const int64_t h = rem % a.h;
  const int64_t b = rem / a.h;
  const int64_t pos = a.positions[s];
  if (pos < 0 || pos >= a.t) return;  // out-of-range slots are skipped (never written out of bounds)

  const T* x = static_cast<const T*>(a.src[which]) + b * a.src_stride[which][0] + h * a.src_stride[which][1] +
               s * a.src_stride[which][2];
  const int pairs = static_cast<int>(a.d / 2);
  float2 v[kMaxPairsPerLane];
  float lo = INFINITY, hi = -INFINITY;
#pragma unroll
  for (int i = 0; i < kMaxPairsPerLane; ++i) {
    const int p = lane + 32 * i;
    if (p < pairs) {
      v[i] = P::to_float2(reinterpret_cast<const typename P::type*>(x)[p]);
      lo = fminf(lo, fminf(v[i].x, v[i].y));
      hi = fmaxf(hi, fmaxf(v[i].x, v[i].y));
    }
  }
  lo = warp_min(lo);
  hi = warp_max(hi);
  const __half scale16 = __float2half_rn((hi - lo) / 15.0f);
  const __half mn16 = __float2half_rn(lo);
  const float scale = __half2float(scale16), mn = __half2float(mn16);

  const int64_t slot = (b * a.h + h) * a.t + pos;
  uint8_t* out = a.cache[which] + slot * (a.d / 2);
#pragma unroll
  for (int i = 0; i < kMaxPairsPerLane; ++i) {
    const int p = lane + 32 * i;
    if (p < pairs) {
      const uint32_t q0 = quantize_nibble(v[i].x, mn, scale), q1 = quantize_nibble(v[i].y, mn, scale);
      out[p] = static_cast<uint8_t>(q0 | (q1 << 4));
    }
  }
  if (lane == 0) {
    __half2 sp;
    sp.x = scale16;
    sp.y = mn16;
    reinterpret_cast<__half2*>(a.params[which])[slot] = sp;
  }
}

void check_cache(const char* cache_name, const at::Tensor& cache, const char* params_name, const at::Tensor& params,
                 const at::Tensor& k) {
  check_kv4_cache_tensor(cache_name, cache, "k", k);
  TORCH_CHECK(cache.size(0) == k.size(0) && cache.size(1) == k.size(1) && cache.size(3) * 2 == k.size(3), cache_name,
              " has shape ", shape_str(cache), " which does not match k ", shape_str(k), " (expected [B, H_kv, T, D/2])");
  check_kv4_params(params_name, params, cache, "k", k);
}

// Strided K/V are read in place when D is contiguous and 4-byte aligned (one pair per load); else copied.
at::Tensor readable(const at::Tensor& t) {
  const bool ok = t.stride(3) == 1 && t.stride(0) % 2 == 0 && t.stride(1) % 2 == 0 && t.stride(2) % 2 == 0 &&
                  reinterpret_cast<uintptr_t>(t.data_ptr()) % 4 == 0;
  return ok ? t : t.contiguous();
}

void kv4_append_cuda(const at::Tensor& k_cache, const at::Tensor& k_params, const at::Tensor& v_cache,
                     const at::Tensor& v_params,
                     const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& cache_position) {
  TORCH_CHECK(k_in.is_cuda(), "k must be a CUDA tensor, got ", device_str(k_in));
  TORCH_CHECK(k_in.scalar_type() == at::kHalf || k_in.scalar_type() == at::kBFloat16,
              "k must have dtype float16 or bfloat16, got ", k_in.scalar_type());
  TORCH_CHECK(k_in.dim() == 4, "k must be 4-D [B, H_kv, S, D], got shape ", shape_str(k_in));
  TORCH_CHECK(k_in.numel() > 0, "k must be non-empty, got shape ", shape_str(k_in));
  TORCH_CHECK(v_in.is_cuda() && v_in.device() == k_in.device(), "v is on ", device_str(v_in), " but k is on ",
              device_str(k_in));
  TORCH_CHECK(v_in.scalar_type() == k_in.scalar_type(), "v must have dtype ", k_in.scalar_type(), " (k's), got ",
              v_in.scalar_type());
  TORCH_CHECK(v_in.sizes() == k_in.sizes(), "v must have k's shape ", shape_str(k_in), ", got ", shape_str(v_in));
  const int64_t d = k_in.size(3);
  TORCH_CHECK(d % 2 == 0, "head_dim must be even, got ", num(d));
  TORCH_CHECK(d <= kMaxHeadDim, "head_dim ", num(d), " is larger than the CUDA kv4_append supports (", num(kMaxHeadDim), ")");
  check_cache("k_cache", k_cache, "k_params", k_params, k_in);
  check_cache("v_cache", v_cache, "v_params", v_params, k_in);
  TORCH_CHECK(v_cache.size(2) == k_cache.size(2), "v_cache has ", num(v_cache.size(2)), " slots but k_cache has ",
              num(k_cache.size(2)));
  TORCH_CHECK(cache_position.is_cuda() && cache_position.device() == k_in.device(), "cache_position is on ",
              device_str(cache_position), " but k is on ", device_str(k_in));
  TORCH_CHECK(cache_position.scalar_type() == at::kLong, "cache_position must have dtype int64, got ",
              cache_position.scalar_type());
  TORCH_CHECK(cache_position.dim() == 1 && cache_position.size(0) == k_in.size(2),
              "cache_position must have shape [S] = [", num(k_in.size(2)), "], got ", shape_str(cache_position));
  TORCH_CHECK(cache_position.is_contiguous(), "cache_position must be contiguous");
  const int64_t t = k_cache.size(2);
  if (t == 0) return;

  const c10::cuda::CUDAGuard guard(k_in.device());
  const at::Tensor k = readable(k_in), v = readable(v_in);
  AppendArgs a{};
  a.src[0] = k.data_ptr();
  a.src[1] = v.data_ptr();
  for (int i = 0; i < 3; ++i) {
    a.src_stride[0][i] = k.stride(i);
    a.src_stride[1][i] = v.stride(i);
  }
  a.cache[0] = k_cache.data_ptr<uint8_t>();
  a.cache[1] = v_cache.data_ptr<uint8_t>();
  a.params[0] = reinterpret_cast<__half*>(k_params.data_ptr<at::Half>());
  a.params[1] = reinterpret_cast<__half*>(v_params.data_ptr<at::Half>());
  a.positions = cache_position.data_ptr<int64_t>();
  a.b = k.size(0);
  a.h = k.size(1);
  a.s = k.size(2);
  a.t = t;
  a.d = d;
  const int64_t vectors = 2 * a.b * a.h * a.s;
  const int64_t blocks = (vectors + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "k has too many vectors for one launch");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (k.scalar_type() == at::kHalf) {
    kv4_append_kernel<__half><<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(a);
  } else {
    kv4_append_kernel<__nv_bfloat16><<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(a);
  }
  QOQ_CHECK_LAUNCH();
}

}  // namespace
}  // namespace qoq

TORCH_LIBRARY_IMPL(qoq, CUDA, m) { m.impl("kv4_append", &qoq::kv4_append_cuda); }
