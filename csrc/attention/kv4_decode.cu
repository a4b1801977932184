// CUDA impl of qoq::kv4_decode_attention (docs/formats.md, "KV cache (KV4)"): flash-decoding over the
// packed UINT4 cache.
//
// Grid: (B * H_kv * query-chunks, splits). A block owns one KV head of one row, the query rows of that
// head's GQA group (up to 16 = heads x S_q; more rows take more blocks), and one contiguous slice of the
// row's valid slots; so each cache byte is read once for up to 16 query rows. Its 4 warps take 16-slot
// steps in turn; each lane copies its own operands of a step into shared memory with cp.async, through a
// 4-stage ring (3 steps ahead of the one computed).
// Lengths are read on the device (CUDA-graph safe): kv_lens is clamped to T and kv_starts to >= 0, so bad
// values can never index out of bounds (a row with start >= len returns zeros).
//
// Arithmetic, with n the UINT4 codes, (s, m) a slot's fp16 (scale, min), and q a query row:
//   q . k^ = s_K * (q . n_K) + m_K * sum(q)          (q . n_K on the tensor cores: exact 16-bit operands)
//   sum_t p_t v^_t = sum_t (p_t s_V,t) n_V,t + sum_t p_t m_V,t
// The first MMA computes S^T = K q^T: 16 slots on M (the K codes as the A operand, converted with one LOP3
// where exactness allows, kv4_ptx.cuh: the constant they add is removed once per score), query rows on N, so
// a GQA group of 4 or 8 rows wastes no MMA rows. Its f32 accumulator, packed to fp16 and transposed in
// registers (movmatrix), is the B operand of the second MMA, which puts head_dim on M and slots on K
// (O^T = V^T P^T): the probabilities never leave registers, and each lane's accumulator columns are the very
// rows whose softmax state it holds. p is fp16 in the second MMA (as in FlashAttention); softmax and all sums
// are float32. Splits are merged by a small second kernel (log-sum-exp weights).
// qoq::kv4_decode_attention_quantize (o_proj's input) always takes the split path; with up to kMergeQuantMaxSplits
// splits its second kernel merges the splits of one query token's heads, rounds them to q's dtype and quantizes the
// token's row as quantize_per_token would (quant/row_quantize.cuh): one kernel instead of a merge and a quantize.
// With more splits it runs the per-head merge, then the quantize_per_token op.
// All three kernels use programmatic dependent launch (common.cuh): each waits for its predecessor before its
// first read, so only the launch and the block set-up overlap the previous kernel; before that wait the decode
// kernel asks L2 for the cache slots of its pipeline fill (a hint: those slots are older than the new token), and
// it lets its own dependents launch once its K loop is done (QOQ_KV4_PREFETCH=0: neither). Its pipeline fill is
// issued before the q fragments are built, so the two latencies overlap.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include <ATen/core/dispatch/Dispatcher.h>

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention/kv4_ptx.cuh"
#include "common.cuh"
#include "gemm/bulk_ptx.cuh"
#include "float16.cuh"
#include "quant/row_quantize.cuh"

