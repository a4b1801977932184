// CUDA impls of qoq::quantize_per_token, qoq::rmsnorm_quantize, qoq::add_rmsnorm_quantize and
// qoq::silu_mul_quantize (docs/formats.md, "Activations"). Both kernels quantize with the reference's exact arithmetic:
// x_s = amax / 127 (IEEE division), x_q = clamp(rint(y / x_s), -127, 127), x_s == 0 -> 0.
// Built without --use_fast_math, so '/' and sqrtf are IEEE and denormals are kept, like the CPU reference.
//
// One block per row: the row held in registers (rows of up to 8192 16-bit values: one 16-byte vector a thread for
// few rows, two for many) or, longer, its float32 values staged in shared memory (one global read). These kernels add
// up the row's code sum with one global atomic a warp (rowq::add_row_sum) instead of a last block barrier.
// Few rows (decode, M <= kSplitMaxM; by default silu_mul_quantize only, whose rows are 14336+ wide) on sm_90: one
// block per row would leave almost every SM idle and make a long row take several dependent load rounds plus four
// block barriers, so each row is split over a thread-block
// cluster of up to 8 CTAs, one 16-byte vector per thread kept in registers. The CTAs combine their partial
// reductions through distributed shared memory, each warp's partial in a fixed slot, folded in slot order: the
// result does not depend on scheduling. The code sums are gathered the same way into the cluster's first CTA, which
// stores the row's sum. Only rmsnorm's float sum of squares depends on that order (amax and the
// integer code sum do not), so quantize_per_token stays bit-exact and rmsnorm may move by an ulp, as the docs allow.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "float16.cuh"
#include "gemm/bulk_ptx.cuh"
#include "quant/row_quantize.cuh"

namespace qoq {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = rowq::kMaxWarps;

// Cluster split (small M). kSplitMaxM: default largest M (QOQ_QUANT_SPLIT overrides it, 0 turns the split off).
// A cluster has at most 8 CTAs (the portable limit); a row gets the fewest of 1, 2, 4, 8 CTAs that leave at most
// kSplitVecsPerCta vectors per CTA (QOQ_QUANT_SPLIT_CTAS=<1..8> forces the count, for tuning and tests).
constexpr int kSplitMaxM = 64;
constexpr int kMaxClusterCtas = 8;
constexpr int kSplitVecsPerCta = 256;
constexpr int kMaxPartials = kMaxClusterCtas * kMaxWarps;  // one slot per warp of a cluster

// VEC consecutive elements moved with one load (16 bytes when VEC * sizeof(T) == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[VEC]) {
  const Vec<T, VEC> raw = *reinterpret_cast<const Vec<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float<T>(raw.v[i]);
}

// add_rmsnorm_quantize's sum: h = x + r rounded to T (torch's add of two T tensors), stored to `h_out` and returned
// in `f` as floats of the rounded values (what the norm then reads).
template <typename T, int VEC>
__device__ __forceinline__ void add_store_vec(float (&f)[VEC], const T* residual, T* h_out) {
  float r[VEC];
  load_vec<T, VEC>(residual, r);
  Vec<T, VEC> h;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    h.v[i] = from_float<T>(f[i] + r[i]);
    f[i] = to_float<T>(h.v[i]);
  }
  *reinterpret_cast<Vec<T, VEC>*>(h_out) = h;
}

using rowq::block_reduce;
using rowq::MaxOp;
using rowq::quantize_store;
using rowq::SumOp;
using rowq::warp_reduce;

// kAddRmsNorm: kRmsNorm of h = x + residual, h also written out (the row kernel only: no cluster split).
enum class RowOp { kIdentity, kRmsNorm, kSiluMul, kAddRmsNorm };

template <RowOp OP>
constexpr bool kIsNorm = OP == RowOp::kRmsNorm || OP == RowOp::kAddRmsNorm;

struct Args {
  const void* x;       // [M, K_in] input rows
  const void* weight;  // [K] RMSNorm weight (kRmsNorm, kAddRmsNorm)
  float eps;
  int64_t k_in;        // row length of the input (2I for kSiluMul)
  int64_t k;           // row length of the output
  int8_t* x_q;         // [M, K]
  float* x_s;          // [M]
  int32_t* x_sum;      // [M]
  const void* residual = nullptr;  // [M, K] (kAddRmsNorm)
  void* h_out = nullptr;           // [M, K] x + residual (kAddRmsNorm)
};

