"""Argument checks shared by the fake (meta) and reference impls: clear errors that name the argument.

Only shapes, dtypes and devices are checked (never values), so the checks also run on fake tensors; the one value
check, `check_positions_in_range`, is for the CPU reference impls only.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT16_TYPES = (torch.float16, torch.bfloat16)
ACTIVATION_TYPES = (torch.float16, torch.bfloat16, torch.float32)


def check(name: str, t: torch.Tensor, *, dtypes: Sequence[torch.dtype] | None = None, dim: int | None = None,
          shape: Sequence[int | None] | None = None, device: torch.device | None = None,
          contiguous: bool = False, nonempty: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and t.shape[i] != s for i, s in enumerate(shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if nonempty and t.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")


def check_activation(name: str, x: torch.Tensor, dtypes=ACTIVATION_TYPES) -> None:
    check(name, x, dtypes=dtypes, dim=2, contiguous=True)


def check_quantized_activation(x_q, x_s, x_sum=None) -> tuple[int, int]:
    check("x_q", x_q, dtypes=(torch.int8,), dim=2, contiguous=True)
    m, k = x_q.shape
    check("x_s", x_s, dtypes=(torch.float32,), shape=(m,), device=x_q.device, contiguous=True)
    if x_sum is not None:
        check("x_sum", x_sum, dtypes=(torch.int32,), shape=(m,), device=x_q.device, contiguous=True)
    return m, k


def check_packed_weight(qweight: torch.Tensor, k: int, device: torch.device) -> int:
    check("qweight", qweight, dtypes=(torch.uint8,), dim=2, device=device, contiguous=True)
    n = qweight.shape[0]
    if qweight.shape[1] * 2 != k:
        raise ValueError(f"qweight must have shape [N, K/2] = [*, {k // 2}] for x_q's K={k}, got {tuple(qweight.shape)}")
    return n


def check_bias_and_dtype(bias, n: int, device, out_dtype) -> None:
    if bias is not None:
        check("bias", bias, dtypes=ACTIVATION_TYPES, shape=(n,), device=device, contiguous=True)
    if out_dtype not in FLOAT16_TYPES:
        raise TypeError(f"out_dtype must be torch.float16 or torch.bfloat16, got {out_dtype}")


def packed_scales_shape(n: int, groups: int) -> tuple[int, int, int]:
    """Shape of `pack_scales`'s output for ``n`` weight rows and ``groups`` groups a row."""
    return ((n + 127) // 128, groups, 256)


def check_group_scales(s2, z2) -> tuple[int, int]:
    check("s2", s2, dtypes=(torch.uint8,), dim=2)
    check("z2", z2, dtypes=(torch.uint8,), shape=tuple(s2.shape), device=s2.device)
    return s2.shape[0], s2.shape[1]


def check_gemm_per_group(x_q, x_s, qweight, s2, z2, s1, bias, group_size, out_dtype,
                         packed_scales=None, x_sum=None) -> tuple[int, int]:
    m, k = check_quantized_activation(x_q, x_s, x_sum)
    if group_size <= 0 or k % group_size != 0:
        raise ValueError(f"group_size={group_size} must be positive and divide K={k}")
    n = check_packed_weight(qweight, k, x_q.device)
    for name, t in (("s2", s2), ("z2", z2)):
        check(name, t, dtypes=(torch.uint8,), shape=(n, k // group_size), device=x_q.device, contiguous=True)
    check("s1", s1, dtypes=(torch.float16,), shape=(n,), device=x_q.device, contiguous=True)
    check_bias_and_dtype(bias, n, x_q.device, out_dtype)
    if packed_scales is not None:
        check("packed_scales", packed_scales, dtypes=(torch.uint8,), shape=packed_scales_shape(n, k // group_size),
              device=x_q.device, contiguous=True)
    return m, n


def check_gemm_per_channel(x_q, x_s, x_sum, qweight, scale, zero, bias, out_dtype) -> tuple[int, int]:
    m, k = check_quantized_activation(x_q, x_s, x_sum)
    n = check_packed_weight(qweight, k, x_q.device)
    check("scale", scale, dtypes=(torch.float16,), shape=(n,), device=x_q.device, contiguous=True)
    check("zero", zero, dtypes=(torch.uint8,), shape=(n,), device=x_q.device, contiguous=True)
    check_bias_and_dtype(bias, n, x_q.device, out_dtype)
    return m, n


def check_kv_cache(prefix: str, cache, params, device) -> tuple[int, int, int, int]:
    check(f"{prefix}_cache", cache, dtypes=(torch.uint8,), dim=4, device=device, contiguous=True)
    b, h, t, half_d = cache.shape
    check(f"{prefix}_params", params, dtypes=(torch.float16,), shape=(b, h, t, 2), device=device, contiguous=True)
    return b, h, t, 2 * half_d


def check_kv4_append(k_cache, k_params, v_cache, v_params, k, v, cache_position) -> None:
    check("k", k, dtypes=FLOAT16_TYPES, dim=4)
    b, h, s, d = k.shape
    check("v", v, dtypes=(k.dtype,), shape=(b, h, s, d), device=k.device)
    for prefix, cache, params in (("k", k_cache, k_params), ("v", v_cache, v_params)):
        cb, ch, _, cd = check_kv_cache(prefix, cache, params, k.device)
        if (cb, ch, cd) != (b, h, d):
            raise ValueError(f"{prefix}_cache is for [B={cb}, H={ch}, D={cd}] but {prefix} has [B={b}, H={h}, D={d}]")
    if d % 2:
        raise ValueError(f"head_dim must be even, got {d}")
    check("cache_position", cache_position, dtypes=(torch.int64,), shape=(s,), device=k.device, contiguous=True)


def check_kv4_decode(q, k_cache, k_params, v_cache, v_params, kv_lens, kv_starts) -> None:
    check("q", q, dtypes=FLOAT16_TYPES, dim=4)
    b, h_q, _, d = q.shape
    kb, h_kv, t, kd = check_kv_cache("k", k_cache, k_params, q.device)
    shape_v = check_kv_cache("v", v_cache, v_params, q.device)
    if (kb, kd) != (b, d) or shape_v != (kb, h_kv, t, kd):
        raise ValueError(f"k_cache/v_cache shapes {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not match q {tuple(q.shape)}")
    if h_q % h_kv:
        raise ValueError(f"query heads ({h_q}) must be a multiple of KV heads ({h_kv})")
    check("kv_lens", kv_lens, dtypes=(torch.int32,), shape=(b,), device=q.device, contiguous=True)
    check("kv_starts", kv_starts, dtypes=(torch.int32,), shape=(b,), device=q.device, contiguous=True)


def check_rope_kv4_append(qkv, cos, sin, k_cache, k_params, v_cache, v_params, cache_position,
                          num_q_heads: int) -> tuple[int, int, int, int]:
    """Checks of `rope_kv4_append`; returns ``(B, S, H_q, D)``."""
    check("qkv", qkv, dtypes=FLOAT16_TYPES, dim=3)
    if qkv.stride(2) != 1:
        raise ValueError(f"qkv must have contiguous rows (stride 1 along the last dim), got strides {qkv.stride()}")
    b, s, width = qkv.shape
    kb, h_kv, _, d = check_kv_cache("k", k_cache, k_params, qkv.device)
    if check_kv_cache("v", v_cache, v_params, qkv.device) != (kb, h_kv, k_cache.shape[2], d):
        raise ValueError(f"v_cache {tuple(v_cache.shape)} must have k_cache's shape {tuple(k_cache.shape)}")
    if kb != b:
        raise ValueError(f"k_cache holds B={kb} rows but qkv has B={b}")
    if not isinstance(num_q_heads, int) or num_q_heads <= 0 or num_q_heads % h_kv:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a positive multiple of the KV heads ({h_kv})")
    if width != (num_q_heads + 2 * h_kv) * d:
        raise ValueError(f"qkv must have (H_q + 2 H_kv) * D = ({num_q_heads} + 2*{h_kv}) * {d} = "
                         f"{(num_q_heads + 2 * h_kv) * d} columns, got {tuple(qkv.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        check(name, t, dtypes=(qkv.dtype,), dim=3, device=qkv.device)
        if t.shape[0] not in (1, b) or tuple(t.shape[1:]) != (s, d):
            raise ValueError(f"{name} must have shape [B or 1, S, D] = [{b} or 1, {s}, {d}], got {tuple(t.shape)}")
    check("cache_position", cache_position, dtypes=(torch.int64,), shape=(s,), device=qkv.device, contiguous=True)
    return b, s, num_q_heads, d


def check_positions_in_range(cache_position: torch.Tensor, slots: int) -> None:
    """Value check of the CPU reference impls: every slot in ``[0, slots)`` (the CUDA kernels skip the others)."""
    if cache_position.numel() == 0:
        return
    lo, hi = int(cache_position.min()), int(cache_position.max())
    if lo < 0 or hi >= slots:
        raise IndexError(f"cache_position values must lie in [0, {slots}) (the cache's slots), got {lo}..{hi}")
