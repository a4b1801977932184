// CUDA impls of qoq::w4a8_gemm_per_group and qoq::w4a8_gemm_per_channel: argument checks, tile-config
// choice by M, split-K choice, the Hopper wgmma path, launch, and the TORCH_LIBRARY_IMPL registration.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <vector>

#include "common.cuh"
#include "gemm/w4a8_gemm_kernel.cuh"
#include "gemm/w4a8_gemm_wgmma.cuh"
#include "gemm/w4a8_gemm_wgmma_ws.cuh"
#include "gemm/w4a8_gemv.cuh"
#include "gemm/w4a8_skinny.cuh"
#include "gemm/w4a8_stream.cuh"

namespace qoq {
namespace {

constexpr int kAlign = 16;  // cp.async copies 16-byte chunks

// A tensor whose data pointer is not 16-byte aligned (a view at an odd offset) is copied once.
at::Tensor aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % kAlign == 0 ? t : t.clone();
}

void check_common(const at::Tensor& x_q, const at::Tensor& x_s, const at::Tensor& qweight,
                  const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  QOQ_CHECK_CUDA(x_q);
  QOQ_CHECK_DTYPE(x_q, at::kChar);
  QOQ_CHECK_DIM(x_q, 2);
  QOQ_CHECK_CONTIGUOUS(x_q);
  const int64_t m = x_q.size(0), k = x_q.size(1);
  TORCH_CHECK(k > 0 && k % 64 == 0, "x_q: K must be a positive multiple of 64 for the CUDA W4A8 GEMM, got K=", qoq::num(k));
  TORCH_CHECK(m < (int64_t(1) << 31), "x_q: more than 2^31 rows is not supported");
  QOQ_CHECK_CUDA(x_s);
  QOQ_CHECK_DTYPE(x_s, at::kFloat);
  TORCH_CHECK(x_s.dim() == 1 && x_s.size(0) == m, "x_s must have shape [M] = [", qoq::num(m), "], got ", qoq::shape_str(x_s));
  QOQ_CHECK_CONTIGUOUS(x_s);
  QOQ_CHECK_CUDA(qweight);
  QOQ_CHECK_DTYPE(qweight, at::kByte);
  QOQ_CHECK_DIM(qweight, 2);
  QOQ_CHECK_CONTIGUOUS(qweight);
  TORCH_CHECK(qweight.size(1) * 2 == k, "qweight must have shape [N, K/2] = [N, ", qoq::num(k / 2), "], got ",
              qoq::shape_str(qweight));
  const int64_t n = qweight.size(0);
  TORCH_CHECK(n > 0 && n % 16 == 0, "qweight: N must be a positive multiple of 16 for the CUDA W4A8 GEMM, got N=",
              qoq::num(n));
  TORCH_CHECK(n < 65535 * 64, "qweight: N=", qoq::num(n), " is too large");
  TORCH_CHECK(x_s.device() == x_q.device(), "x_s is on ", qoq::device_str(x_s), " but x_q is on ", qoq::device_str(x_q));
  TORCH_CHECK(qweight.device() == x_q.device(), "qweight is on ", qoq::device_str(qweight), " but x_q is on ",
              qoq::device_str(x_q));
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    QOQ_CHECK_CUDA(b);
    TORCH_CHECK(b.device() == x_q.device(), "bias is on ", qoq::device_str(b), " but x_q is on ", qoq::device_str(x_q));
    TORCH_CHECK(b.scalar_type() == at::kFloat || b.scalar_type() == at::kHalf || b.scalar_type() == at::kBFloat16,
                "bias must be float32, float16 or bfloat16, got ", b.scalar_type());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == n, "bias must have shape [N] = [", qoq::num(n), "], got ", qoq::shape_str(b));
    QOQ_CHECK_CONTIGUOUS(b);
  }
  TORCH_CHECK(out_dtype == at::kHalf || out_dtype == at::kBFloat16,
              "out_dtype must be torch.float16 or torch.bfloat16, got ", out_dtype);
}

void check_residual(const std::optional<at::Tensor>& residual, const at::Tensor& x_q, int64_t n,
                    at::ScalarType out_dtype) {
  if (!residual.has_value()) return;
  const at::Tensor& r = *residual;
  TORCH_CHECK(r.is_cuda() && r.device() == x_q.device(), "residual is on ", qoq::device_str(r), " but x_q is on ",
              qoq::device_str(x_q));
  TORCH_CHECK(r.scalar_type() == out_dtype, "residual must have dtype ", out_dtype, " (out_dtype), got ", r.scalar_type());
  TORCH_CHECK(r.dim() == 2 && r.size(0) == x_q.size(0) && r.size(1) == n, "residual must have shape [M, N] = [",
              qoq::num(x_q.size(0)), ", ", qoq::num(n), "], got ", qoq::shape_str(r));
  TORCH_CHECK(r.is_contiguous(), "residual must be contiguous");
}

void check_per_row(const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t n, const at::Tensor& x_q) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", qoq::device_str(t));
  TORCH_CHECK(t.device() == x_q.device(), name, " is on ", qoq::device_str(t), " but x_q is on ", qoq::device_str(x_q));
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape [", qoq::num(n), "], got ", qoq::shape_str(t));
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

int multiprocessor_count() { return device_attribute(cudaDevAttrMultiProcessorCount); }

int bias_kind(const std::optional<at::Tensor>& bias) {
  if (!bias.has_value()) return kNoBias;
  switch (bias->scalar_type()) {
    case at::kFloat: return kBiasF32;
    case at::kHalf: return kBiasF16;
    default: return kBiasBF16;
  }
}

