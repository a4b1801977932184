"""CUDA activation-quantization kernels against the CPU reference ops.

quantize_per_token is bit-exact. rmsnorm_quantize / silu_mul_quantize reduce mean(x^2) in another order
or call another exp (docs/formats.md), so a few x_q may differ by exactly 1 and x_s by a few ulps.
"""
from __future__ import annotations

import pytest
import torch

import qoq_torch.ops as ops

pytestmark = pytest.mark.cuda

QUANT_OPS = ("quantize_per_token", "rmsnorm_quantize", "silu_mul_quantize")


def _kernels_built() -> bool:
    return torch.cuda.is_available() and set(QUANT_OPS) <= set(ops.extension_status()["cuda_ops"])


needs_kernel = pytest.mark.skipif(not _kernels_built(), reason="qoq_torch._C quant kernels not built")

# (M, K): 16-byte vector path, K not a multiple of 8 (scalar path), one row, long rows, many rows.
SHAPES = ((1, 4096), (7, 64), (33, 200), (5, 13), (64, 14336), (1000, 256))


def random_rows(m: int, k: int, dtype, gen: torch.Generator) -> torch.Tensor:
    """Rows with different magnitudes and a few outliers, like transformer activations (never zero)."""
    x = torch.randn(m, k, generator=gen) * (torch.rand(m, 1, generator=gen) * 4 + 0.05)
    outliers = torch.rand(m, k, generator=gen) < 0.01
    return torch.where(outliers, x * 20, x).to(dtype)


def assert_close_quantization(got, ref, min_identical: float = 0.999) -> None:
    """x_q differs from the reference by at most 1 on a small fraction, x_s by a few ulps, x_sum consistent."""
    x_q, x_s, x_sum = got
    r_q, r_s, _ = ref
    diff = (x_q.cpu().int() - r_q.int()).abs()
    assert int(diff.max()) <= 1, f"x_q differs by {int(diff.max())}"
    identical = float((diff == 0).float().mean())
    assert identical >= min_identical, f"only {identical:.5f} of x_q identical"
    # mean(x^2) summed in another order: r, hence every y and amax, moves by a few ulps at K ~ 10^4.
    torch.testing.assert_close(x_s.cpu(), r_s, rtol=1e-5, atol=0)
    assert torch.equal(x_sum.cpu(), x_q.cpu().sum(1, dtype=torch.int32))


@needs_kernel
@pytest.mark.parametrize("m,k", SHAPES)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32))
def test_quantize_per_token_bit_exact(m, k, dtype, gen):
    x = random_rows(m, k, dtype, gen)
    got = ops.quantize_per_token(x.cuda())
    ref = torch.ops.qoq.quantize_per_token(x)  # CPU reference
    for g, r in zip(got, ref):
        assert g.is_cuda and g.dtype == r.dtype
        assert torch.equal(g.cpu(), r)


@needs_kernel
def test_quantize_per_token_zero_and_tiny_rows(gen):
    x = random_rows(6, 96, torch.float32, gen)
    x[1] = 0.0
    x[3] = 1e-42  # denormal input: scale 1e-42 / 127 underflows towards 0 differently per path
    x[4] = 0.0
    x[4, 5] = -1e-45  # amax / 127 underflows to 0: scale 0, codes 0
    got = ops.quantize_per_token(x.cuda())
    ref = torch.ops.qoq.quantize_per_token(x)
    for g, r in zip(got, ref):
        assert torch.equal(g.cpu(), r)
    assert float(got[1][1]) == 0.0 and not bool(torch.isnan(got[1]).any())


@needs_kernel
@pytest.mark.parametrize("m,k", SHAPES)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_rmsnorm_quantize_matches_reference(m, k, dtype, gen):
    x = random_rows(m, k, dtype, gen)
    w = (torch.rand(k, generator=gen) + 0.5).to(dtype)
    got = ops.rmsnorm_quantize(x.cuda(), w.cuda(), 1e-6)
    ref = torch.ops.qoq.rmsnorm_quantize(x, w, 1e-6)
    assert_close_quantization(got, ref)


@needs_kernel
@pytest.mark.parametrize("m,k", SHAPES)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_silu_mul_quantize_matches_reference(m, k, dtype, gen):
    gate_up = random_rows(m, 2 * k, dtype, gen)
    got = ops.silu_mul_quantize(gate_up.cuda())
    ref = torch.ops.qoq.silu_mul_quantize(gate_up)
    assert got[0].shape == (m, k)
    assert_close_quantization(got, ref)


@needs_kernel
def test_unaligned_view_uses_scalar_path(gen):
    base = random_rows(9, 130, torch.float16, gen).cuda()
    x = base[:, 1:129].contiguous()[1:]  # contiguous but starts 256 bytes in: still aligned
    odd = base.view(-1)[1:1 + 8 * 128].view(8, 128)  # contiguous, data pointer 2 bytes off 16-byte alignment
    for t in (x, odd):
        got = ops.quantize_per_token(t)
        ref = torch.ops.qoq.quantize_per_token(t.cpu())
        for g, r in zip(got, ref):
            assert torch.equal(g.cpu(), r)


@needs_kernel
def test_opcheck_cuda(gen):
    x = random_rows(5, 256, torch.float16, gen).cuda()
    w = (torch.rand(256, generator=gen) + 0.5).half().cuda()
    torch.library.opcheck(torch.ops.qoq.quantize_per_token.default, (x,))
    torch.library.opcheck(torch.ops.qoq.rmsnorm_quantize.default, (x, w, 1e-5))
    torch.library.opcheck(torch.ops.qoq.silu_mul_quantize.default, (x,))


@needs_kernel
def test_bad_input_rejected(gen):
    x = random_rows(4, 64, torch.float16, gen).cuda()
    w = torch.rand(64, generator=gen).half().cuda()
    cases = [
        (lambda: torch.ops.qoq.quantize_per_token(x.double()), "x must have dtype"),
        (lambda: torch.ops.qoq.quantize_per_token(x.t()), "x must be contiguous"),
        (lambda: torch.ops.qoq.quantize_per_token(x[None]), "x must be 2-D"),
        (lambda: torch.ops.qoq.quantize_per_token(x[:0]), "x must be non-empty"),
        (lambda: torch.ops.qoq.rmsnorm_quantize(x.float(), w.float(), 1e-6), "x must have dtype"),
        (lambda: torch.ops.qoq.rmsnorm_quantize(x, w.bfloat16(), 1e-6), "weight must have dtype"),
        (lambda: torch.ops.qoq.rmsnorm_quantize(x, w[:32], 1e-6), "weight must have shape"),
        (lambda: torch.ops.qoq.rmsnorm_quantize(x, w.cpu(), 1e-6), "weight is on"),
        (lambda: torch.ops.qoq.rmsnorm_quantize(x, w, 0.0), "eps must be positive"),
        (lambda: torch.ops.qoq.silu_mul_quantize(x[:, :63].contiguous()), "even number of columns"),
    ]
    for call, match in cases:
        with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
            call()
