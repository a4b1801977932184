"""CUDA W4A8 GEMM kernels against the CPU reference ops (bit-exact: same INT32 sums, same float epilogue)."""
from __future__ import annotations

import os

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


def random_per_channel(n: int, k: int, gen: torch.Generator):
    """Random per-channel weights: UINT4 values, float16 scales and UINT4 zero points."""
    w4 = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(n, generator=gen) * 0.05 + 1e-3).half()
    zero = torch.randint(0, 16, (n,), generator=gen, dtype=torch.uint8)
    return w4, scale, zero


def random_bias(n: int, dtype, gen: torch.Generator):
    return (torch.randn(n, generator=gen) * 0.5).to(dtype)


def _to(device, *ts):
    return [None if t is None else t.to(device) for t in ts]

def _kernel_names(gen: torch.Generator, m: int, n: int = 64, k: int = 1024, g: int = 64,
                  per_group: bool = True, packed: bool = False) -> list[str]:
    """CUDA kernels (and memsets) one random GEMM call launches, as the profiler records them (per group with the
    activation row sums given, as modules call it; packed: with the packed scales given too)."""
    from torch.profiler import ProfilerActivity, profile

    w4, s2, z2, s1 = random_per_group(n, k, g, gen)
    x_q, x_s, x_sum = random_activations(m, k, gen)
    qweight = ops.pack_weights(w4)
    if per_group:
        args = _to("cuda", x_q, x_s, qweight, s2, z2, s1)
        packed_scales = ops.pack_scales(args[3], args[4]) if packed else None
        x_sum = x_sum.cuda()
    else:
        args = _to("cuda", x_q, x_s, x_sum, qweight, s1, z2[:, 0].contiguous())
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        if per_group:
            ops.w4a8_gemm_per_group(*args, group_size=g, packed_scales=packed_scales, x_sum=x_sum)
        else:
            ops.w4a8_gemm_per_channel(*args)
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]