template <int BM, int BN, int BK, int WARPS_M, int WARPS_N, int STAGES, int MIN_BLOCKS, bool PER_GROUP>
void launch(GemmParams p, const at::TensorOptions& options, int forced_splits) {
  using C = TileConfig<BM, BN, BK, WARPS_M, WARPS_N, STAGES>;
  const int m_tiles = (p.M + BM - 1) / BM, n_tiles = (p.N + BN - 1) / BN, ktiles = p.K / BK;
  const int tiles = m_tiles * n_tiles;
  // Split K when the tiles alone cannot fill the GPU (decode, narrow layers): aim at ~2 CTAs per SM for
  // the light decode tiles and ~1 for the others (measured: H100 sweep, docs/benchmarks.md), keeping at
  // least 1024 k per split so the pipeline stays deep.
  const int sms = multiprocessor_count();
  int splits = 1;
  if (forced_splits > 0) {
    splits = std::min(forced_splits, ktiles);
  } else if (const int target = p.M <= 16 ? 2 * sms : sms; tiles < target) {
    splits = std::min({(target + tiles - 1) / tiles, std::max(1, p.K / 1024), 32});
  }
  int per_split = (ktiles + splits - 1) / splits;
  int smem_bytes = C::kSmemBytes;
  if (PER_GROUP) {
    // The (s2, z2) table holds BN columns x the groups of one split; keep it <= 32 KB (more splits if not).
    const int max_groups = 32 * 1024 / (2 * BN) - 2;
    per_split = std::max(1, std::min(per_split, max_groups * p.group_size / BK));
    p.split_groups = std::min(p.groups, per_split * BK / p.group_size + 2);
    smem_bytes += BN * p.split_groups * 2;
  }
  splits = (ktiles + per_split - 1) / per_split;  // no empty split
  p.ktiles_per_split = per_split;
  p.splits = splits;
  at::Tensor workspace;
  if (splits > 1) {
    workspace = at::zeros({static_cast<int64_t>(p.M) * p.N + tiles}, options.dtype(at::kInt));
    p.workspace = workspace.data_ptr<int32_t>();
    p.counters = p.workspace + static_cast<int64_t>(p.M) * p.N;
  }
  auto kernel = w4a8_gemm_kernel<BM, BN, BK, WARPS_M, WARPS_N, STAGES, MIN_BLOCKS, PER_GROUP>;
  // Opt in to the device's full dynamic shared memory once per device (the default cap is 48 KB).
  static int opted_in[64] = {0};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int& limit = opted_in[device & 63];
  if (limit == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    limit -= 1024;  // room for the kernel's static shared memory
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit));
  }
  TORCH_CHECK(smem_bytes <= limit, "w4a8 GEMM tile needs ", qoq::num(smem_bytes), " bytes of shared memory; this GPU allows ",
              qoq::num(limit));
  static int8_t sm90[64] = {0};
  launch_kernel(kernel, sm90, {dim3(m_tiles, n_tiles, splits), dim3(C::kThreads), static_cast<size_t>(smem_bytes)}, p);
}

// Tuning knob for benchmarks only: QOQ_GEMM_FORCE="<config>,<splits>" picks a tile config (index below)
// and a split count (0 = automatic); the kernels' results do not depend on either.
// Setting it also bypasses the decode and small-M kernels ("0,0" is this kernel's own choice at M <= 16).
struct ForcedChoice {
  int config = -1, splits = 0;
};

ForcedChoice forced_choice() {
  ForcedChoice f;
  if (const char* env = std::getenv("QOQ_GEMM_FORCE")) {
    if (std::sscanf(env, "%d,%d", &f.config, &f.splits) < 1) f.config = -1;
  }
  return f;
}

// Hopper path, on an sm_90a build running on sm_90. By default it serves M from wgmma_default_min_m on.
// QOQ_GEMM_WGMMA="<mode>[,<bm>[,<min_m>]]", read at every call (a getenv, negligible next to a GEMM; lets tests and
// benchmarks switch paths in one process), overrides it: mode 0: off; 1: the wgmma kernel for every shape it takes
// (M >= min_m, 33 unless given; K % 128 == 0), else the other kernels; 2: as 1 but an error instead of the fallback
// when the device/build lacks the wgmma kernel (tests use it so that a silent fallback cannot pass for the wgmma
// path). bm: activation rows per CTA, 16, 32 or 64 (the narrow tiles), 128, or 256 (the warp-specialised kernel);
// 0: by shape (wgmma_narrow_max_m, wgmma_ws_min_m, per_group_prefers_ws).
struct WgmmaChoice {
  int mode = 1, bm = 0, min_m = 0;  // min_m 0: wgmma_default_min_m
};

WgmmaChoice wgmma_choice() {
  WgmmaChoice c;
  const char* env = std::getenv("QOQ_GEMM_WGMMA");
  if (env != nullptr && *env != '\0') {
    c.min_m = 33;
    if (std::sscanf(env, "%d,%d,%d", &c.mode, &c.bm, &c.min_m) < 1) c.mode = 0;
    c.min_m = std::max(c.min_m, 1);
  }
  return c;
}

// Smallest M the wgmma path takes by default (H100 layer chain, four GEMMs back to back, docs/benchmarks.md): per
// group from 17, where the narrow 32-row tile (with its L2 weight prefetch) ran 67.3-67.9 us a layer at M = 20-23
// against the streaming kernel's 74.1-75.6 (72.1-72.4 against 73.1-73.4 at M = 17); per channel from 33, where the
// narrow tiles ran 73.6-76.3 us at M = 33-64 against the tile kernel's 85.0-111.1 (below, the tile kernel keeps it:
// 66-69 against 67-78). QOQ_GEMM_WGMMA_GROUP_MIN_M / QOQ_GEMM_WGMMA_CHANNEL_MIN_M override them (read at every
// call, for A/B runs of one build).
int wgmma_default_min_m(bool per_group) {
  return per_group ? env_int("QOQ_GEMM_WGMMA_GROUP_MIN_M", 17) : env_int("QOQ_GEMM_WGMMA_CHANNEL_MIN_M", 33);
}

// Whether the running device is sm_90 and this build carries the sm_90a image of the wgmma kernel (a probe
// kernel reports the compile-time flag of the image the driver picked). Cached per device.
bool wgmma_available(const at::TensorOptions& options) {
  static int cached[64] = {0};  // 0: unknown, 1: yes, 2: no
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int& state = cached[device & 63];
  if (state == 0) {
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    bool ok = false;
    if (major == 9) {
      at::Tensor flag = at::zeros({1}, options.dtype(at::kInt));
      wgmma_probe_kernel<<<1, 1, 0, c10::cuda::getCurrentCUDAStream()>>>(flag.data_ptr<int>());
      QOQ_CHECK_LAUNCH();
      ok = flag.item<int>() == 1;
    }
    state = ok ? 1 : 2;
  }
  return state == 1;
}

// Split-K count of the wgmma kernels: QOQ_GEMM_WGMMA_SPLITS (read at every call; > 0 forces a count, for tests
// and sweeps) or as many splits as the resident CTA slots hold, each at least 12 k tiles (1536 k) deep (H100
// sweep, docs/benchmarks.md: deeper splits leave SMs idle, shallower ones pay their fill and merge), except that
// tiles covering >= 70% of the SMs are not split into splits of < 48 k tiles (same sweeps: o at M = 384 / 512 and
// qkv at M = 256, 96-128 tiles of 32 k tiles, ran 7-10% faster unsplit; down at M = 512, 56 k tiles a split,
// gains from two). Returns k tiles per split; no split is empty.
int wgmma_ktiles_per_split(int tiles, int ktiles, int blocks_per_sm) {
  int splits = env_int("QOQ_GEMM_WGMMA_SPLITS", 0);
  if (splits <= 0) {
    const int sms = multiprocessor_count();
    splits = std::min(blocks_per_sm * sms / tiles, ktiles / 12);
    if (splits > 1 && 10 * tiles >= 7 * sms && ktiles / splits < 48) splits = 1;
  }
  splits = std::clamp(splits, 1, ktiles);
  return (ktiles + splits - 1) / splits;
}