// One block per row. Dynamic shared memory: k floats (the row's y values).
template <typename T, int VEC, RowOp OP>
__global__ void __launch_bounds__(kMaxThreads) quantize_rows_kernel(Args a) {
  extern __shared__ float ys[];
  __shared__ float ss_scratch[kMaxWarps];  // block_reduce needs one scratch array per call site
  __shared__ float amax_scratch[kMaxWarps];
  const int64_t nvec = a.k / VEC;
  // RMSNorm: this thread's first weight vector (a module buffer, which PDL lets us read before the wait) is loaded
  // now, so that the pass after the sum of squares does not start with a DRAM round trip.
  float w_first[VEC] = {};
  if constexpr (kIsNorm<OP>) {
    if (static_cast<int64_t>(threadIdx.x) < nvec) {
      load_vec<T, VEC>(static_cast<const T*>(a.weight) + threadIdx.x * VEC, w_first);
    }
  }
  pdl_wait();  // PDL (common.cuh): x, the activations, only after the wait
  pdl_launch_dependents();
  const int64_t row = blockIdx.x;
  rowq::clear_row_sum(a.x_sum + row);
  const T* x = static_cast<const T*>(a.x) + row * a.k_in;
  float amax = 0.f;

  if constexpr (OP == RowOp::kIdentity) {
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      float f[VEC];
      load_vec<T, VEC>(x + v * VEC, f);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        ys[v * VEC + i] = f[i];
        amax = fmaxf(amax, fabsf(f[i]));
      }
    }
  } else if constexpr (OP == RowOp::kSiluMul) {
    const T* up = x + a.k;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      float g[VEC], u[VEC];
      load_vec<T, VEC>(x + v * VEC, g);
      load_vec<T, VEC>(up + v * VEC, u);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float y = g[i] / (1.0f + expf(-g[i])) * u[i];  // the reference's F.silu(gate) * up
        ys[v * VEC + i] = y;
        amax = fmaxf(amax, fabsf(y));
      }
    }
  } else {  // kRmsNorm / kAddRmsNorm: sum of squares first, then y = (x * w) * r
    float ss = 0.f;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      float f[VEC];
      load_vec<T, VEC>(x + v * VEC, f);
      if constexpr (OP == RowOp::kAddRmsNorm) {
        add_store_vec<T, VEC>(f, static_cast<const T*>(a.residual) + row * a.k + v * VEC,
                              static_cast<T*>(a.h_out) + row * a.k + v * VEC);
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        ys[v * VEC + i] = f[i];
        ss += f[i] * f[i];
      }
    }
    ss = block_reduce(ss, ss_scratch, SumOp{});
    const float r = 1.0f / sqrtf(ss / static_cast<float>(a.k) + a.eps);
    const T* w = static_cast<const T*>(a.weight);
    // Each thread rewrites only the elements it wrote above: no barrier needed between the passes.
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      float wf[VEC];
      if (v == threadIdx.x) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) wf[i] = w_first[i];
      } else {
        load_vec<T, VEC>(w + v * VEC, wf);
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float y = __fmul_rn(__fmul_rn(ys[v * VEC + i], wf[i]), r);  // (x * w) * r, docs/formats.md
        ys[v * VEC + i] = y;
        amax = fmaxf(amax, fabsf(y));
      }
    }
  }
  // quantize_row reads back only this thread's own elements (same v loop), so block_reduce's barrier suffices.
  amax = block_reduce(amax, amax_scratch, MaxOp{});
  rowq::quantize_row<VEC>(ys, amax, a.k, a.x_q + row * a.k, a.x_s + row, a.x_sum + row);
}

