"""Weight quantization into the logical formats of docs/formats.md (the one place that does it).

``quantize_weight_per_group`` gives QoQ's progressive format (INT8 per channel in the protective range,
then UINT4 per group with integer scale and zero); ``quantize_weight_per_channel`` the per-channel UINT4
format. Both are pure PyTorch and run on the weight's device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import pack_int4

PROTECTIVE_RANGE = 119  # |w8| <= 119 and s2 <= 16 keep (w4 - z2) * s2 inside INT8 (docs/formats.md)


def _as_row_ratio(clip_ratio: float | torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    ratio = torch.as_tensor(clip_ratio, dtype=torch.float32, device=w.device)
    if ratio.dim() == 0:
        ratio = ratio.expand(w.shape[0])
    if ratio.shape != (w.shape[0],):
        raise ValueError(f"clip_ratio must be a float or a tensor of shape [{w.shape[0]}], got {tuple(ratio.shape)}")
    if bool(((ratio <= 0) | (ratio > 1)).any()):
        raise ValueError("clip_ratio values must lie in (0, 1]")
    return ratio


def _check_weight(w: torch.Tensor) -> torch.Tensor:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"weight must be a 2-D floating-point tensor [N, K], got {getattr(w, 'shape', type(w))}")
    if w.numel() == 0:
        raise ValueError("weight must be non-empty")
    wf = w.detach().float()
    if not bool(torch.isfinite(wf).all()):
        raise ValueError("weight contains non-finite values (inf or nan)")
    return wf


@dataclass
class PerGroupWeight:
    """Progressive group-quantized weight (logical format).

    w4: uint8 [N, K] values 0..15; s2, z2: uint8 [N, K/g]; s1: float16 [N].
    """

    w4: torch.Tensor
    s2: torch.Tensor
    z2: torch.Tensor
    s1: torch.Tensor
    group_size: int

    def int8_weight(self) -> torch.Tensor:
        """The exact reconstructed INT8 weight ``(w4 - z2) * s2`` as int32 [N, K]."""
        n, k = self.w4.shape
        g = self.group_size
        w = (self.w4.view(n, k // g, g).int() - self.z2.int().unsqueeze(-1)) * self.s2.int().unsqueeze(-1)
        return w.view(n, k)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K] weight this format represents."""
        return self.int8_weight().float() * self.s1.float().unsqueeze(1)

    def packed(self) -> torch.Tensor:
        return pack_int4(self.w4)


@dataclass
class PerChannelWeight:
    """Per-channel UINT4 weight (logical format). w4: uint8 [N, K]; scale: float16 [N]; zero: uint8 [N]."""

    w4: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K] weight this format represents."""
        return (self.w4.float() - self.zero.float().unsqueeze(1)) * self.scale.float().unsqueeze(1)

    def packed(self) -> torch.Tensor:
        return pack_int4(self.w4)


def quantize_weight_int8(w: torch.Tensor, clip_ratio: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Level 1: symmetric INT8 per output channel in the protective range.

    Returns ``(w8 int32 [N, K] in [-119, 119], s1 float16 [N])``.
    """
    wf = _check_weight(w)
    ratio = _as_row_ratio(clip_ratio, wf)
    s1 = (wf.abs().amax(dim=1) * ratio / PROTECTIVE_RANGE).to(torch.float16)
    if not bool(torch.isfinite(s1).all()):
        raise ValueError("weight magnitude overflows the float16 scale")
    s1 = torch.where(s1 == 0, torch.ones_like(s1), s1)
    w8 = torch.round(wf / s1.float().unsqueeze(1)).clamp_(-PROTECTIVE_RANGE, PROTECTIVE_RANGE)
    return w8.to(torch.int32), s1


def quantize_weight_per_group(
    w: torch.Tensor, group_size: int = 128, clip_ratio: float | torch.Tensor = 1.0
) -> PerGroupWeight:
    """QoQ progressive quantization of ``w`` (float [N, K]); ``clip_ratio`` shrinks level 1's range per row."""
    if group_size <= 0:
        raise ValueError(f"group_size must be positive for per-group quantization, got {group_size}")
    n, k = w.shape if w.dim() == 2 else (0, 0)
    if w.dim() == 2 and k % group_size != 0:
        raise ValueError(f"in_features K={k} is not a multiple of group_size={group_size}")
    w8, s1 = quantize_weight_int8(w, clip_ratio)
    groups = w8.float().view(n, k // group_size, group_size)
    lo = groups.amin(dim=-1).clamp(max=0)
    hi = groups.amax(dim=-1).clamp(min=0)
    # ceil (not round) so the 16 levels always span the group: no clamping error beyond half a step.
    s2 = torch.ceil((hi - lo) / 15).clamp_(1, 16)
    z2 = torch.round(-lo / s2).clamp_(0, 15)
    w4 = (torch.round(groups / s2.unsqueeze(-1)) + z2.unsqueeze(-1)).clamp_(0, 15)
    return PerGroupWeight(
        w4=w4.view(n, k).to(torch.uint8), s2=s2.to(torch.uint8), z2=z2.to(torch.uint8), s1=s1, group_size=group_size
    )


def quantize_weight_per_channel(w: torch.Tensor, clip_ratio: float | torch.Tensor = 1.0) -> PerChannelWeight:
    """Asymmetric UINT4 per output channel of ``w`` (float [N, K]); ``clip_ratio`` shrinks the range per row."""
    wf = _check_weight(w)
    ratio = _as_row_ratio(clip_ratio, wf)
    lo = wf.amin(dim=1).clamp(max=0) * ratio
    hi = wf.amax(dim=1).clamp(min=0) * ratio
    scale = ((hi - lo) / 15).to(torch.float16)
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("weight magnitude overflows the float16 scale")
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    s = scale.float()
    zero = torch.round(-lo / s).clamp_(0, 15)
    w4 = (torch.round(wf / s.unsqueeze(1)) + zero.unsqueeze(1)).clamp_(0, 15)
    return PerChannelWeight(w4=w4.to(torch.uint8), scale=scale, zero=zero.to(torch.uint8))