// Split-K count of the narrow wgmma tiles (BM < 128: few activation rows, memory-bound): as many splits as keep the
// grid within one wave of resident CTA slots, each at least kNarrowMinKtiles k tiles deep
// (QOQ_GEMM_WGMMA_NARROW_MIN_KT overrides the depth; QOQ_GEMM_WGMMA_SPLITS forces a count). Returns k tiles per
// split; no split is empty.
constexpr int kNarrowMinKtiles = 8;
int wgmma_narrow_ktiles_per_split(int tiles, int ktiles, int blocks_per_sm) {
  int splits = env_int("QOQ_GEMM_WGMMA_SPLITS", 0);
  if (splits <= 0) {
    const int slots = blocks_per_sm * multiprocessor_count();
    splits = std::min(slots / tiles, ktiles / env_int("QOQ_GEMM_WGMMA_NARROW_MIN_KT", kNarrowMinKtiles));
  }
  splits = std::clamp(splits, 1, ktiles);
  return (ktiles + splits - 1) / splits;
}

// The split-K counters of the wgmma kernels: kSplitCounters zeroed int32 per (device, stream), allocated on first
// use and kept for the process. The last split of each output tile sets its counter back to 0, so the next GEMM
// on the stream (which runs after this one has finished) starts from zeros; GEMMs on different streams may overlap,
// so each stream has its own array (a CUDA graph keeps the array of the stream it was captured on). Returns nullptr
// when `needed` counters are more than an array holds, for a 65th stream, or when the allocation fails: the caller
// then allocates zeroed counters for the call. A first use while a CUDA graph is captured allocates in relaxed
// capture mode (as the caching allocator's own cudaMalloc does) and zeroes on a private stream that is waited for,
// so none of it becomes part of the graph.
constexpr int64_t kSplitCounters = int64_t{1} << 16;
constexpr size_t kSplitCounterStreams = 64;

int32_t* split_counters(int64_t needed) {
  if (needed > kSplitCounters) return nullptr;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  struct Entry {
    int device;
    cudaStream_t stream;
    int32_t* counters;
  };
  static std::mutex mutex;
  static std::vector<Entry> entries;
  const std::lock_guard<std::mutex> lock(mutex);
  for (const Entry& e : entries) {
    if (e.device == device && e.stream == stream) return e.counters;
  }
  if (entries.size() >= kSplitCounterStreams) return nullptr;
  const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
  void* counters = nullptr;
  cudaStream_t zeroing = nullptr;
  bool ok = cudaMalloc(&counters, kSplitCounters * sizeof(int32_t)) == cudaSuccess;
  ok = ok && cudaStreamCreateWithFlags(&zeroing, cudaStreamNonBlocking) == cudaSuccess;
  ok = ok && cudaMemsetAsync(counters, 0, kSplitCounters * sizeof(int32_t), zeroing) == cudaSuccess;
  ok = ok && cudaStreamSynchronize(zeroing) == cudaSuccess;
  if (zeroing != nullptr) (void)cudaStreamDestroy(zeroing);
  if (!ok) {
    if (counters != nullptr) (void)cudaFree(counters);
    (void)cudaGetLastError();  // no kept counters: the call allocates its own
    return nullptr;
  }
  entries.push_back({device, stream, static_cast<int32_t*>(counters)});
  return static_cast<int32_t*>(counters);
}

// Split-K scratch of a wgmma launch: the INT32 partial accumulators (`words` a split) of every output tile and its
// counter (split_counters, or zeroed ones for this call where none can be kept), bound into `p`; the tensors live as
// long as this object, i.e. across the launch (the caching allocator orders their reuse after it on the stream).
struct SplitScratch {
  at::Tensor partials, counters;
  SplitScratch(GemmParams& p, int64_t tiles, int64_t words, const at::TensorOptions& options) {
    partials = at::empty({tiles * p.splits * words}, options.dtype(at::kInt));
    p.workspace = partials.data_ptr<int32_t>();
    p.counters = split_counters(tiles);
    if (p.counters == nullptr) {
      counters = at::zeros({tiles}, options.dtype(at::kInt));
      p.counters = counters.data_ptr<int32_t>();
    }
  }
};

template <int BM, int STAGES, int MIN_BLOCKS, bool PER_GROUP, int K_PART, bool ONE_GROUP>
void launch_wgmma_kernel_as(const GemmParams& p, const LaunchDims& dims) {
  auto kernel = w4a8_gemm_wgmma_kernel<BM, STAGES, MIN_BLOCKS, PER_GROUP, K_PART, ONE_GROUP>;
  static bool opted_in[64] = {false};
  allow_dynamic_smem(kernel, WgmmaTile<BM, STAGES>::kSmemBytes, opted_in);
  static int8_t sm90[64] = {0};
  launch_kernel(kernel, sm90, dims, p);
}

// Per group with group_size % 128 == 0 a k tile lies in one scale group, and the kernel reads one half's scales
// (ONE_GROUP; H100 layer chain, docs/benchmarks.md: per group 1.5-2% faster at M = 256-512, 4% at M = 48).
template <int BM, int STAGES, int MIN_BLOCKS, bool PER_GROUP, int K_PART>
void launch_wgmma_kernel(const GemmParams& p, const LaunchDims& dims) {
  if (PER_GROUP && p.group_size % 128 == 0) {
    launch_wgmma_kernel_as<BM, STAGES, MIN_BLOCKS, PER_GROUP, K_PART, PER_GROUP>(p, dims);
  } else {
    launch_wgmma_kernel_as<BM, STAGES, MIN_BLOCKS, PER_GROUP, K_PART, false>(p, dims);
  }
}

// The 128-row kernel (large M takes the warp-specialised 256-row one, launch_wgmma_ws); split K when its tiles
// leave CTA slots idle.
template <int BM, int STAGES, int MIN_BLOCKS, bool PER_GROUP>
void launch_wgmma(GemmParams p, const at::TensorOptions& options) {
  using T = WgmmaTile<BM, STAGES>;
  const int m_tiles = (p.M + BM - 1) / BM, n_tiles = (p.N + T::kBN - 1) / T::kBN, ktiles = p.K / T::kBK;
  p.ktiles_per_split = BM < 128 ? wgmma_narrow_ktiles_per_split(m_tiles * n_tiles, ktiles, MIN_BLOCKS)
                                 : wgmma_ktiles_per_split(m_tiles * n_tiles, ktiles, MIN_BLOCKS);
  p.splits = (ktiles + p.ktiles_per_split - 1) / p.ktiles_per_split;
  // L2 prefetch of the weights (narrow tiles whose grid has one m tile; w4a8_gemm_wgmma.cuh): 4 k tiles beyond the
  // stage copies by default (H100 layer chain, docs/benchmarks.md: per group 76-77 against 80-82 us a layer at
  // M = 33-64; 8 and 16 tiles ahead gained less, and grids of two or more m tiles, narrow or 128-row, lost 10-15%).
  // QOQ_GEMM_WGMMA_L2_PREFETCH sets the distance (0: off).
  p.l2_prefetch_tiles = BM < 128 && m_tiles == 1 ? std::max(0, env_int("QOQ_GEMM_WGMMA_L2_PREFETCH", 4)) : 0;
  const LaunchDims dims{dim3(m_tiles, n_tiles, p.splits), dim3(T::kThreads), T::kSmemBytes};
  if (p.splits > 1) {
    const SplitScratch scratch(p, int64_t{m_tiles} * n_tiles, (BM / 2) * 256, options);
    launch_wgmma_kernel<BM, STAGES, MIN_BLOCKS, PER_GROUP, kSplitK>(p, dims);
    return;
  }
  launch_wgmma_kernel<BM, STAGES, MIN_BLOCKS, PER_GROUP, kWholeK>(p, dims);
}

