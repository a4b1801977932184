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
@pytest.mark.parametrize("k,split,ctas", ((96, None, None), (4096, "64", None), (4096, "64", "1"), (4096, "64", "8")))
def test_quantize_per_token_zero_and_tiny_rows(k, split, ctas, gen, monkeypatch):
    """Zero, denormal and all-underflow rows stay bit-exact (scale 0 -> codes 0, no NaN, code sum 0 although the
    kernels add it up with atomics into memory a previous call left its sums in), on the one-block kernel and on the
    cluster split (QOQ_QUANT_SPLIT, QOQ_QUANT_SPLIT_CTAS)."""
    for name, value in (("QOQ_QUANT_SPLIT", split), ("QOQ_QUANT_SPLIT_CTAS", ctas)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    x = random_rows(6, k, torch.float32, gen)
    x[1] = 0.0
    x[3] = 1e-42  # denormal input: scale 1e-42 / 127 underflows towards 0 differently per path
    x[4] = 0.0
    x[4, k - 1] = -1e-45  # amax / 127 underflows to 0: scale 0, codes 0
    stale = ops.quantize_per_token((x.abs() + 1).cuda())  # its freed x_sum is likely the next call's
    assert bool((stale[2] > 0).all())
    del stale
    got = ops.quantize_per_token(x.cuda())
    ref = torch.ops.qoq.quantize_per_token(x)
    for g, r in zip(got, ref):
        assert torch.equal(g.cpu(), r)
    assert float(got[1][1]) == 0.0 and not bool(torch.isnan(got[1]).any())


def half_integer_quotient_rows(m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """float32 rows whose values y put y / x_s exactly on, one ulp beside, and 2^-13 beside half-integers (the
    kernels round with a reciprocal multiply and divide only near half-integers), for scales whose reciprocal is
    exact or not; each row's first element is its amax, 127 x_s."""
    rows = []
    for r in range(m):
        scale = torch.tensor([(1.0, 3.0, 0.1, 1 / 3, 7.3e-3, 2.0 ** -20, 1e5, 0.7)[r % 8]], dtype=torch.float32)
        amax = scale * 127
        scale = amax / 127  # the kernels' x_s
        codes = torch.randint(-127, 127, (k,), generator=gen).float() + 0.5
        offsets = torch.tensor([0.0, 2.0 ** -13, -(2.0 ** -13)])[torch.randint(0, 3, (k,), generator=gen)]
        y = (codes + offsets) * scale
        ulp = torch.randint(-1, 2, (k,), generator=gen)
        y = torch.where(ulp > 0, torch.nextafter(y, torch.full_like(y, 1e30)),
                        torch.where(ulp < 0, torch.nextafter(y, torch.full_like(y, -1e30)), y))
        y = y.clamp(-amax, amax)
        y[0] = amax
        rows.append(y)
    return torch.stack(rows)


@needs_kernel
@pytest.mark.parametrize("m", (8, 100))
@pytest.mark.parametrize("split", (None, "64"))
def test_quantize_per_token_half_integer_quotients_bit_exact(m, split, gen, monkeypatch):
    """Quotients on and around rounding ties quantize as the reference's IEEE division does, on the one-block, the
    register and the cluster-split kernels."""
    if split is None:
        monkeypatch.delenv("QOQ_QUANT_SPLIT", raising=False)
    else:
        monkeypatch.setenv("QOQ_QUANT_SPLIT", split)
    x = half_integer_quotient_rows(m, 4096, gen)
    got = ops.quantize_per_token(x.cuda())
    ref = torch.ops.qoq.quantize_per_token(x)
    ties = ((x / ref[1].unsqueeze(1)).frac().abs() == 0.5).sum()
    assert int(ties) > 1000  # the rows do hit exact ties
    for g, r in zip(got, ref):
        assert torch.equal(g.cpu(), r)


@needs_kernel
@pytest.mark.parametrize("m,k", SHAPES)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_rmsnorm_quantize_matches_reference(m, k, dtype, gen):
    x = random_rows(m, k, dtype, gen)
    w = (torch.rand(k, generator=gen) + 0.5).to(dtype)
    got = ops.rmsnorm_quantize(x.cuda(), w.cuda(), 1e-6)
    ref = torch.ops.qoq.rmsnorm_quantize(x, w, 1e-6)
    assert_close_quantization(got, ref)


needs_add_kernel = pytest.mark.skipif(
    not (_kernels_built() and "add_rmsnorm_quantize" in ops.extension_status()["cuda_ops"]),
    reason="qoq_torch._C add_rmsnorm_quantize kernel not built")


@needs_add_kernel
@pytest.mark.parametrize("m,k", SHAPES)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_add_rmsnorm_quantize_matches_reference_and_the_unfused_kernels(m, k, dtype, gen):
    x, residual = random_rows(m, k, dtype, gen), random_rows(m, k, dtype, gen)
    w = (torch.rand(k, generator=gen) + 0.5).to(dtype)
    h, *quantized = ops.add_rmsnorm_quantize(x.cuda(), residual.cuda(), w.cuda(), 1e-6)
    ref_h, *ref_quantized = torch.ops.qoq.add_rmsnorm_quantize(x, residual, w, 1e-6)
    assert h.dtype == dtype and torch.equal(h.cpu(), ref_h)
    assert_close_quantization(quantized, ref_quantized)
    # the fused kernel is the add followed by the rmsnorm_quantize kernel, bit for bit
    unfused = ops.rmsnorm_quantize(residual.cuda() + x.cuda(), w.cuda(), 1e-6)
    assert torch.equal(h, residual.cuda() + x.cuda())
    for got, expect in zip(quantized, unfused):
        assert torch.equal(got, expect)


@needs_add_kernel
def test_add_rmsnorm_quantize_unaligned_views_and_opcheck(gen):
    base = random_rows(3, 8 * 128 + 1, torch.bfloat16, gen).cuda()
    x = base[0, 1:].view(8, 128)  # contiguous, 2 bytes off 16-byte alignment: the scalar path
    residual = base[1, :-1].view(8, 128)
    w = (torch.rand(128, generator=gen) + 0.5).bfloat16().cuda()
    got = ops.add_rmsnorm_quantize(x, residual, w, 1e-6)
    ref = torch.ops.qoq.add_rmsnorm_quantize(x.cpu(), residual.cpu(), w.cpu(), 1e-6)
    assert torch.equal(got[0].cpu(), ref[0])
    assert_close_quantization(got[1:], ref[1:])
    torch.library.opcheck(torch.ops.qoq.add_rmsnorm_quantize.default, (x.contiguous(), residual.contiguous(), w, 1e-5))
    for bad, match in ((residual[:, :64].contiguous(), "residual must have shape"),
                       (residual.half(), "residual must have dtype"), (residual.cpu(), "residual is on"),
                       (residual.t(), "residual must")):
        with pytest.raises(RuntimeError, match=match):
            torch.ops.qoq.add_rmsnorm_quantize(x, bad, w, 1e-6)


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


# Small-M cluster split (csrc/quant/quantize.cu): on sm_90, M <= QOQ_QUANT_SPLIT (default 64) rows with 16-byte
# aligned rows are each split over a cluster of CTAs; QOQ_QUANT_SPLIT=0 keeps the one-block-per-row kernel.
SPLIT_MS = (1, 2, 3, 16, 63, 64)
SPLIT_KS = (4096, 14336, 896, 5120, 128)
FALLBACK_KS = (4099, 1001, 13)  # K % 8 != 0 (K % 4 != 0 for float32): the scalar path, never split
OP_DTYPES = [(op, dt) for op in QUANT_OPS for dt in (torch.float16, torch.bfloat16)] + [
    ("quantize_per_token", torch.float32)
]


def check_op_against_reference(op: str, m: int, k: int, dtype, gen: torch.Generator) -> None:
    """One call of `op` on [m, k] (gate_up [m, 2k]) against the CPU reference, with the existing tests' checks."""
    if op == "quantize_per_token":
        x = random_rows(m, k, dtype, gen)
        got = ops.quantize_per_token(x.cuda())
        ref = torch.ops.qoq.quantize_per_token(x)
        for g, r in zip(got, ref):
            assert g.is_cuda and g.dtype == r.dtype
            assert torch.equal(g.cpu(), r), (op, m, k, dtype)
    elif op == "rmsnorm_quantize":
        x = random_rows(m, k, dtype, gen)
        w = (torch.rand(k, generator=gen) + 0.5).to(dtype)
        got = ops.rmsnorm_quantize(x.cuda(), w.cuda(), 1e-6)
        assert_close_quantization(got, torch.ops.qoq.rmsnorm_quantize(x, w, 1e-6))
    else:
        gate_up = random_rows(m, 2 * k, dtype, gen)
        got = ops.silu_mul_quantize(gate_up.cuda())
        assert got[0].shape == (m, k)
        assert_close_quantization(got, torch.ops.qoq.silu_mul_quantize(gate_up))


@needs_kernel
@pytest.mark.parametrize("split", (True, False), ids=("split", "row_kernel"))
@pytest.mark.parametrize("k", SPLIT_KS + FALLBACK_KS)
@pytest.mark.parametrize("op,dtype", OP_DTYPES)
def test_small_m_matches_reference(op, dtype, k, split, gen, monkeypatch):
    """M = 1..64 on the cluster-split path (every op, QOQ_QUANT_SPLIT=64) and on the one-block-per-row kernel."""
    monkeypatch.delenv("QOQ_QUANT_SPLIT_CTAS", raising=False)
    if split:
        monkeypatch.setenv("QOQ_QUANT_SPLIT", "64")
    else:
        monkeypatch.setenv("QOQ_QUANT_SPLIT", "0")
    for m in SPLIT_MS:
        check_op_against_reference(op, m, k, dtype, gen)


@needs_kernel
@pytest.mark.parametrize("ctas", (1, 2, 3, 4, 5, 7, 8))
@pytest.mark.parametrize("op", QUANT_OPS)
def test_split_forced_cluster_sizes(op, ctas, gen, monkeypatch):
    """Every cluster size, including ones that leave CTAs without a vector (K = 8, 24) and one too small for the
    row (1 CTA at K = 14336 falls back to the row kernel); M above the default threshold through QOQ_QUANT_SPLIT."""
    monkeypatch.setenv("QOQ_QUANT_SPLIT", "200")
    monkeypatch.setenv("QOQ_QUANT_SPLIT_CTAS", str(ctas))
    for m, k in ((1, 4096), (3, 896), (2, 8), (5, 24), (4, 14336), (130, 2048)):
        check_op_against_reference(op, m, k, torch.float16, gen)


@needs_kernel
def test_split_under_cuda_graph(gen, monkeypatch):
    """The cluster launch captures into a CUDA graph and replays with new inputs (decode runs in graphs)."""
    monkeypatch.setenv("QOQ_QUANT_SPLIT", "64")
    x = random_rows(2, 4096, torch.float16, gen).cuda()
    w = (torch.rand(4096, generator=gen) + 0.5).half().cuda()
    gate_up = random_rows(2, 2 * 14336, torch.float16, gen).cuda()

    def step():
        return (ops.quantize_per_token(x), ops.rmsnorm_quantize(x, w, 1e-6), ops.silu_mul_quantize(gate_up))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    x.copy_(random_rows(2, 4096, torch.float16, gen).cuda())
    gate_up.copy_(random_rows(2, 2 * 14336, torch.float16, gen).cuda())
    graph.replay()
    torch.cuda.synchronize()
    for g, r in zip(outs[0], torch.ops.qoq.quantize_per_token(x.cpu())):
        assert torch.equal(g.cpu(), r)
    assert_close_quantization(outs[1], torch.ops.qoq.rmsnorm_quantize(x.cpu(), w.cpu(), 1e-6))
    assert_close_quantization(outs[2], torch.ops.qoq.silu_mul_quantize(gate_up.cpu()))


@needs_kernel
def test_split_kernel_is_dispatched(gen, monkeypatch):
    """On sm_90 silu_mul_quantize at M <= 64 with aligned rows runs the cluster kernel alone, quantize_per_token at
    M = 40-64, rmsnorm_quantize never (below: the register kernel, or the shared-memory one for rows over 1024
    vectors); with QOQ_QUANT_SPLIT=64 every op splits at M <= 64; M = 65, K % 8 != 0, an unaligned view and
    QOQ_QUANT_SPLIT=0 run the row kernel; QOQ_QUANT_SPLIT=<m> moves the threshold."""
    from torch.profiler import ProfilerActivity, profile

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the cluster split needs an sm_90 device")
    monkeypatch.delenv("QOQ_QUANT_SPLIT", raising=False)
    monkeypatch.delenv("QOQ_QUANT_SPLIT_CTAS", raising=False)

    def kernels(op: str, m: int, k: int, offset: int = 0) -> list[str]:
        width = 2 * k if op == "silu_mul_quantize" else k
        base = random_rows(1, m * width + offset, torch.float16, gen).cuda()
        x = base.view(-1)[offset:offset + m * width].view(m, width)
        args = (x, (torch.rand(k, generator=gen) + 0.5).half().cuda(), 1e-6) if op == "rmsnorm_quantize" else (x,)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            getattr(ops, op)(*args)
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

    if not kernels("quantize_per_token", 1, 4096):
        pytest.skip("the profiler recorded no CUDA kernels here")
    for m, k in ((1, 4096), (39, 4096), (40, 4096), (64, 4096), (64, 14336), (65, 4096)):
        silu = kernels("silu_mul_quantize", m, k)[0]
        assert ("quantize_rows_cluster_kernel" in silu) == (m <= 64), (m, k, silu)
        for op, split in (("quantize_per_token", 40 <= m <= 64), ("rmsnorm_quantize", False)):
            expect = ("quantize_rows_cluster_kernel" if split else
                      "quantize_rows_regs_kernel" if k <= 8192 else "quantize_rows_kernel")
            assert expect in kernels(op, m, k)[0], (op, m, k)
    monkeypatch.setenv("QOQ_QUANT_SPLIT", "64")
    for op in QUANT_OPS:
        for m, k in ((1, 4096), (64, 4096), (1, 14336), (3, 128)):
            names = kernels(op, m, k)
            assert len(names) == 1 and "quantize_rows_cluster_kernel" in names[0], (op, m, k, names)
        for m, k, offset in ((1, 4099, 0), (2, 4096, 1)):
            names = kernels(op, m, k, offset)
            assert len(names) == 1 and "quantize_rows_kernel" in names[0], (op, m, k, offset, names)
        names = kernels(op, 65, 4096)  # past the split's range: rows in registers
        assert len(names) == 1 and "quantize_rows_regs_kernel" in names[0], (op, names)
    monkeypatch.setenv("QOQ_QUANT_SPLIT", "0")
    assert "quantize_rows_regs_kernel" in kernels("rmsnorm_quantize", 1, 4096)[0]
    assert "quantize_rows_kernel" in kernels("silu_mul_quantize", 1, 14336)[0]
    monkeypatch.setenv("QOQ_QUANT_SPLIT", "128")
    assert "quantize_rows_cluster_kernel" in kernels("rmsnorm_quantize", 128, 4096)[0]
    assert "quantize_rows_regs_kernel" in kernels("rmsnorm_quantize", 129, 4096)[0]


@needs_kernel
@pytest.mark.parametrize("op", QUANT_OPS + ("add_rmsnorm_quantize",))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_rows_in_registers_match_the_shared_memory_kernel(op, dtype, gen, monkeypatch):
    """From M = 65 aligned rows of up to 1024 vectors (K <= 8192) run the register kernel (2 vectors a thread;
    longer rows and QOQ_QUANT_REGS=0 the shared-memory one), and below M = 65 rows of up to 1024 vectors (one a
    thread; the cluster split off): the same bits as the shared-memory kernel, and the reference's codes within the
    documented rounding. K = 4104 leaves the last thread one vector of two."""
    from torch.profiler import ProfilerActivity, profile

    def run(x, w, r):
        if op == "rmsnorm_quantize":
            return ops.rmsnorm_quantize(x, w, 1e-6)
        if op == "add_rmsnorm_quantize":
            return ops.add_rmsnorm_quantize(x, r, w, 1e-6)
        return getattr(ops, op)(x)

    monkeypatch.setenv("QOQ_QUANT_SPLIT", "0")
    for m, k in ((65, 4096), (300, 4104), (97, 8192), (70, 14336), (66, 20000), (200, 128),
                 (1, 4096), (16, 4104), (5, 8192), (3, 14336), (64, 128)):
        width = 2 * k if op == "silu_mul_quantize" else k
        x = random_rows(m, width, dtype, gen)
        w = (torch.rand(k, generator=gen) + 0.5).to(dtype)
        r = random_rows(m, k, dtype, gen)
        cuda_args = (x.cuda(), w.cuda(), r.cuda())
        monkeypatch.delenv("QOQ_QUANT_REGS", raising=False)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            in_regs = run(*cuda_args)
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        expect = "quantize_rows_regs_kernel" if k <= 8192 else "quantize_rows_kernel"
        if names:  # the profiler may record nothing on some setups
            assert any(expect in n for n in names), (op, m, k, names)
        monkeypatch.setenv("QOQ_QUANT_REGS", "0")
        in_smem = run(*cuda_args)
        for a, b in zip(in_regs, in_smem):
            assert torch.equal(a, b), (op, m, k)
        if op == "quantize_per_token":
            ref = torch.ops.qoq.quantize_per_token(x)
            for a, b in zip(in_regs, ref):
                assert torch.equal(a.cpu(), b), (op, m, k)
        elif op == "rmsnorm_quantize":
            assert_close_quantization(in_regs, torch.ops.qoq.rmsnorm_quantize(x, w, 1e-6))
        elif op == "silu_mul_quantize":
            assert_close_quantization(in_regs, torch.ops.qoq.silu_mul_quantize(x))
        else:
            h_ref, *ref = torch.ops.qoq.add_rmsnorm_quantize(x, r, w, 1e-6)
            assert torch.equal(in_regs[0].cpu(), h_ref)
            assert_close_quantization(in_regs[1:], ref)