// Rows of up to VECS * blockDim.x vectors: as quantize_rows_kernel, but the row stays in registers (VECS vectors a
// thread, all loads issued before the first use) instead of shared memory, and the RMSNorm weight is loaded whole
// before the PDL wait, so no pass waits on a second load round. Same per-thread order of the float sum of squares as
// quantize_rows_kernel (vectors v = threadIdx.x + j * blockDim.x in j order, and the host gives both kernels the
// same block size), so the same bits. As the shared-memory kernel takes them: one vector a thread (up to 1024
// threads) for few rows, two (up to 512) for many (four, for longer rows, cost occupancy: see try_launch_regs).
template <int VECS>
constexpr int kRegsMaxThreads = VECS == 1 ? kMaxThreads : 512;
template <typename T, int VEC, RowOp OP, int VECS>
__global__ void __launch_bounds__(kRegsMaxThreads<VECS>) quantize_rows_regs_kernel(Args a) {
  constexpr int kRegsVecs = VECS;
  __shared__ float ss_scratch[kMaxWarps];  // block_reduce needs one scratch array per call site
  __shared__ float amax_scratch[kMaxWarps];
  const int64_t nvec = a.k / VEC;
  bool in_row[kRegsVecs];
#pragma unroll
  for (int j = 0; j < kRegsVecs; ++j) in_row[j] = threadIdx.x + static_cast<int64_t>(j) * blockDim.x < nvec;
  float w[kIsNorm<OP> ? kRegsVecs : 1][VEC] = {};
  if constexpr (kIsNorm<OP>) {
#pragma unroll
    for (int j = 0; j < kRegsVecs; ++j) {
      if (in_row[j]) load_vec<T, VEC>(static_cast<const T*>(a.weight) + (threadIdx.x + j * blockDim.x) * VEC, w[j]);
    }
  }
  pdl_wait();  // PDL (common.cuh): x, the activations, only after the wait
  pdl_launch_dependents();
  const int64_t row = blockIdx.x;
  rowq::clear_row_sum(a.x_sum + row);
  const T* x = static_cast<const T*>(a.x) + row * a.k_in;
  float y[kRegsVecs][VEC] = {};  // vectors past the row stay zero: neutral for every reduction
  float up[OP == RowOp::kSiluMul ? kRegsVecs : 1][VEC] = {};
#pragma unroll
  for (int j = 0; j < kRegsVecs; ++j) {
    const int64_t v = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
    if (in_row[j]) {
      load_vec<T, VEC>(x + v * VEC, y[j]);
      if constexpr (OP == RowOp::kSiluMul) load_vec<T, VEC>(x + a.k + v * VEC, up[j]);
    }
  }
  if constexpr (OP == RowOp::kSiluMul) {
#pragma unroll
    for (int j = 0; j < kRegsVecs; ++j)
#pragma unroll
      for (int i = 0; i < VEC; ++i) y[j][i] = y[j][i] / (1.0f + expf(-y[j][i])) * up[j][i];  // F.silu(gate) * up
  }
  float amax = 0.f;
  if constexpr (kIsNorm<OP>) {
    // y = (x * w) * r (docs/formats.md): r > 0 scales every |x * w| by one rounded multiply, which keeps their order,
    // so amax = max|x * w| * r exactly, and one reduction gives both the sum of squares and that max.
    float ss = 0.f, pmax = 0.f;
#pragma unroll
    for (int j = 0; j < kRegsVecs; ++j) {
      if (!in_row[j]) continue;
      if constexpr (OP == RowOp::kAddRmsNorm) {
        const int64_t v = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
        add_store_vec<T, VEC>(y[j], static_cast<const T*>(a.residual) + row * a.k + v * VEC,
                              static_cast<T*>(a.h_out) + row * a.k + v * VEC);
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        ss += y[j][i] * y[j][i];
        y[j][i] = __fmul_rn(y[j][i], w[j][i]);
        pmax = fmaxf(pmax, fabsf(y[j][i]));
      }
    }
    rowq::block_reduce_sum_max(ss, pmax, ss_scratch, amax_scratch);
    const float r = 1.0f / sqrtf(ss / static_cast<float>(a.k) + a.eps);
#pragma unroll
    for (int j = 0; j < kRegsVecs; ++j)
#pragma unroll
      for (int i = 0; i < VEC; ++i) y[j][i] = __fmul_rn(y[j][i], r);
    amax = __fmul_rn(pmax, r);
  } else {
#pragma unroll
    for (int j = 0; j < kRegsVecs; ++j)
#pragma unroll
      for (int i = 0; i < VEC; ++i) amax = fmaxf(amax, fabsf(y[j][i]));
    amax = block_reduce(amax, amax_scratch, MaxOp{});
  }
  const rowq::RowScale scale = rowq::make_row_scale(amax);
  int sum = 0;
#pragma unroll
  for (int j = 0; j < kRegsVecs; ++j) {
    const int64_t v = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
    if (in_row[j]) sum += quantize_store<VEC>(y[j], scale, a.x_q + row * a.k + v * VEC);
  }
  if (threadIdx.x == 0) a.x_s[row] = scale.scale;
  rowq::add_row_sum(sum, a.x_sum + row);
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
namespace cg = cooperative_groups;

// Where this thread sits in its cluster; `nwarps` is per CTA (every CTA of a launch has the same size).
struct ClusterPos {
  int ctas, rank, nwarps, warp, lane;
};

// Folds the cluster's `n` per-warp partials in slot order (lane l takes slots l, l + 32, ...; then a fixed
// shuffle tree): every CTA gets the same bits in every run.
template <typename V, typename Op>
__device__ __forceinline__ V fold_slots(const V* slots, int n, int lane, Op op) {
  V acc = V(0);
  for (int i = lane; i < n; i += 32) acc = op(acc, slots[i]);
  return warp_reduce(acc, op);
}

// Sends this warp's partial `v` (already reduced over the warp) into slot [rank * nwarps + warp] of every CTA
// (to_all: lane j stores CTA j's copy, in parallel) or of rank 0 only, with st.async, whose 4 bytes complete on the
// receiver's `bar` (armed by init_exchange for the cluster's ctas * nwarps partials); then the receivers (every
// thread, or rank 0's warp 0) wait on their own barrier. No cluster barrier: its release is a GPU-scope memory
// barrier in every thread (H100: 0.9 us of rmsnorm_quantize's two exchanges, docs/benchmarks.md). A cluster of one
// CTA stores locally and syncs the block. Each call site passes its own `slots` and `bar`, so no barrier is needed
// before the stores (nothing reads an array twice).
template <typename V>
__device__ __forceinline__ void push_partial(V v, V* slots, uint64_t* bar, const ClusterPos& p, bool to_all) {
  static_assert(sizeof(V) == 4, "32-bit partials");
  V* slot = slots + p.rank * p.nwarps + p.warp;
  if (p.ctas == 1) {
    if (p.lane == 0) *slot = v;
    __syncthreads();
    return;
  }
  uint32_t bits;
  if constexpr (std::is_same_v<V, float>) {
    bits = __float_as_uint(v);
  } else {
    bits = static_cast<uint32_t>(v);
  }
  if (to_all ? p.lane < p.ctas : p.lane == 0) {
    bulk::st_async_cluster(slot, bits, bar, static_cast<uint32_t>(to_all ? p.lane : 0));
  }
  if (to_all || (p.rank == 0 && p.warp == 0)) bulk::mbar_wait_cluster(bar, 0);
}

// All-reduce over the cluster: every CTA gets every warp's partial, then folds its local copy.
template <typename Op>
__device__ __forceinline__ float cluster_all_reduce(float v, float* slots, uint64_t* bar, const ClusterPos& p, Op op) {
  push_partial(warp_reduce(v, op), slots, bar, p, /*to_all=*/true);
  return fold_slots(slots, p.ctas * p.nwarps, p.lane, op);
}

// The row's code sum, gathered only into rank 0, whose warp 0 returns it (every other thread: 0) for one plain
// store. No clear and no atomics: a clear by rank 0 would have to be ordered before every CTA's add by a GPU-scope
// fence on the exchanges' path (0.3-0.5 us on the H100, docs/benchmarks.md).
__device__ __forceinline__ int cluster_sum_to_rank0(int sum, int* slots, uint64_t* bar, const ClusterPos& p) {
  push_partial(warp_reduce(sum, SumOp{}), slots, bar, p, /*to_all=*/false);
  return p.rank == 0 && p.warp == 0 ? fold_slots(slots, p.ctas * p.nwarps, p.lane, SumOp{}) : 0;
}

// Thread 0: arms `bar` for one exchange of the cluster's per-warp partials (4 bytes each); the cluster barrier that
// follows (arrive at the kernel's start, wait before the first remote store) publishes it to the other CTAs.
__device__ __forceinline__ void init_exchange(uint64_t* bar, const ClusterPos& p) {
  if (threadIdx.x == 0) {
    bulk::mbar_arm_for_bytes(bar, static_cast<uint32_t>(p.ctas * p.nwarps * 4));
  }
}

#endif

// Small-M kernel: row blockIdx.x / C is split over the C CTAs of a cluster (launch_split); CTA `rank` covers the
// vectors [rank * per_cta, (rank + 1) * per_cta) of the row, one vector per thread, held in registers.
template <typename T, int VEC, RowOp OP>
__global__ void __launch_bounds__(kMaxThreads) quantize_rows_cluster_kernel(Args a, int per_cta) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __shared__ float ss_slots[kMaxPartials];
  __shared__ float amax_slots[kMaxPartials];
  __shared__ int sum_slots[kMaxPartials];
  __shared__ uint64_t ss_bar, amax_bar, sum_bar;
  const cg::cluster_group cluster = cg::this_cluster();
  const ClusterPos p{static_cast<int>(cluster.num_blocks()), static_cast<int>(cluster.block_rank()),
                     static_cast<int>(blockDim.x >> 5), static_cast<int>(threadIdx.x >> 5),
                     static_cast<int>(threadIdx.x & 31)};
  init_exchange(&amax_bar, p);
  init_exchange(&sum_bar, p);
  if constexpr (OP == RowOp::kRmsNorm) init_exchange(&ss_bar, p);
  if (threadIdx.x == 0) bulk::fence_mbar_init();
  // A CTA may touch another's shared memory only once every CTA of the cluster runs: arrive here and wait just
  // before the first remote store, so the wait hides behind the global loads.
  __cluster_barrier_arrive_relaxed();
  const int64_t row = blockIdx.x / p.ctas;
  const int64_t v = static_cast<int64_t>(p.rank) * per_cta + threadIdx.x;
  const bool active = static_cast<int>(threadIdx.x) < per_cta && v < a.k / VEC;
  const T* x = static_cast<const T*>(a.x) + row * a.k_in + v * VEC;
  float y[VEC] = {};  // inactive threads keep zeros: neutral for the sum of squares, amax and the code sum
  float amax = 0.f;
  float w[VEC] = {};  // the RMSNorm weight (a module buffer)
  if constexpr (OP == RowOp::kRmsNorm) {
    if (active) load_vec<T, VEC>(static_cast<const T*>(a.weight) + v * VEC, w);
  }
  // PDL (common.cuh): the weight above may be read while the previous kernel runs, x only after it is done.
  pdl_wait();
  pdl_launch_dependents();

  if constexpr (OP == RowOp::kIdentity) {
    if (active) load_vec<T, VEC>(x, y);
  } else if constexpr (OP == RowOp::kSiluMul) {
    if (active) {
      float u[VEC];
      load_vec<T, VEC>(x, y);
      load_vec<T, VEC>(x + a.k, u);
#pragma unroll
      for (int i = 0; i < VEC; ++i) y[i] = y[i] / (1.0f + expf(-y[i])) * u[i];  // the reference's F.silu(gate) * up
    }
  } else {  // kRmsNorm: the weight was loaded before x, not after the sum of squares, to keep one load round
    float ss = 0.f;
    if (active) {
      load_vec<T, VEC>(x, y);
#pragma unroll
      for (int i = 0; i < VEC; ++i) ss += y[i] * y[i];
    }
    cluster.barrier_wait();  // the start barrier above
    ss = cluster_all_reduce(ss, ss_slots, &ss_bar, p, SumOp{});
    const float r = 1.0f / sqrtf(ss / static_cast<float>(a.k) + a.eps);
#pragma unroll
    for (int i = 0; i < VEC; ++i) y[i] = __fmul_rn(__fmul_rn(y[i], w[i]), r);  // (x * w) * r, docs/formats.md
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) amax = fmaxf(amax, fabsf(y[i]));
  if constexpr (OP != RowOp::kRmsNorm) cluster.barrier_wait();  // the start barrier above
  amax = cluster_all_reduce(amax, amax_slots, &amax_bar, p, MaxOp{});

  const rowq::RowScale scale = rowq::make_row_scale(amax);
  int sum = 0;
  if (active) sum = quantize_store<VEC>(y, scale, a.x_q + row * a.k + v * VEC);
  // Rank 0 waits for every CTA's code sums, so the other CTAs may exit once theirs are sent.
  sum = cluster_sum_to_rank0(sum, sum_slots, &sum_bar, p);
  if (p.rank == 0 && threadIdx.x == 0) {
    a.x_s[row] = scale.scale;
    a.x_sum[row] = sum;
  }
#else
  __trap();  // never launched: the host only picks this kernel when its image was built for sm_90+
#endif
}

