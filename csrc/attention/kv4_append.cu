// CUDA impls of qoq::kv4_append and qoq::rope_kv4_append (docs/formats.md, "KV cache (KV4)"). kv4_append
// quantizes each new K and V vector ([B, H_kv, S, D], float16/bfloat16) to UINT4 with a float16 (scale, min) and
// writes it at slot cache_position[s] of its row and head. rope_kv4_append reads the fused projection
// qkv [B, S, (H_q + 2 H_kv) * D] instead: it rotates q and k (RoPE in float32 without FMA, rounded to the input
// dtype), stores the rotated q [B, H_q, S, D] and appends the rotated K and the V exactly as kv4_append does.
// One kernel template serves both (one warp per head vector of one token), bit-exact with the CPU reference
// (fp16 rounding of scale/min, IEEE division, round-half-to-even).
#include <cstdint>
#include <initializer_list>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "float16.cuh"

namespace qoq {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kMaxHeadDim = 256;
// General layout: chunks of 2 values (4-byte loads), up to kPairSlots per lane, for any even D <= kMaxHeadDim.
constexpr int kPairSlots = kMaxHeadDim / 64;

// kWords 32-bit words at p (4 * kWords bytes, aligned to that): one 4-, 8- or 16-byte access.
template <int kWords>
__device__ __forceinline__ void load_words(const void* p, uint32_t (&w)[kWords]) {
  static_assert(kWords == 1 || kWords == 2 || kWords == 4, "4, 8 or 16 bytes");
  if constexpr (kWords == 1) {
    w[0] = *static_cast<const uint32_t*>(p);
  } else if constexpr (kWords == 2) {
    const uint2 u = *static_cast<const uint2*>(p);
    w[0] = u.x, w[1] = u.y;
  } else {
    const uint4 u = *static_cast<const uint4*>(p);
    w[0] = u.x, w[1] = u.y, w[2] = u.z, w[3] = u.w;
  }
}

template <int kWords>
__device__ __forceinline__ void store_words(void* p, const uint32_t (&w)[kWords]) {
  if constexpr (kWords == 1) {
    *static_cast<uint32_t*>(p) = w[0];
  } else if constexpr (kWords == 2) {
    *static_cast<uint2*>(p) = make_uint2(w[0], w[1]);
  } else {
    *static_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// kVec values at p as float32 (kVec * 2 bytes, aligned to that).
template <typename T, int kVec>
__device__ __forceinline__ void load_floats(const T* p, float (&f)[kVec]) {
  uint32_t w[kVec / 2];
  load_words<kVec / 2>(p, w);
#pragma unroll
  for (int j = 0; j < kVec / 2; ++j) {
    const float2 v = pair_to_float2<T>(w[j]);
    f[2 * j] = v.x, f[2 * j + 1] = v.y;
  }
}

struct AppendArgs {
  const void* src[3];          // q, k, v: head vector (b = 0, head 0, s = 0); stride 1 along D
  int64_t src_stride[3][3];    // element strides over (b, head, s)
  void* q_out;                 // rotated q [B, H_q, S, D] contiguous (RoPE only)
  const void* cos;             // [B or 1, S, D] (RoPE only), stride 1 along D
  const void* sin;
  int64_t cos_stride[2];       // element strides over (b, s); 0 over b when broadcast
  int64_t sin_stride[2];
  uint8_t* cache[2];           // K, V: [B, H_kv, T, D/2] contiguous
  __half* params[2];           // [B, H_kv, T, 2] contiguous
  const int64_t* positions;    // [S]
  int64_t vectors;             // B * S * (H_q + 2 H_kv)
  int64_t s, t;
  int h_q, h_kv, d;            // h_q = 0 for kv4_append
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

// In-place RoPE of the lane's chunks (rotate_half: out[e] = x[e] cos[e] + (e < D/2 ? -x[e + D/2] : x[e - D/2])
// sin[e]), each product and the sum rounded to float32 separately as in the reference, then rounded to T: `w`
// becomes the rotated T words (what q stores) and `v` their float values (what K quantizes).
template <typename T, int kVec, int kSlots>
__device__ __forceinline__ void rotate(float (&v)[kSlots][kVec], uint32_t (&w)[kSlots][kVec / 2], const T* x,
                                       const T* cos, const T* sin, int lane, int d) {
  const int half = d / 2;
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    const int e0 = (lane + 32 * i) * kVec;
    float partner[kVec];
    if constexpr (kSlots == 1) {
      // D = 32 kVec: lanes 0-15 hold the first half and lanes 16-31 the second, so x[e +- D/2] is in lane ^ 16.
#pragma unroll
      for (int j = 0; j < kVec / 2; ++j) {
        const float2 p = pair_to_float2<T>(__shfl_xor_sync(0xffffffffu, w[i][j], 16));
        partner[2 * j] = p.x, partner[2 * j + 1] = p.y;
      }
    } else {
      if (e0 >= d) continue;
      // Any even D: the partners may straddle chunks, so read them (just loaded by this warp: L1 hits).
#pragma unroll
      for (int j = 0; j < kVec; ++j) partner[j] = to_float<T>(x[e0 + j < half ? e0 + j + half : e0 + j - half]);
    }
    float c[kVec], s[kVec];
    load_floats<T, kVec>(cos + e0, c);
    load_floats<T, kVec>(sin + e0, s);
#pragma unroll
    for (int j = 0; j < kVec; j += 2) {
      float y[2];
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const float r = e0 + j + k < half ? -partner[j + k] : partner[j + k];
        y[k] = __fadd_rn(__fmul_rn(v[i][j + k], c[j + k]), __fmul_rn(r, s[j + k]));
      }
      w[i][j / 2] = float2_to_pair<T>(y[0], y[1]);
      const float2 rounded = pair_to_float2<T>(w[i][j / 2]);
      v[i][j] = rounded.x, v[i][j + 1] = rounded.y;
    }
  }
}

// Quantizes the warp's vector (lane's chunks in `v`, `chunks` of kVec values in all) and writes its D/2 bytes at
// `out` and its (scale, min) at `params`.
template <int kVec, int kSlots>
__device__ __forceinline__ void quantize_store(const float (&v)[kSlots][kVec], int lane, int chunks, uint8_t* out,
                                               __half* params) {
  float lo = INFINITY, hi = -INFINITY;
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    if (lane + 32 * i < chunks) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) lo = fminf(lo, v[i][j]), hi = fmaxf(hi, v[i][j]);
    }
  }
  lo = warp_min(lo);
  hi = warp_max(hi);
  const __half scale16 = __float2half_rn((hi - lo) / 15.0f);
  const __half mn16 = __float2half_rn(lo);
  const float scale = __half2float(scale16), mn = __half2float(mn16);
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    const int c = lane + 32 * i;
    if (c < chunks) {
      uint32_t packed = 0;  // byte j/2 = value j (low nibble) | value j+1 (high nibble)
#pragma unroll
      for (int j = 0; j < kVec; ++j) packed |= quantize_nibble(v[i][j], mn, scale) << (4 * j);
      uint8_t* dst = out + c * (kVec / 2);
      if constexpr (kVec == 2) {
        *dst = static_cast<uint8_t>(packed);
      } else if constexpr (kVec == 4) {
        *reinterpret_cast<uint16_t*>(dst) = static_cast<uint16_t>(packed);
      } else {
        *reinterpret_cast<uint32_t*>(dst) = packed;
      }
    }
  }
  if (lane == 0) {
    __half2 sp;
    sp.x = scale16;
    sp.y = mn16;
    *reinterpret_cast<__half2*>(params) = sp;
  }
}