// The 128-row kernel with stream-K over `ctas` CTAs (w4a8_gemm_wgmma.cuh, kStreamK): p.splits is the most pieces
// any output tile has, the stride of the partial sums' slots.
template <int STAGES, int MIN_BLOCKS, bool PER_GROUP>
void launch_wgmma_stream_k(GemmParams p, const at::TensorOptions& options, int ctas) {
  using T = WgmmaTile<128, STAGES>;
  const int m_tiles = (p.M + 127) / 128, n_tiles = (p.N + T::kBN - 1) / T::kBN, ktiles = p.K / T::kBK;
  const int64_t iterations = int64_t{n_tiles} * ktiles;  // (n tile, k tile) pairs, taken by groups of m_tiles CTAs
  const int groups = static_cast<int>(std::clamp<int64_t>(ctas / m_tiles, 1, iterations));
  int slots = 1;
  for (int n_tile = 0; n_tile < n_tiles; ++n_tile) {
    const int first = stream_k_group_of(int64_t{n_tile} * ktiles, groups, iterations);
    slots = std::max(slots, stream_k_group_of(int64_t{n_tile + 1} * ktiles - 1, groups, iterations) - first + 1);
  }
  p.splits = slots;
  p.l2_prefetch_tiles = 0;
  const SplitScratch scratch(p, int64_t{m_tiles} * n_tiles, 64 * 256, options);
  launch_wgmma_kernel<128, STAGES, MIN_BLOCKS, PER_GROUP, kStreamK>(p, {dim3(groups * m_tiles), dim3(T::kThreads),
                                                                       T::kSmemBytes});
}

// From this M on the default is the warp-specialised 256-row kernel (H100, docs/benchmarks.md: per group it beat
// the 128-row kernel from M = 1024, per channel it ties there and wins above); QOQ_GEMM_WS_MIN_M overrides.
int wgmma_ws_min_m() { return env_int("QOQ_GEMM_WS_MIN_M", 1024); }

// Whether the warp-specialised kernel takes the shape: its producer addresses rows with 32-bit offsets.
bool wgmma_ws_supports(const GemmParams& p) {
  return static_cast<uint64_t>(p.M) * p.K < (uint64_t{1} << 32) && static_cast<uint64_t>(p.N) * p.K < (uint64_t{1} << 33);
}

constexpr int kWgmma128BlocksPerSm = 2;  // the 128-row kernel's resident CTAs an SM (launch_wgmma's MIN_BLOCKS)
// The narrow tiles (16-64 activation rows): memory-bound, so deeper pipelines: 6 stages (4 tiles in flight a CTA),
// 8 for the 16- and 32-row tiles, whose stages are smaller (two CTAs an SM either way).
constexpr int kNarrowBlocksPerSm = 2;
template <int BM>
constexpr int narrow_stages() { return BM <= 32 ? 8 : 6; }
// Up to this M the default wgmma tile is a narrow one (H100, docs/benchmarks.md): 32 activation rows up to M = 32,
// 64 rows above (per channel at M = 33-64 two 32-row m tiles), except that a weight larger than the L2 takes the
// tile that covers M at once (weight_exceeds_l2). QOQ_GEMM_WGMMA_NARROW_MAX_M overrides (0: never).
int wgmma_narrow_max_m() { return env_int("QOQ_GEMM_WGMMA_NARROW_MAX_M", 128); }

// Two or more m tiles read every weight once each, from L2 after the first when the weight fits there; one tile
// covering M reads it once but computes its empty rows. H100 (50 MB of L2), µs per GEMM timed alone
// (docs/results/gemm_per_channel_bm_by_shape_h100.txt, gemm_bm_m80_m128_by_shape_h100.txt):
// - per channel at M = 40 / 64, 32-row / 64-row tiles: weights that fit, Llama-3-8B qkv (12 MB) 17.3-18.3 /
//   20.0-20.9, down (28 MB) 27.9-29.1 / 30.8-31.3; weights that do not, Llama-3-8B gate_up (56 MB) 44.4-45.1 /
//   38.9-39.8, Qwen1.5-72B qkv (96 MB) 71.0-71.9 / 57.0-58.5, down (96 MB) 65.5-66.4 / 62.3-63.6, gate_up (192 MB)
//   112.8-114.8 / 110.3-111.7, the Llama-3-8B head (250 MB) 144.0-146.6 / 123.4-127.0, the Qwen1.5-72B head (594 MB)
//   312.4-320.2 / 256.5-264.9;
// - at M = 80 / 128, 64-row / 128-row tiles, per channel and per group: Llama-3-8B qkv, o, down 17.0-33.1 / 20.0-40.1;
//   gate_up 47.2-48.7 / 43.2-44.6 per channel, 52.1-53.7 / 45.0-47.4 per group; Qwen1.5-72B qkv 78.1-80.0 / 66.6-68.0
//   and 88.8-90.6 / 70.9-72.2; the Llama-3-8B head 162.7-172.1 / 151.1-157.7 and 185.9-190.5 / 157.8-164.9.
// (All four Llama-3-8B layers per channel on the 64-row tile at M = 40-64: layer chain 74.2-78.6 against 75.2-79.6
// µs a layer, batch 48 / 64 end to end within its run-to-run noise: the rule keeps the small weights on two tiles.)
bool weight_exceeds_l2(const GemmParams& p) {
  return static_cast<int64_t>(p.N) * p.K / 2 > device_attribute(cudaDevAttrL2CacheSize);
}

