// Decode (small M) path of the W4A8 GEMM: a memory-bound dp4a kernel, see w4a8_gemv.cu.
#pragma once
#include "gemm/w4a8_gemm_kernel.cuh"

namespace qoq {

// Largest M the decode kernel takes (0: never). QOQ_GEMM_DECODE=0 disables it and QOQ_GEMM_DECODE_MAX_M=<m>
// lowers the bound; both are read once per process.
int gemv_max_m();

// Computes p.out for 1 <= p.M <= 16 (same contract and parameters as w4a8_gemm_kernel; no workspace).
template <bool PER_GROUP>
void launch_w4a8_gemv(const GemmParams& p);

}  // namespace qoq