// Vector index = (b * S + s) * (H_q + 2 H_kv) + head; heads [0, H_q) are q (RoPE only), then K, then V heads, so the
// warps of one token are adjacent (its cos/sin rows come from DRAM once). Lane l holds the kVec values of chunks
// l + 32 i (i < kSlots): kSlots = 1 with kVec = D / 32 is the vectorized layout (D = 64, 128, 256: 4-, 8- and 16-byte
// accesses), kVec = 2 with kPairSlots the general one.
template <typename T, int kVec, int kSlots, bool kRope>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) kv4_append_kernel(AppendArgs a) {
  // PDL (common.cuh): the inputs come from the kernel before (the q/k/v GEMM); wait before any read or exit
  pdl_wait();
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31;
  const int64_t vec = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (vec >= a.vectors) return;
  const int heads = a.h_q + 2 * a.h_kv;
  const int64_t token = vec / heads;
  const int head = static_cast<int>(vec - token * heads);
  const int64_t s = token % a.s, b = token / a.s;
  const int role = head < a.h_q ? 0 : (head < a.h_q + a.h_kv ? 1 : 2);  // q, k, v
  const int h = head - (role == 0 ? 0 : (role == 1 ? a.h_q : a.h_q + a.h_kv));
  const int64_t pos = a.positions[s];
  if (role != 0 && (pos < 0 || pos >= a.t)) return;  // out-of-range slots are skipped (never written out of bounds)

  const T* x = static_cast<const T*>(a.src[role]) + b * a.src_stride[role][0] + h * a.src_stride[role][1] +
               s * a.src_stride[role][2];
  const int chunks = a.d / kVec;
  float v[kSlots][kVec];
  uint32_t w[kSlots][kVec / 2];
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    const int c = lane + 32 * i;
    if (kSlots == 1 || c < chunks) {
      load_words<kVec / 2>(x + c * kVec, w[i]);
#pragma unroll
      for (int j = 0; j < kVec / 2; ++j) {
        const float2 f = pair_to_float2<T>(w[i][j]);
        v[i][2 * j] = f.x, v[i][2 * j + 1] = f.y;
      }
    }
  }
  if constexpr (kRope) {
    if (role != 2) {
      const T* cos = static_cast<const T*>(a.cos) + b * a.cos_stride[0] + s * a.cos_stride[1];
      const T* sin = static_cast<const T*>(a.sin) + b * a.sin_stride[0] + s * a.sin_stride[1];
      rotate<T, kVec, kSlots>(v, w, x, cos, sin, lane, a.d);
      if (role == 0) {
        T* q = static_cast<T*>(a.q_out) + ((b * a.h_q + h) * a.s + s) * a.d;
#pragma unroll
        for (int i = 0; i < kSlots; ++i) {
          const int c = lane + 32 * i;
          if (kSlots == 1 || c < chunks) store_words<kVec / 2>(q + c * kVec, w[i]);
        }
        return;
      }
    }
  }
  const int64_t slot = (b * a.h_kv + h) * a.t + pos;
  quantize_store<kVec, kSlots>(v, lane, chunks, a.cache[role - 1] + slot * (a.d / 2), a.params[role - 1] + 2 * slot);
}

