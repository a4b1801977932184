"""Exact reference implementations of the `qoq` ops (docs/formats.md): the oracle for every CUDA kernel.

Pure PyTorch, run on any device. Integer GEMMs are computed in float64, which is exact for INT8 x INT8
products summed over K < 2**37 / 127**2, so the result equals INT32 accumulation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .packing import unpack_int4

INT8_MAX = 127


def quantize_rows_float32(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row symmetric INT8 of a float32 [M, K] tensor: ``(x_q int8, x_s float32 [M], x_sum int32 [M])``."""
    amax = y.abs().amax(dim=1)
    scale = amax / INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(y / safe.unsqueeze(1)).clamp_(-INT8_MAX, INT8_MAX)
    q = torch.where(scale.unsqueeze(1) > 0, q, torch.zeros_like(q)).to(torch.int8)
    return q, scale, q.sum(dim=1, dtype=torch.int32)


def quantize_per_token(x: torch.Tensor):
    return quantize_rows_float32(x.float())


def rmsnorm_quantize(x: torch.Tensor, weight: torch.Tensor, eps: float):
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(dim=1, keepdim=True) + eps)
    # (x * w) * r: the largest |y| is then max|x * w| * r, which lets a kernel take it with the sum of squares
    return quantize_rows_float32((xf * weight.float()) * r)