namespace qoq {
namespace {

using kv4::cp_async;

constexpr int kStages = 4;
constexpr int kStepSlots = 16;
constexpr int kRowsPerBlock = 16;  // query rows (heads of one GQA group x S_q) per block
constexpr float kLog2e = 1.4426950408889634f;
// The largest cluster whose CTAs merge their splits (the portable size; H100, docs/benchmarks.md: 12- and 16-CTA
// clusters lost to the merge kernel at every size above 1k slots).
constexpr int kMaxClusterMerge = 8;

// Per-thread shares of one 16-slot step, for head_dim D and W warps a block. Lane = 4 * g + c (g = lane / 4,
// c = lane % 4).
template <int D, int W>
struct Geometry {
  static constexpr int kWarps = W;
  static constexpr int kThreads = 32 * W;
  static constexpr int kRowBytes = D / 2;      // packed bytes of one slot
  static constexpr int kKBytes = D / 8;        // K bytes a lane reads per slot (slots g and 8 + g)
  static constexpr int kKWords = kKBytes / 4;  // each word feeds two k-steps of the QK MMA
  static constexpr int kKChunk = kKBytes < 16 ? kKBytes : 16;
  static constexpr int kVBytes = D / 16;       // V bytes a lane reads per slot (slots 2c, 2c+1, 2c+8, 2c+9)
  static constexpr int kVWords = kVBytes / 4;  // each byte is one m-tile of the PV MMA
  static constexpr int kMTiles = D / 16;
  // Shared memory of one warp's stage: K [2][32 lanes][kKBytes], V [4][32][kVBytes], params [32] x 4 bytes.
  static constexpr int kKOffset = 0;
  static constexpr int kVOffset = 2 * 32 * kKBytes;
  static constexpr int kPOffset = kVOffset + 4 * 32 * kVBytes;
  static constexpr int kStageBytes = kPOffset + 32 * 4;
  static constexpr int kPipelineBytes = kWarps * kStages * kStageBytes;
  // Epilogue (reuses the same memory): per warp, m / l / min-sum per row and O^T [rows][D].
  static constexpr int kReduceBytes = kWarps * kRowsPerBlock * (3 + D) * 4;
  // The cluster merge's receive buffers, past both (the other CTAs' stores may land while this one is still in its
  // K loop): [splits][per] values (ClusterSlice; splits * per <= kRowsPerBlock * D + 4 * splits), then
  // [splits][kRowsPerBlock] log-sum-exps.
  static constexpr int kRecvOffset = kPipelineBytes > kReduceBytes ? kPipelineBytes : kReduceBytes;
  static constexpr int kRecvValues = kRowsPerBlock * D + 4 * kMaxClusterMerge;
  static constexpr int kSmemBytes = kRecvOffset + (kRecvValues + kMaxClusterMerge * kRowsPerBlock) * 4;
  static_assert(kVBytes >= 4, "head_dim must be at least 64");
};

struct DecodeArgs {
  const void* q;            // [B, H_q, S_q, D], element strides below, stride 1 along D
  int64_t q_stride[3];
  const uint8_t* k_cache;   // [B, H_kv, T, D/2]
  const uint8_t* v_cache;
  const __half* k_params;   // [B, H_kv, T, 2] = (scale, min)
  const __half* v_params;
  const int32_t* kv_lens;   // [B]
  const int32_t* kv_starts;
  void* out;                // [B, H_q, S_q, D] contiguous, q's dtype (when !partials)
  float* part_o;            // [splits, rows, D] (when partials)
  float* part_lse;          // [splits, rows], base-2 log-sum-exp, -inf when the split saw nothing
  int b, h_q, h_kv, s_q, t, q_chunks, splits;
  bool partials;            // write part_o / part_lse (a second kernel merges them), else out
  bool cluster_merge;       // the splits of a block's rows are one cluster, merged in distributed shared memory
  float scale_log2;         // sm_scale * log2(e)
  bool q_vec16;             // q rows and strides allow 16-byte loads
  bool prefetch;            // L2-prefetch the first steps before the PDL wait
  bool late_trigger;        // dependents launched after the K loop (else at the top)
};

// Index of query row `rg` of the KV head whose first query head is hq0, row b, in [B, H_q, S_q] order.
__device__ __forceinline__ int64_t output_row(const DecodeArgs& a, int b, int hq0, int rg) {
  return (static_cast<int64_t>(b) * a.h_q + hq0 + rg / a.s_q) * a.s_q + rg % a.s_q;
}

// One split's term of the merge sum_s w_s o_s / sum_s w_s, w_s = 2^(lse_s - m_max) (the split holding the max
// weighs exactly 1, so one split returns its values unchanged): every merge (the split-merge kernels and the
// cluster merge) runs this, in split order, so they produce the same bits.
template <int N>
__device__ __forceinline__ void accumulate_split(float lse, float m_max, const float (&v)[N], float (&num)[N],
                                                 float& den) {
  const float w = lse == -INFINITY ? 0.f : (lse == m_max ? 1.f : kv4::exp2_approx(lse - m_max));
#pragma unroll
  for (int j = 0; j < N; ++j) num[j] += w > 0.f ? w * v[j] : 0.f;  // v of an empty split is never used
  den += w;
}

// The cluster merge (sm_90): the splits of a block's rows are the CTAs of one cluster (rank = split), and CTA `owner`
// merges elements [first, first + count) of the block's [block_rows][D] result (whole 16-byte quads). Every CTA
// sends each owner its values of those elements and the log-sum-exps of the rows they lie in with st.async, which
// complete on the owner's mbarrier: no cluster barrier on the way (its release is a GPU-scope memory barrier in every
// thread; with two of them and remote loads instead, H100 batch 8 ran 1.0-1.4 µs slower a call, docs/benchmarks.md).
struct ClusterSlice {
  int per, first, count, first_row, rows;
  __device__ ClusterSlice(int owner, int splits, int block_rows, int d) {
    const int total = block_rows * d;
    per = ((total + splits - 1) / splits + 3) & ~3;
    first = min(owner * per, total);
    count = min(per, total - first);
    first_row = first / d;
    rows = count > 0 ? (first + count - 1) / d - first_row + 1 : 0;
  }
  __device__ uint32_t bytes(int splits) const { return static_cast<uint32_t>(splits * (count + rows) * 4); }
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// At the kernel's start: arms this CTA's barrier for what the cluster will send it, then arrives on the cluster
// barrier whose wait (cluster_merge_send) comes before the first remote store.
__device__ __forceinline__ void cluster_merge_arm(uint64_t* bar, int split, int splits, int block_rows, int d) {
  if (threadIdx.x == 0) {
    bulk::mbar_arm_for_bytes(bar, ClusterSlice(split, splits, block_rows, d).bytes(splits));
    bulk::fence_mbar_init();
  }
  __cluster_barrier_arrive_relaxed();
}

// Sends this split's normalized values of row r, dims d .. d + 3, to their owner, and (d == 0) the row's
// log-sum-exp to every owner of some of its elements.
template <int D>
__device__ __forceinline__ void cluster_merge_send(const float (&value)[4], float lse, int r, int d, int split,
                                                   int per, float* recv_o, float* recv_lse, uint64_t* bar) {
  const int e = r * D + d, owner = e / per;
  bulk::st_async_cluster_v4(recv_o + split * per + (e - owner * per),
                            make_uint4(__float_as_uint(value[0]), __float_as_uint(value[1]),
                                       __float_as_uint(value[2]), __float_as_uint(value[3])),
                            bar, static_cast<uint32_t>(owner));
  if (d == 0) {
    for (int o = r * D / per; o <= (r * D + D - 1) / per; ++o) {
      bulk::st_async_cluster(recv_lse + split * kRowsPerBlock + (r - o * per / D), __float_as_uint(lse), bar,
                             static_cast<uint32_t>(o));
    }
  }
}

// The owner's side: once every split's share has landed, merges its slice in split order (accumulate_split, so the
// merge kernel's bits) and stores it.
template <typename T, int D, int kThreads>
__device__ __forceinline__ void cluster_merge_finish(const DecodeArgs& a, uint64_t* bar, const float* recv_o,
                                                     const float* recv_lse, int split, int block_rows, int b, int hq0,
                                                     int row0) {
  const ClusterSlice sl(split, a.splits, block_rows, D);
  bulk::mbar_wait_cluster(bar, 0);  // also with nothing to merge (the phase completed when armed)
  for (int i = 4 * static_cast<int>(threadIdx.x); i < sl.count; i += 4 * kThreads) {
    const int e = sl.first + i, r = e / D, d = e % D, lr = r - sl.first_row;
    float m_max = -INFINITY;
    for (int s = 0; s < a.splits; ++s) m_max = fmaxf(m_max, recv_lse[s * kRowsPerBlock + lr]);
    float num[4] = {0.f, 0.f, 0.f, 0.f}, den = 0.f;
    if (m_max != -INFINITY) {
      for (int s = 0; s < a.splits; ++s) {
        const float4 q4 = *reinterpret_cast<const float4*>(recv_o + s * sl.per + i);
        const float v[4] = {q4.x, q4.y, q4.z, q4.w};
        accumulate_split<4>(recv_lse[s * kRowsPerBlock + lr], m_max, v, num, den);
      }
    }
    uint2 packed;  // the 4 values in T, one 8-byte store
    T* out4 = reinterpret_cast<T*>(&packed);
#pragma unroll
    for (int j = 0; j < 4; ++j) out4[j] = from_float<T>(den > 0.f ? num[j] / den : 0.f);
    *reinterpret_cast<uint2*>(static_cast<T*>(a.out) + output_row(a, b, hq0, row0 + r) * D + d) = packed;
  }
}
#endif

// Column of element (row r, dim d) in a warp's [row][D] block of the epilogue's O^T exchange. Lane (g, c) stores rows
// 2c, 2c + 1 at dims (D / 8) g + 2i (+1), which in plain order fall on 2 (D = 128), 4 (64) or 1 (256) banks: a 16-way
// conflict on each of a lane's 32 stores (~2 µs for 8 warps). XOR-ing bits 0-1 with c and bits 2-4 with the dim's
// bits 5-7 puts a store's 32 lanes on 32 banks, and maps each aligned 32 dims of a row onto themselves, so the merge's
// reads of 32 consecutive dims of one row stay conflict-free.
__device__ __forceinline__ int red_o_col(int r, int d) {
  return d ^ ((r >> 1) & 3) ^ (((d >> 5) & 3) << 2) ^ (((d >> 7) & 1) << 4);
}

// Slots [begin, end) of split `split` of a row whose valid slots are [start, len): whole rounds of the warps'
// 16-slot steps from the step holding `start`; empty when the row has no valid slot.
template <int kWarps>
__device__ __forceinline__ void split_slots(const DecodeArgs& a, int len, int start, int split, int& begin, int& end) {
  const int first = start & ~(kStepSlots - 1);
  const int span = len - first;
  begin = 0;
  end = 0;
  if (span > 0) {
    const int per_split = (span + a.splits - 1) / a.splits;
    const int chunk = (per_split + kWarps * kStepSlots - 1) / (kWarps * kStepSlots) * (kWarps * kStepSlots);
    begin = first + split * chunk;
    end = min(begin + chunk, len);
  }
}

// Before the PDL wait: asks L2 for the slots the block's pipeline fill will copy (its first kStages - 1 rounds of
// steps), so that they load while the previous kernel finishes. The cache slots before the new token are not
// written by the kernels just before (the append writes the new token's slot only), and a prefetch is only a
// hint: the lengths read here may be stale, so they are clamped like the real ones and steer nothing but it.
template <int D, int kWarps>
__device__ __forceinline__ void prefetch_first_steps(const DecodeArgs& a, int b, int hkv, int split) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using G = Geometry<D, kWarps>;
  int begin, end;
  // .cg loads (L2 only): an L1 line of them must not outlive the wait, after which the lengths are read again
  split_slots<kWarps>(a, min(__ldcg(a.kv_lens + b), a.t), max(__ldcg(a.kv_starts + b), 0), split, begin, end);
  end = min(end, begin + (kStages - 1) * kWarps * kStepSlots);
  if (end <= begin) return;
  const int64_t slot0 = (static_cast<int64_t>(b) * a.h_kv + hkv) * a.t + begin;
  const int code_bytes = (end - begin) * G::kRowBytes, param_bytes = (end - begin) * 4;
  for (int off = static_cast<int>(threadIdx.x) * 128; off < code_bytes; off += G::kThreads * 128) {
    kv4::prefetch_l2(a.k_cache + slot0 * G::kRowBytes + off);
    kv4::prefetch_l2(a.v_cache + slot0 * G::kRowBytes + off);
  }
  for (int off = static_cast<int>(threadIdx.x) * 128; off < param_bytes; off += G::kThreads * 128) {
    kv4::prefetch_l2(reinterpret_cast<const uint8_t*>(a.k_params + slot0 * 2) + off);
    kv4::prefetch_l2(reinterpret_cast<const uint8_t*>(a.v_params + slot0 * 2) + off);
  }
#endif
}

// NQ = number of 8-row query groups in use (1: rows 0..7, 2: rows 0..15).
// 4 blocks (16 warps) a multiprocessor for the common shapes: at most 128 registers a thread there.
// W = warps a block (4, or 8 when there are too few blocks to give every SM several).
template <typename T, int D, int NQ, int W>
__global__ void __launch_bounds__(32 * W, (NQ == 1 && D <= 128) ? 16 / W : 1) kv4_decode_kernel(const DecodeArgs a) {
  using G = Geometry<D, W>;
  constexpr int kWarps = W, kThreads = 32 * W;
  extern __shared__ __align__(16) uint8_t smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, c = lane & 3;
  const int split = blockIdx.x % a.splits;  // the splits of one work item are adjacent: a cluster's CTAs
  const int item = blockIdx.x / a.splits;
  const int qc = item % a.q_chunks;
  const int hkv = (item / a.q_chunks) % a.h_kv;
  const int b = item / (a.q_chunks * a.h_kv);
  const int group = a.h_q / a.h_kv;
  const int rows = group * a.s_q;  // query rows of this KV head
  const int row0 = qc * kRowsPerBlock;
  const int block_rows = min(8 * NQ, rows - row0);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __shared__ uint64_t merge_bar;  // the cluster merge's: what the other splits send this CTA
  if (a.cluster_merge) cluster_merge_arm(&merge_bar, split, a.splits, block_rows, D);
#endif
  if (a.prefetch) prefetch_first_steps<D, kWarps>(a, b, hkv, split);
  // PDL: q, the lengths and the cache (the append just before wrote it) are all read after the wait
  pdl_wait();
  if (!a.late_trigger) pdl_launch_dependents();
  // q's loads go out first: issued after the pipeline fill they queued behind its DRAM reads (H100 timestamps at
  // batch 1: 1.8 to 4.1 µs from the wait to the K loop, growing with the fill's bytes; docs/benchmarks.md).
  constexpr int kQWords = G::kKWords;
  uint4 q_raw[NQ][kQWords];
#pragma unroll
  for (int n = 0; n < NQ; ++n) {
    const int r = row0 + g + 8 * n;
#pragma unroll
    for (int wi = 0; wi < kQWords; ++wi) q_raw[n][wi] = make_uint4(0, 0, 0, 0);
    if (a.q_vec16 && r < rows) {
      const T* src = static_cast<const T*>(a.q) + b * a.q_stride[0] + (hkv * group + r / a.s_q) * a.q_stride[1] +
                     (r % a.s_q) * a.q_stride[2] + c * (D / 4);
#pragma unroll
      for (int wi = 0; wi < kQWords; ++wi) q_raw[n][wi] = *reinterpret_cast<const uint4*>(src + 8 * wi);
    }
  }

  // Valid slots [start, len) of this row, clamped to the cache (bad values never index out of bounds).
  const int len = min(a.kv_lens[b], a.t);
  const int start = max(a.kv_starts[b], 0);
  int split_begin, split_end;
  split_slots<kWarps>(a, len, start, split, split_begin, split_end);
  const int steps_total = split_end > split_begin ? (split_end - split_begin + kStepSlots - 1) / kStepSlots : 0;
  const int my_steps = steps_total > warp ? (steps_total - warp + kWarps - 1) / kWarps : 0;

  // ---- the pipeline fill: this lane's operands of its first kStages - 1 steps, in flight during the q set-up ----
  const int64_t head = static_cast<int64_t>(b) * a.h_kv + hkv;
  const uint8_t* k_base = a.k_cache + head * a.t * G::kRowBytes;
  const uint8_t* v_base = a.v_cache + head * a.t * G::kRowBytes;
  const __half* kp_base = a.k_params + head * a.t * 2;
  const __half* vp_base = a.v_params + head * a.t * 2;
  uint8_t* warp_smem = smem + warp * kStages * G::kStageBytes;
  // This lane's operands at slot 0: K of slot g (chunk c), V of slot 2c (chunk g), params of slot lane % 16.
  const uint8_t* k_lane = k_base + g * G::kRowBytes + c * G::kKBytes;
  const uint8_t* v_lane = v_base + 2 * c * G::kRowBytes + g * G::kVBytes;
  const __half* p_lane = (lane < 16 ? kp_base : vp_base) + (lane & 15) * 2;
  const int last_slot = a.t - 1;

  // issue(k) copies this lane's operands of step k into stage k % kStages (called for k = 0, 1, 2, ... in order).
  // This lane's sources for the next step it issues, advanced one round of the warps at each issue (running
  // pointers: recomputing them from the step index cost ~50 instructions a step).
  int t_issue = split_begin + warp * kStepSlots;
  const uint8_t* k_src = k_lane + static_cast<int64_t>(t_issue) * G::kRowBytes;
  const uint8_t* v_src = v_lane + static_cast<int64_t>(t_issue) * G::kRowBytes;
  const __half* p_src = p_lane + static_cast<int64_t>(t_issue) * 2;
  uint8_t* const k_dst = warp_smem + G::kKOffset + lane * G::kKBytes;  // + j * 32 * kKBytes
  uint8_t* const v_dst = warp_smem + G::kVOffset + lane * G::kVBytes;  // + j * 32 * kVBytes
  uint8_t* const p_dst = warp_smem + G::kPOffset + lane * 4;
  constexpr int kRoundSlots = kWarps * kStepSlots;
  auto issue = [&](int k) {
    const int stage = (k % kStages) * G::kStageBytes;
    if (t_issue + kStepSlots <= a.t) {  // whole step inside the cache (warp-uniform): no clamping
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int o = 0; o < G::kKBytes; o += G::kKChunk) {
          cp_async<G::kKChunk>(k_dst + stage + j * 32 * G::kKBytes + o, k_src + 8 * j * G::kRowBytes + o);
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        cp_async<G::kVBytes>(v_dst + stage + j * 32 * G::kVBytes, v_src + ((j & 1) + 8 * (j >> 1)) * G::kRowBytes);
      }
      cp_async<4>(p_dst + stage, p_src);
    } else {  // last step of the cache: slots past it are clamped to the last slot (their values are masked out)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int slot = min(t_issue + 8 * j + g, last_slot);
        const uint8_t* src = k_base + static_cast<int64_t>(slot) * G::kRowBytes + c * G::kKBytes;
#pragma unroll
        for (int o = 0; o < G::kKBytes; o += G::kKChunk) {
          cp_async<G::kKChunk>(k_dst + stage + j * 32 * G::kKBytes + o, src + o);
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int slot = min(t_issue + 2 * c + (j & 1) + 8 * (j >> 1), last_slot);
        const uint8_t* src = v_base + static_cast<int64_t>(slot) * G::kRowBytes + g * G::kVBytes;
        cp_async<G::kVBytes>(v_dst + stage + j * 32 * G::kVBytes, src);
      }
      const int slot = min(t_issue + (lane & 15), last_slot);
      cp_async<4>(p_dst + stage, (lane < 16 ? kp_base : vp_base) + static_cast<int64_t>(slot) * 2);
    }
    t_issue += kRoundSlots;
    k_src += kRoundSlots * G::kRowBytes;
    v_src += kRoundSlots * G::kRowBytes;
    p_src += kRoundSlots * 2;
  };
  for (int k = 0; k < kStages - 1; ++k) {
    if (k < my_steps) issue(k);
    kv4::cp_async_commit();
  }