// ---- host side ------------------------------------------------------------------------------------------------

bool aligned_to(const at::Tensor& t, int64_t elems) {
  if (t.stride(t.dim() - 1) != 1 || reinterpret_cast<uintptr_t>(t.data_ptr()) % (elems * t.element_size()) != 0) {
    return false;
  }
  for (int64_t i = 0; i + 1 < t.dim(); ++i) {
    if (t.size(i) > 1 && t.stride(i) % elems != 0) return false;
  }
  return true;
}

// Strided inputs are read in place when the general layout's 4-byte accesses are aligned; else copied.
at::Tensor readable(const at::Tensor& t) { return aligned_to(t, 2) ? t : t.clone(at::MemoryFormat::Contiguous); }

// kVec of the vectorized layout (D = 32 kVec) when every input allows its accesses, else 0 (the general layout).
int vector_width(int64_t d, std::initializer_list<const at::Tensor*> inputs) {
  const int vec = d == 64 ? 2 : (d == 128 ? 4 : (d == 256 ? 8 : 0));
  for (const at::Tensor* t : inputs) {
    if (vec == 0 || !aligned_to(*t, vec)) return 0;
  }
  return vec;
}

template <typename T, int kVec, int kSlots, bool kRope>
void launch_one(const AppendArgs& a, unsigned blocks) {
  static int8_t sm90[64] = {0};
  launch_kernel(kv4_append_kernel<T, kVec, kSlots, kRope>, sm90, {dim3(blocks), dim3(kWarpsPerBlock * 32)}, a);
}

template <typename T, bool kRope>
void launch_typed(const AppendArgs& a, int vec, unsigned blocks) {
  switch (vec) {
    case 2: launch_one<T, 2, 1, kRope>(a, blocks); break;
    case 4: launch_one<T, 4, 1, kRope>(a, blocks); break;
    case 8: launch_one<T, 8, 1, kRope>(a, blocks); break;
    default: launch_one<T, 2, kPairSlots, kRope>(a, blocks); break;
  }
}