int max_dynamic_smem() { return device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin); }

// Many rows of up to 2 * kRegsMaxThreads<2> vectors (K <= 8192 for 16-bit inputs) are held in registers
// (QOQ_QUANT_REGS=0: the shared-memory kernel instead). H100 (docs/benchmarks.md, benchmarks/quant.py, same run):
// M = 4096, K = 4096: quantize_per_token 22.8 against 30.5 us, rmsnorm_quantize 29.6 against 41.4 (a copy of the
// input: 24.3); M = 256: 3.6 / 4.2 against 4.4 / 4.9. Not for longer rows: four vectors a thread (92 registers, one
// 448-thread block an SM) made silu_mul_quantize's 14336-wide rows slower (M = 4096: 277.1 against 175.6 us).
// Few rows (M <= 64) are held in registers too, one vector a thread (QOQ_QUANT_REGS=0 or QOQ_QUANT_REGS_FEW=0: not).
//
// Both kernels give a row of M rows the block size below, which is what keeps their float sums in the same order (the
// same bits): few rows (decode) leave most SMs idle, so each row gets up to 1024 threads, one vector each (fewer
// dependent load rounds a thread); many rows about two vectors a thread, at most 512 threads.
constexpr int64_t kFewRowsMaxM = 64;
inline int vectors_per_thread(int64_t m) { return m <= kFewRowsMaxM ? 1 : 2; }
inline int row_threads(int64_t m, int64_t nvec) {
  const int64_t per_thread = vectors_per_thread(m);
  const int64_t cap = per_thread == 1 ? kRegsMaxThreads<1> : kRegsMaxThreads<2>;
  return static_cast<int>(std::min<int64_t>(cap, std::max<int64_t>(64, ((nvec + per_thread - 1) / per_thread + 31) / 32 * 32)));
}