  // ---- query fragments (B operand of the QK MMA), the rows' sums and visible ends ----------------------
  // The QK MMA computes S^T = K q^T: 16 slots on M (slots g and g + 8 of a step for lane (g, c)), query
  // rows on N (one 8-row tile per n), head_dim on K. k-step ks = 2 * wi + jj covers, for lane (g, c), the
  // dims base + {2jj, 4+2jj} (k = 2c, 2c+1) and base + {1+2jj, 5+2jj} (k = 2c+8, 2c+9) with
  // base = c * D/4 + 8 * wi: the order in which the nibble conversion delivers the K codes (kv4_ptx.cuh).
  // The B fragment of query row 8n + g holds exactly those dims; for fp16 the hi-code dims are pre-scaled.
  constexpr int kKSteps = 2 * G::kKWords;
  uint32_t qb[NQ][kKSteps][2];
  float q_sum[NQ], q_bias[NQ];  // of row 8n + g: sum of q, and what the biased K codes add to q . n
  int q_end[NQ];                // of row 8n + g: its last visible slot + 1
#pragma unroll
  for (int n = 0; n < NQ; ++n) {
    const int r = row0 + g + 8 * n;
    const bool valid = r < rows;
    const T* qrow = nullptr;
    q_end[n] = INT_MIN;
    if (valid) {
      const int hq = hkv * group + r / a.s_q, i = r % a.s_q;
      qrow = static_cast<const T*>(a.q) + b * a.q_stride[0] + hq * a.q_stride[1] + i * a.q_stride[2];
      q_end[n] = len - (a.s_q - 1 - i);
    }
    float sum = 0.f, bias_lo = 0.f, bias_hi = 0.f;
#pragma unroll
    for (int wi = 0; wi < G::kKWords; ++wi) {
      uint16_t e[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (valid) {
        const T* src = qrow + c * (D / 4) + 8 * wi;
        if (a.q_vec16) {
          const uint4 raw = q_raw[n][wi];
          const uint32_t w4[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
          for (int j = 0; j < 8; ++j) e[j] = static_cast<uint16_t>(w4[j / 2] >> (16 * (j % 2)));
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j) e[j] = *reinterpret_cast<const uint16_t*>(src + j);
        }
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const uint16_t bits = e[j];
        const float x = to_float<T>(*reinterpret_cast<const T*>(&bits));
        sum += x;
        if (j % 2 == 0) {
          bias_lo += x;
        } else {  // a hi-code dim: pre-scaled by a power of two (exact unless subnormal; the bias uses the result)
          const T scaled = from_float<T>(x * kv4::KBias<T>::kHiQueryScale);
          e[j] = *reinterpret_cast<const uint16_t*>(&scaled);
          bias_hi += to_float<T>(scaled);
        }
      }
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        qb[n][2 * wi + jj][0] = uint32_t(e[2 * jj]) | (uint32_t(e[4 + 2 * jj]) << 16);
        qb[n][2 * wi + jj][1] = uint32_t(e[1 + 2 * jj]) | (uint32_t(e[5 + 2 * jj]) << 16);
      }
    }
#pragma unroll
    for (int o = 1; o <= 2; o <<= 1) {
      sum += __shfl_xor_sync(0xffffffffu, sum, o);
      bias_lo += __shfl_xor_sync(0xffffffffu, bias_lo, o);
      bias_hi += __shfl_xor_sync(0xffffffffu, bias_hi, o);
    }
    q_sum[n] = sum;
    q_bias[n] = kv4::KBias<T>::kLo * bias_lo + kv4::KBias<T>::kHi * bias_hi;
  }
  // The scores of lane (g, c) are those of rows 8n + 2c + e (e = 0, 1): their constants come from lane 4 (2c + e).
  float row_sum[NQ][2], row_bias[NQ][2];
  int row_end[NQ][2];
#pragma unroll
  for (int n = 0; n < NQ; ++n) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      row_sum[n][e] = __shfl_sync(0xffffffffu, q_sum[n], 4 * (2 * c + e));
      row_bias[n][e] = __shfl_sync(0xffffffffu, q_bias[n], 4 * (2 * c + e));
      row_end[n][e] = __shfl_sync(0xffffffffu, q_end[n], 4 * (2 * c + e));
    }
  }

  // ---- state of rows 8n + 2c + e: running max, this lane's share of the sum and min-sum; O^T accumulators
  float m_run[NQ][2], l_run[NQ][2], vmin_run[NQ][2];
  float acc[NQ][G::kMTiles][4];
