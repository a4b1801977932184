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


SCALE_TILE_ROWS = 128  # weight rows per tile of the packed per-group scales (the wgmma kernels' weight tile)
ZS_BIAS = 240  # the packed z byte is ZS_BIAS - z2 * s2, in 0..240 since s2 <= 16 and z2 <= 15


def pack_scales(s2: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Per-group scales ``s2, z2: uint8 [N, G]`` -> the CUDA kernels' ``uint8 [ceil(N/128), G, 256]``.

    For weight-row tile ``t`` and group ``j``, row ``r`` of the tile (0..127) lies in 16-row block ``r // 16``;
    the 4 bytes at ``32 * (r // 16) + 4 * (r % 8)`` are ``s2`` of rows ``r`` and ``r + 8`` of that block, then
    ``b = 240 - z2 * s2`` of the same two rows (rows past N: s2 = 0 and b = 240, i.e. zero weights). So one
    aligned 32-bit load gives a thread both rows of its MMA fragment (rows g and g + 8 of 16); one group of one
    tile is 256 contiguous bytes, copied with 16-byte copies; and the dequantization constant
    ``(128 - z2 * s2) * 0x01010101`` is the b byte replicated (one byte permute) plus a constant."""
    if s2.shape != z2.shape or s2.dim() != 2:
        raise ValueError(f"s2 and z2 must both be [N, G], got {tuple(s2.shape)} and {tuple(z2.shape)}")
    if s2.dtype != torch.uint8 or z2.dtype != torch.uint8:
        raise TypeError(f"s2 and z2 must have dtype uint8, got {s2.dtype} and {z2.dtype}")
    n, groups = s2.shape
    tiles = (n + SCALE_TILE_ROWS - 1) // SCALE_TILE_ROWS
    pad = tiles * SCALE_TILE_ROWS - n
    s = s2.to(torch.int32)
    zs = ZS_BIAS - z2.to(torch.int32) * s
    s = torch.nn.functional.pad(s, (0, 0, 0, pad), value=0)
    zs = torch.nn.functional.pad(zs, (0, 0, 0, pad), value=ZS_BIAS)
    planes = torch.stack((s, zs), dim=1)  # [tiles * 128, kind (s2, b), G]
    # rows = (tile, 16-row block, upper half of the block, row in the half)
    planes = planes.view(tiles, 8, 2, 8, 2, groups).permute(0, 5, 1, 3, 4, 2)  # [tiles, G, block, row, kind, half]
    return planes.reshape(tiles, groups, 2 * SCALE_TILE_ROWS).to(torch.uint8).contiguous()


def unpack_scales(packed: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_scales` for ``n`` weight rows: ``(s2, z2)``, each ``uint8 [n, G]``."""
    tiles, groups, _ = packed.shape
    planes = packed.view(tiles, groups, 8, 8, 2, 2).permute(0, 2, 5, 3, 4, 1).reshape(-1, 2, groups)[:n]
    s = planes[:, 0].to(torch.int32)
    z = (ZS_BIAS - planes[:, 1].to(torch.int32)) // s.clamp(min=1)
    return s.to(torch.uint8), z.to(torch.uint8)
