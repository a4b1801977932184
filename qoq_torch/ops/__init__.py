"""The `qoq` op layer: typed entry points over `torch.ops.qoq.*` (docs/formats.md is the contract).

This is the only package that knows whether an op runs a CUDA kernel or the CPU reference.
"""
from __future__ import annotations

import torch

from . import library as _library  # noqa: F401  (defines the ops)
from ._loader import cuda_available, extension_status, load_extension
from .formats import (
    PROTECTIVE_RANGE,
    PerChannelWeight,
    PerGroupWeight,
    quantize_weight_int8,
    quantize_weight_per_channel,
    quantize_weight_per_group,
)
from .reference import kv4_dequantize, kv4_quantize, rope

load_extension()

_ops = torch.ops.qoq


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token INT8 of ``x [M, K]`` -> ``(x_q int8 [M, K], x_s float32 [M], x_sum int32 [M])``."""
    return _ops.quantize_per_token(x)


def rmsnorm_quantize(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RMSNorm of ``x [M, K]`` (fp16/bf16) with ``weight [K]``, then per-token INT8 (as `quantize_per_token`)."""
    return _ops.rmsnorm_quantize(x, weight, eps)


def add_rmsnorm_quantize(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``h = x + residual`` (``[M, K]`` fp16/bf16, rounded to their dtype), then `rmsnorm_quantize` of ``h``
    -> ``(h, x_q int8 [M, K], x_s float32 [M], x_sum int32 [M])``: a decoder's residual add fused into the norm."""
    return _ops.add_rmsnorm_quantize(x, residual, weight, eps)


def silu_mul_quantize(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``silu(gate) * up`` of ``gate_up [M, 2I]`` (gate first), then per-token INT8 of the ``[M, I]`` result."""
    return _ops.silu_mul_quantize(gate_up)


def w4a8_gemm_per_group(x_q: torch.Tensor, x_s: torch.Tensor, qweight: torch.Tensor, s2: torch.Tensor,
                        z2: torch.Tensor, s1: torch.Tensor, bias: torch.Tensor | None = None,
                        group_size: int = 128, out_dtype: torch.dtype = torch.float16,
                        residual: torch.Tensor | None = None,
                        packed_scales: torch.Tensor | None = None,
                        x_sum: torch.Tensor | None = None) -> torch.Tensor:
    """Progressive W4A8 GEMM ``[M, K] x [N, K]^T -> [M, N]`` in ``out_dtype`` (INT32 accumulation); with
    ``residual [M, N]`` (``out_dtype``) the output is ``residual + y``, y rounded first (a decoder's residual add).
    ``packed_scales`` must be ``pack_scales(s2, z2)`` when given (modules keep it; without it the CUDA op packs
    the scales at every call where its wgmma or streaming kernel may run, i.e. on sm_90 at most M). ``x_sum int32
    [M]`` must be x_q's row sums when given (the quantize ops return them; without it the CUDA kernels compute them
    at every call)."""
    return _ops.w4a8_gemm_per_group(x_q, x_s, qweight, s2, z2, s1, bias, group_size, out_dtype, residual,
                                    packed_scales, x_sum)


def w4a8_gemm_per_channel(x_q: torch.Tensor, x_s: torch.Tensor, x_sum: torch.Tensor, qweight: torch.Tensor,
                          scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None = None,
                          out_dtype: torch.dtype = torch.float16, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel W4A8 GEMM ``[M, K] x [N, K]^T -> [M, N]`` with the zero-point correction by ``x_sum``; with
    ``residual`` as in `w4a8_gemm_per_group`."""
    return _ops.w4a8_gemm_per_channel(x_q, x_s, x_sum, qweight, scale, zero, bias, out_dtype, residual)


def pack_weights(w4: torch.Tensor) -> torch.Tensor:
    """Logical UINT4 ``uint8 [N, K]`` -> the kernels' packed ``uint8 [N, K/2]``."""
    return _ops.pack_weights(w4)


def pack_scales(s2: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Per-group ``s2, z2: uint8 [N, K/g]`` -> the CUDA GEMM's ``uint8 [ceil(N/128), K/g, 256]`` copy of them
    (docs/formats.md, "Packed scales"); pass it to `w4a8_gemm_per_group` as ``packed_scales``."""
    return _ops.pack_scales(s2, z2)


def unpack_weights(packed: torch.Tensor) -> torch.Tensor:
    """Packed ``uint8 [N, K/2]`` -> logical ``uint8 [N, K]`` (exact inverse of `pack_weights`)."""
    return _ops.unpack_weights(packed)


def kv4_append(k_cache: torch.Tensor, k_params: torch.Tensor, v_cache: torch.Tensor, v_params: torch.Tensor,
               k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor) -> None:
    """Quantize ``k, v [B, H_kv, S, D]`` to KV4 and write them at slots ``cache_position [S]`` (in place)."""
    _ops.kv4_append(k_cache, k_params, v_cache, v_params, k, v, cache_position)


def rope_kv4_append(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                    k_params: torch.Tensor, v_cache: torch.Tensor, v_params: torch.Tensor,
                    cache_position: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """RoPE + KV4 append from the fused projection ``qkv [B, S, (H_q + 2 H_kv) * D]`` (fp16/bf16, q|k|v heads).

    Rotates q and k with ``cos``/``sin [B or 1, S, D]`` (`rope`), writes the rotated K and V at slots
    ``cache_position [S]`` (as `kv4_append`, in place) and returns the rotated ``q [B, H_q, S, D]`` (contiguous).
    """
    return _ops.rope_kv4_append(qkv, cos, sin, k_cache, k_params, v_cache, v_params, cache_position, num_q_heads)


def kv4_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, k_params: torch.Tensor, v_cache: torch.Tensor,
                         v_params: torch.Tensor, kv_lens: torch.Tensor, kv_starts: torch.Tensor,
                         sm_scale: float) -> torch.Tensor:
    """Attention of ``q [B, H_q, S_q, D]`` over the KV4 cache slots ``[kv_starts, kv_lens)`` per row."""
    return _ops.kv4_decode_attention(q, k_cache, k_params, v_cache, v_params, kv_lens, kv_starts, sm_scale)


def kv4_decode_attention_quantize(q: torch.Tensor, k_cache: torch.Tensor, k_params: torch.Tensor,
                                  v_cache: torch.Tensor, v_params: torch.Tensor, kv_lens: torch.Tensor,
                                  kv_starts: torch.Tensor, sm_scale: float):
    """`kv4_decode_attention` followed by `quantize_per_token` of its output in o_proj's layout, in one op.

    ``q [B, H_q, S_q, D]`` -> ``(x_q int8 [B * S_q, H_q * D], x_s float32 [B * S_q], x_sum int32 [B * S_q])``: row
    ``b * S_q + i`` holds query token i of row b, its heads side by side (the attention output rounded to q's dtype,
    then quantized exactly as `quantize_per_token` does).
    """
    return _ops.kv4_decode_attention_quantize(q, k_cache, k_params, v_cache, v_params, kv_lens, kv_starts, sm_scale)


__all__ = [
    "PROTECTIVE_RANGE", "PerChannelWeight", "PerGroupWeight", "add_rmsnorm_quantize", "cuda_available",
    "extension_status", "kv4_append", "kv4_decode_attention", "kv4_decode_attention_quantize", "kv4_dequantize",
    "kv4_quantize", "pack_scales", "pack_weights",
    "quantize_per_token", "quantize_weight_int8", "quantize_weight_per_channel", "quantize_weight_per_group",
    "rmsnorm_quantize", "rope", "rope_kv4_append", "silu_mul_quantize", "unpack_weights", "w4a8_gemm_per_channel",
    "w4a8_gemm_per_group",
]
