"""CUDA W4A8 GEMM kernels against the CPU reference ops (bit-exact: same INT32 sums, same float epilogue)."""
from __future__ import annotations

import pytest
import torch

import qoq_torch.ops as ops

pytestmark = pytest.mark.cuda

MS = (1, 3, 16, 17, 64, 100, 1024)
NK = ((16, 64), (48, 192), (272, 1024), (128, 4096))  # N tails, K % 128 != 0, split-K (small N, long K)


def _cuda_kernels_built() -> bool:
    return torch.cuda.is_available() and "w4a8_gemm_per_group" in ops.extension_status()["cuda_ops"]


needs_kernel = pytest.mark.skipif(not _cuda_kernels_built(), reason="qoq_torch._C GEMM kernels not built")


def random_activations(m: int, k: int, gen: torch.Generator):
    """Random INT8 activations (full range, never all zero) with float32 scales and row sums."""
    x_q = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    x_s = torch.rand(m, generator=gen) * 0.02 + 1e-3
    x_sum = x_q.sum(dim=1, dtype=torch.int32)
    return x_q, x_s, x_sum


def random_per_group(n: int, k: int, g: int, gen: torch.Generator):
    """Random valid progressive weights: any s2 in 1..16 and z2 in 0..15, with w4 drawn from the values that
    keep (w4 - z2) * s2 inside INT8 (the format's guarantee), so every nibble and scale is exercised."""
    s2 = torch.randint(1, 17, (n, k // g), generator=gen, dtype=torch.int32)
    z2 = torch.randint(0, 16, (n, k // g), generator=gen, dtype=torch.int32)
    lo = torch.clamp(z2 - 128 // s2, min=0)
    hi = torch.clamp(z2 + 127 // s2, max=15)
    u = torch.rand(n, k // g, g, generator=gen)
    w4 = (lo.unsqueeze(-1) + (u * (hi - lo + 1).unsqueeze(-1)).floor().long()).clamp(max=hi.unsqueeze(-1))
    w4 = w4.reshape(n, k).to(torch.uint8)
    s1 = (torch.rand(n, generator=gen) * 0.01 + 1e-4).half()
    return w4, s2.to(torch.uint8), z2.to(torch.uint8), s1


def random_bias(n: int, dtype, gen: torch.Generator):
    return (torch.randn(n, generator=gen) * 0.5).to(dtype)


def _to(device, *ts):
    return [None if t is None else t.to(device) for t in ts]


@needs_kernel
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k", NK)
@pytest.mark.parametrize("out_dtype", (torch.float16, torch.bfloat16))
def test_per_group_matches_reference(m, n, k, out_dtype, gen):
    g = 64 if k % 128 else 128
    x_q, x_s, _ = random_activations(m, k, gen)
    w4, s2, z2, s1 = random_per_group(n, k, g, gen)
    qweight = ops.pack_weights(w4)
    bias = random_bias(n, (torch.float32, torch.float16, torch.bfloat16)[m % 3], gen) if m % 2 else None
    ref = torch.ops.qoq.w4a8_gemm_per_group(x_q, x_s, qweight, s2, z2, s1, bias, g, out_dtype)
    out = ops.w4a8_gemm_per_group(*_to("cuda", x_q, x_s, qweight, s2, z2, s1, bias), group_size=g,
                                  out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (m, n) and out.is_cuda
    assert torch.equal(out.cpu(), ref)


@needs_kernel
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k", NK)
@pytest.mark.parametrize("out_dtype", (torch.float16, torch.bfloat16))
def test_per_channel_matches_reference(m, n, k, out_dtype, gen):
    x_q, x_s, x_sum = random_activations(m, k, gen)
    w4 = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(n, generator=gen) * 0.05 + 1e-3).half()
    zero = torch.randint(0, 16, (n,), generator=gen, dtype=torch.uint8)
    qweight = ops.pack_weights(w4)
    bias = random_bias(n, torch.bfloat16, gen) if m % 2 == 0 else None
    ref = torch.ops.qoq.w4a8_gemm_per_channel(x_q, x_s, x_sum, qweight, scale, zero, bias, out_dtype)
    out = ops.w4a8_gemm_per_channel(*_to("cuda", x_q, x_s, x_sum, qweight, scale, zero, bias), out_dtype=out_dtype)
    assert torch.equal(out.cpu(), ref)


@needs_kernel
def test_quantized_float_weights_and_group_256(gen):
    """The quantizer's own output (not only synthetic formats) through the kernel, and g = 256."""
    m, n, k = 33, 96, 768
    w = torch.randn(n, k, generator=gen)
    for g in (128, 256):
        pg = ops.quantize_weight_per_group(w, g)
        x_q, x_s, _ = random_activations(m, k, gen)
        ref = torch.ops.qoq.w4a8_gemm_per_group(x_q, x_s, pg.packed(), pg.s2, pg.z2, pg.s1, None, g, torch.float16)
        out = ops.w4a8_gemm_per_group(*_to("cuda", x_q, x_s, pg.packed(), pg.s2, pg.z2, pg.s1), group_size=g)
        assert torch.equal(out.cpu(), ref)


@needs_kernel
def test_unaligned_views_and_repeat_determinism(gen):
    """A contiguous view at an odd byte offset is handled; split-K results are identical run to run."""
    m, n, k = 5, 64, 4096
    x_q, x_s, _ = random_activations(m, k, gen)
    w4, s2, z2, s1 = random_per_group(n, k, 128, gen)
    qweight = ops.pack_weights(w4)
    big = torch.empty(m * k + 1, dtype=torch.int8)
    big[1:] = x_q.flatten()
    x_view = big.cuda()[1:].view(m, k)
    dev = _to("cuda", x_s, qweight, s2, z2, s1)
    ref = torch.ops.qoq.w4a8_gemm_per_group(x_q, x_s, qweight, s2, z2, s1, None, 128, torch.float16)
    outs = [ops.w4a8_gemm_per_group(x_view, *dev, group_size=128) for _ in range(3)]
    for out in outs:
        assert torch.equal(out.cpu(), ref)


@needs_kernel
def test_opcheck_cuda(gen):
    m, n, k = 7, 64, 256
    x_q, x_s, x_sum = random_activations(m, k, gen)
    w4, s2, z2, s1 = random_per_group(n, k, 128, gen)
    qweight = ops.pack_weights(w4)
    zero = torch.randint(0, 16, (n,), generator=gen, dtype=torch.uint8)
    bias = random_bias(n, torch.float16, gen)
    torch.library.opcheck(torch.ops.qoq.w4a8_gemm_per_group.default,
                          (*_to("cuda", x_q, x_s, qweight, s2, z2, s1, bias), 128, torch.bfloat16))
    torch.library.opcheck(torch.ops.qoq.w4a8_gemm_per_channel.default,
                          (*_to("cuda", x_q, x_s, x_sum, qweight, s1, zero), None, torch.float16))


@needs_kernel
def test_bad_input_rejected(gen):
    m, n, k = 4, 32, 256
    x_q, x_s, x_sum = random_activations(m, k, gen)
    w4, s2, z2, s1 = random_per_group(n, k, 128, gen)
    good = dict(zip(("x_q", "x_s", "qweight", "s2", "z2", "s1"), _to("cuda", x_q, x_s, ops.pack_weights(w4), s2, z2, s1)))

    def call(**over):
        a = {**good, **over}
        g = a.pop("group_size", 128)
        return torch.ops.qoq.w4a8_gemm_per_group(a["x_q"], a["x_s"], a["qweight"], a["s2"], a["z2"], a["s1"], None,
                                                 g, torch.float16)

    cases = [
        (dict(x_q=good["x_q"].int()), "x_q"),
        (dict(x_q=good["x_q"].t().contiguous().t()), "x_q"),
        (dict(x_s=good["x_s"].half()), "x_s"),
        (dict(x_s=good["x_s"][:2]), "x_s"),
        (dict(qweight=good["qweight"][:, :64].contiguous()), "qweight"),
        (dict(qweight=good["qweight"][:24].contiguous(), s2=good["s2"][:24], z2=good["z2"][:24],
              s1=good["s1"][:24]), "multiple of 16"),
        (dict(s2=good["s2"].cpu()), "s2"),
        (dict(z2=good["z2"][:, :1].contiguous()), "z2"),
        (dict(s1=good["s1"].float()), "s1"),
        (dict(group_size=96), "group_size"),
        (dict(group_size=32, s2=torch.ones(n, k // 32, dtype=torch.uint8, device="cuda"),
              z2=torch.ones(n, k // 32, dtype=torch.uint8, device="cuda")), "multiple of 64"),
    ]
    for over, msg in cases:
        with pytest.raises((RuntimeError, ValueError, TypeError), match=msg):
            call(**over)
    x_q_bad_k = torch.zeros(m, 96, dtype=torch.int8, device="cuda")
    with pytest.raises(RuntimeError, match="multiple of 64"):
        torch.ops.qoq.w4a8_gemm_per_channel(x_q_bad_k, good["x_s"], x_sum.cuda(),
                                            torch.zeros(n, 48, dtype=torch.uint8, device="cuda"), good["s1"],
                                            torch.zeros(n, dtype=torch.uint8, device="cuda"), None, torch.float16)
    with pytest.raises(RuntimeError, match="zero"):
        torch.ops.qoq.w4a8_gemm_per_channel(good["x_q"], good["x_s"], x_sum.cuda(), good["qweight"], good["s1"],
                                            good["s1"], None, torch.float16)