#pragma unroll
  for (int n = 0; n < NQ; ++n) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      m_run[n][e] = -INFINITY;
      l_run[n][e] = 0.f;
      vmin_run[n][e] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < G::kMTiles; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[n][i][j] = 0.f;
  }

  for (int k = 0; k < my_steps; ++k) {
    kv4::cp_async_wait<kStages - 2>();
    __syncwarp();  // the params of a step are copied by other lanes
    const uint8_t* st = warp_smem + (k % kStages) * G::kStageBytes;
    const int t0 = split_begin + (warp + k * kWarps) * kStepSlots;  // the step computed now
    const uint32_t* params = reinterpret_cast<const uint32_t*>(st + G::kPOffset);

    // -- S^T[slot][row] for slots t0 + g + 8h (h = j / 2) and rows 8n + 2c + (j % 2) --------------------
    uint32_t kw[2][G::kKWords];  // K words of slots g and g + 8
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t* src = reinterpret_cast<const uint32_t*>(st + G::kKOffset + (h * 32 + lane) * G::kKBytes);
      if constexpr (G::kKWords % 4 == 0) {
#pragma unroll
        for (int wi = 0; wi < G::kKWords; wi += 4) {
          const uint4 v4 = reinterpret_cast<const uint4*>(src)[wi / 4];
          kw[h][wi] = v4.x; kw[h][wi + 1] = v4.y; kw[h][wi + 2] = v4.z; kw[h][wi + 3] = v4.w;
        }
      } else {
#pragma unroll
        for (int wi = 0; wi < G::kKWords; wi += 2) {
          const uint2 v2 = reinterpret_cast<const uint2*>(src)[wi / 2];
          kw[h][wi] = v2.x; kw[h][wi + 1] = v2.y;
        }
      }
    }
    float chain[2][NQ][4];  // two MMA chains: more ILP
#pragma unroll
    for (int jj = 0; jj < 2; ++jj)
#pragma unroll
      for (int n = 0; n < NQ; ++n)
#pragma unroll
        for (int j = 0; j < 4; ++j) chain[jj][n][j] = 0.f;
#pragma unroll
    for (int wi = 0; wi < G::kKWords; ++wi) {
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        const uint32_t x0 = jj ? (kw[0][wi] >> 8) : kw[0][wi];
        const uint32_t x1 = jj ? (kw[1][wi] >> 8) : kw[1][wi];
        const uint32_t ka[4] = {kv4::k_codes_lo<T>(x0), kv4::k_codes_lo<T>(x1), kv4::k_codes_hi<T>(x0),
                                kv4::k_codes_hi<T>(x1)};
#pragma unroll
        for (int n = 0; n < NQ; ++n) kv4::mma_16816<T>(chain[jj][n], ka, qb[n][2 * wi + jj][0], qb[n][2 * wi + jj][1]);
      }
    }
    const int slot_g = t0 + g;
    float2 kp[2], vp[2];  // (scale, min) of slots g and g + 8
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      kp[h] = pair_to_float2<__half>(params[g + 8 * h]);
      vp[h] = pair_to_float2<__half>(params[16 + g + 8 * h]);
      kp[h].x *= a.scale_log2;
      kp[h].y *= a.scale_log2;
    }
    float s[NQ][4];
#pragma unroll
    for (int n = 0; n < NQ; ++n) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int h = j >> 1, e = j & 1, slot = slot_g + 8 * h;
        const float dot = chain[0][n][j] + chain[1][n][j] - row_bias[n][e];
        const float score = fmaf(kp[h].x, dot, kp[h].y * row_sum[n][e]);
        s[n][j] = (slot >= start && slot < row_end[n][e]) ? score : -INFINITY;
      }
    }

    // -- online softmax per row; P' = p * s_V (fp16) feeds the PV MMA, p * m_V the min-sum ------------
    uint32_t pb[NQ][2];  // B fragments of the PV MMA: P'^T for slots 0-7 and 8-15 of the step
    float alpha[NQ][2];
#pragma unroll
    for (int n = 0; n < NQ; ++n) {
      // Row maxima over the 8 lanes of a column group: the pair exchange leaves even g with row 2c and odd g
      // with row 2c + 1, so each of the three butterfly steps reduces one value, and a last exchange shares both.
      const bool odd = g & 1;
      const float v0 = fmaxf(s[n][0], s[n][2]), v1 = fmaxf(s[n][1], s[n][3]);
      float mine = fmaxf(odd ? v1 : v0, __shfl_xor_sync(0xffffffffu, odd ? v0 : v1, 4));
      mine = fmaxf(mine, __shfl_xor_sync(0xffffffffu, mine, 8));
      mine = fmaxf(mine, __shfl_xor_sync(0xffffffffu, mine, 16));
      const float other = __shfl_xor_sync(0xffffffffu, mine, 4);
      const float tile_max[2] = {odd ? other : mine, odd ? mine : other};
      float m_use[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float m_new = fmaxf(m_run[n][e], tile_max[e]);
        m_use[e] = m_new == -INFINITY ? 0.f : m_new;  // no slot seen yet: avoid (-inf) - (-inf)
        alpha[n][e] = m_new == m_run[n][e] ? 1.f : kv4::exp2_approx(m_run[n][e] - m_use[e]);
        m_run[n][e] = m_new;
      }
      float pv[4], psum[2] = {0.f, 0.f}, vmin_sum[2] = {0.f, 0.f};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int h = j >> 1, e = j & 1;
        const float p = kv4::exp2_approx(s[n][j] - m_use[e]);
        // Masked slots may hold stale params (even NaN): select, never multiply by 0.
        pv[j] = p > 0.f ? p * vp[h].x : 0.f;
        vmin_sum[e] += p > 0.f ? p * vp[h].y : 0.f;
        psum[e] += p;
      }
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        l_run[n][e] = l_run[n][e] * alpha[n][e] + psum[e];
        vmin_run[n][e] = vmin_run[n][e] * alpha[n][e] + vmin_sum[e];
      }
      // lane (g, c) holds P'[slot g (+8)][rows 2c, 2c+1]; the B fragment wants P'^T[row g][slots 2c, 2c+1]
      pb[n][0] = kv4::transpose_8x8(kv4::pack_half2(pv[0], pv[1]));
      pb[n][1] = kv4::transpose_8x8(kv4::pack_half2(pv[2], pv[3]));
    }

    // -- rescale O^T: its columns are this lane's rows 2c, 2c+1 ------------------------------------------
#pragma unroll
    for (int n = 0; n < NQ; ++n) {
      if (__all_sync(0xffffffffu, alpha[n][0] == 1.f && alpha[n][1] == 1.f)) continue;  // once the max settles
#pragma unroll
      for (int i = 0; i < G::kMTiles; ++i) {
        acc[n][i][0] *= alpha[n][0];
        acc[n][i][1] *= alpha[n][1];
        acc[n][i][2] *= alpha[n][0];
        acc[n][i][3] *= alpha[n][1];
      }
    }

    // -- O^T[d][row] += n_V^T[d][slot] * P'^T[slot][row]: m-tile i is byte i of each slot's V share -----
    uint32_t vw[4][G::kVWords];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint8_t* src = st + G::kVOffset + (j * 32 + lane) * G::kVBytes;
      if constexpr (G::kVWords == 4) {
        const uint4 v4 = *reinterpret_cast<const uint4*>(src);
        vw[j][0] = v4.x; vw[j][1] = v4.y; vw[j][2] = v4.z; vw[j][3] = v4.w;
      } else if constexpr (G::kVWords == 2) {
        const uint2 v2 = *reinterpret_cast<const uint2*>(src);
        vw[j][0] = v2.x; vw[j][1] = v2.y;
      } else {
        vw[j][0] = *reinterpret_cast<const uint32_t*>(src);
      }
    }