// Per group from M = kPerGroupWsMinM up to wgmma_ws_min_m: the warp-specialised kernel when its grid (one CTA an SM)
// costs no more than the 128-row kernel's (two an SM) and it splits K only for deep K (>= 64 k tiles). Cost: waves
// times k tiles a CTA, where a last 128-row wave of at most one CTA an SM counts kLoneWavePct% of a full one (its
// CTAs run alone, at about twice a shared CTA's rate, while a 256-row CTA alone still takes a full wave). H100 layer
// chain, docs/benchmarks.md: against counting waves alone, qkv (two waves either way, the second nearly empty) and
// gate_up at M = 768 move to the 128-row kernel, 314.2 against 322.2 us a layer at M = 768 and 337.2 against 344.0
// at 896 (four rounds each); o and down keep the 256-row one. A full wave of either kernel covers the same output
// area, and the 256-row one dequantizes each weight once per 256 rows instead of 128, so at equal cost it wins per
// group (not per channel, whose dequantization is cheaper); its split-K merge costs more than it gains at
// K = 4096. H100 sweep of single GEMMs (docs/benchmarks.md,
// `--sweep-wgmma-splits` at M = 256-1024): it won gate_up at M = 256 and 768, qkv at M = 384 / 512, down
// everywhere. But in a layer's four GEMMs back to back (the layer chain, as a model runs them), the 128-row kernel
// everywhere was faster below M = 768 (M = 256 / 384 / 512: 145 / 201 / 221 against 167-169 / 213-217 / 233 us a
// layer); at M = 768 the two were within the spread between calls (rule 317-358, 128-row 329-335), and at 1024
// the rule won (351-382 against 403-408). Timed cold (each GEMM alone, L2 flushed) the old rule was faster at
// M = 256 (157-161 against 181-184 us with L2 zeroed, 154-157 against 162-168 read-flushed), about even at 384-512.
// End to end, HF's eager prefill at 256-768 tokens is host-bound (TTFT the same under both rules), so the GEMMs set
// the time only back to back, as in the chain. docs/results/gemm_prefill_chain_ws_rule_h100.txt,
// dispatch_rules_e2e_ab_h100.txt. QOQ_GEMM_WS_GROUP_MIN_M overrides (read at every call).
constexpr int kPerGroupWsMinM = 768;
constexpr int kLoneWavePct = 60;

bool per_group_prefers_ws(const GemmParams& p) {
  if (p.M < env_int("QOQ_GEMM_WS_GROUP_MIN_M", kPerGroupWsMinM) || !wgmma_ws_supports(p)) return false;
  const int sms = multiprocessor_count(), n_tiles = (p.N + 127) / 128, ktiles = p.K / 128;
  const int ws_tiles = (p.M + 255) / 256 * n_tiles, tiles_128 = (p.M + 127) / 128 * n_tiles;
  auto splits = [&](int tiles, int blocks_per_sm) {
    const int per_split = wgmma_ktiles_per_split(tiles, ktiles, blocks_per_sm);
    return (ktiles + per_split - 1) / per_split;
  };
  const int ws_splits = splits(ws_tiles, 1), splits_128 = splits(tiles_128, kWgmma128BlocksPerSm);
  if (ws_splits > 1 && ktiles < 64) return false;
  const int64_t ws_waves = (int64_t{ws_tiles} * ws_splits + sms - 1) / sms;
  const int64_t slots = int64_t{kWgmma128BlocksPerSm} * sms, ctas_128 = int64_t{tiles_128} * splits_128;
  const int64_t last = ctas_128 % slots;
  const int64_t wave_pct_128 = ctas_128 / slots * 100 + (last == 0 ? 0 : last <= sms ? kLoneWavePct : 100);
  const int ws_ktiles = (ktiles + ws_splits - 1) / ws_splits, ktiles_128 = (ktiles + splits_128 - 1) / splits_128;
  return ws_waves * 100 * ws_ktiles <= wave_pct_128 * ktiles_128;
}

template <int STAGES, bool PER_GROUP, int K_PART>
void launch_wgmma_ws_kernel(const GemmParams& p, const LaunchDims& dims) {
  using T = WgmmaWsTile<256, STAGES>;
  auto kernel = w4a8_gemm_wgmma_ws_kernel<256, STAGES, PER_GROUP, K_PART>;
  static bool opted_in[64] = {false};
  allow_dynamic_smem(kernel, T::kSmemBytes, opted_in);
  static int8_t sm90[64] = {0};
  launch_kernel(kernel, sm90, dims, p);
}

// Pieces into which the 256-row kernel splits the K of each tile of its last, partial wave (kTailSplit), or 1: where
// the grid has at least one full wave of one CTA an SM and a last wave of `tail` tiles, as many pieces as that wave's
// SMs hold (sms / tail), each at least kTailMinKtiles k tiles; two pieces only for deep K (>= kTailTwoPieceMinKtiles
// k tiles), where half a tile's K loop is worth more than the merge (the last piece loads the other's 128 KB of
// partials). H100 (docs/benchmarks.md, "The 256-row kernel's last wave split in K"), each shape chained with itself:
// down_proj at M = 1280 / 1536 118.6 / 130.7 against 164.4 / 157.7 us (4 / 2 pieces), o at 1280 49.3 against 54.0,
// qkv at 1536 75.9 against 80.6 (5 pieces); but qkv at M = 1024 (K = 4096, 2 pieces), 52.1 against 54.0 alone, made
// the layer chain 369-376 against 346-350 us a layer. Only for grids of at most kTailMaxWaves full waves: at M = 4096
// (gate_up, 27 waves and a last one of 20 tiles) the layer chain ran 0.5-1% slower with it. QOQ_GEMM_WS_TAIL_SPLIT
// (read at every call) 0 turns it off; n > 1 forces n pieces on the last tiles % sms tiles (all of them, at most sms,
// when that is 0).
constexpr int kTailMinKtiles = 8, kTailTwoPieceMinKtiles = 64, kTailMaxWaves = 16;
int ws_tail_pieces(int tiles, int ktiles, int* tail) {
  const int mode = env_int("QOQ_GEMM_WS_TAIL_SPLIT", -1), sms = multiprocessor_count();
  *tail = tiles % sms;
  if (mode > 1) {
    if (*tail == 0) *tail = std::min(tiles, sms);
    return std::min(mode, ktiles);
  }
  if (mode == 0 || tiles < sms || tiles > kTailMaxWaves * sms || *tail == 0) return 1;
  const int pieces = std::min(sms / *tail, ktiles / kTailMinKtiles);
  return pieces >= 3 || (pieces == 2 && ktiles >= kTailTwoPieceMinKtiles) ? pieces : 1;
}

