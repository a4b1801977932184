// Streaming small-M path of the W4A8 GEMM (sm_90: persistent blocks, bulk-copy weight stages), see w4a8_stream.cu.
#pragma once
#include "gemm/w4a8_gemm_kernel.cuh"

namespace qoq {

// The M range the streaming kernel serves by default (1..16 per channel, 1..32 per group; 0: never).
// QOQ_GEMM_STREAM=0 disables it, QOQ_GEMM_STREAM_MIN_M / QOQ_GEMM_STREAM_MAX_M=<m> change the bounds in both formats
// (the kernel takes 1..32); read at each call.
int stream_max_m(bool per_group);
int stream_min_m();

// Whether M lies in the kernel's range and the current device runs its image (the host packs the per-group scales
// for it when the caller did not).
bool stream_may_take(int64_t M, bool per_group);

// Whether the kernel takes these operands on the current device: 1 <= M <= 32, N % 16 == 0, K % 128 == 0, per
// group a group size of 64 or 128 and 16-byte aligned packed scales (p.packed_scales), and an sm_90+ image.
bool stream_supports(const GemmParams& p, bool per_group);

// Computes p.out (same contract and parameters as w4a8_gemm_kernel; no workspace); `sms`: the device's
// multiprocessor count (one or two persistent blocks each). QOQ_GEMM_STREAM_VARIANT=<0..3> forces a variant (rows per
// tile, consumer warps, blocks per SM; see w4a8_stream.cu).
template <bool PER_GROUP>
void launch_w4a8_stream(const GemmParams& p, int sms);

}  // namespace qoq
