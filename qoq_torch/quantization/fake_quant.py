"""Float simulations of the W4A8KV4 arithmetic, built only from the ops' quantization routines.

Used by the searches (smoothing, clipping) and by :mod:`qoq_torch.quantization.simulate`.
"""
from __future__ import annotations

import torch

from qoq_torch.ops.formats import (
    PerChannelWeight,
    PerGroupWeight,
    quantize_weight_per_channel,
    quantize_weight_per_group,
)
from qoq_torch.ops.reference import kv4_dequantize, kv4_quantize, quantize_per_token

QuantizedWeight = PerGroupWeight | PerChannelWeight


def quantize_weight(w: torch.Tensor, group_size: int, clip_ratio: float | torch.Tensor = 1.0) -> QuantizedWeight:
    """``w [N, K]`` -> the logical integer format of docs/formats.md (per-group, or per-channel for -1)."""
    if group_size == -1:
        return quantize_weight_per_channel(w, clip_ratio)
    return quantize_weight_per_group(w, group_size, clip_ratio)


def fake_quantize_weight(w: torch.Tensor, group_size: int, clip_ratio: float | torch.Tensor = 1.0) -> torch.Tensor:
    """float32 ``[N, K]`` weight that the quantized ``w`` represents."""
    return quantize_weight(w, group_size, clip_ratio).dequantize()


def fake_quantize_tokens(x: torch.Tensor) -> torch.Tensor:
    """Per-token symmetric INT8 round trip of ``x [..., K]``; float32 result of x's shape."""
    flat = x.reshape(-1, x.shape[-1])
    x_q, x_s, _ = quantize_per_token(flat)
    return (x_q.float() * x_s.unsqueeze(1)).view(x.shape)


def fake_quantize_kv4(x: torch.Tensor) -> torch.Tensor:
    """KV4 round trip of ``x [B, H, S, D]`` (per token and head over D); float32 result."""
    packed, params = kv4_quantize(x)
    return kv4_dequantize(packed, params)