// The warp-specialised 256-row kernel (w4a8_gemm_wgmma_ws.cuh): one CTA an SM; split K when its tiles leave SMs
// idle (wgmma_ktiles_per_split with one CTA slot an SM), or only the last wave's tiles (ws_tail_pieces).
template <int STAGES, bool PER_GROUP>
void launch_wgmma_ws(GemmParams p, const at::TensorOptions& options) {
  using T = WgmmaWsTile<256, STAGES>;
  const int m_tiles = (p.M + 255) / 256, n_tiles = (p.N + T::kBN - 1) / T::kBN, ktiles = p.K / T::kBK;
  const int tiles = m_tiles * n_tiles;
  p.ktiles_per_split = wgmma_ktiles_per_split(tiles, ktiles, 1);
  p.splits = (ktiles + p.ktiles_per_split - 1) / p.ktiles_per_split;
  if (p.splits > 1) {
    const SplitScratch scratch(p, tiles, 128 * 256, options);
    launch_wgmma_ws_kernel<STAGES, PER_GROUP, kSplitK>(p, {dim3(m_tiles, n_tiles, p.splits), dim3(T::kThreads),
                                                           T::kSmemBytes});
    return;
  }
  int tail = 0;
  const int pieces = ws_tail_pieces(tiles, ktiles, &tail);
  if (pieces > 1) {
    p.ktiles_per_split = (ktiles + pieces - 1) / pieces;
    p.splits = (ktiles + p.ktiles_per_split - 1) / p.ktiles_per_split;  // no empty piece
  }
  if (pieces > 1 && p.splits > 1) {
    const SplitScratch scratch(p, tail, 128 * 256, options);
    launch_wgmma_ws_kernel<STAGES, PER_GROUP, kTailSplit>(p, {dim3(tiles + tail * (p.splits - 1)), dim3(T::kThreads),
                                                              T::kSmemBytes});
    return;
  }
  launch_wgmma_ws_kernel<STAGES, PER_GROUP, kWholeK>(p, {dim3(m_tiles, n_tiles, 1), dim3(T::kThreads), T::kSmemBytes});
}

// Whether the wgmma path takes the GEMM (raises under QOQ_GEMM_WGMMA=2 when the device or build lacks it).
bool wgmma_takes(int64_t M, int64_t K, bool per_group, int64_t group_size, const at::TensorOptions& options) {
  const WgmmaChoice choice = wgmma_choice();
  const int min_m = choice.min_m > 0 ? choice.min_m : wgmma_default_min_m(per_group);
  if (choice.mode <= 0 || M < min_m || K % 128 != 0 || (per_group && group_size % 64 != 0)) return false;
  if (!wgmma_available(options)) {
    TORCH_CHECK(choice.mode != 2, "QOQ_GEMM_WGMMA=2: the wgmma W4A8 kernel needs an sm_90 device and a build "
                "with an sm_90a image (TORCH_CUDA_ARCH_LIST=9.0a)");
    return false;
  }
  return true;
}

// The 128-row kernel's grid when it would leave SMs idle: at most one CTA an SM, with the split-K count for one CTA
// slot an SM, runs the 8-stage instantiation of one CTA an SM (twice the stages in flight, no second CTA to hide
// latency with). H100 layer chain, docs/benchmarks.md: per group 4-5% and per channel 8-10% faster a layer at
// M = 192-384 (o and down, and qkv up to 256 rows). Returns whether it does; QOQ_GEMM_WGMMA_DEEP=0 turns it off.
bool wgmma128_takes_deep_pipeline(const GemmParams& p) {
  if (env_int("QOQ_GEMM_WGMMA_DEEP", 1) == 0) return false;
  using T = WgmmaTile<128, 8>;  // the tile launch_wgmma<128, 8, 1, ...> takes
  const int tiles = (p.M + 127) / 128 * ((p.N + T::kBN - 1) / T::kBN), ktiles = p.K / T::kBK;
  const int per_split = wgmma_ktiles_per_split(tiles, ktiles, 1);
  return tiles * ((ktiles + per_split - 1) / per_split) <= multiprocessor_count();
}

// Stream-K on the 128-row kernel (two CTAs an SM, kStreamK), per group, for deep K (>= kStreamKMinKtiles k tiles)
// where the unsplit grid, at most one wave of two CTAs an SM, would fill the SMs unevenly (its last wave of one CTA
// an SM covers at most 3/4 of them: 96, 160 or 192 tiles on 132 SMs). H100 (docs/benchmarks.md, "Stream-K"), per
// group, each shape chained with itself: Llama-3-8B down_proj 52.1 / 75.2 / 84.2 against 56.2 / 87.2 / 87.6 us at
// M = 384 / 640 / 704, Llama-2/3-70B and Qwen1.5-72B down_proj (K = 28672 / 24576) 159-166 / 137-142 against
// 177-187 / 153 at 384; the layer chain ~2% / ~5% / ~1% faster at 384 / 640 / 704. Not taken where it lost: K = 8192
// (o_proj of the 70B shapes at 300-384 rows, 54-57 against 52-53 us) and K = 4096 (o at 384: 26.9 against 18.7),
// whose shorter tiles pay each piece's pipeline fill and merge; 128 tiles (balanced already: down at 512, 63.1
// against 57.1); per channel, whose K loop is cheaper (down 49.2 against 44.2 at 384, 82.4 against 74.6 at 768).
// QOQ_GEMM_STREAMK (read at every call) 0 turns it off, 1 sends every 128-row GEMM (either format) to it;
// QOQ_GEMM_STREAMK_DEEP=1 takes the 8-stage one-CTA-an-SM instantiation instead, QOQ_GEMM_STREAMK_CTAS sets the grid.
constexpr int kStreamKMinKtiles = 96;
bool wgmma128_takes_stream_k(const GemmParams& p, bool per_group) {
  const int mode = env_int("QOQ_GEMM_STREAMK", -1);
  if (mode >= 0) return mode >= 1;
  const int sms = multiprocessor_count(), ktiles = p.K / 128;
  const int tiles = (p.M + 127) / 128 * ((p.N + 127) / 128);
  if (!per_group || ktiles < kStreamKMinKtiles) return false;
  const bool deep = wgmma128_takes_deep_pipeline(p);
  if (wgmma_ktiles_per_split(tiles, ktiles, deep ? 1 : kWgmma128BlocksPerSm) < ktiles) return false;  // split K
  const int last_wave = tiles % sms;
  return tiles <= kWgmma128BlocksPerSm * sms && last_wave > 0 && 4 * last_wave <= 3 * sms;
}