template <bool kRope>
void launch(const AppendArgs& a, at::ScalarType dtype, int vec) {
  const int64_t blocks = (a.vectors + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "too many vectors for one launch");
  if (dtype == at::kHalf) {
    launch_typed<__half, kRope>(a, vec, static_cast<unsigned>(blocks));
  } else {
    launch_typed<__nv_bfloat16, kRope>(a, vec, static_cast<unsigned>(blocks));
  }
  QOQ_CHECK_LAUNCH();
}

void check_cache(const char* cache_name, const at::Tensor& cache, const char* params_name, const at::Tensor& params,
                 const at::Tensor& k) {
  check_kv4_cache_tensor(cache_name, cache, "k", k);
  TORCH_CHECK(cache.size(0) == k.size(0) && cache.size(1) == k.size(1) && cache.size(3) * 2 == k.size(3), cache_name,
              " has shape ", shape_str(cache), " which does not match k ", shape_str(k), " (expected [B, H_kv, T, D/2])");
  check_kv4_params(params_name, params, cache, "k", k);
}

void check_positions(const at::Tensor& cache_position, int64_t s, const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(cache_position.is_cuda() && cache_position.device() == ref.device(), "cache_position is on ",
              device_str(cache_position), " but ", ref_name, " is on ", device_str(ref));
  TORCH_CHECK(cache_position.scalar_type() == at::kLong, "cache_position must have dtype int64, got ",
              cache_position.scalar_type());
  TORCH_CHECK(cache_position.dim() == 1 && cache_position.size(0) == s, "cache_position must have shape [S] = [",
              num(s), "], got ", shape_str(cache_position));
  TORCH_CHECK(cache_position.is_contiguous(), "cache_position must be contiguous");
}

// cos or sin of rope_kv4_append: qkv's device and dtype, [B or 1, S, D].
void check_rotary(const char* name, const at::Tensor& t, const at::Tensor& qkv, int64_t d) {
  TORCH_CHECK(t.is_cuda() && t.device() == qkv.device(), name, " is on ", device_str(t), " but qkv is on ",
              device_str(qkv));
  TORCH_CHECK(t.scalar_type() == qkv.scalar_type(), name, " must have dtype ", qkv.scalar_type(), " (qkv's), got ",
              t.scalar_type());
  const int64_t b = qkv.size(0), s = qkv.size(1);
  TORCH_CHECK(t.dim() == 3 && (t.size(0) == 1 || t.size(0) == b) && t.size(1) == s && t.size(2) == d, name,
              " must have shape [B or 1, S, D] = [", num(b), " or 1, ", num(s), ", ", num(d), "], got ", shape_str(t));
}

void set_cache(AppendArgs& a, const at::Tensor& k_cache, const at::Tensor& k_params, const at::Tensor& v_cache,
               const at::Tensor& v_params, const at::Tensor& cache_position) {
  a.cache[0] = k_cache.data_ptr<uint8_t>();
  a.cache[1] = v_cache.data_ptr<uint8_t>();
  a.params[0] = reinterpret_cast<__half*>(k_params.data_ptr<at::Half>());
  a.params[1] = reinterpret_cast<__half*>(v_params.data_ptr<at::Half>());
  a.positions = cache_position.data_ptr<int64_t>();
  a.t = k_cache.size(2);
  a.h_kv = static_cast<int>(k_cache.size(1));
  a.d = static_cast<int>(k_cache.size(3) * 2);
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
  check_positions(cache_position, k_in.size(2), "k", k_in);
  if (k_cache.size(2) == 0) return;

  const c10::cuda::CUDAGuard guard(k_in.device());
  const at::Tensor k = readable(k_in), v = readable(v_in);
  AppendArgs a{};
  set_cache(a, k_cache, k_params, v_cache, v_params, cache_position);
  a.src[1] = k.data_ptr();
  a.src[2] = v.data_ptr();
  for (int i = 0; i < 3; ++i) {
    a.src_stride[1][i] = k.stride(i);
    a.src_stride[2][i] = v.stride(i);
  }
  a.s = k.size(2);
  a.h_q = 0;
  a.vectors = k.size(0) * a.s * 2 * a.h_kv;
  launch<false>(a, k.scalar_type(), vector_width(d, {&k, &v}));
}