template <typename T, int VEC, RowOp OP>
bool try_launch_regs(const Args& a, int64_t m) {
  if constexpr (VEC == 1) {
    return false;  // the rare unaligned view
  } else {
    const int64_t nvec = a.k / VEC;
    const int vecs = vectors_per_thread(m);
    const int threads = row_threads(m, nvec);
    if (nvec > static_cast<int64_t>(vecs) * threads || env_int("QOQ_QUANT_REGS", 1) == 0) return false;
    if (vecs == 1 && env_int("QOQ_QUANT_REGS_FEW", 1) == 0) return false;
    static int8_t sm90[2][64] = {{0}};
    const LaunchDims dims{dim3(static_cast<unsigned>(m)), dim3(threads)};
    if (vecs == 1) {
      launch_kernel(quantize_rows_regs_kernel<T, VEC, OP, 1>, sm90[0], dims, a);
    } else {
      launch_kernel(quantize_rows_regs_kernel<T, VEC, OP, 2>, sm90[1], dims, a);
    }
    return true;
  }
}

template <typename T, int VEC, RowOp OP>
void launch_typed(const Args& a, int64_t m) {
  if (try_launch_regs<T, VEC, OP>(a, m)) return;
  const size_t smem = static_cast<size_t>(a.k) * sizeof(float);
  const int threads = row_threads(m, a.k / VEC);
  auto kernel = quantize_rows_kernel<T, VEC, OP>;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  static int8_t sm90[64] = {0};
  launch_kernel(kernel, sm90, {dim3(static_cast<unsigned>(m)), dim3(threads), smem}, a);
}