#pragma unroll
    for (int i = 0; i < G::kMTiles; ++i) {
      const uint32_t sel = (i & 3) | ((4 + (i & 3)) << 8);  // byte i of slot A -> byte 0, of slot B -> byte 2
      const uint32_t x01 = __byte_perm(vw[0][i >> 2], vw[1][i >> 2], sel);  // slots 2c, 2c+1
      const uint32_t x89 = __byte_perm(vw[2][i >> 2], vw[3][i >> 2], sel);  // slots 2c+8, 2c+9
      const uint32_t va[4] = {kv4::nibbles_0_16<__half>(x01), kv4::nibbles_4_20<__half>(x01),
                              kv4::nibbles_0_16<__half>(x89), kv4::nibbles_4_20<__half>(x89)};
#pragma unroll
      for (int n = 0; n < NQ; ++n) kv4::mma_16816<__half>(acc[n][i], va, pb[n][0], pb[n][1]);
    }

    if (k + kStages - 1 < my_steps) issue(k + kStages - 1);
    kv4::cp_async_commit();
  }
  kv4::cp_async_wait<0>();
  // The next kernel launches now (a.late_trigger), so that its prefetch overlaps this block's tail (the merge and the
  // stores) rather than the K loop's reads, whose stream would evict the prefetched lines from L2 first.
  if (a.late_trigger) pdl_launch_dependents();

  // ---- merge the warps (shared memory), then write the output or this split's partial ---------------
#pragma unroll
  for (int n = 0; n < NQ; ++n) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
#pragma unroll
      for (int o = 4; o <= 16; o <<= 1) {  // the 8 lanes of a column group share rows 2c, 2c+1
        l_run[n][e] += __shfl_xor_sync(0xffffffffu, l_run[n][e], o);
        vmin_run[n][e] += __shfl_xor_sync(0xffffffffu, vmin_run[n][e], o);
      }
    }
  }
  __syncthreads();  // every warp is done with its pipeline memory
  float* red_m = reinterpret_cast<float*>(smem);
  float* red_l = red_m + kWarps * kRowsPerBlock;
  float* red_vmin = red_l + kWarps * kRowsPerBlock;
  float* red_o = red_vmin + kWarps * kRowsPerBlock;  // [warp][row][D]
  if (g == 0) {
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int r = warp * kRowsPerBlock + 8 * n + 2 * c + e;
        red_m[r] = n < NQ ? m_run[n < NQ ? n : 0][e] : -INFINITY;
        red_l[r] = n < NQ ? l_run[n < NQ ? n : 0][e] : 0.f;
        red_vmin[r] = n < NQ ? vmin_run[n < NQ ? n : 0][e] : 0.f;
      }
    }
  }
#pragma unroll
  for (int half = 0; half < NQ; ++half) {
    const int r0 = 8 * half + 2 * c;
    if (r0 >= block_rows) continue;  // rows past the block's (a GQA group of 4 fills 4 of 8)
#pragma unroll
    for (int i = 0; i < G::kMTiles; ++i) {
      const int d0 = (D / 8) * g + 2 * i;  // low nibble of byte i of lane group g's V share
      float* o = red_o + (warp * kRowsPerBlock) * D;
      o[r0 * D + red_o_col(r0, d0)] = acc[half][i][0];
      o[(r0 + 1) * D + red_o_col(r0 + 1, d0)] = acc[half][i][1];
      o[r0 * D + red_o_col(r0, d0 + 1)] = acc[half][i][2];
      o[(r0 + 1) * D + red_o_col(r0 + 1, d0 + 1)] = acc[half][i][3];
    }
  }
  __syncthreads();

  const int64_t rows_total = static_cast<int64_t>(a.b) * a.h_q * a.s_q;
  float* recv_o = reinterpret_cast<float*>(smem + G::kRecvOffset);
  float* recv_lse = recv_o + G::kRecvValues;
  int cluster_per = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (a.cluster_merge) {
    cluster_per = ClusterSlice(0, a.splits, block_rows, D).per;
    cooperative_groups::this_cluster().barrier_wait();  // every CTA runs (and armed its barrier): remote stores may go
  }
#endif
  // Four consecutive dims a thread: red_o_col keeps each aligned group of 4 together (bits 0-1 XOR-ed with
  // (r >> 1) & 3), so one 16-byte load per warp state gives them, and the results leave as 16-byte stores.
  constexpr int kQuads = D / 4;
  for (int idx = threadIdx.x; idx < block_rows * kQuads; idx += kThreads) {
    const int r = idx / kQuads, d = (idx % kQuads) * 4;
    const int swz = (r >> 1) & 3, col = red_o_col(r, d) & ~3;
    float m_max = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m_max = fmaxf(m_max, red_m[w * kRowsPerBlock + r]);
    float l_sum = 0.f, o_sum[4] = {0.f, 0.f, 0.f, 0.f};
    if (m_max != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float mw = red_m[w * kRowsPerBlock + r];
        if (mw == -INFINITY) continue;
        const float e = kv4::exp2_approx(mw - m_max);
        l_sum += e * red_l[w * kRowsPerBlock + r];
        const float vmin = red_vmin[w * kRowsPerBlock + r];
        const float4 q4 = *reinterpret_cast<const float4*>(red_o + (w * kRowsPerBlock + r) * D + col);
        o_sum[0] += e * (q4.x + vmin);  // in shared-memory order: dim d + (k ^ swz) in o_sum[k]
        o_sum[1] += e * (q4.y + vmin);
        o_sum[2] += e * (q4.z + vmin);
        o_sum[3] += e * (q4.w + vmin);
      }
    }
    const bool seen = l_sum > 0.f;
    float value[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int k = j ^ swz;  // selects, not a runtime index into a local array
      const float o = k == 0 ? o_sum[0] : k == 1 ? o_sum[1] : k == 2 ? o_sum[2] : o_sum[3];
      value[j] = seen ? o / l_sum : 0.f;
    }
    const int64_t row_id = output_row(a, b, hkv * group, row0 + r);
    if (a.cluster_merge) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      cluster_merge_send<D>(value, seen ? m_max + log2f(l_sum) : -INFINITY, r, d, split, cluster_per, recv_o,
                            recv_lse, &merge_bar);
#endif
    } else if (!a.partials) {
      uint2 packed;  // the 4 values in T, one 8-byte store
      T* out4 = reinterpret_cast<T*>(&packed);
#pragma unroll
      for (int j = 0; j < 4; ++j) out4[j] = from_float<T>(value[j]);
      *reinterpret_cast<uint2*>(static_cast<T*>(a.out) + row_id * D + d) = packed;
    } else {
      if (seen) {
        *reinterpret_cast<float4*>(a.part_o + (split * rows_total + row_id) * D + d) =
            make_float4(value[0], value[1], value[2], value[3]);
      }
      if (d == 0) a.part_lse[split * rows_total + row_id] = seen ? m_max + log2f(l_sum) : -INFINITY;
    }
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (a.cluster_merge) {
    cluster_merge_finish<T, D, kThreads>(a, &merge_bar, recv_o, recv_lse, split, block_rows, b, hkv * group, row0);
  }
#endif
}

