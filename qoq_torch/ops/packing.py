"""The single packing routine for 4-bit GEMM weights.

The logical format is ``uint8 [N, K]`` with values 0..15; the packed form is always ``uint8 [N, K/2]``,
whose nibble order belongs to the GEMM kernels (docs/formats.md, "Packed layout"). Both functions are
pure PyTorch, so they run on any device and under torch.compile.
"""
from __future__ import annotations

import torch

PACK_LAYOUT_VERSION = 2
BLOCK = 32  # K elements per interleaved block (two mma.m16n8k32 B fragments of one column)


def pack_int4(w4: torch.Tensor) -> torch.Tensor:
    """Pack logical UINT4 weights ``uint8 [N, K]`` into the kernels' ``uint8 [N, K/2]`` layout."""
    n, k = w4.shape
    full = k - k % BLOCK
    # Each 32-wide block of a row becomes 16 bytes: byte i holds w[i] (low) and w[i + 16] (high), so one
    # 32-bit word gives an mma.m16n8k32 B fragment: low nibbles -> k 4t..4t+3, high -> k 16+4t..16+4t+3.
    blocks = w4[:, :full].reshape(n, full // BLOCK, 2, BLOCK // 2)
    packed_full = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, full // 2)
    tail = w4[:, full:]  # K % 32 != 0 (no CUDA kernel takes it): plain pairs, so any even K round-trips
    packed_tail = tail[:, 0::2] | (tail[:, 1::2] << 4)
    return torch.cat((packed_full, packed_tail), dim=1).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`pack_int4`: ``uint8 [N, K/2]`` -> ``uint8 [N, K]``."""
    n, half_k = packed.shape
    full_bytes = (2 * half_k) // BLOCK * (BLOCK // 2)
    body = packed[:, :full_bytes].reshape(n, full_bytes // (BLOCK // 2), 1, BLOCK // 2)
    body = torch.cat((body & 0x0F, body >> 4), dim=2).reshape(n, 2 * full_bytes)
    tail = packed[:, full_bytes:]
    tail = torch.stack((tail & 0x0F, tail >> 4), dim=-1).reshape(n, 2 * (half_k - full_bytes))
    return torch.cat((body, tail), dim=1)
