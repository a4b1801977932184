// Shared helpers for the qoq CUDA kernels: argument checks with messages that name the argument.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>

// Numbers, shapes and devices in check messages go through std::to_string: in the device build (torch 2.11 +
// nvcc 13.0), streaming an integer, a shape or a device into TORCH_CHECK's message from a .cu file crashed
// the process when the check failed, while strings and dtypes were fine.
namespace qoq {

inline std::string num(int64_t v) { return std::to_string(v); }

inline std::string device_str(const at::Tensor& t) { return t.device().str(); }

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + "]";
}

}  // namespace qoq

#define QOQ_CHECK_CUDA(t) TORCH_CHECK((t).is_cuda(), #t " must be a CUDA tensor, got ", qoq::device_str(t))
#define QOQ_CHECK_CONTIGUOUS(t) TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")
#define QOQ_CHECK_DTYPE(t, dt) \
  TORCH_CHECK((t).scalar_type() == (dt), #t " must have dtype ", (dt), ", got ", (t).scalar_type())
#define QOQ_CHECK_DIM(t, d) \
  TORCH_CHECK((t).dim() == (d), #t " must have ", qoq::num(d), " dims, got ", qoq::num((t).dim()))
#define QOQ_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()