// Elements d0 .. d0 + N - 1 of query row `row` merged over the splits: sum_s w_s o_s / sum_s w_s with
// w_s = 2^(lse_s - m_max) (the split holding the max weighs exactly 1, so one split returns its values unchanged).
// N = 8 reads each split's values with two 16-byte loads (d0 % 8 == 0).
// The loads are issued in rounds of kMergeRound splits, each before the first use of its values: every round is one
// L2 latency on the path from the decode kernel's end to the next kernel (a loop with a load round per split made
// the merge the largest part of a batch-1 call). MAXS > 0 (splits <= MAXS <= kMergeRound): every split's
// log-sum-exp and values in one round. MAXS == 0: any count, the log-sum-exp maximum then the values, by rounds.
constexpr int kMergeRound = 16;
template <int N, int MAXS>
__device__ __forceinline__ void merge_splits(const float* part_o, const float* part_lse, int64_t row, int d0,
                                             int64_t rows_total, int splits, int d_size, float (&out)[N]) {
  static_assert(N == 1 || N == 8, "one value or two 16-byte vectors");
  const float* lse = part_lse + row;                // lse of split s: lse[s * rows_total]
  const float* o = part_o + row * d_size + d0;      // o of split s: o[s * rows_total * d_size]
  auto load = [&](int s, float (&v)[N]) {
    if constexpr (N == 8) {
      const float4 lo = reinterpret_cast<const float4*>(o + s * rows_total * d_size)[0];
      const float4 hi = reinterpret_cast<const float4*>(o + s * rows_total * d_size)[1];
      v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w, v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
    } else {
      v[0] = o[s * rows_total * d_size];
    }
  };
  float num[N], den = 0.f;
#pragma unroll
  for (int j = 0; j < N; ++j) num[j] = 0.f;
  if constexpr (MAXS > 0) {
    static_assert(MAXS <= kMergeRound, "one round of loads");
    float l[MAXS], v[MAXS][N];  // v of an empty split is loaded but never used (its weight is 0)
#pragma unroll
    for (int s = 0; s < MAXS; ++s) {
      if (s < splits) {
        l[s] = lse[s * rows_total];
        load(s, v[s]);
      }
    }
    float m_max = -INFINITY;
#pragma unroll
    for (int s = 0; s < MAXS; ++s) {
      if (s < splits) m_max = fmaxf(m_max, l[s]);
    }
    if (m_max != -INFINITY) {
#pragma unroll
      for (int s = 0; s < MAXS; ++s) {
        if (s < splits) accumulate_split<N>(l[s], m_max, v[s], num, den);
      }
    }
  } else {
    float m_max = -INFINITY;
#pragma unroll kMergeRound
    for (int s = 0; s < splits; ++s) m_max = fmaxf(m_max, lse[s * rows_total]);
    if (m_max != -INFINITY) {
#pragma unroll 1
      for (int c = 0; c < splits; c += kMergeRound) {
        float l[kMergeRound], v[kMergeRound][N];
#pragma unroll
        for (int j = 0; j < kMergeRound; ++j) {
          if (c + j < splits) {
            l[j] = lse[(c + j) * rows_total];
            load(c + j, v[j]);
          }
        }
#pragma unroll
        for (int j = 0; j < kMergeRound; ++j) {
          if (c + j < splits) accumulate_split<N>(l[j], m_max, v[j], num, den);
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = den > 0.f ? num[j] / den : 0.f;
}

// Merges the splits of one query row per block (MAXS: merge_splits).
template <typename T, int MAXS>
__global__ void __launch_bounds__(128) kv4_combine_kernel(const float* part_o, const float* part_lse, T* out,
                                                          int64_t rows_total, int splits, int d_size) {
  pdl_wait();
  pdl_launch_dependents();
  const int64_t row = blockIdx.x;
  for (int d = threadIdx.x; d < d_size; d += blockDim.x) {
    float value[1];
    merge_splits<1, MAXS>(part_o, part_lse, row, d, rows_total, splits, d_size, value);
    out[row * d_size + d] = from_float<T>(value[0]);
  }
}

// kv4_decode_attention_quantize's merge: one block per query token (b, i) merges the splits of all its H_q heads,
// rounds each value to T (what kv4_decode_attention returns) and quantizes the token's [H_q * D] row in the
// order o_proj reads it (head-major), exactly as quantize_per_token. Dynamic shared memory: the row's H_q * D
// float values.
constexpr int kMergeQuantThreads = 512;
constexpr int kMergeQuantVec = 8;  // H_q * D is a multiple of 64
// One block per token reads all its splits: beyond this many the per-head merge (one block per head) and the quantize
// kernel are faster (H100: batch 1 at 4096 slots, 32 splits), so the op runs those two instead.
constexpr int kMergeQuantMaxSplits = 8;
// Default split count cap (QOQ_KV4_SPLITS can force more, up to 1024).
constexpr int kMaxSplits = 16;
// Which splits merge inside a cluster (H100, `benchmarks/attention.py --ab QOQ_KV4_CLUSTER=...`, docs/benchmarks.md):
// two anywhere (batch 8: 8.6 / 17.7 / 53.3 µs at 1k / 4k / 16k against 10.8 / 20.0 / 56.1 with the merge kernel);
// up to kMaxClusterMerge where the grid is at most three quarters of the SMs (batch 1 at 512 / 1024 slots: 5.8 / 6.1
// against 6.4 / 6.7; batch 2 at 512 / 768: 5.8 / 6.1 against 6.7 / 6.7). Larger grids of larger clusters lose
// (batch 4 at 512 slots: 7.3 against 6.9; batch 2 at 32k, 8 splits: 45.0 against 31.8): the CTAs of a cluster
// share SMs then.
constexpr int kMaxClusterSplits = 2;
// The one-token quantized op's split rule (launch_rows).
constexpr int kOneTokenMaxSlots = 1024;
constexpr int64_t kOneTokenSplits = 12;
static_assert(kOneTokenSplits > kMergeQuantMaxSplits,
              "the one-token rule is meant to take the per-head merge and quantize_per_token, not merge-quantize");

template <typename T>
__global__ void __launch_bounds__(kMergeQuantThreads) kv4_combine_quantize_kernel(
    const float* part_o, const float* part_lse, int64_t rows_total, int splits, int h_q, int s_q, int d_size,
    int8_t* x_q, float* x_s, int32_t* x_sum) {
  extern __shared__ float ys[];
  __shared__ float fscratch[rowq::kMaxWarps];
  pdl_wait();
  pdl_launch_dependents();
  const int64_t token = blockIdx.x;
  rowq::clear_row_sum(x_sum + token);
  const int64_t b = token / s_q, i = token % s_q;
  const int64_t k = static_cast<int64_t>(h_q) * d_size;
  float amax = 0.f;
  for (int64_t v = threadIdx.x; v < k / kMergeQuantVec; v += blockDim.x) {
    const int64_t e = v * kMergeQuantVec;  // a vector lies within one head: D % 8 == 0
    const int h = static_cast<int>(e / d_size), d0 = static_cast<int>(e % d_size);
    float y[kMergeQuantVec];
    merge_splits<kMergeQuantVec, kMergeQuantMaxSplits>(part_o, part_lse, (b * h_q + h) * s_q + i, d0, rows_total,
                                                       splits, d_size, y);
#pragma unroll
    for (int j = 0; j < kMergeQuantVec; ++j) {
      y[j] = to_float<T>(from_float<T>(y[j]));  // the value kv4_decode_attention returns
      ys[e + j] = y[j];
      amax = fmaxf(amax, fabsf(y[j]));
    }
  }
  amax = rowq::block_reduce(amax, fscratch, rowq::MaxOp{});
  rowq::quantize_row<kMergeQuantVec>(ys, amax, k, x_q + token * k, x_s + token, x_sum + token);
}

// What a launch produces: kv4_decode_attention's `out` [B, H_q, S_q, D], or (quantized) o_proj's INT8 input
// x_q [B * S_q, H_q * D] with its per-token scale x_s and code sum x_sum.
struct DecodeOutput {
  at::Tensor out;
  bool quantized = false;
  at::Tensor x_q, x_s, x_sum;
};

template <typename T>
void launch_merge_quantize(const DecodeArgs& a, int d, const DecodeOutput& o) {
  auto kernel = kv4_combine_quantize_kernel<T>;
  const int64_t k = static_cast<int64_t>(a.h_q) * d;
  const size_t smem = static_cast<size_t>(k) * sizeof(float);
  static size_t configured[64] = {0};  // per device: the largest dynamic shared memory size allowed so far
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (smem > 48 * 1024 && smem > configured[device & 63]) {
    TORCH_CHECK(smem + 1024 <= static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin)),
                "H_q * D = ", num(k), " is too large for the CUDA kv4_decode_attention_quantize");
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    configured[device & 63] = smem;
  }
  static int8_t sm90[64] = {0};
  launch_kernel(kernel, sm90, {dim3(static_cast<unsigned>(a.b * a.s_q)), dim3(kMergeQuantThreads), smem},
                static_cast<const float*>(a.part_o), static_cast<const float*>(a.part_lse),
                static_cast<int64_t>(a.b) * a.h_q * a.s_q, a.splits, a.h_q, a.s_q, d, o.x_q.data_ptr<int8_t>(),
                o.x_s.data_ptr<float>(), o.x_sum.data_ptr<int32_t>());
}

// kv4_decode_attention_quantize's outputs, allocated for `tokens` rows of k values.
void allocate_quantized(DecodeOutput& o, const at::Tensor& q, int64_t tokens, int64_t k) {
  o.x_q = at::empty({tokens, k}, q.options().dtype(at::kChar));
  o.x_s = at::empty({tokens}, q.options().dtype(at::kFloat));
  o.x_sum = at::empty({tokens}, q.options().dtype(at::kInt));
}

// The quantize_per_token op (its CUDA impl) on `out` [B, H_q, S_q, D] in o_proj's layout.
void quantize_output(DecodeOutput& o) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qoq::quantize_per_token", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&)>();
  const int64_t b = o.out.size(0), h_q = o.out.size(1), s_q = o.out.size(2), d = o.out.size(3);
  std::tie(o.x_q, o.x_s, o.x_sum) = op.call(o.out.transpose(1, 2).reshape({b * s_q, h_q * d}).contiguous());
}

// Whether `kernel` can run as clusters of `size` CTAs (2 .. kMaxClusterMerge) on this device (sm_90 image, at least
// one such cluster resident): checked once per device and size; `state` is the call site's (0 unknown, 1 yes, 2 no).
template <typename Kernel>
bool cluster_merge_possible(Kernel kernel, int8_t (&sm90_cache)[64], int8_t (&state)[kMaxClusterMerge + 1][64],
                            int size, int threads, int smem) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int8_t& s = state[size][device & 63];
  if (s == 0) {
    bool ok = runs_sm90_image(kernel, sm90_cache);
    if (ok) {
      cudaLaunchAttribute attr{};
      attr.id = cudaLaunchAttributeClusterDimension;
      attr.val.clusterDim.x = static_cast<unsigned>(size);
      attr.val.clusterDim.y = 1;
      attr.val.clusterDim.z = 1;
      cudaLaunchConfig_t config{};
      config.gridDim = dim3(static_cast<unsigned>(size));
      config.blockDim = dim3(threads);
      config.dynamicSmemBytes = smem;
      config.attrs = &attr;
      config.numAttrs = 1;
      int clusters = 0;
      ok = cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) == cudaSuccess && clusters > 0;
    }
    (void)cudaGetLastError();  // a refused query leaves the merge kernel path, not an error
    s = ok ? 1 : 2;
  }
  return s == 1;
}