def add_rmsnorm_quantize(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    h = (x.float() + residual.float()).to(x.dtype)  # the decoder's `residual + x`, rounded as torch's add rounds
    return (h,) + rmsnorm_quantize(h, weight, eps)


def silu_mul_quantize(gate_up: torch.Tensor):
    gate, up = gate_up.float().chunk(2, dim=1)
    return quantize_rows_float32(F.silu(gate) * up)


def _epilogue(acc: torch.Tensor, x_s, scale, bias, out_dtype) -> torch.Tensor:
    y = acc.float() * x_s.unsqueeze(1)
    y = y * scale.float().unsqueeze(0)
    if bias is not None:
        y = y + bias.float().unsqueeze(0)
    return y.to(out_dtype)


def _add_residual(y: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """``residual + y`` as the decoder adds them: y already rounded to its dtype, the sum rounded again."""
    return y if residual is None else (y.float() + residual.float()).to(y.dtype)


def w4a8_gemm_per_group(x_q, x_s, qweight, s2, z2, s1, bias, group_size: int, out_dtype, residual=None,
                        packed_scales=None, x_sum=None):
    # packed_scales (pack_scales(s2, z2)) and x_sum (x_q's row sums) are what the CUDA kernels take instead of
    # recomputing them; when given they must be those values, and they do not enter the math here.
    w4 = unpack_int4(qweight)
    n, k = w4.shape
    w8 = (w4.view(n, k // group_size, group_size).double() - z2.double().unsqueeze(-1)) * s2.double().unsqueeze(-1)
    acc = x_q.double() @ w8.view(n, k).t()
    return _add_residual(_epilogue(acc, x_s, s1, bias, out_dtype), residual)


def w4a8_gemm_per_channel(x_q, x_s, x_sum, qweight, scale, zero, bias, out_dtype, residual=None):
    w4 = unpack_int4(qweight)
    acc = x_q.double() @ w4.double().t() - zero.double().unsqueeze(0) * x_sum.double().unsqueeze(1)
    return _add_residual(_epilogue(acc, x_s, scale, bias, out_dtype), residual)


def kv4_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x [..., D]`` per vector: ``(packed uint8 [..., D/2], params float16 [..., 2] = (scale, min))``."""
    xf = x.float()
    mn16 = xf.amin(dim=-1).to(torch.float16)
    scale16 = ((xf.amax(dim=-1) - xf.amin(dim=-1)) / 15).to(torch.float16)
    scale, mn = scale16.float().unsqueeze(-1), mn16.float().unsqueeze(-1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((xf - mn) / safe).clamp_(0, 15)
    q = torch.where(scale > 0, q, torch.zeros_like(q)).to(torch.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return packed, torch.stack((scale16, mn16), dim=-1)


def kv4_dequantize(cache: torch.Tensor, params: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """float32 ``[B, H, length, D]`` values of a KV4 cache ``[B, H, T, D/2]`` with params ``[B, H, T, 2]``."""
    if length is not None:
        cache, params = cache[:, :, :length], params[:, :, :length]
    q = torch.stack((cache & 0x0F, cache >> 4), dim=-1).flatten(-2).float()
    p = params.float()
    return q * p[..., 0:1] + p[..., 1:2]


def kv4_append(k_cache, k_params, v_cache, v_params, k, v, cache_position) -> None:
    for cache, params, x in ((k_cache, k_params, k), (v_cache, v_params, v)):
        packed, p = kv4_quantize(x)
        cache.index_copy_(2, cache_position, packed)
        params.index_copy_(2, cache_position, p)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (rotate_half convention) of ``x [..., D]`` with ``cos``/``sin`` broadcastable to it, in x's dtype.

    In float32 ``x * cos + rotate_half(x) * sin`` with each product and the sum rounded separately (no fused
    multiply-add; the CUDA kernel uses __fmul_rn/__fadd_rn), then rounded to x's dtype once.
    """
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos.float() + rotated * sin.float()).to(x.dtype)


def split_qkv(qkv: torch.Tensor, num_q_heads: int, num_kv_heads: int, head_dim: int):
    """Views ``q [B, H_q, S, D]``, ``k``, ``v [B, H_kv, S, D]`` of ``qkv [B, S, (H_q + 2 H_kv) * D]``."""
    heads = qkv.unflatten(-1, (num_q_heads + 2 * num_kv_heads, head_dim)).transpose(1, 2)
    return heads.split((num_q_heads, num_kv_heads, num_kv_heads), dim=1)


def rope_kv4_append(qkv, cos, sin, k_cache, k_params, v_cache, v_params, cache_position, num_q_heads: int):
    """Split, RoPE on q and k (`rope`), `kv4_append` of the rotated k and v; returns q ``[B, H_q, S, D]``."""
    q, k, v = split_qkv(qkv, num_q_heads, k_cache.shape[1], 2 * k_cache.shape[3])
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    kv4_append(k_cache, k_params, v_cache, v_params, rope(k, cos, sin), v, cache_position)
    return rope(q, cos, sin).contiguous()


def visible_mask(kv_lens, kv_starts, s_q: int, t: int) -> torch.Tensor:
    """bool [B, S_q, T]: slot j is visible to query i of row b (docs/formats.md)."""
    j = torch.arange(t, device=kv_lens.device)
    i = torch.arange(s_q, device=kv_lens.device)
    end = kv_lens.long().view(-1, 1, 1) - (s_q - 1 - i).view(1, -1, 1)
    return (j.view(1, 1, -1) >= kv_starts.long().view(-1, 1, 1)) & (j.view(1, 1, -1) < end)


def kv4_decode_attention(q, k_cache, k_params, v_cache, v_params, kv_lens, kv_starts, sm_scale: float):
    b, h_q, s_q, d = q.shape
    h_kv, t = k_cache.shape[1], k_cache.shape[2]
    k = kv4_dequantize(k_cache, k_params).repeat_interleave(h_q // h_kv, dim=1)
    v = kv4_dequantize(v_cache, v_params).repeat_interleave(h_q // h_kv, dim=1)
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * sm_scale
    mask = visible_mask(kv_lens, kv_starts, s_q, t).unsqueeze(1)
    scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows that see no slot
    return torch.matmul(p, v).to(q.dtype)


def kv4_decode_attention_quantize(q, k_cache, k_params, v_cache, v_params, kv_lens, kv_starts, sm_scale: float):
    out = kv4_decode_attention(q, k_cache, k_params, v_cache, v_params, kv_lens, kv_starts, sm_scale)
    b, h_q, s_q, d = out.shape
    return quantize_per_token(out.transpose(1, 2).reshape(b * s_q, h_q * d))