bool cluster_split_available() {
  static int8_t cached[64] = {0};
  return runs_sm90_image(quantize_rows_cluster_kernel<__half, 8, RowOp::kIdentity>, cached);
}

struct SplitPlan {
  int ctas = 0;  // 0: no split, use the one-block-per-row kernel
  int threads = 0;
  int per_cta = 0;  // vectors of the row per CTA, one per thread
};

// Default split ranges, M from default_min_m to kSplitMaxM (H100, docs/benchmarks.md): silu_mul_quantize from M = 1
// (6.3 -> 4.5 us at M = 1 when it came, 7.1 -> 5.2 at M = 16); quantize_per_token from kIdentitySplitMinM (2.01 against
// 2.18 us at M = 48, 2.14 against 2.43 at 64, even at 32, slower below); rmsnorm_quantize never (its split sums the
// squares in another order, and gains 3% at M = 64 only).
constexpr int64_t kIdentitySplitMinM = 40;
constexpr int64_t kNoDefaultSplit = kSplitMaxM + 1;
// QOQ_QUANT_SPLIT=<m> (every op split at M <= m, 0: none) and QOQ_QUANT_SPLIT_CTAS=<1..8> are read at every call (a
// getenv, negligible next to the launch; lets tests and benchmarks switch paths in one process).
SplitPlan plan_split(int64_t m, int64_t nvec, int64_t default_min_m) {
  SplitPlan plan;
  const int forced_max_m = env_int("QOQ_QUANT_SPLIT", -1);
  if (forced_max_m >= 0 ? m > forced_max_m : (m < default_min_m || m > kSplitMaxM)) return plan;
  int ctas = env_int("QOQ_QUANT_SPLIT_CTAS", 0);
  if (ctas < 1 || ctas > kMaxClusterCtas) {
    ctas = 1;
    while (ctas < kMaxClusterCtas && (nvec + ctas - 1) / ctas > kSplitVecsPerCta) ctas *= 2;
  }
  const int64_t per_cta = (nvec + ctas - 1) / ctas;
  if (per_cta > kMaxThreads || m * ctas > INT_MAX || !cluster_split_available()) return plan;
  plan.ctas = ctas;
  plan.per_cta = static_cast<int>(per_cta);
  plan.threads = static_cast<int>((per_cta + 31) / 32 * 32);
  return plan;
}

