"""The `qoq` op library: schemas, fake (meta) impls and the CPU reference impls.

CUDA impls come from the extension `qoq_torch._C` (TORCH_LIBRARY_IMPL(qoq, CUDA, ...)); see `_loader`.
"""
from __future__ import annotations

import torch

from . import checks, reference
from .packing import pack_int4, pack_scales, unpack_int4

LIB = torch.library.Library("qoq", "DEF")

SCHEMAS = {
    "quantize_per_token": "quantize_per_token(Tensor x) -> (Tensor, Tensor, Tensor)",
    "rmsnorm_quantize": "rmsnorm_quantize(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)",
    "add_rmsnorm_quantize": (
        "add_rmsnorm_quantize(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
    "silu_mul_quantize": "silu_mul_quantize(Tensor gate_up) -> (Tensor, Tensor, Tensor)",
    "w4a8_gemm_per_group": (
        "w4a8_gemm_per_group(Tensor x_q, Tensor x_s, Tensor qweight, Tensor s2, Tensor z2, Tensor s1, "
        "Tensor? bias, int group_size, ScalarType out_dtype, Tensor? residual=None, "
        "Tensor? packed_scales=None, Tensor? x_sum=None) -> Tensor"
    ),
    "w4a8_gemm_per_channel": (
        "w4a8_gemm_per_channel(Tensor x_q, Tensor x_s, Tensor x_sum, Tensor qweight, Tensor scale, "
        "Tensor zero, Tensor? bias, ScalarType out_dtype, Tensor? residual=None) -> Tensor"
    ),
    "pack_weights": "pack_weights(Tensor w4) -> Tensor",
    "unpack_weights": "unpack_weights(Tensor packed) -> Tensor",
    "pack_scales": "pack_scales(Tensor s2, Tensor z2) -> Tensor",
    "kv4_append": (
        "kv4_append(Tensor(a!) k_cache, Tensor(b!) k_params, Tensor(c!) v_cache, Tensor(d!) v_params, "
        "Tensor k, Tensor v, Tensor cache_position) -> ()"
    ),
    "rope_kv4_append": (
        "rope_kv4_append(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) k_params, "
        "Tensor(c!) v_cache, Tensor(d!) v_params, Tensor cache_position, int num_q_heads) -> Tensor"
    ),
    "kv4_decode_attention": (
        "kv4_decode_attention(Tensor q, Tensor k_cache, Tensor k_params, Tensor v_cache, Tensor v_params, "
        "Tensor kv_lens, Tensor kv_starts, float sm_scale) -> Tensor"
    ),
    "kv4_decode_attention_quantize": (
        "kv4_decode_attention_quantize(Tensor q, Tensor k_cache, Tensor k_params, Tensor v_cache, "
        "Tensor v_params, Tensor kv_lens, Tensor kv_starts, float sm_scale) -> (Tensor, Tensor, Tensor)"
    ),
}
# Ops that take a decode step's small per-step tensors (RoPE tables, slot positions, lengths): every layer passes the
# same ones, and under inductor's default layout constraint (exact strides) each consuming op got its own copy of
# them, a kernel per input and layer in a compiled decode step. These ops accept any layout inductor gives them
# (their impls check contiguity where they need it, and inductor lays out a fresh buffer contiguously).
FLEXIBLE_LAYOUT = ("kv4_append", "rope_kv4_append", "kv4_decode_attention", "kv4_decode_attention_quantize")
for _name, _schema in SCHEMAS.items():
    LIB.define(_schema, tags=(torch.Tag.flexible_layout,) if _name in FLEXIBLE_LAYOUT else ())


# ---- shape/dtype validation + output allocation, shared by fake and reference impls -------------------

def _quant_outputs(x: torch.Tensor, k: int):
    m = x.shape[0]
    return (x.new_empty((m, k), dtype=torch.int8), x.new_empty((m,), dtype=torch.float32),
            x.new_empty((m,), dtype=torch.int32))


def _quantize_per_token_fake(x):
    checks.check_activation("x", x)
    return _quant_outputs(x, x.shape[1])


def _rmsnorm_quantize_fake(x, weight, eps):
    checks.check_activation("x", x, checks.FLOAT16_TYPES)
    checks.check("weight", weight, dtypes=(x.dtype,), shape=(x.shape[1],), device=x.device, contiguous=True)
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    return _quant_outputs(x, x.shape[1])


def _add_rmsnorm_quantize_fake(x, residual, weight, eps):
    quantized = _rmsnorm_quantize_fake(x, weight, eps)
    checks.check("residual", residual, dtypes=(x.dtype,), shape=tuple(x.shape), device=x.device, contiguous=True)
    return (torch.empty_like(x),) + quantized


def _silu_mul_quantize_fake(gate_up):
    checks.check_activation("gate_up", gate_up, checks.FLOAT16_TYPES)
    if gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must have an even number of columns [M, 2I], got {tuple(gate_up.shape)}")
    return _quant_outputs(gate_up, gate_up.shape[1] // 2)


def _check_residual(residual, x_q, m, n, out_dtype):
    if residual is not None:
        checks.check("residual", residual, dtypes=(out_dtype,), shape=(m, n), device=x_q.device, contiguous=True)


def _gemm_per_group_fake(x_q, x_s, qweight, s2, z2, s1, bias, group_size, out_dtype, residual=None,
                         packed_scales=None, x_sum=None):
    m, n = checks.check_gemm_per_group(x_q, x_s, qweight, s2, z2, s1, bias, group_size, out_dtype, packed_scales,
                                       x_sum)
    _check_residual(residual, x_q, m, n, out_dtype)
    return x_q.new_empty((m, n), dtype=out_dtype)


def _gemm_per_channel_fake(x_q, x_s, x_sum, qweight, scale, zero, bias, out_dtype, residual=None):
    m, n = checks.check_gemm_per_channel(x_q, x_s, x_sum, qweight, scale, zero, bias, out_dtype)
    _check_residual(residual, x_q, m, n, out_dtype)
    return x_q.new_empty((m, n), dtype=out_dtype)


def _check_w4(w4):
    checks.check("w4", w4, dtypes=(torch.uint8,), dim=2)
    if w4.shape[1] % 2:
        raise ValueError(f"w4 must have an even number of columns K, got {tuple(w4.shape)}")


def _pack_fake(w4):
    _check_w4(w4)
    return w4.new_empty((w4.shape[0], w4.shape[1] // 2))


def _unpack_fake(packed):
    checks.check("packed", packed, dtypes=(torch.uint8,), dim=2)
    return packed.new_empty((packed.shape[0], packed.shape[1] * 2))


def _pack_scales_fake(s2, z2):
    n, groups = checks.check_group_scales(s2, z2)
    return s2.new_empty(checks.packed_scales_shape(n, groups))


def _kv4_append_fake(k_cache, k_params, v_cache, v_params, k, v, cache_position):
    checks.check_kv4_append(k_cache, k_params, v_cache, v_params, k, v, cache_position)


def _rope_kv4_append_fake(qkv, cos, sin, k_cache, k_params, v_cache, v_params, cache_position, num_q_heads):
    b, s, h_q, d = checks.check_rope_kv4_append(qkv, cos, sin, k_cache, k_params, v_cache, v_params,
                                                cache_position, num_q_heads)
    return qkv.new_empty((b, h_q, s, d))


def _kv4_decode_fake(q, k_cache, k_params, v_cache, v_params, kv_lens, kv_starts, sm_scale):
    checks.check_kv4_decode(q, k_cache, k_params, v_cache, v_params, kv_lens, kv_starts)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _kv4_decode_quantize_fake(q, k_cache, k_params, v_cache, v_params, kv_lens, kv_starts, sm_scale):
    checks.check_kv4_decode(q, k_cache, k_params, v_cache, v_params, kv_lens, kv_starts)
    b, h_q, s_q, d = q.shape
    return _quant_outputs(q.new_empty((b * s_q, 0)), h_q * d)


FAKES = {
    "quantize_per_token": _quantize_per_token_fake,
    "rmsnorm_quantize": _rmsnorm_quantize_fake,
    "add_rmsnorm_quantize": _add_rmsnorm_quantize_fake,
    "silu_mul_quantize": _silu_mul_quantize_fake,
    "w4a8_gemm_per_group": _gemm_per_group_fake,
    "w4a8_gemm_per_channel": _gemm_per_channel_fake,
    "pack_weights": _pack_fake,
    "unpack_weights": _unpack_fake,
    "pack_scales": _pack_scales_fake,
    "kv4_append": _kv4_append_fake,
    "rope_kv4_append": _rope_kv4_append_fake,
    "kv4_decode_attention": _kv4_decode_fake,
    "kv4_decode_attention_quantize": _kv4_decode_quantize_fake,
}


def _checked(name, ref_fn, check_values=None):
    """Reference impl that runs the same validation as the fake impl first (and `check_values`, if given)."""
    fake = FAKES[name]

    def impl(*args):
        fake(*args)
        if check_values is not None:
            check_values(*args)
        return ref_fn(*args)

    impl.__name__ = f"{name}_reference"
    return impl


def _pack_impl(w4):
    _check_w4(w4)
    return pack_int4(w4)


def _unpack_impl(packed):
    _unpack_fake(packed)
    return unpack_int4(packed)


def _pack_scales_impl(s2, z2):
    checks.check_group_scales(s2, z2)
    return pack_scales(s2, z2)


def _rope_kv4_append_positions(qkv, cos, sin, k_cache, k_params, v_cache, v_params, cache_position, num_q_heads):
    checks.check_positions_in_range(cache_position, k_cache.shape[2])


REFERENCES = {
    "quantize_per_token": _checked("quantize_per_token", reference.quantize_per_token),
    "rmsnorm_quantize": _checked("rmsnorm_quantize", reference.rmsnorm_quantize),
    "add_rmsnorm_quantize": _checked("add_rmsnorm_quantize", reference.add_rmsnorm_quantize),
    "silu_mul_quantize": _checked("silu_mul_quantize", reference.silu_mul_quantize),
    "w4a8_gemm_per_group": _checked("w4a8_gemm_per_group", reference.w4a8_gemm_per_group),
    "w4a8_gemm_per_channel": _checked("w4a8_gemm_per_channel", reference.w4a8_gemm_per_channel),
    "kv4_append": _checked("kv4_append", reference.kv4_append),
    "rope_kv4_append": _checked("rope_kv4_append", reference.rope_kv4_append, _rope_kv4_append_positions),
    "kv4_decode_attention": _checked("kv4_decode_attention", reference.kv4_decode_attention),
    "kv4_decode_attention_quantize": _checked("kv4_decode_attention_quantize",
                                              reference.kv4_decode_attention_quantize),
}
# The device-agnostic ops (pure tensor code) serve every backend.
DEVICE_AGNOSTIC = {"pack_weights": _pack_impl, "unpack_weights": _unpack_impl, "pack_scales": _pack_scales_impl}

for _name, _fake in FAKES.items():
    torch.library.register_fake(f"qoq::{_name}", _fake, lib=LIB)
for _name, _impl in REFERENCES.items():
    LIB.impl(_name, _impl, "CPU")
for _name, _impl in DEVICE_AGNOSTIC.items():
    LIB.impl(_name, _impl, "CompositeExplicitAutograd")
