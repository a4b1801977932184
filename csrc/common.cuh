// Shared helpers for the qoq CUDA kernels: argument checks with messages that name the argument.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

// Numbers, shapes and devices in check messages go through std::to_string: in the device build (torch 2.11 +
// nvcc 13.0), streaming an integer, a shape or a device into TORCH_CHECK's message from a .cu file crashed
// the process when the check failed, while strings and dtypes were fine.
namespace qoq {

inline std::string num(int64_t v) { return std::to_string(v); }

// An integer tuning/test override from the environment; `fallback` when unset or empty.
inline int env_int(const char* name, int fallback) {
  const char* env = std::getenv(name);
  return env == nullptr || *env == '\0' ? fallback : std::atoi(env);
}

// Lets `kernel` launch with `bytes` of dynamic shared memory (above the 48 KB default) on the current device.
// `done` is the call site's per-device flag (a static array), so the attribute is set once per device.
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, int bytes, bool (&done)[64]) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (!done[device & 63]) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    done[device & 63] = true;
  }
}

// Whether `kernel` can run its sm_90 code on the current device: an sm_90+ device, and the image the driver picked
// for it was compiled from sm_90+ PTX (ptxVersion is that image's virtual architecture; a build with only sm_80 PTX,
// JIT-compiled on an H100, would run the kernel's pre-sm_90 fallback body). No launch and no stream work, so a first
// call during CUDA graph capture is safe. `cache` is the call site's per-device state (0 unknown, 1 yes, 2 no).
template <typename Kernel>
bool runs_sm90_image(Kernel kernel, int8_t (&cache)[64]) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int8_t& state = cache[device & 63];
  if (state == 0) {
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    bool ok = false;
    if (major >= 9) {
      cudaFuncAttributes attr{};
      if (cudaFuncGetAttributes(&attr, kernel) == cudaSuccess) {
        ok = attr.ptxVersion >= 90;
      } else {
        (void)cudaGetLastError();  // no image for this device: the caller takes its fallback
      }
    }
    state = ok ? 1 : 2;
  }
  return state == 1;
}

inline std::string device_str(const at::Tensor& t) { return t.device().str(); }

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + "]";
}

// Checks shared by the KV4 ops (docs/formats.md, "KV cache (KV4)"); `ref` is the op's K/V or query tensor,
// whose device the cache must be on, and `ref_name` its name in the messages.
// A cache tensor: uint8, 4-D [B, H_kv, T, D/2], contiguous (the caller checks its sizes against `ref`).
inline void check_kv4_cache_tensor(const char* cache_name, const at::Tensor& cache, const char* ref_name,
                                   const at::Tensor& ref) {
  TORCH_CHECK(cache.is_cuda() && cache.device() == ref.device(), cache_name, " is on ", device_str(cache), " but ",
              ref_name, " is on ", device_str(ref));
  TORCH_CHECK(cache.scalar_type() == at::kByte, cache_name, " must have dtype uint8, got ", cache.scalar_type());
  TORCH_CHECK(cache.dim() == 4, cache_name, " must be 4-D [B, H_kv, T, D/2], got shape ", shape_str(cache));
  TORCH_CHECK(cache.is_contiguous(), cache_name, " must be contiguous");
}

// Its params: float16 [B, H_kv, T, 2] matching `cache`, contiguous.
inline void check_kv4_params(const char* params_name, const at::Tensor& params, const at::Tensor& cache,
                             const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(params.is_cuda() && params.device() == ref.device(), params_name, " is on ", device_str(params),
              " but ", ref_name, " is on ", device_str(ref));
  TORCH_CHECK(params.scalar_type() == at::kHalf, params_name, " must have dtype float16, got ", params.scalar_type());
  TORCH_CHECK(params.dim() == 4 && params.size(0) == cache.size(0) && params.size(1) == cache.size(1) &&
                  params.size(2) == cache.size(2) && params.size(3) == 2,
              params_name, " must have shape [B, H_kv, T, 2] = [", num(cache.size(0)), ", ", num(cache.size(1)), ", ",
              num(cache.size(2)), ", 2], got ", shape_str(params));
  TORCH_CHECK(params.is_contiguous(), params_name, " must be contiguous");
}

}  // namespace qoq

#define QOQ_CHECK_CUDA(t) TORCH_CHECK((t).is_cuda(), #t " must be a CUDA tensor, got ", qoq::device_str(t))
#define QOQ_CHECK_CONTIGUOUS(t) TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")
#define QOQ_CHECK_DTYPE(t, dt) \
  TORCH_CHECK((t).scalar_type() == (dt), #t " must have dtype ", (dt), ", got ", (t).scalar_type())
#define QOQ_CHECK_DIM(t, d) \
  TORCH_CHECK((t).dim() == (d), #t " must have ", qoq::num(d), " dims, got ", qoq::num((t).dim()))
#define QOQ_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()
