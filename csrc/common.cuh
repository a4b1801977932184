// Shared helpers for the qoq CUDA kernels: argument checks with messages that name the argument.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#define QOQ_CHECK_CUDA(t) TORCH_CHECK((t).is_cuda(), #t " must be a CUDA tensor, got ", (t).device())
#define QOQ_CHECK_CONTIGUOUS(t) TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")
#define QOQ_CHECK_DTYPE(t, dt) \
  TORCH_CHECK((t).scalar_type() == (dt), #t " must have dtype ", (dt), ", got ", (t).scalar_type())
#define QOQ_CHECK_DIM(t, d) TORCH_CHECK((t).dim() == (d), #t " must have ", (d), " dims, got ", (t).dim())
#define QOQ_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()