template <typename T, int VEC, RowOp OP>
void launch_split(const Args& a, int64_t m, const SplitPlan& plan) {
  static int8_t sm90[64] = {0};
  launch_kernel(quantize_rows_cluster_kernel<T, VEC, OP>, sm90,
                {dim3(static_cast<unsigned>(m * plan.ctas)), dim3(static_cast<unsigned>(plan.threads)), 0,
                 static_cast<unsigned>(plan.ctas)},
                a, plan.per_cta);
}

// 16-byte vectors when every row start (and the weight / the `up` half) is 16-byte aligned, else scalars. The
// cluster split takes only the vector path; the scalar one is the rare unaligned view, left to the row kernel.
template <typename T, RowOp OP>
void launch(const Args& a, int64_t m) {
  constexpr int kVec = 16 / sizeof(T);
  const bool aligned = reinterpret_cast<uintptr_t>(a.x) % 16 == 0 &&
                       (a.weight == nullptr || reinterpret_cast<uintptr_t>(a.weight) % 16 == 0) &&
                       (a.residual == nullptr || reinterpret_cast<uintptr_t>(a.residual) % 16 == 0) &&
                       (a.h_out == nullptr || reinterpret_cast<uintptr_t>(a.h_out) % 16 == 0) &&
                       a.k_in % kVec == 0 && a.k % kVec == 0;
  if (aligned) {
    if constexpr (OP != RowOp::kAddRmsNorm) {  // the cluster kernel has no residual path
      const SplitPlan plan = plan_split(m, a.k / kVec,
                                        OP == RowOp::kSiluMul    ? 1
                                        : OP == RowOp::kIdentity ? kIdentitySplitMinM
                                                                 : kNoDefaultSplit);
      if (plan.ctas > 0) {
        launch_split<T, kVec, OP>(a, m, plan);
        return;
      }
    }
    launch_typed<T, kVec, OP>(a, m);
  } else {
    launch_typed<T, 1, OP>(a, m);
  }
}

template <RowOp OP>
void dispatch(const at::Tensor& x, const Args& a, int64_t m) {
  switch (x.scalar_type()) {
    case at::kHalf: launch<__half, OP>(a, m); break;
    case at::kBFloat16: launch<__nv_bfloat16, OP>(a, m); break;
    case at::kFloat:
      if constexpr (OP == RowOp::kIdentity) {
        launch<float, OP>(a, m);
        break;
      }
      [[fallthrough]];
    default: TORCH_CHECK(false, "unsupported dtype ", x.scalar_type());
  }
}

