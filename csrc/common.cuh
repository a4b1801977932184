// Shared helpers for the qoq CUDA kernels: argument checks with messages that name the argument.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <utility>

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

// An attribute of the current device, read once per (attribute, device): the launchers' dispatch asks for the SM
// count, the L2 size and the shared memory limits on every call.
inline int device_attribute(cudaDeviceAttr attr) {
  constexpr int kCached = 256;  // cudaDeviceAttr values are small integers
  static int cache[kCached][64] = {};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const int index = static_cast<int>(attr);
  int fresh = 0;
  int& value = index >= 0 && index < kCached ? cache[index][device & 63] : fresh;
  if (value == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
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

// Programmatic dependent launch (PDL, sm_90+). Why: a decode step chains short kernels (rmsnorm_quantize ->
// W4A8 GEMM -> ... -> silu_mul_quantize -> GEMM); a GEMM launched with PDL starts while the kernel before it still
// runs, sets itself up and streams its weights (immutable module buffers) before it waits for that kernel's
// activations, hiding the launch gap and the first DRAM round trip. Contract of every kernel launched through
// launch_kernel with PDL on: pdl_wait() on every path before reading anything a previous kernel may have written
// (activations, their scales and sums; the GEMM's packed weights, s1/s2/z2, scale/zero and bias may be read
// before), before any global-memory write (the caching allocator may hand out memory the previous kernel still
// reads) and before exiting (so that a kernel waiting on this one transitively waits on its predecessors).
// pdl_launch_dependents() lets the next PDL-launched kernel start its prologue; it waits for this whole grid.
// Both are no-ops below sm_90 and when the kernel was launched without the attribute.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// QOQ_PDL=0 turns PDL launches off (default on); read at every launch (a getenv), so tests can switch it.
inline bool pdl_requested() { return env_int("QOQ_PDL", 1) != 0; }

// Grid, block, dynamic shared memory and (cluster_x > 0) a 1-D thread-block cluster of one launch.
struct LaunchDims {
  dim3 grid, block;
  size_t smem = 0;
  unsigned cluster_x = 0;
};

// Launches `kernel` on the current stream with cudaLaunchKernelEx, with the PDL attribute when QOQ_PDL allows it
// and the image the driver picked for `kernel` is sm_90+ code (runs_sm90_image; `sm90_cache` is the call site's
// per-device state): a pre-sm_90 image (e.g. sm_80 PTX JIT-compiled on an H100) lacks the griddepcontrol.wait
// above, so it must never start early. Captures into CUDA graphs (programmatic edges, CUDA >= 12.3).
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), int8_t (&sm90_cache)[64], const LaunchDims& dims, Args&&... args) {
  cudaLaunchAttribute attrs[2];
  unsigned n = 0;
  if (dims.cluster_x > 0) {
    attrs[n].id = cudaLaunchAttributeClusterDimension;
    attrs[n].val.clusterDim.x = dims.cluster_x;
    attrs[n].val.clusterDim.y = 1;
    attrs[n].val.clusterDim.z = 1;
    ++n;
  }
  if (pdl_requested() && runs_sm90_image(kernel, sm90_cache)) {
    attrs[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  cudaLaunchConfig_t config{};
  config.gridDim = dims.grid;
  config.blockDim = dims.block;
  config.dynamicSmemBytes = dims.smem;
  config.stream = c10::cuda::getCurrentCUDAStream();
  config.attrs = n > 0 ? attrs : nullptr;
  config.numAttrs = n;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
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
