// Small-M tensor-core path of the W4A8 GEMM (swapped operands, no workspace), see w4a8_skinny.cu.
#pragma once
#include "gemm/w4a8_gemm_kernel.cuh"

namespace qoq {

// Largest M the small-M kernel serves in the given format (0: never). QOQ_GEMM_SKINNY=0 disables it and
// QOQ_GEMM_SKINNY_MAX_M=<m> changes the bound; read at each call (tests and benchmarks switch paths in one process).
int skinny_max_m(bool per_group);

// Whether the kernel takes these shapes (M <= 64, N % 16 == 0, K % 128 == 0).
bool skinny_supports(const GemmParams& p);

// Computes p.out (same contract and parameters as w4a8_gemm_kernel); `sms`: the device's multiprocessor count,
// which sets the rows per block for M > 32 (QOQ_GEMM_SKINNY_RT=<1|2|4> forces 16, 32 or 64).
template <bool PER_GROUP>
void launch_w4a8_skinny(const GemmParams& p, int sms);

}  // namespace qoq