void check_input(const char* name, const at::Tensor& x, bool allow_float32) {
  TORCH_CHECK(x.is_cuda(), name, " must be a CUDA tensor, got ", device_str(x));
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || (allow_float32 && dt == at::kFloat), name,
              allow_float32 ? " must have dtype float16, bfloat16 or float32, got " : " must have dtype float16 or bfloat16, got ",
              dt);
  TORCH_CHECK(x.dim() == 2, name, " must be 2-D, got shape ", shape_str(x));
  TORCH_CHECK(x.numel() > 0, name, " must be non-empty, got shape ", shape_str(x));
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(x.size(0) <= 0x7fffffff, name, " has too many rows (", num(x.size(0)), ")");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> run(const at::Tensor& x, const at::Tensor* weight, double eps,
                                                   int64_t k_out, RowOp op, const at::Tensor* residual = nullptr,
                                                   at::Tensor* h_out = nullptr) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0);
  const int64_t max_k = (max_dynamic_smem() - 1024) / static_cast<int64_t>(sizeof(float));  // 1 KB: static scratch
  TORCH_CHECK(k_out <= max_k, "row length K=", num(k_out), " is too long for the CUDA quantize kernels (max ", num(max_k), ")");
  at::Tensor x_q = at::empty({m, k_out}, x.options().dtype(at::kChar));
  at::Tensor x_s = at::empty({m}, x.options().dtype(at::kFloat));
  at::Tensor x_sum = at::empty({m}, x.options().dtype(at::kInt));
  Args a{x.data_ptr(), weight ? weight->data_ptr() : nullptr, static_cast<float>(eps), x.size(1), k_out,
         x_q.data_ptr<int8_t>(), x_s.data_ptr<float>(), x_sum.data_ptr<int32_t>()};
  if (residual != nullptr) {
    a.residual = residual->data_ptr();
    a.h_out = h_out->data_ptr();
  }
  switch (op) {
    case RowOp::kIdentity: dispatch<RowOp::kIdentity>(x, a, m); break;
    case RowOp::kRmsNorm: dispatch<RowOp::kRmsNorm>(x, a, m); break;
    case RowOp::kSiluMul: dispatch<RowOp::kSiluMul>(x, a, m); break;
    case RowOp::kAddRmsNorm: dispatch<RowOp::kAddRmsNorm>(x, a, m); break;
  }
  return {x_q, x_s, x_sum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_per_token_cuda(const at::Tensor& x) {
  check_input("x", x, /*allow_float32=*/true);
  return run(x, nullptr, 0.0, x.size(1), RowOp::kIdentity);
}

void check_norm_weight(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(weight.is_cuda() && weight.device() == x.device(), "weight is on ", device_str(weight), " but x is on ",
              device_str(x));
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight must have dtype ", x.scalar_type(), " (x's), got ",
              weight.scalar_type());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), "weight must have shape [", num(x.size(1)), "], got ",
              shape_str(weight));
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous");
  TORCH_CHECK(eps > 0, "eps must be positive, got ", std::to_string(eps));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rmsnorm_quantize_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                     double eps) {
  check_input("x", x, /*allow_float32=*/false);
  check_norm_weight(x, weight, eps);
  return run(x, &weight, eps, x.size(1), RowOp::kRmsNorm);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_rmsnorm_quantize_cuda(const at::Tensor& x,
                                                                                     const at::Tensor& residual,
                                                                                     const at::Tensor& weight,
                                                                                     double eps) {
  check_input("x", x, /*allow_float32=*/false);
  check_norm_weight(x, weight, eps);
  TORCH_CHECK(residual.is_cuda() && residual.device() == x.device(), "residual is on ", device_str(residual),
              " but x is on ", device_str(x));
  TORCH_CHECK(residual.scalar_type() == x.scalar_type(), "residual must have dtype ", x.scalar_type(), " (x's), got ",
              residual.scalar_type());
  TORCH_CHECK(residual.sizes() == x.sizes(), "residual must have shape ", shape_str(x), ", got ", shape_str(residual));
  TORCH_CHECK(residual.is_contiguous(), "residual must be contiguous");
  at::Tensor h = at::empty_like(x);
  auto [x_q, x_s, x_sum] = run(x, &weight, eps, x.size(1), RowOp::kAddRmsNorm, &residual, &h);
  return {h, x_q, x_s, x_sum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> silu_mul_quantize_cuda(const at::Tensor& gate_up) {
  check_input("gate_up", gate_up, /*allow_float32=*/false);
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even number of columns [M, 2I], got ", shape_str(gate_up));
  return run(gate_up, nullptr, 0.0, gate_up.size(1) / 2, RowOp::kSiluMul);
}

}  // namespace
}  // namespace qoq

TORCH_LIBRARY_IMPL(qoq, CUDA, m) {
  m.impl("quantize_per_token", &qoq::quantize_per_token_cuda);
  m.impl("rmsnorm_quantize", &qoq::rmsnorm_quantize_cuda);
  m.impl("add_rmsnorm_quantize", &qoq::add_rmsnorm_quantize_cuda);
  m.impl("silu_mul_quantize", &qoq::silu_mul_quantize_cuda);
}
