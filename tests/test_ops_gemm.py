"""Weight formats, packing and the reference W4A8 GEMMs."""
from __future__ import annotations

import pytest
import torch

from qoq_torch import ops


def _weight(n, k, gen, outliers=True):
    w = torch.randn(n, k, generator=gen) * 0.05
    if outliers:
        w[:, :: max(1, k // 7)] *= 8  # a few large input channels, as real LLM weights have
    return w


@pytest.mark.parametrize("n,k,g", [(16, 128, 128), (48, 256, 128), (32, 256, 64), (16, 384, 32)])
def test_progressive_format_round_trip(n, k, g, gen):
    pg = ops.quantize_weight_per_group(_weight(n, k, gen), group_size=g)
    assert pg.w4.dtype == torch.uint8 and int(pg.w4.max()) <= 15
    assert pg.s2.shape == (n, k // g) and pg.z2.shape == (n, k // g)
    assert int(pg.s2.min()) >= 1 and int(pg.s2.max()) <= 16 and int(pg.z2.max()) <= 15
    w8 = pg.int8_weight()
    # Every reconstructed INT8 weight fits INT8, and (w4 - z) * s2 is exactly that integer.
    assert int(w8.min()) >= -128 and int(w8.max()) <= 127
    exact = (pg.w4.double().view(n, -1, g) - pg.z2.double()[..., None]) * pg.s2.double()[..., None]
    assert torch.equal(exact.view(n, k), w8.double())
    # Level 1 alone is close to the float weight; level 2 adds at most half a level-2 step.
    w8_level1, s1 = ops.quantize_weight_int8(_weight(n, k, torch.Generator().manual_seed(1234)))
    assert int(w8_level1.abs().max()) <= ops.PROTECTIVE_RANGE


def test_level2_error_bound(gen):
    w = _weight(64, 256, gen)
    pg = ops.quantize_weight_per_group(w, 128)
    w8, _ = ops.quantize_weight_int8(w)
    step = pg.s2.float().repeat_interleave(128, dim=1)
    assert bool(((pg.int8_weight().float() - w8.float()).abs() <= step / 2).all())


def test_per_channel_format(gen):
    w = _weight(32, 256, gen)
    pc = ops.quantize_weight_per_channel(w)
    assert int(pc.w4.max()) <= 15 and int(pc.zero.max()) <= 15
    err = (pc.dequantize() - w).abs()
    assert bool((err <= pc.scale.float()[:, None] / 2 * 1.01 + 1e-6).all())


def test_clip_ratio_shrinks_range(gen):
    w = _weight(16, 128, gen)
    full = ops.quantize_weight_per_group(w, 128)
    clipped = ops.quantize_weight_per_group(w, 128, clip_ratio=torch.full((16,), 0.8))
    assert bool((clipped.s1.float() < full.s1.float()).all())
    with pytest.raises(ValueError, match="clip_ratio"):
        ops.quantize_weight_per_group(w, 128, clip_ratio=1.5)


def test_pack_unpack_exact(gen):
    w4 = torch.randint(0, 16, (48, 256), generator=gen, dtype=torch.uint8)
    packed = ops.pack_weights(w4)
    assert packed.shape == (48, 128) and packed.dtype == torch.uint8
    assert torch.equal(ops.unpack_weights(packed), w4)


@pytest.mark.parametrize("n,groups", [(16, 3), (128, 32), (200, 7), (300, 112)])
def test_pack_scales_layout_and_inverse(n, groups, gen):
    """Per 128-row weight tile and group, row r's s2 at byte 32 (r // 16) + 4 (r % 8) + (r % 16) // 8 and its
    240 - z2 * s2 two bytes on (rows r and r + 8 of a 16-row block share one 4-byte word); rows past N zero weights."""
    from qoq_torch.ops.packing import unpack_scales

    s2 = torch.randint(1, 17, (n, groups), generator=gen, dtype=torch.uint8)
    z2 = torch.randint(0, 16, (n, groups), generator=gen, dtype=torch.uint8)
    packed = ops.pack_scales(s2, z2)
    tiles = (n + 127) // 128
    assert packed.shape == (tiles, groups, 256) and packed.dtype == torch.uint8 and packed.is_contiguous()
    rows = torch.arange(n)
    j = torch.randint(0, groups, (n,), generator=gen)
    r = rows % 128
    s_byte = 32 * (r // 16) + 4 * (r % 8) + (r % 16) // 8
    assert torch.equal(packed[rows // 128, j, s_byte], s2[rows, j])
    assert torch.equal(packed[rows // 128, j, s_byte + 2].long(), 240 - z2[rows, j].long() * s2[rows, j].long())
    pad_rows = torch.arange(n, tiles * 128) % 128
    if len(pad_rows):
        pad_s = 32 * (pad_rows // 16) + 4 * (pad_rows % 8) + (pad_rows % 16) // 8
        assert int(packed[-1][:, pad_s].max()) == 0 and int(packed[-1][:, pad_s + 2].min()) == 240
    s_back, z_back = unpack_scales(packed, n)
    assert torch.equal(s_back, s2) and torch.equal(z_back, z2)
    torch.library.opcheck(torch.ops.qoq.pack_scales.default, (s2, z2))
    with pytest.raises(ValueError, match="z2"):
        ops.pack_scales(s2, z2[:, :1].contiguous())


def test_gemm_checks_packed_scales_and_ignores_their_values_on_cpu(gen):
    """The reference takes packed_scales (the CUDA kernels' copy) but computes from s2 / z2; a wrong shape,
    dtype or a missing tile is rejected by name."""
    n, k, g, m = 200, 256, 64, 3
    _, x_q, x_s, _ = _quantized_activation(m, k, gen)
    pg = ops.quantize_weight_per_group(_weight(n, k, gen), g)
    packed = ops.pack_scales(pg.s2, pg.z2)
    want = ops.w4a8_gemm_per_group(x_q, x_s, pg.packed(), pg.s2, pg.z2, pg.s1, None, g, torch.float16)
    got = ops.w4a8_gemm_per_group(x_q, x_s, pg.packed(), pg.s2, pg.z2, pg.s1, None, g, torch.float16, None, packed)
    assert torch.equal(got, want)
    for bad in (packed[:1].contiguous(), packed.int(), packed[:, :, :128].contiguous()):
        with pytest.raises((ValueError, TypeError), match="packed_scales"):
            ops.w4a8_gemm_per_group(x_q, x_s, pg.packed(), pg.s2, pg.z2, pg.s1, None, g, torch.float16, None, bad)


def test_gemm_per_group_checks_x_sum(gen):
    """x_sum (x_q's row sums, what the CUDA kernels take instead of summing) is checked by name and never changes
    the CPU result; the module passes the quantize op's."""
    n, k, g, m = 64, 256, 128, 3
    _, x_q, x_s, x_sum = _quantized_activation(m, k, gen)
    assert torch.equal(x_sum, x_q.sum(1, dtype=torch.int32))
    pg = ops.quantize_weight_per_group(_weight(n, k, gen), g)
    want = ops.w4a8_gemm_per_group(x_q, x_s, pg.packed(), pg.s2, pg.z2, pg.s1, None, g, torch.float16)
    got = ops.w4a8_gemm_per_group(x_q, x_s, pg.packed(), pg.s2, pg.z2, pg.s1, None, g, torch.float16, x_sum=x_sum)
    assert torch.equal(got, want)
    for bad, err in ((x_sum[:2], ValueError), (x_sum.long(), TypeError), (x_sum.view(m, 1), ValueError)):
        with pytest.raises(err, match="x_sum"):
            ops.w4a8_gemm_per_group(x_q, x_s, pg.packed(), pg.s2, pg.z2, pg.s1, None, g, torch.float16, x_sum=bad)


def _quantized_activation(m, k, gen):
    x = torch.randn(m, k, generator=gen).half()
    return x, *ops.quantize_per_token(x)


@pytest.mark.parametrize("m", [1, 5, 16, 33])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemm_per_group_matches_float64(m, out_dtype, with_bias, gen):
    n, k, g = 48, 256, 128
    _, x_q, x_s, _ = _quantized_activation(m, k, gen)
    pg = ops.quantize_weight_per_group(_weight(n, k, gen), g)
    bias = torch.randn(n, generator=gen).half() if with_bias else None
    y = ops.w4a8_gemm_per_group(x_q, x_s, pg.packed(), pg.s2, pg.z2, pg.s1, bias, g, out_dtype)
    assert y.dtype == out_dtype and y.shape == (m, n)
    # float64 from the dequantized operands: the same number up to the final rounding of the output.
    acc = x_q.double() @ pg.int8_weight().double().t()
    ref = acc * x_s.double()[:, None] * pg.s1.double()[None, :]
    if bias is not None:
        ref = ref + bias.double()
    torch.testing.assert_close(y.double(), ref.to(out_dtype).double(), rtol=2 ** -7, atol=1e-3)
    # And the float32 epilogue of docs/formats.md exactly.
    exact = (acc.float() * x_s[:, None]) * pg.s1.float()[None, :]
    if bias is not None:
        exact = exact + bias.float()
    assert torch.equal(y, exact.to(out_dtype))


@pytest.mark.parametrize("m", [1, 7, 32])
def test_gemm_per_channel_matches_float64(m, gen):
    n, k = 32, 256
    _, x_q, x_s, x_sum = _quantized_activation(m, k, gen)
    pc = ops.quantize_weight_per_channel(_weight(n, k, gen))
    y = ops.w4a8_gemm_per_channel(x_q, x_s, x_sum, pc.packed(), pc.scale, pc.zero, None, torch.float16)
    deq = (pc.w4.double() - pc.zero.double()[:, None])
    acc = x_q.double() @ deq.t()
    exact = (acc.float() * x_s[:, None]) * pc.scale.float()[None, :]
    assert torch.equal(y, exact.half())


def test_gemm_approximates_float_linear(gen):
    m, n, k = 8, 64, 512
    x, x_q, x_s, _ = _quantized_activation(m, k, gen)
    w = _weight(n, k, gen, outliers=False)
    pg = ops.quantize_weight_per_group(w, 128)
    y = ops.w4a8_gemm_per_group(x_q, x_s, pg.packed(), pg.s2, pg.z2, pg.s1, None, 128, torch.float16)
    ref = x.float() @ w.t()
    assert float((y.float() - ref).norm() / ref.norm()) < 0.15


@pytest.mark.parametrize("m", [1, 13])
def test_opcheck_gemms(m, gen):
    n, k = 32, 256
    _, x_q, x_s, x_sum = _quantized_activation(m, k, gen)
    pg = ops.quantize_weight_per_group(_weight(n, k, gen), 128)
    pc = ops.quantize_weight_per_channel(_weight(n, k, gen))
    bias = torch.randn(n, generator=gen).half()
    torch.library.opcheck(torch.ops.qoq.w4a8_gemm_per_group.default,
                          (x_q, x_s, pg.packed(), pg.s2, pg.z2, pg.s1, bias, 128, torch.float16))
    torch.library.opcheck(torch.ops.qoq.w4a8_gemm_per_channel.default,
                          (x_q, x_s, x_sum, pc.packed(), pc.scale, pc.zero, None, torch.bfloat16))
    torch.library.opcheck(torch.ops.qoq.pack_weights.default, (pg.w4,))
    torch.library.opcheck(torch.ops.qoq.unpack_weights.default, (pg.packed(),))
    residual = torch.randn(m, n, generator=gen).bfloat16()
    torch.library.opcheck(torch.ops.qoq.w4a8_gemm_per_group.default,
                          (x_q, x_s, pg.packed(), pg.s2, pg.z2, pg.s1, None, 128, torch.bfloat16, residual))
    torch.library.opcheck(torch.ops.qoq.w4a8_gemm_per_channel.default,
                          (x_q, x_s, x_sum, pc.packed(), pc.scale, pc.zero, None, torch.bfloat16, residual))
    torch.library.opcheck(torch.ops.qoq.w4a8_gemm_per_group.default,
                          (x_q, x_s, pg.packed(), pg.s2, pg.z2, pg.s1, None, 128, torch.bfloat16, residual,
                           ops.pack_scales(pg.s2, pg.z2), x_sum))


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_gemm_residual_is_the_decoders_add(out_dtype, gen):
    n, k, m = 48, 256, 5
    _, x_q, x_s, x_sum = _quantized_activation(m, k, gen)
    pg = ops.quantize_weight_per_group(_weight(n, k, gen), 128)
    pc = ops.quantize_weight_per_channel(_weight(n, k, gen))
    residual = (8 * torch.randn(m, n, generator=gen)).to(out_dtype)
    for gemm in (lambda r: ops.w4a8_gemm_per_group(x_q, x_s, pg.packed(), pg.s2, pg.z2, pg.s1, None, 128, out_dtype,
                                                   residual=r),
                 lambda r: ops.w4a8_gemm_per_channel(x_q, x_s, x_sum, pc.packed(), pc.scale, pc.zero, None, out_dtype,
                                                     residual=r)):
        y = gemm(None)
        fused = gemm(residual)
        assert fused.dtype == out_dtype and torch.equal(fused, residual + y)  # y rounded, then the add rounded
        assert not torch.equal(fused, y)


def test_gemm_bad_residual(gen):
    n, k = 32, 256
    _, x_q, x_s, _ = _quantized_activation(4, k, gen)
    pg = ops.quantize_weight_per_group(_weight(n, k, gen), 128)
    for residual, err, match in ((torch.zeros(4, n + 16).half(), ValueError, "residual must have shape"),
                                 (torch.zeros(4, n).bfloat16(), TypeError, "residual must have dtype"),
                                 (torch.zeros(n, 4).half().t(), ValueError, "residual must be contiguous")):
        with pytest.raises(err, match=match):
            ops.w4a8_gemm_per_group(x_q, x_s, pg.packed(), pg.s2, pg.z2, pg.s1, None, 128, torch.float16,
                                    residual=residual)


def test_gemm_bad_input(gen):
    n, k = 32, 256
    _, x_q, x_s, x_sum = _quantized_activation(4, k, gen)
    pg = ops.quantize_weight_per_group(_weight(n, k, gen), 128)
    args = dict(x_q=x_q, x_s=x_s, qweight=pg.packed(), s2=pg.s2, z2=pg.z2, s1=pg.s1, bias=None, group_size=128,
                out_dtype=torch.float16)
    cases = [
        (dict(x_q=x_q.float()), TypeError, "x_q must have dtype"),
        (dict(x_s=x_s.half()), TypeError, "x_s must have dtype"),
        (dict(x_s=x_s[:3]), ValueError, "x_s must have shape"),
        (dict(group_size=96), ValueError, "group_size=96"),
        (dict(qweight=pg.packed()[:, :64].contiguous()), ValueError, "qweight must have shape"),
        (dict(s2=pg.s2[:, :1]), ValueError, "s2 must have shape"),
        (dict(s1=pg.s1.float()), TypeError, "s1 must have dtype"),
        (dict(bias=torch.zeros(n + 1)), ValueError, "bias must have shape"),
        (dict(out_dtype=torch.float32), TypeError, "out_dtype"),
        (dict(x_q=x_q[:0], x_s=x_s[:0]), ValueError, "x_q must be non-empty"),
        (dict(qweight=torch.zeros(n, 256, dtype=torch.uint8)[:, ::2]), ValueError, "qweight must be contiguous"),
    ]
    for change, err, match in cases:
        with pytest.raises(err, match=match):
            ops.w4a8_gemm_per_group(**{**args, **change})
    with pytest.raises(ValueError, match="x_sum must have shape"):
        pc = ops.quantize_weight_per_channel(_weight(n, k, gen))
        ops.w4a8_gemm_per_channel(x_q, x_s, x_sum[:2], pc.packed(), pc.scale, pc.zero, None, torch.float16)


def test_weight_quantization_bad_input():
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        ops.quantize_weight_per_group(torch.randn(16, 200), 128)
    with pytest.raises(ValueError, match="non-finite"):
        w = torch.randn(16, 128)
        w[3, 4] = float("inf")
        ops.quantize_weight_per_group(w, 128)
    with pytest.raises(ValueError, match="2-D floating-point"):
        ops.quantize_weight_per_channel(torch.randint(0, 3, (4, 4)))