// Dynamic shared memory that leaves room for one block an SM (half the SM's, with the 1 KB a block reserves).
inline int solo_smem() {
  return static_cast<int>(device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor) / 2);
}

// Sets the kernel's dynamic shared memory limit and returns its resident blocks per SM: both once per device
// (an occupancy query at every call was host time on the decode path).
template <typename T, int D, int NQ, int W>
int decode_blocks_per_sm() {
  using G = Geometry<D, W>;
  auto kernel = kv4_decode_kernel<T, D, NQ, W>;
  static int per_sm[64] = {0};  // 0: not configured yet on that device
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int& blocks = per_sm[device & 63];
  if (blocks == 0) {
    const int limit = std::max(G::kSmemBytes, solo_smem());  // launch_decode's solo launch asks for more than it uses
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit));
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, G::kThreads, G::kSmemBytes));
    blocks = std::max(n, 1);
  }
  return blocks;
}

// Work items (row, KV head, query chunk) of one launch: its blocks are items x splits.
inline int64_t decode_items(const DecodeArgs& a) {
  const int64_t items = static_cast<int64_t>(a.b) * a.h_kv * a.q_chunks;
  TORCH_CHECK(items < (int64_t(1) << 31), "too many (row, KV head) pairs for one launch");
  return items;
}

// Splits for half a wave of resident 4-warp blocks, at most kMaxSplits, each covering at least 256 slots of the
// cache: more cost more in partial results, their merge and fixed per-block work than they gain in parallelism
// (H100, `benchmarks/attention.py --sweep-splits` at 4k-32k slots: batch 1 is fastest with 16 splits, batch 4 with
// 8, batch 16 with 2 merged in a cluster, batch 64 with 1; a full wave (64 / 16 / 4) was up to 40% slower). Up to
// 8 query rows with at most one work item an SM take launch_rows's own count instead (8-warp blocks).
// QOQ_KV4_SPLITS=<n> forces the count (read at every call: a getenv, negligible next to the launch).
template <typename T, int D, int NQ>
int64_t decode_splits(const DecodeArgs& a) {
  const int64_t resident =
      static_cast<int64_t>(decode_blocks_per_sm<T, D, NQ, 4>()) * device_attribute(cudaDevAttrMultiProcessorCount);
  int64_t splits = std::max<int64_t>(1, resident / (2 * decode_items(a)));
  splits = std::min<int64_t>(splits, kMaxSplits);
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, (a.t + 255) / 256));
  if (const int forced = env_int("QOQ_KV4_SPLITS", 0); forced > 0) splits = forced;
  return std::min<int64_t>(splits, 1024);
}

template <typename T, int D, int NQ, int W>
void launch_decode(DecodeArgs& a, const at::Tensor& q, DecodeOutput& o, int64_t splits) {
  using G = Geometry<D, W>;
  constexpr int kThreads = G::kThreads;
  auto kernel = kv4_decode_kernel<T, D, NQ, W>;
  constexpr int smem = G::kSmemBytes;
  (void)decode_blocks_per_sm<T, D, NQ, W>();  // the shared memory limit
  const int64_t base_blocks = decode_items(a);
  a.splits = static_cast<int>(splits);
  TORCH_CHECK(base_blocks * splits < (int64_t(1) << 31), "too many (row, KV head, split) blocks for one launch");
  // The plain op merges its splits inside a cluster on sm_90 where kMaxClusterSplits's rule says (QOQ_KV4_CLUSTER=0:
  // the merge kernel instead; QOQ_KV4_CLUSTER=<n> >= 2: up to n splits, at most kMaxClusterMerge, on any grid); the
  // quantized op always writes partials (its merge needs every head of a token).
  static int8_t sm90_decode[64] = {0}, cluster_ok[kMaxClusterMerge + 1][64] = {};
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount);
  const int cluster_env = env_int("QOQ_KV4_CLUSTER", 1);
  const int64_t cluster_cap = cluster_env >= 2                       ? std::min(cluster_env, kMaxClusterMerge)
                              : 4 * base_blocks * splits <= 3 * sms ? kMaxClusterMerge
                                                                     : kMaxClusterSplits;
  a.cluster_merge = !o.quantized && splits > 1 && splits <= cluster_cap && cluster_env != 0 &&
                    cluster_merge_possible(kernel, sm90_decode, cluster_ok, static_cast<int>(splits), kThreads, smem);
  a.partials = (splits > 1 || o.quantized) && !a.cluster_merge;

  const int64_t rows_total = static_cast<int64_t>(a.b) * a.h_q * a.s_q;
  at::Tensor part_o, part_lse;
  if (a.partials) {
    part_o = at::empty({splits, rows_total, D}, q.options().dtype(at::kFloat));
    part_lse = at::empty({splits, rows_total}, q.options().dtype(at::kFloat));
    a.part_o = part_o.data_ptr<float>();
    a.part_lse = part_lse.data_ptr<float>();
  }
  const bool merge_quantize = o.quantized && splits <= kMergeQuantMaxSplits;
  if (merge_quantize) {
    allocate_quantized(o, q, static_cast<int64_t>(a.b) * a.s_q, static_cast<int64_t>(a.h_q) * D);
  } else if (o.quantized) {  // many splits: the per-head merge into `out`, then quantize_per_token
    o.out = at::empty({a.b, a.h_q, a.s_q, D}, q.options());
  }
  a.out = o.out.defined() ? o.out.data_ptr() : nullptr;
  // A grid of at most one block an SM asks for half an SM's shared memory, so that no SM runs two of its blocks: with
  // the dependents launched after the K loop (a.late_trigger), the next call's blocks would otherwise land two to an
  // SM that the previous call had already left, and such a block shares its SM's issue slots (H100, batch 16, 4k /
  // 16k / 32k: 35.2 / 137.7 / 267.0 µs without this, 29.3 / 101.7 / 195.4 with it). QOQ_KV4_SOLO=0: the block's size.
  // Clusters keep the block's size (one CTA an SM made batch 1's clusters of 8-16 slower still).
  const bool solo = !a.cluster_merge && base_blocks * splits <= sms && env_int("QOQ_KV4_SOLO", 1) != 0;
  const size_t launch_smem = static_cast<size_t>(solo ? std::max(smem, solo_smem()) : smem);
  launch_kernel(kernel, sm90_decode,
                {dim3(static_cast<unsigned>(base_blocks * splits)), dim3(kThreads), launch_smem,
                 a.cluster_merge ? static_cast<unsigned>(splits) : 0u},
                a);
  QOQ_CHECK_LAUNCH();
  if (merge_quantize) {
    launch_merge_quantize<T>(a, D, o);
    QOQ_CHECK_LAUNCH();
    return;
  }
  if (a.partials) {
    // Up to kMergeRound splits (the default cap is kMaxSplits) one round of loads; more, rounds of kMergeRound.
    static int8_t sm90_combine[2][64] = {{0}};
    const int variant = a.splits <= kMergeRound ? 0 : 1;
    auto combine = variant == 0 ? kv4_combine_kernel<T, kMergeRound> : kv4_combine_kernel<T, 0>;
    launch_kernel(combine, sm90_combine[variant], {dim3(static_cast<unsigned>(rows_total)), dim3(128)},
                  static_cast<const float*>(a.part_o), static_cast<const float*>(a.part_lse), static_cast<T*>(a.out),
                  rows_total, a.splits, D);
    QOQ_CHECK_LAUNCH();
  }
  if (o.quantized) quantize_output(o);
}