def assert_per_group_matches(m: int, n: int, k: int, g: int, bias_dtype, out_dtype, gen: torch.Generator) -> None:
    """Random per-group operands through the CUDA op (whatever kernel the dispatch, or the caller's environment,
    picks) equal the CPU reference bit for bit, with and without the row sums and packed scales modules give."""
    x_q, x_s, x_sum = random_activations(m, k, gen)
    w4, s2, z2, s1 = random_per_group(n, k, g, gen)
    qweight = ops.pack_weights(w4)
    bias = None if bias_dtype is None else random_bias(n, bias_dtype, gen)
    ref = torch.ops.qoq.w4a8_gemm_per_group(x_q, x_s, qweight, s2, z2, s1, bias, g, out_dtype)
    args = _to("cuda", x_q, x_s, qweight, s2, z2, s1, bias)
    out = ops.w4a8_gemm_per_group(*args, group_size=g, out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (m, n) and out.is_cuda
    assert torch.equal(out.cpu(), ref)
    # with the module's packed scales and row sums (without them the op computes them where a kernel needs them)
    packed = ops.pack_scales(args[3], args[4])
    out = ops.w4a8_gemm_per_group(*args, group_size=g, out_dtype=out_dtype, packed_scales=packed,
                                  x_sum=x_sum.cuda())
    assert torch.equal(out.cpu(), ref)


def assert_per_channel_matches(m: int, n: int, k: int, bias_dtype, out_dtype, gen: torch.Generator) -> None:
    """The same for the per-channel format (zero point corrected with the activation row sums)."""
    x_q, x_s, x_sum = random_activations(m, k, gen)
    w4, scale, zero = random_per_channel(n, k, gen)
    qweight = ops.pack_weights(w4)
    bias = None if bias_dtype is None else random_bias(n, bias_dtype, gen)
    ref = torch.ops.qoq.w4a8_gemm_per_channel(x_q, x_s, x_sum, qweight, scale, zero, bias, out_dtype)
    out = ops.w4a8_gemm_per_channel(*_to("cuda", x_q, x_s, x_sum, qweight, scale, zero, bias), out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (m, n) and out.is_cuda
    assert torch.equal(out.cpu(), ref)


@needs_kernel
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k", NK)
@pytest.mark.parametrize("out_dtype", (torch.float16, torch.bfloat16))
def test_per_group_matches_reference(m, n, k, out_dtype, gen):
    bias_dtype = (torch.float32, torch.float16, torch.bfloat16)[m % 3] if m % 2 else None
    assert_per_group_matches(m, n, k, 64 if k % 128 else 128, bias_dtype, out_dtype, gen)


@needs_kernel
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k", NK)
@pytest.mark.parametrize("out_dtype", (torch.float16, torch.bfloat16))
def test_per_channel_matches_reference(m, n, k, out_dtype, gen):
    assert_per_channel_matches(m, n, k, torch.bfloat16 if m % 2 == 0 else None, out_dtype, gen)


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
    torch.library.opcheck(torch.ops.qoq.w4a8_gemm_per_group.default,
                          (*_to("cuda", x_q, x_s, qweight, s2, z2, s1, bias), 128, torch.bfloat16, None, None,
                           x_sum.cuda()))
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
                                                 g, torch.float16, x_sum=a.get("x_sum"))

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
        (dict(x_sum=x_sum), "x_sum must be a CUDA tensor"),
        (dict(x_sum=x_sum[:2].cuda()), "x_sum must have shape"),
        (dict(x_sum=x_sum.long().cuda()), "x_sum must have dtype"),
    ]
    for over, msg in cases:
        with pytest.raises((RuntimeError, ValueError, TypeError), match=msg):
            call(**over)
    deep_k = 65536 + 128  # past the per-group kernels' INT32 range for biased weights
    with pytest.raises(RuntimeError, match="K <= 65536"):
        torch.ops.qoq.w4a8_gemm_per_group(torch.ones(1, deep_k, dtype=torch.int8, device="cuda"), good["x_s"][:1],
                                          torch.ones(n, deep_k // 2, dtype=torch.uint8, device="cuda"),
                                          torch.ones(n, deep_k // 128, dtype=torch.uint8, device="cuda"),
                                          torch.ones(n, deep_k // 128, dtype=torch.uint8, device="cuda"), good["s1"],
                                          None, 128, torch.float16)
    x_q_bad_k = torch.zeros(m, 96, dtype=torch.int8, device="cuda")
    with pytest.raises(RuntimeError, match="multiple of 64"):
        torch.ops.qoq.w4a8_gemm_per_channel(x_q_bad_k, good["x_s"], x_sum.cuda(),
                                            torch.zeros(n, 48, dtype=torch.uint8, device="cuda"), good["s1"],
                                            torch.zeros(n, dtype=torch.uint8, device="cuda"), None, torch.float16)
    with pytest.raises(RuntimeError, match="zero"):
        torch.ops.qoq.w4a8_gemm_per_channel(good["x_q"], good["x_s"], x_sum.cuda(), good["qweight"], good["s1"],
                                            good["s1"], None, torch.float16)


# ---- Hopper wgmma path (default from M = 33 / 64; QOQ_GEMM_WGMMA="<mode>,<bm>" forces it, see csrc/gemm/w4a8_gemm.cu) ----

def _hopper() -> bool:
    return _cuda_kernels_built() and torch.cuda.get_device_capability() == (9, 0)


needs_hopper = pytest.mark.skipif(not _hopper(), reason="the wgmma GEMM path needs an sm_90 GPU")

WGMMA_MS = (33, 64, 100, 128, 1000, 1024)
WGMMA_NK = ((16, 128), (272, 1024), (128, 4096), (48, 192))  # N < tile, N tail, long K, K % 128 != 0 (fallback)
LLAMA_NK = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))  # qkv, o, gate_up, down


@pytest.fixture
def wgmma(monkeypatch):
    """Returns a switch routing eligible GEMMs to the wgmma kernel with `bm` activation rows per CTA; mode 2
    makes an unavailable wgmma kernel an error, so a silent fallback cannot pass for the wgmma path."""
    def use(bm: int) -> None:
        monkeypatch.setenv("QOQ_GEMM_WGMMA", f"2,{bm}")
    return use


@needs_hopper
@pytest.mark.parametrize("bm", (128, 256))
@pytest.mark.parametrize("m", WGMMA_MS)
@pytest.mark.parametrize("n,k", WGMMA_NK)
@pytest.mark.parametrize("out_dtype", (torch.float16, torch.bfloat16))
def test_wgmma_per_group_matches_reference(bm, m, n, k, out_dtype, gen, wgmma):
    g = 64 if (k % 128 or m % 2) else 128  # g = 64: two scale groups inside one 128-wide k tile
    wgmma(bm)
    bias_dtype = (torch.float32, torch.float16, torch.bfloat16)[m % 3] if m % 4 else None
    assert_per_group_matches(m, n, k, g, bias_dtype, out_dtype, gen)


@needs_hopper
@pytest.mark.parametrize("bm", (128, 256))
@pytest.mark.parametrize("m", WGMMA_MS)
@pytest.mark.parametrize("n,k", WGMMA_NK)
def test_wgmma_per_channel_matches_reference(bm, m, n, k, gen, wgmma):
    wgmma(bm)
    assert_per_channel_matches(m, n, k, torch.bfloat16 if m % 2 == 0 else None, (torch.float16, torch.bfloat16)[m % 2],
                               gen)


@needs_hopper
@pytest.mark.parametrize("n,k", LLAMA_NK)
def test_wgmma_llama_shapes_match_reference(n, k, gen, monkeypatch):
    """Llama-3-8B's layer shapes (M = 1000: an M tail) through both wgmma tiles, g = 128, with bias."""
    m, g = 1000, 128
    x_q, x_s, _ = random_activations(m, k, gen)
    w4, s2, z2, s1 = random_per_group(n, k, g, gen)
    qweight = ops.pack_weights(w4)
    bias = random_bias(n, torch.float16, gen)
    ref = torch.ops.qoq.w4a8_gemm_per_group(x_q, x_s, qweight, s2, z2, s1, bias, g, torch.bfloat16)
    dev = _to("cuda", x_q, x_s, qweight, s2, z2, s1, bias)
    for bm in (128, 256):
        monkeypatch.setenv("QOQ_GEMM_WGMMA", f"2,{bm}")
        out = ops.w4a8_gemm_per_group(*dev, group_size=g, out_dtype=torch.bfloat16)
        assert torch.equal(out.cpu(), ref), bm


@needs_hopper
@pytest.mark.parametrize("bm", (128, 256))
@pytest.mark.parametrize("g,k", ((64, 4608), (128, 4608), (192, 768), (256, 1024), (512, 2048), (128, 14336)))
def test_wgmma_per_group_zero_point_terms(bm, g, k, gen, wgmma):
    """Per group the wgmma kernels dequantize each 64-wide k half with its group's constants, staged a tile ahead:
    group sizes 64..512 (192: not a power of two, so some k tiles' halves lie in different groups; 512: one group
    over four tiles), group counts that are not a multiple of 4, and activations at the INT8 extremes."""
    m, n = 200, 144
    wgmma(bm)
    x_q = torch.where(torch.rand(m, k, generator=gen) < 0.5, -128, 127).to(torch.int8)
    x_q[0] = -128
    x_q[1] = 127
    x_s = torch.rand(m, generator=gen) * 1e-4 + 1e-6
    w4, s2, z2, s1 = random_per_group(n, k, g, gen)
    qweight = ops.pack_weights(w4)
    ref = torch.ops.qoq.w4a8_gemm_per_group(x_q, x_s, qweight, s2, z2, s1, None, g, torch.float16)
    out = ops.w4a8_gemm_per_group(*_to("cuda", x_q, x_s, qweight, s2, z2, s1), group_size=g)
    assert torch.isfinite(ref.float()).all()
    assert torch.equal(out.cpu(), ref)


@needs_kernel
def test_cuda_gemm_rejects_bad_packed_scales(gen):
    n, k, g, m = 208, 512, 128, 256
    x_q, x_s, _ = random_activations(m, k, gen)
    w4, s2, z2, s1 = random_per_group(n, k, g, gen)
    args = _to("cuda", x_q, x_s, ops.pack_weights(w4), s2, z2, s1)
    packed = ops.pack_scales(args[3], args[4])
    strided = torch.cat((packed, packed), dim=2)[:, :, :256]
    for bad, match in ((packed[:1].contiguous(), "shape"), (packed.int(), "uint8"),
                       (strided, "contiguous"), (packed.cpu(), "packed_scales is on")):
        with pytest.raises(RuntimeError, match=match):
            torch.ops.qoq.w4a8_gemm_per_group(*args, None, g, torch.float16, None, bad)


@needs_hopper
def test_wgmma_gemm_is_one_launch_in_both_formats(gen, monkeypatch):
    """The wgmma path is a single kernel launch in both formats: per group the zero points are applied in the
    K loop's dequantization, with no helper kernel before it."""
    monkeypatch.delenv("QOQ_GEMM_WGMMA", raising=False)
    for per_group in (True, False):
        names = _kernel_names(gen, 256, per_group=per_group, packed=True)
        assert len(names) == 1 and "w4a8_gemm_wgmma" in names[0], (per_group, names)


@needs_hopper
def test_wgmma_default_and_fallbacks_stay_exact(gen, monkeypatch):
    """Unset: the wgmma kernel from M = 17 per group and from M = 33 per channel (QOQ_GEMM_WGMMA_GROUP_MIN_M /
    _CHANNEL_MIN_M move them), the other kernels below; mode 0 (the mma.sync kernel) stays exact; M < 33 under
    mode 2 falls back (the wgmma path does not take it) instead of raising."""
    monkeypatch.delenv("QOQ_GEMM_WGMMA", raising=False)
    monkeypatch.delenv("QOQ_GEMM_SKINNY_MAX_M", raising=False)

    def on_wgmma(m: int, per_group: bool) -> bool:
        return any("w4a8_gemm_wgmma" in name for name in _kernel_names(gen, m, per_group=per_group, packed=True))

    assert not on_wgmma(16, True) and on_wgmma(17, True) and on_wgmma(64, True)
    assert not on_wgmma(32, False) and on_wgmma(33, False) and on_wgmma(100, False)
    monkeypatch.setenv("QOQ_GEMM_WGMMA_GROUP_MIN_M", "65")
    assert not on_wgmma(64, True) and on_wgmma(65, True)
    monkeypatch.delenv("QOQ_GEMM_WGMMA_GROUP_MIN_M")
    assert_per_group_matches(33, 144, 1024, 64, torch.float16, torch.bfloat16, gen)
    assert_per_channel_matches(64, 144, 1024, None, torch.float16, gen)
    n, k, g = 64, 256, 128
    w4, s2, z2, s1 = random_per_group(n, k, g, gen)
    qweight = ops.pack_weights(w4)
    for m, env in ((40, None), (100, None), (200, None), (100, "0,128"), (17, "2,128"), (33, "2,128")):
        if env is None:
            monkeypatch.delenv("QOQ_GEMM_WGMMA", raising=False)
        else:
            monkeypatch.setenv("QOQ_GEMM_WGMMA", env)
        x_q, x_s, _ = random_activations(m, k, gen)
        ref = torch.ops.qoq.w4a8_gemm_per_group(x_q, x_s, qweight, s2, z2, s1, None, g, torch.float16)
        out = ops.w4a8_gemm_per_group(*_to("cuda", x_q, x_s, qweight, s2, z2, s1), group_size=g)
        assert torch.equal(out.cpu(), ref), (m, env)


def _residual_case(m: int, n: int, k: int, g: int, per_group: bool, gen: torch.Generator):
    """Random operands with bias and a residual, their CPU reference (bfloat16 out) and a closure running the CUDA op
    with the packed scales and row sums modules pass."""
    x_q, x_s, x_sum = random_activations(m, k, gen)
    bias = random_bias(n, torch.float16, gen)
    residual = (torch.randn(m, n, generator=gen) * 4).to(torch.bfloat16)
    if per_group:
        w4, s2, z2, s1 = random_per_group(n, k, g, gen)
        operands = (x_q, x_s, ops.pack_weights(w4), s2, z2, s1, bias)
        ref = torch.ops.qoq.w4a8_gemm_per_group(*operands, g, torch.bfloat16, residual)
        cuda = _to("cuda", *operands)
        packed = ops.pack_scales(cuda[3], cuda[4])
        run = lambda: ops.w4a8_gemm_per_group(*cuda, group_size=g, out_dtype=torch.bfloat16,  # noqa: E731
                                              residual=residual.cuda(), packed_scales=packed, x_sum=x_sum.cuda())
    else:
        w4, scale, zero = random_per_channel(n, k, gen)
        operands = (x_q, x_s, x_sum, ops.pack_weights(w4), scale, zero, bias)
        ref = torch.ops.qoq.w4a8_gemm_per_channel(*operands, torch.bfloat16, residual)
        cuda = _to("cuda", *operands)
        run = lambda: ops.w4a8_gemm_per_channel(*cuda, out_dtype=torch.bfloat16,  # noqa: E731
                                                residual=residual.cuda())
    return ref, run


@needs_hopper
@pytest.mark.parametrize("splits", ("2", "3", "7", "64"))
@pytest.mark.parametrize("per_group", (True, False))
@pytest.mark.parametrize("bm", ("16", "64", "128", "256"))
def test_wgmma_split_k_is_exact(bm, splits, per_group, gen, monkeypatch):
    """Split K on both wgmma kernels (QOQ_GEMM_WGMMA_SPLITS forces a count; 64 is more than the 32 k tiles, so one
    tile a split): the last split of each output tile adds the others' INT32 partials, which gives the reference's
    bits and the unsplit kernel's, with M and N tails, bias, g = 64 (two groups a k tile) and a residual."""
    ref, run = _residual_case(300 if bm == "256" else 200, 272, 4096, 64, per_group, gen)
    monkeypatch.setenv("QOQ_GEMM_WGMMA", f"2,{bm}")
    monkeypatch.setenv("QOQ_GEMM_WGMMA_SPLITS", splits)
    split = run()
    monkeypatch.setenv("QOQ_GEMM_WGMMA_SPLITS", "1")
    whole = run()
    assert torch.equal(split.cpu(), ref)
    assert torch.equal(split, whole)


@needs_hopper
@pytest.mark.parametrize("ctas", ("1", "3", "7", "13", "132", "100000"))
@pytest.mark.parametrize("per_group", (True, False))
def test_wgmma_stream_k_is_exact(ctas, per_group, gen, monkeypatch):
    """Stream-K on the 128-row kernel (QOQ_GEMM_STREAMK=1, QOQ_GEMM_STREAMK_CTAS CTAs, rounded down to whole groups
    of the 3 m tiles): shares that start and end part-way through output tiles, one group for every tile, and one k
    tile a CTA (100000 is clamped to the 3 x 32 (n tile, k tile) pairs: 32 pieces a tile), with the one- and the
    two-CTA-an-SM instantiations, all give the reference's bits, with M and N tails, bias, g = 64 and a residual,
    run twice (the tile counters are left at zero for the next call)."""
    ref, run = _residual_case(300, 272, 4096, 64, per_group, gen)
    monkeypatch.setenv("QOQ_GEMM_WGMMA", "2,128")
    monkeypatch.setenv("QOQ_GEMM_STREAMK", "1")
    monkeypatch.setenv("QOQ_GEMM_STREAMK_CTAS", ctas)
    for deep in ("1", "0"):
        monkeypatch.setenv("QOQ_GEMM_STREAMK_DEEP", deep)
        assert torch.equal(run().cpu(), ref)
        assert torch.equal(run().cpu(), ref)


@needs_hopper
@pytest.mark.parametrize("m,n,k,g", ((1000, 4096, 4096, 128), (384, 4096, 14336, 128), (129, 640, 4608, 128),
                                     (640, 1024, 1024, 64)))
def test_wgmma_stream_k_kernel_runs_and_matches(m, n, k, g, gen, monkeypatch):
    """QOQ_GEMM_STREAMK=1 sends every 128-row GEMM to the stream-K instantiation with two CTAs an SM (one kernel),
    which matches the reference in both formats at Llama-3-8B-like shapes, with one scale group a k tile (g = 128)
    and two (g = 64)."""
    import re

    monkeypatch.setenv("QOQ_GEMM_WGMMA", "2,128")
    monkeypatch.delenv("QOQ_GEMM_STREAMK_CTAS", raising=False)
    monkeypatch.delenv("QOQ_GEMM_STREAMK_DEEP", raising=False)
    monkeypatch.setenv("QOQ_GEMM_STREAMK", "1")
    kernel = re.compile(r"w4a8_gemm_wgmma_kernel<128, 4, 2, (true|false), 2, (true|false)>")
    for per_group in (True, False):
        names = _kernel_names(gen, m, n=n, k=k, g=g, per_group=per_group, packed=True)
        kernels = [x for x in names if "emset" not in x]  # a first use zeroes the stream's counters once
        assert len(kernels) == 1 and kernel.search(kernels[0]), names
        ref, run = _residual_case(m, n, k, g, per_group, gen)
        assert torch.equal(run().cpu(), ref)


@needs_hopper
@pytest.mark.parametrize("pieces", ("2", "3", "64"))
@pytest.mark.parametrize("per_group", (True, False))
def test_wgmma_ws_tail_split_is_exact(pieces, per_group, gen, monkeypatch):
    """The 256-row kernel's tail split forced on a grid smaller than the GPU (QOQ_GEMM_WS_TAIL_SPLIT=n: all 2 x 3
    tiles split in n pieces; 64 is clamped to the 32 k tiles, one k tile a piece): the reference's bits, with M and N
    tails, bias, g = 64 and a residual, twice (the counters are left at zero)."""
    ref, run = _residual_case(300, 272, 4096, 64, per_group, gen)
    monkeypatch.setenv("QOQ_GEMM_WGMMA", "2,256")
    monkeypatch.delenv("QOQ_GEMM_WGMMA_SPLITS", raising=False)
    monkeypatch.setenv("QOQ_GEMM_WS_TAIL_SPLIT", pieces)
    assert torch.equal(run().cpu(), ref)
    assert torch.equal(run().cpu(), ref)


def _ws_tail_pieces(m: int, n: int, k: int, sms: int) -> int:
    """The 256-row kernel's default tail split (w4a8_gemm.cu, ws_tail_pieces), written out: with at least one full
    wave of tiles (at most 16) and a partial last one, sms // tail pieces of at least 8 k tiles each, two only for
    K >= 64 k tiles."""
    tiles, ktiles = -(-m // 256) * -(-n // 128), k // 128
    tail = tiles % sms
    if tiles < sms or tiles > 16 * sms or tail == 0:
        return 1
    pieces = min(sms // tail, ktiles // 8)
    return pieces if pieces >= 3 or (pieces == 2 and ktiles >= 64) else 1


@needs_hopper
def test_wgmma_ws_tail_split_rule(gen, monkeypatch):
    """By default the 256-row kernel splits the K of its last, partial wave's tiles when the grid has a full wave
    (1024 x 4352: 136 tiles on an H100, the last 4 in 4 pieces) and not otherwise (1024 x 4096: 128 tiles;
    1024 x 6144: 192 tiles, whose last 60 would take only 2 pieces of a short K);
    QOQ_GEMM_WS_TAIL_SPLIT=0 turns it off; all exact in both formats."""
    import re

    for name in ("QOQ_GEMM_WGMMA", "QOQ_GEMM_WS_TAIL_SPLIT", "QOQ_GEMM_WGMMA_SPLITS", "QOQ_GEMM_WS_MIN_M"):
        monkeypatch.delenv(name, raising=False)
    tail_kernel = re.compile(r"w4a8_gemm_wgmma_ws_kernel<256, 5, (true|false), 3>")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cases = [(1024, 4352, 4096), (1024, 4096, 2048), (1024, 6144, 2048)]
    expected = [_ws_tail_pieces(m, n, k, sms) > 1 for m, n, k in cases]
    if sms == 132:
        assert expected == [True, False, False]
    for (m, n, k), takes in zip(cases, expected):
        for per_group in (True, False):
            names = _kernel_names(gen, m, n=n, k=k, g=128, per_group=per_group, packed=True)
            assert sum(bool(tail_kernel.search(x)) for x in names) == int(takes), (m, n, k, per_group, names)
        assert_per_group_matches(m, n, k, 128, torch.float16, torch.bfloat16, gen)
        assert_per_channel_matches(m, n, k, None, torch.float16, gen)
    monkeypatch.setenv("QOQ_GEMM_WS_TAIL_SPLIT", "0")
    assert not any(tail_kernel.search(x) for x in _kernel_names(gen, 1024, n=4352, k=4096, g=128, packed=True))


def _takes_stream_k(m: int, n: int, k: int, sms: int) -> bool:
    """The default stream-K rule (w4a8_gemm.cu, wgmma128_takes_stream_k) for a per-group 128-row GEMM, written out:
    at least 96 k tiles, no split K in the default grid, at most two output tiles an SM, and a last wave covering at
    most 3/4 of the SMs."""
    tiles, ktiles = -(-m // 128) * -(-n // 128), k // 128
    if ktiles < 96:
        return False
    deep = tiles * _wgmma_splits(tiles, ktiles, 1, sms) <= sms
    if _wgmma_splits(tiles, ktiles, 1 if deep else 2, sms) > 1:
        return False
    return tiles <= 2 * sms and 0 < tiles % sms and 4 * (tiles % sms) <= 3 * sms


@needs_hopper
def test_wgmma_stream_k_rule(gen, monkeypatch):
    """By default the per-group 128-row GEMMs with deep K whose tiles leave the SMs unevenly filled run stream-K
    (down_proj at M = 384 and 640 on an H100) and the others not (512: 128 tiles; K = 4096 or 8192; more than two
    tiles an SM; per channel); QOQ_GEMM_STREAMK=0 turns it off."""
    import re

    for name in ("QOQ_GEMM_WGMMA", "QOQ_GEMM_STREAMK", "QOQ_GEMM_STREAMK_DEEP", "QOQ_GEMM_WGMMA_SPLITS"):
        monkeypatch.delenv(name, raising=False)
    stream_k = re.compile(r"w4a8_gemm_wgmma_kernel<128, 4, 2, (true|false), 2, (true|false)>")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cases = [(384, 4096, 14336), (640, 4096, 14336), (512, 4096, 14336), (384, 4096, 4096), (384, 4096, 8192),
             (600, 6784, 12288)]
    expected = [_takes_stream_k(m, n, k, sms) for m, n, k in cases]
    if sms == 132:  # deep K and uneven; balanced; K too short (twice); more than two tiles an SM
        assert expected == [True, True, False, False, False, False]
    for (m, n, k), takes in zip(cases, expected):
        for per_group in (True, False):
            names = _kernel_names(gen, m, n=n, k=k, g=128, per_group=per_group, packed=True)
            assert sum(bool(stream_k.search(x)) for x in names) == int(takes and per_group), (m, n, k, per_group, names)
    monkeypatch.setenv("QOQ_GEMM_STREAMK", "0")
    assert not any(stream_k.search(x) for x in _kernel_names(gen, 384, n=4096, k=14336, g=128, packed=True))


@needs_hopper
@pytest.mark.parametrize("bm", (16, 32, 64))
@pytest.mark.parametrize("m", (1, 7, 16, 33, 100))
@pytest.mark.parametrize("n,k", WGMMA_NK)
def test_wgmma_narrow_tiles_match_reference(bm, m, n, k, gen, monkeypatch):
    """The narrow wgmma tiles (16, 32 or 64 activation rows a CTA, QOQ_GEMM_WGMMA="2,<bm>,1" from M = 1): both
    formats equal the reference bit for bit with M below, at and above the tile (several m tiles), N tails, bias,
    g = 64 and 128, and the default split-K of a small grid."""
    monkeypatch.setenv("QOQ_GEMM_WGMMA", f"2,{bm},1")
    g = 64 if (k % 128 or m % 2) else 128
    assert_per_group_matches(m, n, k, g, torch.float16 if m % 3 else None, (torch.float16, torch.bfloat16)[m % 2], gen)
    assert_per_channel_matches(m, n, k, torch.bfloat16 if m % 2 == 0 else None, (torch.float16, torch.bfloat16)[m % 2],
                               gen)


@needs_hopper
@pytest.mark.parametrize("distance", ("0", "1", "64"))
def test_wgmma_l2_prefetch_distance_keeps_the_bits(distance, gen, monkeypatch):
    """The narrow tiles' L2 weight prefetch (QOQ_GEMM_WGMMA_L2_PREFETCH k tiles beyond the stage copies, clipped to
    each split's k range) is only a hint: off, one tile ahead and past the end of K, whole and split in 3, both
    formats equal the reference bit for bit."""
    monkeypatch.setenv("QOQ_GEMM_WGMMA", "2,32,1")
    monkeypatch.setenv("QOQ_GEMM_WGMMA_L2_PREFETCH", distance)
    for splits in ("1", "3"):
        monkeypatch.setenv("QOQ_GEMM_WGMMA_SPLITS", splits)
        assert_per_group_matches(20, 272, 4608, 128, None, torch.float16, gen)
        assert_per_channel_matches(20, 272, 4608, torch.bfloat16, torch.bfloat16, gen)


@needs_hopper
@pytest.mark.parametrize("bm", (16, 32, 64))
def test_wgmma_narrow_tile_is_the_kernel_that_runs(bm, gen, monkeypatch):
    """QOQ_GEMM_WGMMA="2,<bm>,1" launches the narrow instantiation, with split K for a grid of 2 x 1 tiles of 32 k
    tiles, as one launch (the split counters are kept, not zeroed by a memset each call)."""
    import re

    monkeypatch.setenv("QOQ_GEMM_WGMMA", f"2,{bm},1")
    monkeypatch.delenv("QOQ_GEMM_WGMMA_SPLITS", raising=False)
    pattern = re.compile(rf"w4a8_gemm_wgmma_kernel<{bm}, \d+, \d+, (true|false), 1, (true|false)>")
    for per_group in (True, False):
        names = _kernel_names(gen, 5, n=256, k=4096, per_group=per_group, packed=True)
        assert len(names) == 1 and pattern.search(names[0]), names


@needs_hopper
@pytest.mark.parametrize("bm", ("32", "64", "128"))
def test_wgmma_reads_one_scale_half_when_a_k_tile_is_one_group(bm, gen, monkeypatch):
    """Per group with group_size % 128 == 0 a 128-wide k tile lies in one scale group, and the 16- to 128-row
    kernel's instantiation that reads one half's scales runs (g = 64 and 192: both halves); results exact in both."""
    import re

    monkeypatch.setenv("QOQ_GEMM_WGMMA", f"2,{bm}")
    monkeypatch.delenv("QOQ_GEMM_WGMMA_SPLITS", raising=False)
    kernel = re.compile(r"w4a8_gemm_wgmma_kernel<\d+, \d+, \d+, true, ([01]), (true|false)>")
    for g in (64, 128, 192, 256):
        k = 768 if g == 192 else 1024
        names = [kernel.search(x) for x in _kernel_names(gen, 100, n=256, k=k, g=g, packed=True)]
        found = [x.group(2) for x in names if x]
        assert found == ["true" if g % 128 == 0 else "false"], (g, found)
        assert_per_group_matches(100, 256, k, g, torch.float16, torch.bfloat16, gen)


@needs_hopper
def test_wgmma_narrow_tile_is_the_default_up_to_128_rows(gen, monkeypatch):
    """Unset, the wgmma path takes the 32-row tile up to M = 32 per group and M = 64 per channel, the 64-row tile
    above up to M = 128, and the 128-row tile beyond; QOQ_GEMM_WGMMA_NARROW_MAX_M=0 restores the 128-row tile."""
    import re

    monkeypatch.delenv("QOQ_GEMM_WGMMA", raising=False)
    monkeypatch.delenv("QOQ_GEMM_WGMMA_SPLITS", raising=False)
    monkeypatch.delenv("QOQ_GEMM_SKINNY_MAX_M", raising=False)

    def tile(m: int, per_group: bool) -> int:
        names = _kernel_names(gen, m, n=256, k=4096, per_group=per_group, packed=True)
        found = [re.search(r"w4a8_gemm_wgmma_kernel<(\d+),", name) for name in names]
        assert len(names) == 1 and found[0], names
        return int(found[0].group(1))

    assert tile(17, True) == 32 and tile(32, True) == 32 and tile(33, True) == 64 and tile(128, True) == 64
    assert tile(33, False) == 32 and tile(64, False) == 32 and tile(65, False) == 64 and tile(100, False) == 64
    assert tile(129, True) == 128 and tile(200, False) == 128
    monkeypatch.setenv("QOQ_GEMM_WGMMA_NARROW_MAX_M", "0")
    assert tile(48, True) == 128 and tile(64, False) == 128


@needs_hopper
@pytest.mark.parametrize("per_group", (True, False))
def test_wgmma_split_counters_are_reused_across_calls_streams_and_graphs(per_group, gen, monkeypatch):
    """Split K keeps one zeroed counter array per stream, which every call leaves at zero again: calls in a row
    (different data, different tile counts), on a second stream, and replayed from a CUDA graph captured while
    its stream had no array yet all give the reference's bits."""
    monkeypatch.setenv("QOQ_GEMM_WGMMA", "2,16,1")
    monkeypatch.setenv("QOQ_GEMM_WGMMA_SPLITS", "5")
    k, g = 2048, 128

    def case(m: int, n: int):
        x_q, x_s, x_sum = random_activations(m, k, gen)
        if per_group:
            w4, s2, z2, s1 = random_per_group(n, k, g, gen)
            operands = (x_q, x_s, ops.pack_weights(w4), s2, z2, s1, None)
            ref = torch.ops.qoq.w4a8_gemm_per_group(*operands, g, torch.float16)
            dev = _to("cuda", *operands)
            return ref, lambda: ops.w4a8_gemm_per_group(*dev, group_size=g)
        w4, scale, zero = random_per_channel(n, k, gen)
        operands = (x_q, x_s, x_sum, ops.pack_weights(w4), scale, zero, None)
        ref = torch.ops.qoq.w4a8_gemm_per_channel(*operands, torch.float16)
        dev = _to("cuda", *operands)
        return ref, lambda: ops.w4a8_gemm_per_channel(*dev)

    for m, n in ((3, 256), (16, 640), (40, 128), (3, 256)):
        ref, run = case(m, n)
        assert torch.equal(run().cpu(), ref), (m, n)
    side = torch.cuda.Stream()
    ref, run = case(9, 384)
    with torch.cuda.stream(side):
        out = run()
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(out.cpu(), ref)
    ref, run = case(12, 512)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured.cpu(), ref)


@needs_hopper
def test_wgmma_splits_k_only_when_the_tiles_leave_sms_idle(gen, monkeypatch):
    """By default the wgmma kernel splits K for a grid smaller than the GPU (2 x 1 tiles, 32 k tiles: the split
    instantiation) and not for one that fills it (2 x 256 tiles)."""
    import re

    monkeypatch.delenv("QOQ_GEMM_WGMMA", raising=False)
    monkeypatch.delenv("QOQ_GEMM_WGMMA_SPLITS", raising=False)
    monkeypatch.setenv("QOQ_GEMM_WGMMA_DEEP", "0")  # the two-CTA kernel's rule (the deep one: test below)
    split_kernel = re.compile(r"w4a8_gemm_wgmma_kernel<128, 4, 2, (true|false), 1, (true|false)>")
    whole_kernel = re.compile(r"w4a8_gemm_wgmma_kernel<128, 4, 2, (true|false), 0, (true|false)>")
    for per_group in (True, False):
        names = _kernel_names(gen, 256, k=4096, per_group=per_group)
        assert sum(bool(split_kernel.search(x)) for x in names) == 1, names
        names = _kernel_names(gen, 256, n=32768, per_group=per_group)
        assert sum(bool(whole_kernel.search(x)) for x in names) == 1, names
        assert not any(split_kernel.search(x) for x in names), names



@needs_hopper
def test_wgmma_deep_pipeline_for_grids_of_one_cta_an_sm(gen, monkeypatch):
    """A 128-row grid of at most one CTA an SM (tiles times the split count for one CTA slot an SM) runs the
    8-stage one-CTA-an-SM instantiation, split or not; a larger grid the 4-stage two-CTA one; both exact."""
    import re

    monkeypatch.delenv("QOQ_GEMM_WGMMA", raising=False)
    monkeypatch.delenv("QOQ_GEMM_WGMMA_SPLITS", raising=False)
    monkeypatch.delenv("QOQ_GEMM_WGMMA_DEEP", raising=False)
    monkeypatch.setenv("QOQ_GEMM_STREAMK", "0")  # its rule takes some of these grids (test_wgmma_stream_k_rule)
    deep = re.compile(r"w4a8_gemm_wgmma_kernel<128, 8, 1, (true|false), ([012]), (true|false)>")
    shallow = re.compile(r"w4a8_gemm_wgmma_kernel<128, 4, 2, (true|false), ([01]), (true|false)>")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cases = [(256, 4096, 4096), (384, 4096, 14336), (256, 128, 4096), (256, 33792, 1024), (640, 4096, 4096)]
    for m, n, k in cases:
        tiles = -(-m // 128) * (n // 128)
        expect_deep = tiles * _wgmma_splits(tiles, k // 128, 1, sms) <= sms
        for per_group in (True, False):
            names = _kernel_names(gen, m, n=n, k=k, g=128, per_group=per_group, packed=True)
            assert sum(bool(deep.search(x)) for x in names) == int(expect_deep), (m, n, k, names)
            assert sum(bool(shallow.search(x)) for x in names) == int(not expect_deep), (m, n, k, names)
    # 2 tiles of 32 k tiles: the deep kernel's split instantiation
    assert any(deep.search(x) and deep.search(x).group(2) == "1" for x in _kernel_names(gen, 256, n=128, k=4096))
    for m, n, k, g in ((256, 128, 4096, 64), (300, 384, 4608, 128), (256, 4096, 4096, 128)):
        assert_per_group_matches(m, n, k, g, torch.float16, torch.bfloat16, gen)
        assert_per_channel_matches(m, n, k, torch.float16, torch.bfloat16, gen)
    monkeypatch.setenv("QOQ_GEMM_WGMMA_DEEP", "0")
    names = _kernel_names(gen, 256, n=4096, k=4096, g=128, per_group=True, packed=True)
    assert sum(bool(shallow.search(x)) for x in names) == 1, names


def _wgmma_splits(tiles: int, ktiles: int, blocks_per_sm: int, sms: int) -> int:
    """The wgmma kernels' default split-K count (w4a8_gemm.cu, wgmma_ktiles_per_split), written out for the test."""
    splits = min(blocks_per_sm * sms // tiles, ktiles // 12)
    if splits > 1 and 10 * tiles >= 7 * sms and ktiles // splits < 48:
        splits = 1
    splits = max(1, min(splits, ktiles))
    per_split = -(-ktiles // splits)
    return -(-ktiles // per_split)


def _per_group_takes_ws(m: int, n: int, k: int, sms: int) -> bool:
    """The per-group rule below M = 1024 (w4a8_gemm.cu, per_group_prefers_ws): from M = 768, a cost (waves times k
    tiles a CTA) no higher than the 128-row kernel's, whose last wave of at most one CTA an SM counts 60% of a full
    one; and a split K only when K is deep."""
    if m < 768:
        return False
    n_tiles, ktiles = -(-n // 128), k // 128
    ws_tiles, tiles_128 = -(-m // 256) * n_tiles, -(-m // 128) * n_tiles
    ws_splits, splits_128 = _wgmma_splits(ws_tiles, ktiles, 1, sms), _wgmma_splits(tiles_128, ktiles, 2, sms)
    if ws_splits > 1 and ktiles < 64:
        return False
    ctas_128, slots = tiles_128 * splits_128, 2 * sms
    last = ctas_128 % slots
    wave_pct_128 = ctas_128 // slots * 100 + (0 if last == 0 else 60 if last <= sms else 100)
    ws_waves = -(-ws_tiles * ws_splits // sms)
    return ws_waves * 100 * -(-ktiles // ws_splits) <= wave_pct_128 * -(-ktiles // splits_128)


@needs_hopper
def test_wgmma_warp_specialised_kernel_choice(gen, monkeypatch):
    """By default M >= 1024 runs the warp-specialised 256-row kernel in both formats; below, per channel runs the
    128-row one, and per group the 256-row one from M = 768 where its grid costs no more than the 128-row kernel's
    (_per_group_takes_ws; with a split K only for deep K). QOQ_GEMM_WS_MIN_M moves the threshold. Results stay
    bit-exact (M = 1300: a partial 256-row tile)."""
    import re

    monkeypatch.delenv("QOQ_GEMM_WGMMA", raising=False)
    monkeypatch.delenv("QOQ_GEMM_WS_MIN_M", raising=False)
    monkeypatch.delenv("QOQ_GEMM_WGMMA_SPLITS", raising=False)
    ws_kernel = re.compile(r"w4a8_gemm_wgmma_ws_kernel<256, 5, (true|false), [0-3]>")
    ws_split_kernel = re.compile(r"w4a8_gemm_wgmma_ws_kernel<256, 5, true, 1>")
    for per_group in (True, False):
        assert sum(bool(ws_kernel.search(x)) for x in _kernel_names(gen, 1024, per_group=per_group)) == 1
    names = _kernel_names(gen, 1023, per_group=False)
    assert not any(ws_kernel.search(x) for x in names), names
    assert sum("w4a8_gemm_wgmma_kernel<128" in x for x in names) == 1, names
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cases = [(200, 6144, 1024), (300, 6144, 1024), (640, 6144, 1024), (1023, 64, 1024), (768, 6144, 1024),
             (256, 4096, 4096), (512, 4096, 8192), (800, 28672, 1024), (768, 4096, 4096), (768, 6144, 4096)]
    expected = [_per_group_takes_ws(m, n, k, sms) for m, n, k in cases]
    assert any(expected) and not all(expected), expected  # both kernels are exercised
    for (m, n, k), ws in zip(cases, expected):
        names = _kernel_names(gen, m, n=n, k=k, per_group=True, packed=True)
        assert sum(bool(ws_kernel.search(x)) for x in names) == int(ws), (m, n, k, names)
        assert sum("w4a8_gemm_wgmma_kernel<128" in x for x in names) == int(not ws), (m, n, k, names)
    # Deep K: the 256-row kernel splits it (64 k tiles, 48 output tiles: two splits from 132 SMs, as on the H100).
    if _wgmma_splits(48, 64, 1, sms) > 1:
        assert any(ws_split_kernel.search(x) for x in _kernel_names(gen, 768, n=2048, k=8192, packed=True))
    monkeypatch.setenv("QOQ_GEMM_WS_MIN_M", "512")
    assert sum(bool(ws_kernel.search(x)) for x in _kernel_names(gen, 600, per_group=False)) == 1
    monkeypatch.delenv("QOQ_GEMM_WS_MIN_M")
    assert_per_group_matches(1300, 272, 1664, 64, torch.float16, torch.bfloat16, gen)
    assert_per_group_matches(768, 384, 8192, 128, torch.float16, torch.bfloat16, gen)


@needs_hopper
@pytest.mark.parametrize("bm", (128, 256))
def test_wgmma_grouped_tile_order_beyond_4096_rows(bm, gen, wgmma):
    """Past 4096 activation rows the wgmma kernels take their output tiles in groups of 4096 rows (an L2-friendly
    order): every tile, including the last partial group and partial tiles, is computed once and exactly."""
    wgmma(bm)
    assert_per_group_matches(4400, 400, 640, 64, None, torch.float16, gen)
    assert_per_channel_matches(4400, 400, 640, None, torch.bfloat16, gen)

# ---- Decode kernel (M <= 16: csrc/gemm/w4a8_gemv.cu; the default unless QOQ_GEMM_DECODE=0) ----

def _decode_enabled() -> bool:
    import os

    max_m = os.environ.get("QOQ_GEMM_DECODE_MAX_M", "")
    return os.environ.get("QOQ_GEMM_DECODE", "1") != "0" and (max_m == "" or int(max_m) >= 16)


needs_decode = pytest.mark.skipif(not (_cuda_kernels_built() and _decode_enabled()),
                                  reason="qoq_torch._C not built, or the decode kernel disabled by QOQ_GEMM_DECODE*")

DECODE_MS = tuple(range(1, 17))


@pytest.fixture(autouse=True)
def _decode_kernel_for_every_small_m(request, monkeypatch):
    """The decode kernel serves M <= 2 by default; its own tests run it for every M it supports (1..16)."""
    if request.node.name.startswith("test_decode") and "QOQ_GEMM_DECODE_MAX_M" not in os.environ:
        monkeypatch.setenv("QOQ_GEMM_DECODE_MAX_M", "16")
    if request.node.name.startswith("test_decode"):
        monkeypatch.setenv("QOQ_GEMM_STREAM", "0")  # the streaming kernel comes first where it is on
# (N, K): a single 16-row block, K % 128 != 0 (g = 64), N not a multiple of 32, a last K pass that only part of
# the block's lanes reach (K/32 % 64 != 0), long K like Llama's down projection.
DECODE_NK = ((16, 64), (48, 192), (272, 1024), (32, 4160), (80, 14336))
_BIAS_DTYPES = (None, torch.float32, torch.float16, torch.bfloat16)


@needs_decode
@pytest.mark.parametrize("m", DECODE_MS)
@pytest.mark.parametrize("n,k", DECODE_NK)
@pytest.mark.parametrize("out_dtype", (torch.float16, torch.bfloat16))
def test_decode_per_group_matches_reference(m, n, k, out_dtype, gen):
    assert_per_group_matches(m, n, k, 64 if (k % 128 or m % 2) else 128, _BIAS_DTYPES[m % 4], out_dtype, gen)


@needs_decode
@pytest.mark.parametrize("m", DECODE_MS)
@pytest.mark.parametrize("n,k", DECODE_NK)
@pytest.mark.parametrize("out_dtype", (torch.float16, torch.bfloat16))
def test_decode_per_channel_matches_reference(m, n, k, out_dtype, gen):
    assert_per_channel_matches(m, n, k, _BIAS_DTYPES[(m + 1) % 4], out_dtype, gen)


@needs_decode
@pytest.mark.parametrize("m", (1, 7, 16))
def test_decode_extreme_values(m):
    _assert_extreme_values(m)


def _assert_extreme_values(m: int) -> None:
    """Largest |acc| the formats allow at K = 14336: x_q = -127 against w8 = -128 (w4 = 0, z2 = 8, s2 = 16)
    and against UINT4 15 with zero point 0 (per channel)."""
    n, k, g = 32, 14336, 128
    x_q = torch.full((m, k), -127, dtype=torch.int8)
    x_s = torch.full((m,), 1e-6)
    x_sum = x_q.sum(dim=1, dtype=torch.int32)
    qweight = ops.pack_weights(torch.zeros(n, k, dtype=torch.uint8))
    s2 = torch.full((n, k // g), 16, dtype=torch.uint8)
    z2 = torch.full((n, k // g), 8, dtype=torch.uint8)
    s1 = torch.full((n,), 1e-3).half()
    ref = torch.ops.qoq.w4a8_gemm_per_group(x_q, x_s, qweight, s2, z2, s1, None, g, torch.float16)
    out = ops.w4a8_gemm_per_group(*_to("cuda", x_q, x_s, qweight, s2, z2, s1), group_size=g)
    assert torch.equal(out.cpu(), ref) and bool((ref > 0).all())
    qweight15 = ops.pack_weights(torch.full((n, k), 15, dtype=torch.uint8))
    zero = torch.zeros(n, dtype=torch.uint8)
    ref = torch.ops.qoq.w4a8_gemm_per_channel(x_q, x_s, x_sum, qweight15, s1, zero, None, torch.bfloat16)
    out = ops.w4a8_gemm_per_channel(*_to("cuda", x_q, x_s, x_sum, qweight15, s1, zero), out_dtype=torch.bfloat16)
    assert torch.equal(out.cpu(), ref) and bool((ref < 0).all())


@needs_decode
@pytest.mark.parametrize("n,k", ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (8720, 4224)))
def test_decode_llama_shapes_match_reference(n, k, gen):
    """Llama-3-8B's qkv, o, gate_up and down at M = 1 and 16, both formats, g = 128, with and without bias;
    (8720, 4224): many blocks and a last K pass that only part of the lanes reach."""
    g = 128
    w4, s2, z2, s1 = random_per_group(n, k, g, gen)
    qweight = ops.pack_weights(w4)
    scale = (torch.rand(n, generator=gen) * 0.05 + 1e-3).half()
    zero = torch.randint(0, 16, (n,), generator=gen, dtype=torch.uint8)
    bias = random_bias(n, torch.bfloat16, gen)
    qw_c, s2_c, z2_c, s1_c, scale_c, zero_c, bias_c = _to("cuda", qweight, s2, z2, s1, scale, zero, bias)
    for m in (1, 16):
        x_q, x_s, x_sum = random_activations(m, k, gen)
        x_q_c, x_s_c, x_sum_c = _to("cuda", x_q, x_s, x_sum)
        b, b_c = (bias, bias_c) if m == 16 else (None, None)
        ref = torch.ops.qoq.w4a8_gemm_per_group(x_q, x_s, qweight, s2, z2, s1, b, g, torch.bfloat16)
        out = ops.w4a8_gemm_per_group(x_q_c, x_s_c, qw_c, s2_c, z2_c, s1_c, b_c, group_size=g,
                                      out_dtype=torch.bfloat16)
        assert torch.equal(out.cpu(), ref), ("per-group", m)
        ref = torch.ops.qoq.w4a8_gemm_per_channel(x_q, x_s, x_sum, qweight, scale, zero, b, torch.float16)
        out = ops.w4a8_gemm_per_channel(x_q_c, x_s_c, x_sum_c, qw_c, scale_c, zero_c, b_c, out_dtype=torch.float16)
        assert torch.equal(out.cpu(), ref), ("per-channel", m)


@needs_decode
@pytest.mark.parametrize("config", range(5))
@pytest.mark.parametrize("m", (1, 2))
@pytest.mark.parametrize("n,k", ((16, 64), (48, 192), (32, 4160), (80, 14336), (6144, 4096)))
def test_decode_configs_match_reference(config, m, n, k, gen, monkeypatch):
    """Every (rows per lane, chunks per batch, blocks per SM) variant of the M <= 2 decode kernel
    (QOQ_GEMM_DECODE_CONFIG) is exact in both formats, including the largest |acc| the formats allow."""
    monkeypatch.setenv("QOQ_GEMM_DECODE_CONFIG", str(config))
    g = 64 if k % 128 else 128
    assert_per_group_matches(m, n, k, g, torch.float16 if m == 2 else None, torch.bfloat16, gen)
    assert_per_channel_matches(m, n, k, torch.bfloat16 if m == 1 else None, torch.float16, gen)
    if k == 14336:
        _assert_extreme_values(m)


@needs_kernel
@pytest.mark.parametrize("m", (1, 5, 16))
@pytest.mark.parametrize("n,k", ((48, 192), (272, 1024), (128, 4096)))
def test_tile_kernel_small_m_still_exact(m, n, k, gen, monkeypatch):
    """QOQ_GEMM_FORCE="0,0" keeps the mma.sync tile kernel (its own config choice) reachable at M <= 16."""
    monkeypatch.setenv("QOQ_GEMM_FORCE", "0,0")
    g = 64 if k % 128 else 128
    x_q, x_s, x_sum = random_activations(m, k, gen)
    w4, s2, z2, s1 = random_per_group(n, k, g, gen)
    qweight = ops.pack_weights(w4)
    bias = random_bias(n, torch.float16, gen)
    ref = torch.ops.qoq.w4a8_gemm_per_group(x_q, x_s, qweight, s2, z2, s1, bias, g, torch.float16)
    out = ops.w4a8_gemm_per_group(*_to("cuda", x_q, x_s, qweight, s2, z2, s1, bias), group_size=g)
    assert torch.equal(out.cpu(), ref)
    zero = z2[:, 0].contiguous()
    ref = torch.ops.qoq.w4a8_gemm_per_channel(x_q, x_s, x_sum, qweight, s1, zero, None, torch.bfloat16)
    out = ops.w4a8_gemm_per_channel(*_to("cuda", x_q, x_s, x_sum, qweight, s1, zero), out_dtype=torch.bfloat16)
    assert torch.equal(out.cpu(), ref)


@needs_decode
def test_decode_kernel_is_dispatched(gen, monkeypatch):
    """M <= 16 runs the decode kernel (and only it: no memset, no split-K workspace); M = 17 and a forced tile
    config run the mma.sync tile kernel."""
    from torch.profiler import ProfilerActivity, profile

    n, k, g = 64, 1024, 128
    w4, s2, z2, s1 = random_per_group(n, k, g, gen)
    weights = _to("cuda", ops.pack_weights(w4), s2, z2, s1)

    def kernels(m: int) -> list[str]:
        x_q, x_s, x_sum = _to("cuda", *random_activations(m, k, gen))
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            ops.w4a8_gemm_per_group(x_q, x_s, *weights, group_size=g, x_sum=x_sum)  # as modules call it
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]  # kernels, memsets

    if not kernels(1):
        pytest.skip("the profiler recorded no CUDA kernels here")
    for m in (1, 2, 3, 4, 8, 9, 16):
        names = kernels(m)
        assert len(names) == 1 and "w4a8_gemv_kernel" in names[0], (m, names)
    assert not any("w4a8_gemv_kernel" in name for name in kernels(17))
    monkeypatch.delenv("QOQ_GEMM_DECODE_MAX_M")  # the default: decode kernel for M <= 2 only
    assert any("w4a8_gemv_kernel" in name for name in kernels(2))
    assert not any("w4a8_gemv_kernel" in name for name in kernels(3))
    monkeypatch.setenv("QOQ_GEMM_DECODE_MAX_M", "16")
    monkeypatch.setenv("QOQ_GEMM_FORCE", "0,0")
    names = kernels(4)
    assert any("w4a8_gemm_kernel" in name for name in names) and not any("w4a8_gemv_kernel" in x for x in names)


@needs_kernel
@pytest.mark.parametrize("per_group", (True, False))
def test_more_than_2_31_activation_elements(per_group, gen):
    """M * K >= 2^31 (a long batched prefill) runs in row chunks: rows on both sides of the first chunk
    boundary and the last rows match the reference computed on those rows alone."""
    k, n, g = 128, 32, 128
    chunk = (2**31 - 1) // k // 256 * 256  # the CUDA entry's rows per launch
    m = chunk + 300
    torch.manual_seed(0)
    x_q_c = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
    x_s_c = torch.rand(m, device="cuda") * 0.02 + 1e-4
    x_sum_c = x_q_c.sum(dim=1, dtype=torch.int32)
    w4, s2, z2, s1 = random_per_group(n, k, g, gen)
    qweight = ops.pack_weights(w4)
    zero = z2[:, 0].contiguous()
    if per_group:
        out = ops.w4a8_gemm_per_group(x_q_c, x_s_c, *_to("cuda", qweight, s2, z2, s1), group_size=g)
    else:
        out = ops.w4a8_gemm_per_channel(x_q_c, x_s_c, x_sum_c, *_to("cuda", qweight, s1, zero))
    rows = torch.cat([torch.arange(0, 3), torch.arange(chunk - 3, chunk + 3), torch.arange(m - 3, m)])
    x_q, x_s, x_sum = x_q_c[rows.cuda()].cpu(), x_s_c[rows.cuda()].cpu(), x_sum_c[rows.cuda()].cpu()
    if per_group:
        ref = torch.ops.qoq.w4a8_gemm_per_group(x_q, x_s, qweight, s2, z2, s1, None, g, torch.float16)
    else:
        ref = torch.ops.qoq.w4a8_gemm_per_channel(x_q, x_s, x_sum, qweight, s1, zero, None, torch.float16)
    assert torch.equal(out[rows.cuda()].cpu(), ref)


# ---- Small-M kernel (3 <= M <= 64: csrc/gemm/w4a8_skinny.cu; QOQ_GEMM_SKINNY=0 turns it off) ----

def _skinny_enabled() -> bool:
    max_m = os.environ.get("QOQ_GEMM_SKINNY_MAX_M", "")
    return os.environ.get("QOQ_GEMM_SKINNY", "1") != "0" and (max_m == "" or int(max_m) >= 64)


needs_skinny = pytest.mark.skipif(not (_cuda_kernels_built() and _skinny_enabled()),
                                  reason="qoq_torch._C not built, or the small-M kernel disabled by QOQ_GEMM_SKINNY*")

@pytest.fixture(autouse=True)
def _skinny_kernel_for_every_m(request, monkeypatch):
    """The small-M kernel serves M <= 32 per group and M <= 16 per channel by default; its own tests run it for
    every M it takes (1..64 in both formats)."""
    if request.node.name.startswith("test_skinny") and "QOQ_GEMM_SKINNY_MAX_M" not in os.environ:
        monkeypatch.setenv("QOQ_GEMM_SKINNY_MAX_M", "64")
    if request.node.name.startswith("test_skinny"):
        monkeypatch.setenv("QOQ_GEMM_STREAM", "0")
        monkeypatch.setenv("QOQ_GEMM_WGMMA", "0")


# M in every 8-token-tile bucket and at its edges; (N, K): one 16-row block, N = 48 (not a multiple of 32: fewer
# rows per block), a K whose 128-wide blocks do not fill the 8 warps' passes, long K like Llama's down projection.
SKINNY_MS = (3, 5, 8, 9, 15, 16, 17, 24, 31, 32, 33, 47, 63, 64)
SKINNY_NK = ((16, 128), (48, 384), (64, 1152), (256, 2048), (80, 14336))


@needs_skinny
@pytest.mark.parametrize("rt", (1, 2, 4))
@pytest.mark.parametrize("m", SKINNY_MS)
@pytest.mark.parametrize("n,k", SKINNY_NK)
def test_skinny_matches_reference(rt, m, n, k, gen, monkeypatch):
    """Each forced rows-per-block choice (QOQ_GEMM_SKINNY_RT; the kernel lowers it where N needs) is exact in both
    formats, group sizes 64 and 128, every bias dtype and both output dtypes."""
    monkeypatch.setenv("QOQ_GEMM_SKINNY_RT", str(rt))
    monkeypatch.setenv("QOQ_GEMM_DECODE", "0")
    out_dtype = (torch.float16, torch.bfloat16)[m % 2]
    assert_per_group_matches(m, n, k, 64 if (m + rt) % 2 else 128, _BIAS_DTYPES[m % 4], out_dtype, gen)
    assert_per_channel_matches(m, n, k, _BIAS_DTYPES[(m + rt) % 4], out_dtype, gen)


@needs_skinny
@pytest.mark.parametrize("m", (1, 2))
def test_skinny_takes_m_1_and_2(m, gen, monkeypatch):
    """With the decode kernel off, M = 1 and 2 run on the small-M kernel, exactly."""
    monkeypatch.setenv("QOQ_GEMM_DECODE", "0")
    assert_per_group_matches(m, 272, 1024, 128, torch.bfloat16, torch.bfloat16, gen)
    assert_per_channel_matches(m, 272, 1024, None, torch.float16, gen)


@needs_skinny
@pytest.mark.parametrize("m", (3, 33, 64))
def test_skinny_extreme_values(m):
    _assert_extreme_values(m)


@needs_skinny
@pytest.mark.parametrize("n,k", ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)))
def test_skinny_llama_shapes_match_reference(n, k, gen):
    """Llama-3-8B's qkv, o, gate_up and down at M = 4, 16 and 64 (the kernel's own rows-per-block choice)."""
    for m in (4, 16, 64):
        assert_per_group_matches(m, n, k, 128, None, torch.bfloat16, gen)
    assert_per_channel_matches(16, n, k, torch.bfloat16, torch.float16, gen)


@needs_skinny
def test_skinny_kernel_is_dispatched(gen, monkeypatch):
    """3 <= M <= 64 runs the small-M kernel alone (no memset, no workspace); M = 65, K % 128 != 0, a forced tile
    config and QOQ_GEMM_SKINNY=0 do not; by default it serves M <= 32 per group and M <= 16 per channel."""
    def kernels(m: int, k: int = 1024, per_group: bool = True) -> list[str]:
        return _kernel_names(gen, m, k=k, g=64, per_group=per_group)

    if not kernels(3):
        pytest.skip("the profiler recorded no CUDA kernels here")
    for m in (3, 8, 17, 64):
        names = kernels(m)
        assert len(names) == 1 and "w4a8_skinny_kernel" in names[0], (m, names)
    assert not any("w4a8_skinny_kernel" in x for x in kernels(65))
    assert not any("w4a8_skinny_kernel" in x for x in kernels(8, k=192))  # K % 128 != 0: the tile kernel
    assert any("w4a8_gemv_kernel" in x for x in kernels(2))
    monkeypatch.setenv("QOQ_GEMM_FORCE", "0,0")
    assert not any("w4a8_skinny_kernel" in x for x in kernels(8))
    monkeypatch.delenv("QOQ_GEMM_FORCE")
    monkeypatch.setenv("QOQ_GEMM_SKINNY", "0")
    assert not any("w4a8_skinny_kernel" in x for x in kernels(8))
    monkeypatch.delenv("QOQ_GEMM_SKINNY")
    monkeypatch.delenv("QOQ_GEMM_SKINNY_MAX_M")  # the defaults: M <= 32 per group, M <= 16 per channel
    assert any("w4a8_skinny_kernel" in x for x in kernels(32))
    assert not any("w4a8_skinny_kernel" in x for x in kernels(33))
    assert any("w4a8_skinny_kernel" in x for x in kernels(16, per_group=False))
    assert not any("w4a8_skinny_kernel" in x for x in kernels(17, per_group=False))


@needs_kernel
@pytest.mark.parametrize("config", range(8))
@pytest.mark.parametrize("splits", (0, 3))
@pytest.mark.parametrize("m,n,k", ((5, 272, 1024), (40, 144, 2048), (70, 400, 512)))
def test_every_tile_config_matches_reference(config, splits, m, n, k, gen, monkeypatch):
    """Each mma.sync tile config (QOQ_GEMM_FORCE="<config>,<splits>"; configs 0 and 4 need K % 256 / % 128 and
    fall back to the kernel's own choice otherwise), with and without a forced split-K, in both formats."""
    monkeypatch.setenv("QOQ_GEMM_FORCE", f"{config},{splits}")
    assert_per_group_matches(m, n, k, 128 if config % 2 else 64, torch.float16, torch.bfloat16, gen)
    assert_per_channel_matches(m, n, k, None, torch.float16, gen)


# ---- Streaming small-M kernel (sm_90: csrc/gemm/w4a8_stream.cu; QOQ_GEMM_STREAM=0 turns it off) ----

def _stream_enabled() -> bool:
    return _hopper() and os.environ.get("QOQ_GEMM_STREAM", "1") != "0"


needs_stream = pytest.mark.skipif(not _stream_enabled(),
                                  reason="the streaming GEMM kernel needs an sm_90 GPU (or QOQ_GEMM_STREAM=0 is set)")


@pytest.fixture(autouse=True)
def _stream_kernel_for_every_m(request, monkeypatch):
    """Its own tests run the streaming kernel for every M it takes (1..32), whatever its default range, ahead of the
    wgmma kernel (which takes per group M >= 24 by default)."""
    if request.node.name.startswith("test_stream") and "QOQ_GEMM_STREAM_MAX_M" not in os.environ:
        monkeypatch.setenv("QOQ_GEMM_STREAM_MAX_M", "32")
        monkeypatch.setenv("QOQ_GEMM_STREAM_MIN_M", "1")
        monkeypatch.setenv("QOQ_GEMM_WGMMA_GROUP_MIN_M", "33")


# M in every 8-token-tile bucket and at its edges. (N, K): one 16-row tile (N % 32 != 0: 32-row tiles fall back),
# K of a single partial stage (fewer k blocks than warps; 1152: not a multiple of 4 groups), K with a partial last
# stage, more tiles than SMs (each block walks several tiles, the producer runs ahead across them), long K like
# Llama's down projection.
STREAM_MS = (1, 2, 3, 7, 8, 9, 16, 17, 24, 31, 32)
STREAM_NK = ((16, 512), (48, 1152), (96, 2560), (4160, 1024), (80, 14336))


@needs_stream
@pytest.mark.parametrize("variant", range(4))
@pytest.mark.parametrize("m", STREAM_MS)
@pytest.mark.parametrize("n,k", STREAM_NK)
def test_stream_matches_reference(variant, m, n, k, gen, monkeypatch):
    """Each forced variant (QOQ_GEMM_STREAM_VARIANT: rows per tile, consumer warps, blocks per SM; N % 32 != 0 falls
    back to 16-row tiles) is exact in both formats, group sizes 64 and 128, every bias dtype and both output
    dtypes."""
    monkeypatch.setenv("QOQ_GEMM_STREAM_VARIANT", str(variant))
    out_dtype = (torch.float16, torch.bfloat16)[m % 2]
    for g in (64, 128):
        assert_per_group_matches(m, n, k, g, _BIAS_DTYPES[(m + g // 64) % 4], out_dtype, gen)
    assert_per_channel_matches(m, n, k, _BIAS_DTYPES[(m + variant) % 4], out_dtype, gen)


@needs_stream
@pytest.mark.parametrize("m", (1, 16, 32))
def test_stream_extreme_values(m):
    _assert_extreme_values(m)


@needs_stream
@pytest.mark.parametrize("n,k", LLAMA_NK)
def test_stream_llama_shapes_match_reference(n, k, gen):
    """Llama-3-8B's qkv, o, gate_up and down at M = 1, 4, 16 and 32 (the kernel's own variant choice)."""
    for m in (1, 4, 16, 32):
        assert_per_group_matches(m, n, k, 128, None, torch.bfloat16, gen)
    assert_per_group_matches(3, n, k, 64, torch.float16, torch.float16, gen)
    assert_per_channel_matches(16, n, k, torch.bfloat16, torch.float16, gen)


@needs_stream
def test_stream_misaligned_scales_fall_back_exactly(gen):
    """The kernel copies the packed scales in 16-byte words: a packed_scales view that is not 16-byte aligned takes
    another kernel, exactly; s2 / z2 views at any alignment (no packed scales given) are packed by the op for it."""
    from torch.profiler import ProfilerActivity, profile

    m, n, k, g = 4, 64, 1024, 128
    x_q, x_s, _ = random_activations(m, k, gen)
    w4, s2, z2, s1 = random_per_group(n, k, g, gen)
    ref = torch.ops.qoq.w4a8_gemm_per_group(x_q, x_s, ops.pack_weights(w4), s2, z2, s1, None, g, torch.float16)
    cuda = _to("cuda", x_q, x_s, ops.pack_weights(w4), s2, z2, s1)

    def odd_view(t: torch.Tensor) -> torch.Tensor:
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")
        view = buf[1:].view(t.shape)
        view.copy_(t)
        return view

    def run(s2_in, z2_in, packed) -> list[str]:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = ops.w4a8_gemm_per_group(cuda[0], cuda[1], cuda[2], s2_in, z2_in, cuda[5], group_size=g,
                                          packed_scales=packed)
            torch.cuda.synchronize()
        assert torch.equal(out.cpu(), ref)
        return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

    packed = odd_view(ops.pack_scales(cuda[3], cuda[4]))
    assert packed.data_ptr() % 16 != 0
    names = run(cuda[3], cuda[4], packed)
    assert names and not any("w4a8_stream_kernel" in x for x in names), names
    odd = [odd_view(t) for t in cuda[3:5]]
    assert odd[0].data_ptr() % 4 != 0
    names = run(odd[0], odd[1], None)
    assert any("w4a8_stream_kernel" in x for x in names), names


@needs_stream
def test_stream_kernel_is_dispatched(gen, monkeypatch):
    """Within its M range the streaming kernel runs alone (no memset, no workspace; per group with the packed scales
    given, as modules call it); group size 256, M = 33, a forced tile config and QOQ_GEMM_STREAM=0 do not take it;
    by default it serves 1 <= M <= 16 in both formats (per group the wgmma kernel takes M >= 17)."""
    def kernels(m: int, k: int = 1024, g: int = 128, per_group: bool = True) -> list[str]:
        return _kernel_names(gen, m, k=k, g=g, per_group=per_group, packed=True)

    if not kernels(1):
        pytest.skip("the profiler recorded no CUDA kernels here")
    for m in (1, 2, 8, 17, 32):
        for per_group in (True, False):
            names = kernels(m, per_group=per_group)
            assert len(names) == 1 and "w4a8_stream_kernel" in names[0], (m, per_group, names)
    assert not any("w4a8_stream_kernel" in x for x in kernels(33))
    assert not any("w4a8_stream_kernel" in x for x in kernels(4, g=256))
    assert any("w4a8_stream_kernel" in x for x in kernels(4, k=384, g=64))  # a partial stage of 6 groups
    assert any("w4a8_stream_kernel" in x for x in kernels(4, k=384, per_group=False))
    monkeypatch.setenv("QOQ_GEMM_FORCE", "0,0")
    assert not any("w4a8_stream_kernel" in x for x in kernels(4))
    monkeypatch.delenv("QOQ_GEMM_FORCE")
    monkeypatch.setenv("QOQ_GEMM_STREAM", "0")
    assert not any("w4a8_stream_kernel" in x for x in kernels(4))
    monkeypatch.delenv("QOQ_GEMM_STREAM")
    monkeypatch.delenv("QOQ_GEMM_STREAM_MIN_M")
    monkeypatch.delenv("QOQ_GEMM_STREAM_MAX_M")  # the defaults: 1 <= M <= 16 per channel, 1 <= M <= 16 per group
    monkeypatch.delenv("QOQ_GEMM_WGMMA_GROUP_MIN_M")  # (per group from M = 17 on the wgmma kernel)
    for m in (1, 2, 9, 16):
        assert any("w4a8_stream_kernel" in x for x in kernels(m, per_group=False)), m
        assert any("w4a8_stream_kernel" in x for x in kernels(m)), m
    for m in (17, 23, 24, 32):
        assert not any("w4a8_stream_kernel" in x for x in kernels(m)), m
    assert not any("w4a8_stream_kernel" in x for x in kernels(17, per_group=False))
    assert not any("w4a8_stream_kernel" in x for x in kernels(33))


@needs_kernel
@pytest.mark.parametrize("m", [1, 4, 24, 64, 300])
@pytest.mark.parametrize("per_group", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_residual_epilogue_is_the_reference_add(m, per_group, out_dtype, gen):
    """`residual + y` in the epilogue of every kernel the dispatch picks (decode, streaming, small-M, tile, wgmma by
    M): bit-equal to the CPU reference and to the GEMM followed by torch's add on the GPU."""
    n, k, g = 512, 1024, 128
    x_q, x_s, x_sum = random_activations(m, k, gen)
    residual = (torch.randn(m, n, generator=gen) * 4).to(out_dtype)
    if per_group:
        w4, s2, z2, s1 = random_per_group(n, k, g, gen)
        operands = (x_q, x_s, ops.pack_weights(w4), s2, z2, s1, None)
        ref = torch.ops.qoq.w4a8_gemm_per_group(*operands, g, out_dtype, residual)
        run = lambda r: ops.w4a8_gemm_per_group(*_to("cuda", *operands), group_size=g, out_dtype=out_dtype,  # noqa: E731
                                                residual=r)
    else:
        w4, scale, zero = random_per_channel(n, k, gen)
        operands = (x_q, x_s, x_sum, ops.pack_weights(w4), scale, zero, None)
        ref = torch.ops.qoq.w4a8_gemm_per_channel(*operands, out_dtype, residual)
        run = lambda r: ops.w4a8_gemm_per_channel(*_to("cuda", *operands), out_dtype=out_dtype,  # noqa: E731
                                                  residual=r)
    fused = run(residual.cuda())
    assert torch.equal(fused.cpu(), ref)
    assert torch.equal(fused, residual.cuda() + run(None))
    with pytest.raises(RuntimeError, match="residual must have shape"):
        run(residual[:, :256].contiguous().cuda())
    with pytest.raises(RuntimeError, match="residual must have dtype"):
        run(residual.float().cuda())