// True when the wgmma path computed the GEMM.
template <bool PER_GROUP>
bool try_wgmma(const GemmParams& p, const at::TensorOptions& options) {
  const WgmmaChoice choice = wgmma_choice();
  if (!wgmma_takes(p.M, p.K, PER_GROUP, p.group_size, options)) return false;
  TORCH_CHECK(!PER_GROUP || p.packed_scales != nullptr, "internal: the per-group wgmma path needs packed scales");
  int bm = choice.bm;
  if (bm == 0) {
    if (p.M >= wgmma_ws_min_m() || (PER_GROUP && per_group_prefers_ws(p))) {
      bm = 256;
    } else if (p.M > wgmma_narrow_max_m()) {
      bm = 128;
    } else {
      const bool one_m_tile = weight_exceeds_l2(p);
      bm = p.M <= 32 ? 32 : p.M <= 64 ? (PER_GROUP || one_m_tile ? 64 : 32) : (one_m_tile ? 128 : 64);
    }
  }
  if (bm == 256 && wgmma_ws_supports(p)) {
    launch_wgmma_ws<5, PER_GROUP>(p, options);
  } else if (bm == 16) {
    launch_wgmma<16, narrow_stages<16>(), kNarrowBlocksPerSm, PER_GROUP>(p, options);
  } else if (bm == 32) {
    launch_wgmma<32, narrow_stages<32>(), kNarrowBlocksPerSm, PER_GROUP>(p, options);
  } else if (bm == 64) {
    launch_wgmma<64, narrow_stages<64>(), kNarrowBlocksPerSm, PER_GROUP>(p, options);
  } else if (wgmma128_takes_stream_k(p, PER_GROUP)) {
    if (env_int("QOQ_GEMM_STREAMK_DEEP", 0) != 0) {
      launch_wgmma_stream_k<8, 1, PER_GROUP>(p, options, env_int("QOQ_GEMM_STREAMK_CTAS", multiprocessor_count()));
    } else {
      launch_wgmma_stream_k<4, kWgmma128BlocksPerSm, PER_GROUP>(
          p, options, env_int("QOQ_GEMM_STREAMK_CTAS", kWgmma128BlocksPerSm * multiprocessor_count()));
    }
  } else if (wgmma128_takes_deep_pipeline(p)) {
    launch_wgmma<128, 8, 1, PER_GROUP>(p, options);
  } else {
    launch_wgmma<128, 4, kWgmma128BlocksPerSm, PER_GROUP>(p, options);
  }
  return true;
}

template <bool PER_GROUP>
void dispatch(GemmParams p, const at::TensorOptions& options) {
  if (try_wgmma<PER_GROUP>(p, options)) return;
  const ForcedChoice forced = forced_choice();
  if (forced.config < 0 && p.M >= stream_min_m() && p.M <= stream_max_m(PER_GROUP) && stream_supports(p, PER_GROUP)) {
    // small M on sm_90: the streaming kernel (w4a8_stream.cu)
    launch_w4a8_stream<PER_GROUP>(p, multiprocessor_count());
    return;
  }
  if (forced.config < 0 && p.M <= gemv_max_m()) {  // decode: the memory-bound dp4a kernel (w4a8_gemv.cu)
    launch_w4a8_gemv<PER_GROUP>(p);
    return;
  }
  if (forced.config < 0 && p.M <= skinny_max_m(PER_GROUP) && skinny_supports(p)) {  // small M: w4a8_skinny.cu
    launch_w4a8_skinny<PER_GROUP>(p, multiprocessor_count());
    return;
  }
  int config = forced.config;
  if (config < 0 || config > 7 || (p.K % 256 != 0 && config == 0) || (p.K % 128 != 0 && config == 4)) {
    // H100 sweep (docs/benchmarks.md): at 16 < M <= 64 the 64 x 128 tile with all 8 warps along N (config 6:
    // each weight fragment dequantized once per 64 rows) is the fastest per group, and the 16-row tile over
    // several M tiles (0) per channel, where nothing is dequantized.
    const int small = p.K % 256 == 0 ? 0 : 1;
    config = p.M <= 16 ? small : (p.M <= 64 ? (PER_GROUP ? 6 : small) : 3);
  }
  const int splits = std::max(0, forced.splits);
  switch (config) {
    case 0: launch<16, 64, 256, 1, 4, 4, 3, PER_GROUP>(p, options, splits); break;
    case 1: launch<16, 64, 64, 1, 4, 6, 4, PER_GROUP>(p, options, splits); break;
    case 2: launch<64, 128, 64, 2, 4, 4, 2, PER_GROUP>(p, options, splits); break;
    case 3: launch<128, 128, 64, 2, 4, 4, 2, PER_GROUP>(p, options, splits); break;
    case 4: launch<16, 64, 128, 1, 4, 6, 4, PER_GROUP>(p, options, splits); break;
    case 6: launch<64, 128, 64, 1, 8, 4, 2, PER_GROUP>(p, options, splits); break;
    case 7: launch<32, 128, 64, 1, 8, 4, 2, PER_GROUP>(p, options, splits); break;
    default: launch<128, 256, 64, 2, 4, 4, 1, PER_GROUP>(p, options, splits); break;
  }
}

// The kernels index x_q and out with 32-bit integers, so a long prefill (M * K or M * N >= 2^31, e.g. 256
// prompts of 1024 tokens into a 14336-wide down projection) runs as several launches over row ranges.
template <bool PER_GROUP>
void dispatch_row_chunks(const GemmParams& p, const at::TensorOptions& options) {
  const int64_t widest = std::max(p.K, p.N);
  const int64_t chunk = std::max<int64_t>(256, ((int64_t(1) << 31) - 1) / widest / 256 * 256);  // whole M tiles
  for (int64_t r0 = 0; r0 < p.M; r0 += chunk) {
    GemmParams c = p;
    c.M = static_cast<int>(std::min<int64_t>(chunk, p.M - r0));
    c.x_q = p.x_q + r0 * p.K;
    c.x_s = p.x_s + r0;
    if (p.x_sum != nullptr) c.x_sum = p.x_sum + r0;
    c.out = static_cast<char*>(p.out) + r0 * p.N * 2;  // float16 / bfloat16 rows
    if (p.residual != nullptr) c.residual = static_cast<const char*>(p.residual) + r0 * p.N * 2;
    dispatch<PER_GROUP>(c, options);
  }
}

GemmParams base_params(const at::Tensor& x_q, const at::Tensor& x_s, const at::Tensor& qweight,
                       const std::optional<at::Tensor>& bias, at::Tensor& out) {
  GemmParams p{};
  p.x_q = x_q.data_ptr<int8_t>();
  p.x_s = x_s.data_ptr<float>();
  p.qweight = qweight.data_ptr<uint8_t>();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.bias_kind = bias_kind(bias);
  p.out = out.data_ptr();
  p.out_bf16 = out.scalar_type() == at::kBFloat16;
  p.M = static_cast<int>(x_q.size(0));
  p.K = static_cast<int>(x_q.size(1));
  p.N = static_cast<int>(qweight.size(0));
  return p;
}

// The part both entry points share once their arguments are checked: the output, 16-byte aligned operands, the
// common parameters, the format's own (set_format), then the row-chunked dispatch.
template <bool PER_GROUP, typename SetFormat>
at::Tensor run_checked(const at::Tensor& x_q_in, const at::Tensor& x_s, const at::Tensor& qweight_in,
                       const std::optional<at::Tensor>& bias, at::ScalarType out_dtype,
                       const std::optional<at::Tensor>& residual_in, SetFormat&& set_format) {
  const c10::cuda::CUDAGuard guard(x_q_in.device());
  at::Tensor out = at::empty({x_q_in.size(0), qweight_in.size(0)}, x_q_in.options().dtype(out_dtype));
  if (x_q_in.size(0) == 0) return out;
  const at::Tensor x_q = aligned(x_q_in), qweight = aligned(qweight_in);
  at::Tensor residual;  // 16-byte aligned (the wgmma epilogue reads it in 16-byte chunks)
  if (residual_in.has_value()) residual = aligned(*residual_in);
  GemmParams p = base_params(x_q, x_s, qweight, bias, out);
  p.residual = residual.defined() ? residual.data_ptr() : nullptr;
  set_format(p);
  dispatch_row_chunks<PER_GROUP>(p, x_q.options());
  return out;
}