at::Tensor rope_kv4_append_cuda(const at::Tensor& qkv_in, const at::Tensor& cos_in, const at::Tensor& sin_in,
                                const at::Tensor& k_cache, const at::Tensor& k_params, const at::Tensor& v_cache,
                                const at::Tensor& v_params, const at::Tensor& cache_position, int64_t num_q_heads) {
  TORCH_CHECK(qkv_in.is_cuda(), "qkv must be a CUDA tensor, got ", device_str(qkv_in));
  TORCH_CHECK(qkv_in.scalar_type() == at::kHalf || qkv_in.scalar_type() == at::kBFloat16,
              "qkv must have dtype float16 or bfloat16, got ", qkv_in.scalar_type());
  TORCH_CHECK(qkv_in.dim() == 3, "qkv must be 3-D [B, S, (H_q + 2 H_kv) * D], got shape ", shape_str(qkv_in));
  TORCH_CHECK(qkv_in.numel() > 0, "qkv must be non-empty, got shape ", shape_str(qkv_in));
  TORCH_CHECK(qkv_in.stride(2) == 1, "qkv must have contiguous rows (stride 1 along the last dim)");
  check_kv4_cache_tensor("k_cache", k_cache, "qkv", qkv_in);
  check_kv4_params("k_params", k_params, k_cache, "qkv", qkv_in);
  check_kv4_cache_tensor("v_cache", v_cache, "qkv", qkv_in);
  check_kv4_params("v_params", v_params, v_cache, "qkv", qkv_in);
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache ", shape_str(v_cache), " must have k_cache's shape ",
              shape_str(k_cache));
  TORCH_CHECK(k_cache.numel() > 0, "k_cache must be non-empty, got shape ", shape_str(k_cache));
  const int64_t b = qkv_in.size(0), s = qkv_in.size(1), h_kv = k_cache.size(1), d = 2 * k_cache.size(3);
  TORCH_CHECK(k_cache.size(0) == b, "k_cache holds B=", num(k_cache.size(0)), " rows but qkv has B=", num(b));
  TORCH_CHECK(d <= kMaxHeadDim, "head_dim ", num(d), " is larger than the CUDA rope_kv4_append supports (",
              num(kMaxHeadDim), ")");
  TORCH_CHECK(num_q_heads > 0 && num_q_heads % h_kv == 0, "num_q_heads (", num(num_q_heads),
              ") must be a positive multiple of the KV heads (", num(h_kv), ")");
  TORCH_CHECK(qkv_in.size(2) == (num_q_heads + 2 * h_kv) * d, "qkv must have (H_q + 2 H_kv) * D = ",
              num((num_q_heads + 2 * h_kv) * d), " columns, got shape ", shape_str(qkv_in));
  check_rotary("cos", cos_in, qkv_in, d);
  check_rotary("sin", sin_in, qkv_in, d);
  check_positions(cache_position, s, "qkv", qkv_in);

  const c10::cuda::CUDAGuard guard(qkv_in.device());
  at::Tensor q = at::empty({b, num_q_heads, s, d}, qkv_in.options());
  const at::Tensor qkv = readable(qkv_in), cos = readable(cos_in), sin = readable(sin_in);
  AppendArgs a{};
  set_cache(a, k_cache, k_params, v_cache, v_params, cache_position);
  const int64_t offsets[3] = {0, num_q_heads * d, (num_q_heads + h_kv) * d};
  for (int role = 0; role < 3; ++role) {
    a.src[role] = static_cast<const char*>(qkv.data_ptr()) + offsets[role] * qkv.element_size();
    a.src_stride[role][0] = qkv.stride(0);
    a.src_stride[role][1] = d;
    a.src_stride[role][2] = qkv.stride(1);
  }
  a.q_out = q.data_ptr();
  a.cos = cos.data_ptr();
  a.sin = sin.data_ptr();
  a.cos_stride[0] = cos.size(0) == 1 ? 0 : cos.stride(0);
  a.cos_stride[1] = cos.stride(1);
  a.sin_stride[0] = sin.size(0) == 1 ? 0 : sin.stride(0);
  a.sin_stride[1] = sin.stride(1);
  a.s = s;
  a.h_q = static_cast<int>(num_q_heads);
  a.vectors = b * s * (num_q_heads + 2 * h_kv);
  launch<true>(a, qkv.scalar_type(), vector_width(d, {&qkv, &cos, &sin}));
  return q;
}

}  // namespace
}  // namespace qoq

TORCH_LIBRARY_IMPL(qoq, CUDA, m) {
  m.impl("kv4_append", &qoq::kv4_append_cuda);
  m.impl("rope_kv4_append", &qoq::rope_kv4_append_cuda);
}