template <typename T, int D>
void launch_rows(DecodeArgs& a, const at::Tensor& q, DecodeOutput& o) {
  const int rows = (a.h_q / a.h_kv) * a.s_q;
  if (rows <= 8) {
    // Up to one block an SM (items <= SMs): 8-warp blocks, and as many splits as fill the SMs with such blocks (at
    // most kMaxSplits, each of at least one round of the warps' steps, 128 slots); more items: 4-warp blocks and the
    // 4-warp split rule. H100 sweep of warps x splits (docs/results/attention_warps_splits_sweep_h100.txt, µs at 1k /
    // 4k / 16k slots, this rule against the one before it): batch 1 6.6 / 8.4 / 13.5 against 8.1 / 9.0 / 13.6, batch
    // 2 6.8 / 10.4 / 19.5 against 8.2 / 14.2 / 28.8, batch 4 8.2 / 13.4 / 32.0 against 8.7 / 20.0 / 48.4, batch 8
    // 10.7 / 19.4 / 55.1 against 14.4 / 29.1 / 85.4; batch 16 (one 8-warp block per item, no split) as before. With
    // fewer splits a block walks more steps per warp; with more, the blocks share SMs or their fixed cost outweighs.
    // QOQ_KV4_WARPS=4|8 forces the width (the split count is then the 4-warp rule's unless QOQ_KV4_SPLITS is set).
    // Except: the quantized op with one token (a batch-1 decode step) on a cache of up to kOneTokenMaxSlots takes 4-warp
    // blocks and kOneTokenSplits splits (where they fit one block an SM), so that its merge runs as the per-head merge
    // kernel and quantize_per_token rather than merge_quantize's single block. H100 sweep of the quantized op, 32 / 8
    // heads, µs at 256 / 384 / 640 / 1024 slots: 7.1 / 7.2 / 7.5 / 7.9 against 7.5 / 7.6 / 8.3 / 8.9 with the 8-warp
    // rule (2-8 splits merged by one block); it lost at batch 2 and 4 (docs/benchmarks.md, "The quantized op at
    // batch 1").
    int64_t splits = decode_splits<T, D, 1>(a);
    const int64_t items = decode_items(a), sms = device_attribute(cudaDevAttrMultiProcessorCount);
    const bool forced_splits = env_int("QOQ_KV4_SPLITS", 0) > 0;
    int warps = env_int("QOQ_KV4_WARPS", 0);
    if (warps != 4 && warps != 8) {
      warps = items <= sms ? 8 : 4;
      if (o.quantized && !forced_splits && static_cast<int64_t>(a.b) * a.s_q == 1 && a.t <= kOneTokenMaxSlots &&
          items * kOneTokenSplits <= sms) {
        warps = 4;
        splits = kOneTokenSplits;
      } else if (warps == 8 && !forced_splits) {
        splits = std::max<int64_t>(1, std::min<int64_t>({sms / items, kMaxSplits, (a.t + 127) / 128}));
      }
    }
    if (warps == 8) {
      launch_decode<T, D, 1, 8>(a, q, o, splits);
    } else {
      launch_decode<T, D, 1, 4>(a, q, o, splits);
    }
  } else {
    launch_decode<T, D, 2, 4>(a, q, o, decode_splits<T, D, 2>(a));
  }
}

template <typename T>
void launch_dim(DecodeArgs& a, const at::Tensor& q, DecodeOutput& o, int64_t d) {
  switch (d) {
    case 64: launch_rows<T, 64>(a, q, o); break;
    case 128: launch_rows<T, 128>(a, q, o); break;
    case 256: launch_rows<T, 256>(a, q, o); break;
    default: TORCH_CHECK(false, "head_dim ", num(d), " is not supported by the CUDA kv4_decode_attention (64, 128, 256)");
  }
}

void check_cache(const char* cache_name, const at::Tensor& cache, const char* params_name, const at::Tensor& params,
                 const at::Tensor& q) {
  check_kv4_cache_tensor(cache_name, cache, "q", q);
  TORCH_CHECK(cache.size(0) == q.size(0) && cache.size(3) * 2 == q.size(3), cache_name, " has shape ", shape_str(cache),
              " which does not match q ", shape_str(q), " (expected [B, H_kv, T, D/2])");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(cache.data_ptr()) % 16 == 0, cache_name, " must be 16-byte aligned");
  check_kv4_params(params_name, params, cache, "q", q);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(params.data_ptr()) % 4 == 0, params_name, " must be 4-byte aligned");
}

void check_lengths(const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), name, " is on ", device_str(t), " but q is on ", device_str(q));
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must have dtype int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == q.size(0), name, " must have shape [B] = [", num(q.size(0)), "], got ",
              shape_str(t));
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Checks the inputs, then runs the decode into `o` (whose tensors are allocated here from q's shape).
void run_decode(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& k_params,
                const at::Tensor& v_cache, const at::Tensor& v_params, const at::Tensor& kv_lens,
                const at::Tensor& kv_starts, double sm_scale, DecodeOutput& o) {
  TORCH_CHECK(q_in.is_cuda(), "q must be a CUDA tensor, got ", device_str(q_in));
  TORCH_CHECK(q_in.scalar_type() == at::kHalf || q_in.scalar_type() == at::kBFloat16,
              "q must have dtype float16 or bfloat16, got ", q_in.scalar_type());
  TORCH_CHECK(q_in.dim() == 4, "q must be 4-D [B, H_q, S_q, D], got shape ", shape_str(q_in));
  TORCH_CHECK(q_in.numel() > 0, "q must be non-empty, got shape ", shape_str(q_in));
  check_cache("k_cache", k_cache, "k_params", k_params, q_in);
  check_cache("v_cache", v_cache, "v_params", v_params, q_in);
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache has shape ", shape_str(v_cache), " but k_cache has ",
              shape_str(k_cache));
  check_lengths("kv_lens", kv_lens, q_in);
  check_lengths("kv_starts", kv_starts, q_in);
  const int64_t b = q_in.size(0), h_q = q_in.size(1), s_q = q_in.size(2), d = q_in.size(3);
  const int64_t h_kv = k_cache.size(1), t = k_cache.size(2);
  TORCH_CHECK(h_kv > 0 && h_q % h_kv == 0, "query heads (", num(h_q), ") must be a multiple of KV heads (", num(h_kv), ")");
  TORCH_CHECK(d == 64 || d == 128 || d == 256, "head_dim ", num(d),
              " is not supported by the CUDA kv4_decode_attention (64, 128 or 256)");
  TORCH_CHECK(t < INT_MAX && b * h_q * s_q < INT_MAX && (h_q / h_kv) * s_q < INT_MAX / 2, "sizes too large");

  const c10::cuda::CUDAGuard guard(q_in.device());
  if (t == 0) {  // no slot to attend to: zeros, whose quantization is all zeros too
    if (o.quantized) {
      allocate_quantized(o, q_in, b * s_q, h_q * d);
      for (at::Tensor* r : {&o.x_q, &o.x_s, &o.x_sum}) r->zero_();
    } else {
      o.out = at::zeros({b, h_q, s_q, d}, q_in.options());
    }
    return;
  }
  if (!o.quantized) o.out = at::empty({b, h_q, s_q, d}, q_in.options());
  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();

  DecodeArgs a{};
  a.q = q.data_ptr();
  for (int i = 0; i < 3; ++i) a.q_stride[i] = q.stride(i);
  a.k_cache = k_cache.data_ptr<uint8_t>();
  a.v_cache = v_cache.data_ptr<uint8_t>();
  a.k_params = reinterpret_cast<const __half*>(k_params.data_ptr<at::Half>());
  a.v_params = reinterpret_cast<const __half*>(v_params.data_ptr<at::Half>());
  a.kv_lens = kv_lens.data_ptr<int32_t>();
  a.kv_starts = kv_starts.data_ptr<int32_t>();
  a.b = static_cast<int>(b);
  a.h_q = static_cast<int>(h_q);
  a.h_kv = static_cast<int>(h_kv);
  a.s_q = static_cast<int>(s_q);
  a.t = static_cast<int>(t);
  a.q_chunks = static_cast<int>(((h_q / h_kv) * s_q + kRowsPerBlock - 1) / kRowsPerBlock);
  a.scale_log2 = static_cast<float>(sm_scale) * kLog2e;
  a.q_vec16 = reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0 && q.stride(0) % 8 == 0 && q.stride(1) % 8 == 0 &&
              q.stride(2) % 8 == 0;
  // QOQ_KV4_PREFETCH (read at every call): bit 0 the L2 prefetch before the PDL wait, bit 1 the dependents launched
  // after the K loop; default 3 (both), 0 neither (H100 A/B: batch 16 at 4k 29.6 against 30.5 µs, batch 1 10.1 / 10.5)
  const int prefetch_mode = env_int("QOQ_KV4_PREFETCH", 3);
  a.prefetch = (prefetch_mode & 1) != 0;
  a.late_trigger = (prefetch_mode & 2) != 0;
  if (q.scalar_type() == at::kHalf) {
    launch_dim<__half>(a, q, o, d);
  } else {
    launch_dim<__nv_bfloat16>(a, q, o, d);
  }
}

at::Tensor kv4_decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& k_params,
                                     const at::Tensor& v_cache, const at::Tensor& v_params, const at::Tensor& kv_lens,
                                     const at::Tensor& kv_starts, double sm_scale) {
  DecodeOutput o;
  run_decode(q, k_cache, k_params, v_cache, v_params, kv_lens, kv_starts, sm_scale, o);
  return o.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kv4_decode_attention_quantize_cuda(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& k_params, const at::Tensor& v_cache,
    const at::Tensor& v_params, const at::Tensor& kv_lens, const at::Tensor& kv_starts, double sm_scale) {
  DecodeOutput o;
  o.quantized = true;
  run_decode(q, k_cache, k_params, v_cache, v_params, kv_lens, kv_starts, sm_scale, o);
  return {o.x_q, o.x_s, o.x_sum};
}

}  // namespace
}  // namespace qoq

TORCH_LIBRARY_IMPL(qoq, CUDA, m) {
  m.impl("kv4_decode_attention", &qoq::kv4_decode_attention_cuda);
  m.impl("kv4_decode_attention_quantize", &qoq::kv4_decode_attention_quantize_cuda);
}