constexpr int64_t kPerGroupMaxK = 65536;

at::Tensor w4a8_gemm_per_group_cuda(const at::Tensor& x_q_in, const at::Tensor& x_s, const at::Tensor& qweight_in,
                                    const at::Tensor& s2, const at::Tensor& z2, const at::Tensor& s1,
                                    const std::optional<at::Tensor>& bias, int64_t group_size,
                                    at::ScalarType out_dtype, const std::optional<at::Tensor>& residual,
                                    const std::optional<at::Tensor>& packed_scales_in,
                                    const std::optional<at::Tensor>& x_sum_in) {
  check_common(x_q_in, x_s, qweight_in, bias, out_dtype);
  const int64_t k = x_q_in.size(1), n = qweight_in.size(0);
  check_residual(residual, x_q_in, n, out_dtype);
  TORCH_CHECK(group_size > 0 && k % group_size == 0, "group_size=", qoq::num(group_size), " must be positive and divide K=",
              qoq::num(k));
  TORCH_CHECK(group_size % 64 == 0, "group_size must be a multiple of 64 for the CUDA W4A8 GEMM, got ",
              qoq::num(group_size));
  // The MMA kernels sum biased weights (0..255) times activations (-128..127) in INT32: 255 * 128 * K < 2^31.
  TORCH_CHECK(k <= kPerGroupMaxK, "the CUDA per-group W4A8 GEMM takes K <= ", qoq::num(kPerGroupMaxK),
              " (its INT32 sums), got K=", qoq::num(k));
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"s2", &s2}, {"z2", &z2}}) {
    TORCH_CHECK(t->is_cuda(), name, " must be a CUDA tensor, got ", qoq::device_str(*t));
    TORCH_CHECK(t->device() == x_q_in.device(), name, " is on ", qoq::device_str(*t), " but x_q is on ",
                qoq::device_str(x_q_in));
    TORCH_CHECK(t->scalar_type() == at::kByte, name, " must have dtype uint8, got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 2 && t->size(0) == n && t->size(1) == k / group_size, name, " must have shape [N, K/g] = [",
                qoq::num(n), ", ", qoq::num(k / group_size), "], got ", qoq::shape_str(*t));
    TORCH_CHECK(t->is_contiguous(), name, " must be contiguous");
  }
  check_per_row("s1", s1, at::kHalf, n, x_q_in);
  at::Tensor packed_scales;
  if (packed_scales_in.has_value()) {
    packed_scales = *packed_scales_in;
    TORCH_CHECK(packed_scales.device() == x_q_in.device(), "packed_scales is on ", qoq::device_str(packed_scales),
                " but x_q is on ", qoq::device_str(x_q_in));
    TORCH_CHECK(packed_scales.scalar_type() == at::kByte, "packed_scales must have dtype uint8, got ",
                packed_scales.scalar_type());
    TORCH_CHECK(packed_scales.dim() == 3 && packed_scales.size(0) == (n + 127) / 128 &&
                    packed_scales.size(1) == k / group_size && packed_scales.size(2) == 256,
                "packed_scales must have shape [ceil(N/128), K/g, 256] = [", qoq::num((n + 127) / 128), ", ",
                qoq::num(k / group_size), ", 256] (ops.pack_scales(s2, z2)), got ", qoq::shape_str(packed_scales));
    TORCH_CHECK(packed_scales.is_contiguous(), "packed_scales must be contiguous");
  } else if (x_q_in.size(0) > 0 && (wgmma_takes(x_q_in.size(0), k, true, group_size, x_q_in.options()) ||
                                     stream_may_take(x_q_in.size(0), true))) {
    // Not given (modules always give it) but the wgmma or the streaming kernel may read it: the one packing
    // routine, the Python-registered qoq::pack_scales.
    static auto pack = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("qoq::pack_scales", "")
                           .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
    packed_scales = pack.call(s2, z2);
  }
  // The MMA kernels' epilogue takes kGroupBias * x_sum off their INT32 sums (w4a8_gemm_kernel.cuh). Not given (the
  // modules always give it, from the quantize op): one reduction of x_q.
  at::Tensor x_sum;
  if (x_sum_in.has_value()) {
    x_sum = *x_sum_in;
    check_per_row("x_sum", x_sum, at::kInt, x_q_in.size(0), x_q_in);
  } else {
    x_sum = x_q_in.sum(1, /*keepdim=*/false, at::kInt);
  }
  return run_checked<true>(x_q_in, x_s, qweight_in, bias, out_dtype, residual, [&](GemmParams& p) {
    p.x_sum = x_sum.data_ptr<int32_t>();
    p.packed_scales = packed_scales.defined() ? packed_scales.data_ptr<uint8_t>() : nullptr;
    p.s2 = s2.data_ptr<uint8_t>();
    p.z2 = z2.data_ptr<uint8_t>();
    p.wscale = reinterpret_cast<const __half*>(s1.data_ptr<at::Half>());
    p.group_size = static_cast<int>(group_size);
    p.groups = static_cast<int>(k / group_size);
  });
}

at::Tensor w4a8_gemm_per_channel_cuda(const at::Tensor& x_q_in, const at::Tensor& x_s, const at::Tensor& x_sum,
                                      const at::Tensor& qweight_in, const at::Tensor& scale, const at::Tensor& zero,
                                      const std::optional<at::Tensor>& bias, at::ScalarType out_dtype,
                                      const std::optional<at::Tensor>& residual) {
  check_common(x_q_in, x_s, qweight_in, bias, out_dtype);
  const int64_t n = qweight_in.size(0);
  check_residual(residual, x_q_in, n, out_dtype);
  check_per_row("x_sum", x_sum, at::kInt, x_q_in.size(0), x_q_in);
  check_per_row("scale", scale, at::kHalf, n, x_q_in);
  check_per_row("zero", zero, at::kByte, n, x_q_in);
  return run_checked<false>(x_q_in, x_s, qweight_in, bias, out_dtype, residual, [&](GemmParams& p) {
    p.x_sum = x_sum.data_ptr<int32_t>();
    p.wscale = reinterpret_cast<const __half*>(scale.data_ptr<at::Half>());
    p.zero = zero.data_ptr<uint8_t>();
    p.group_size = static_cast<int>(p.K);
    p.groups = 1;
  });
}

}  // namespace
}  // namespace qoq

TORCH_LIBRARY_IMPL(qoq, CUDA, m) {
  m.impl("w4a8_gemm_per_group", &qoq::w4a8_gemm_per_group_cuda);
  m.impl("w4a8_gemm_per_channel", &qoq::w4a8_gemm_per_channel_cuda);
}
