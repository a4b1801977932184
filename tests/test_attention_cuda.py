"""CUDA KV4 kernels (kv4_append, kv4_decode_attention, kv4_decode_attention_quantize) against the CPU reference ops.

kv4_append is bit-exact. kv4_decode_attention sums in another order and feeds p to the tensor cores
in float16 (as FlashAttention does), so it is compared by relative error against the float32 reference.
"""
from __future__ import annotations

import math

import pytest
import torch

import qoq_torch.ops as ops

pytestmark = pytest.mark.cuda

KV_OPS = ("kv4_append", "kv4_decode_attention", "kv4_decode_attention_quantize")


def _kernels_built() -> bool:
    return torch.cuda.is_available() and set(KV_OPS) <= set(ops.extension_status()["cuda_ops"])


needs_kernel = pytest.mark.skipif(not _kernels_built(), reason="qoq_torch._C KV4 kernels not built")

# Relative Frobenius error and max error (as a fraction of max |ref|) allowed per output dtype: output
# rounding (2^-11 / 2^-8) plus float16 probabilities in the PV product.
TOLERANCE = {torch.float16: (2e-3, 4e-3), torch.bfloat16: (6e-3, 1.2e-2)}


def random_cache(b: int, h: int, t: int, d: int, gen: torch.Generator):
    """A KV4 cache of random codes and plausible random (scale, min) per slot: every slot holds data."""
    caches = []
    for _ in range(2):
        packed = torch.randint(0, 256, (b, h, t, d // 2), generator=gen, dtype=torch.uint8)
        scale = torch.rand(b, h, t, generator=gen) * 0.5 + 0.05
        mn = -7.5 * scale + torch.randn(b, h, t, generator=gen) * 0.2
        caches += [packed, torch.stack((scale, mn), -1).half()]
    return caches


def random_query(b: int, h_q: int, s_q: int, d: int, dtype, gen: torch.Generator, sharp: float = 2.0):
    """Queries stored as HF stores them ([B, S, H, D] transposed: not contiguous); `sharp` peaks the softmax."""
    return (torch.randn(b, s_q, h_q, d, generator=gen) * sharp).to(dtype).transpose(1, 2)


def assert_attention_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    rel_tol, max_tol = TOLERANCE[ref.dtype]
    assert out.dtype == ref.dtype and out.shape == ref.shape
    o, r = out.float().cpu(), ref.float()
    assert bool(torch.isfinite(o).all())
    rel = float((o - r).norm() / r.norm().clamp_min(1e-30))
    worst = float((o - r).abs().max() / r.abs().max().clamp_min(1e-30))
    assert rel <= rel_tol and worst <= max_tol, f"relative error {rel:.2e}, max error {worst:.2e} of max |ref|"


def run_both(q, caches, lens, starts, sm_scale):
    """(CUDA kernel output, CPU reference output) for the same inputs."""
    out = ops.kv4_decode_attention(q.cuda(), *[c.cuda() for c in caches], lens.cuda(), starts.cuda(), sm_scale)
    ref = torch.ops.qoq.kv4_decode_attention(q, *caches, lens, starts, sm_scale)
    return out, ref


# ---- kv4_append -----------------------------------------------------------------------------------------

@needs_kernel
@pytest.mark.parametrize("d", (64, 96, 128, 256))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_append_bit_exact_and_touches_only_its_slots(d, dtype, gen):
    b, h, t, s = 3, 4, 50, 7
    caches = random_cache(b, h, t, d, gen)  # stale contents that must survive outside the written slots
    # Rows with different ranges; strided like HF's (k after RoPE is [B, S, H, D].transpose(1, 2)).
    k = (torch.randn(b, s, h, d, generator=gen) * torch.rand(b, s, h, 1, generator=gen) * 6).to(dtype).transpose(1, 2)
    v = (torch.randn(b, s, h, d, generator=gen) + 3).to(dtype).transpose(1, 2)
    k[0, 1, 2] = 0.25  # a constant vector: scale 0, all codes 0
    pos = torch.randperm(t, generator=gen)[:s]
    got = [c.cuda() for c in caches]
    ops.kv4_append(*got, k.cuda(), v.cuda(), pos.cuda())
    ref = [c.clone() for c in caches]
    torch.ops.qoq.kv4_append(*ref, k, v, pos)
    for name, g, r in zip(("k_cache", "k_params", "v_cache", "v_params"), got, ref):
        assert torch.equal(g.cpu(), r), f"{name} differs"


@needs_kernel
def test_append_prefill_shape_bit_exact(gen):
    b, h, s, d = 2, 8, 1000, 128
    k = torch.randn(b, h, s, d, generator=gen).bfloat16()
    v = torch.randn(b, h, s, d, generator=gen).bfloat16()
    caches = random_cache(b, h, 1024, d, gen)
    got = [c.cuda() for c in caches]
    ops.kv4_append(*got, k.cuda(), v.cuda(), torch.arange(1000).cuda())
    ref = [c.clone() for c in caches]
    torch.ops.qoq.kv4_append(*ref, k, v, torch.arange(1000))
    assert all(torch.equal(g.cpu(), r) for g, r in zip(got, ref))


# ---- kv4_decode_attention -------------------------------------------------------------------------------

@needs_kernel
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("b,h_q,h_kv,s_q,d,t", [
    (2, 32, 8, 1, 128, 300),   # Llama-3 GQA, decode
    (3, 8, 8, 1, 64, 37),      # MHA, T not a multiple of 16
    (2, 12, 4, 3, 128, 129),   # 9 query rows (two 8-row groups), causal multi-token
    (2, 16, 2, 3, 64, 200),    # 24 query rows: two query chunks
    (1, 32, 8, 4, 128, 1000),  # Llama-3 GQA, speculative decoding's verification: 16 query rows, one block
    (1, 4, 2, 2, 256, 90),     # head_dim 256
    (1, 7, 1, 1, 128, 2000),   # odd GQA group (Qwen2-style), many splits
])
def test_decode_matches_reference(b, h_q, h_kv, s_q, d, t, dtype, gen):
    caches = random_cache(b, h_kv, t, d, gen)
    q = random_query(b, h_q, s_q, d, dtype, gen)
    lens = torch.randint(max(1, t // 2), t + 1, (b,), generator=gen, dtype=torch.int32)
    starts = torch.randint(0, max(1, t // 4), (b,), generator=gen, dtype=torch.int32)  # left padding
    out, ref = run_both(q, caches, lens, starts, 1 / math.sqrt(d))
    assert_attention_close(out, ref)


@needs_kernel
@pytest.mark.parametrize("h_q,h_kv,s_q,d", ((16, 2, 3, 128), (32, 8, 1, 64), (8, 2, 1, 256), (6, 6, 1, 64)))
@pytest.mark.parametrize("splits", (2, 3, 5, 8))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_decode_cluster_merge_equals_merge_kernel(h_q, h_kv, s_q, d, splits, dtype, gen, monkeypatch):
    """Splits merged inside a thread-block cluster (QOQ_KV4_CLUSTER=8: clusters of up to 8 CTAs on any grid; each CTA
    merges a slice of the block's rows x head_dim that the others send it) give the merge kernel's bits
    (QOQ_KV4_CLUSTER=0), with rows of different lengths (some splits empty), left padding, one or two query chunks,
    slices of part of one row (MHA: 64 values over up to 8 CTAs) or of several rows, and match the reference."""
    b, t = 3, 2100
    caches = random_cache(b, h_kv, t, d, gen)
    q = random_query(b, h_q, s_q, d, dtype, gen)
    lens = torch.tensor([t, 700, 9], dtype=torch.int32)
    starts = torch.tensor([0, 37, 2], dtype=torch.int32)
    cq, cc, cl, cs = q.cuda(), [c.cuda() for c in caches], lens.cuda(), starts.cuda()
    monkeypatch.setenv("QOQ_KV4_SPLITS", str(splits))
    monkeypatch.setenv("QOQ_KV4_CLUSTER", "8")
    clustered = ops.kv4_decode_attention(cq, *cc, cl, cs, 1 / math.sqrt(d))
    monkeypatch.setenv("QOQ_KV4_CLUSTER", "0")
    merged = ops.kv4_decode_attention(cq, *cc, cl, cs, 1 / math.sqrt(d))
    assert torch.equal(clustered, merged)
    assert_attention_close(clustered, torch.ops.qoq.kv4_decode_attention(q, *caches, lens, starts, 1 / math.sqrt(d)))


@needs_kernel
@pytest.mark.parametrize("b,t,clustered", ((1, 1000, True), (2, 700, True), (3, 500, True), (4, 500, False),
                                           (1, 1600, False), (8, 1000, True)))
def test_decode_cluster_rule_and_graph_replay(b, t, clustered, gen, monkeypatch):
    """The default rule: clusters of up to 8 splits where the grid is at most 3/4 of the SMs (batch 1-3 on short
    caches), two splits anywhere (batch 8), else the merge kernel; on the Llama-3 shape, replayed back to back in one
    CUDA graph, the result is the merge kernel's bits every time. `clustered` is what the rule does on a 132-SM H100
    (the profiler's kernel names tell: no merge kernel runs)."""
    for name in ("QOQ_KV4_SPLITS", "QOQ_KV4_WARPS"):
        monkeypatch.delenv(name, raising=False)
    h_q, h_kv, d = 32, 8, 128
    caches = [c.cuda() for c in random_cache(b, h_kv, t, d, gen)]
    q = random_query(b, h_q, 1, d, torch.bfloat16, gen).cuda()
    lens = torch.randint(t // 2, t + 1, (b,), generator=gen, dtype=torch.int32).cuda()
    starts = torch.randint(0, 5, (b,), generator=gen, dtype=torch.int32).cuda()
    monkeypatch.setenv("QOQ_KV4_CLUSTER", "0")
    merged = ops.kv4_decode_attention(q, *caches, lens, starts, 1 / math.sqrt(d))
    monkeypatch.delenv("QOQ_KV4_CLUSTER")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.kv4_decode_attention(q, *caches, lens, starts, 1 / math.sqrt(d))
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if names and torch.cuda.get_device_properties(0).multi_processor_count == 132:
        assert any("kv4_decode_kernel" in n for n in names), names
        assert any("kv4_combine" in n for n in names) != clustered, names
    graph, outs = torch.cuda.CUDAGraph(), []
    with torch.cuda.graph(graph):
        for _ in range(8):
            outs.append(ops.kv4_decode_attention(q, *caches, lens, starts, 1 / math.sqrt(d)))
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        for out in outs:
            assert torch.equal(out, merged)


@needs_kernel
@pytest.mark.parametrize("warps", ("4", "8"))
@pytest.mark.parametrize("splits", ("1", "2", "5", "8", "16", "17", "40"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_decode_block_widths_and_split_counts_match_reference(warps, splits, dtype, gen, monkeypatch):
    """4- and 8-warp blocks (QOQ_KV4_WARPS), one split, two (cluster merge) and more (merge kernel: one round of
    loads up to 16 splits, rounds of 16 beyond, the last one partial; empty splits past the shortest rows), with ragged
    rows and left padding, all match the reference; the quantized op stays bit-equal to quantizing the plain op (its
    own merge up to 8 splits, the per-head merge beyond)."""
    b, h_q, h_kv, s_q, d, t = 3, 32, 8, 1, 128, 1500
    caches = random_cache(b, h_kv, t, d, gen)
    q = random_query(b, h_q, s_q, d, dtype, gen)
    lens = torch.tensor([t, 611, 40], dtype=torch.int32)
    starts = torch.tensor([0, 17, 39], dtype=torch.int32)
    monkeypatch.setenv("QOQ_KV4_WARPS", warps)
    monkeypatch.setenv("QOQ_KV4_SPLITS", splits)
    out, ref = run_both(q, caches, lens, starts, 1 / math.sqrt(d))
    assert_attention_close(out, ref)
    assert_quantized_equals_unfused(q, caches, lens, starts, 1 / math.sqrt(d))


@needs_kernel
@pytest.mark.parametrize("warps,splits", (("4", "1"), ("8", "1"), ("4", "2"), ("8", "5")))
def test_decode_prefetch_before_the_wait_changes_no_bit(warps, splits, gen, monkeypatch):
    """The L2 prefetch before the PDL wait reads the lengths early (possibly stale); the result is the same bits as
    without it (QOQ_KV4_PREFETCH=0) and with the block's own shared memory size (QOQ_KV4_SOLO=0), also when the kernel
    just before rewrote the lengths and the newest slots."""
    b, h_q, h_kv, d, t = 3, 32, 8, 128, 1500
    caches = [c.cuda() for c in random_cache(b, h_kv, t, d, gen)]
    q = random_query(b, h_q, 1, d, torch.bfloat16, gen).cuda()
    new = [c.cuda() for c in random_cache(b, h_kv, 16, d, gen)]
    starts = torch.tensor([0, 17, 39], dtype=torch.int32, device="cuda")
    monkeypatch.setenv("QOQ_KV4_WARPS", warps)
    monkeypatch.setenv("QOQ_KV4_SPLITS", splits)
    results = []
    for prefetch, solo in (("3", "1"), ("0", "1"), ("3", "0")):
        monkeypatch.setenv("QOQ_KV4_PREFETCH", prefetch)
        monkeypatch.setenv("QOQ_KV4_SOLO", solo)
        lens = torch.tensor([5, 5, 40], dtype=torch.int32, device="cuda")
        cc = [c.clone() for c in caches]
        ops.kv4_decode_attention(q, *cc, lens, starts, 0.088)  # a launch with the short lengths just before
        lens.copy_(torch.tensor([t, 611, 1400], dtype=torch.int32))
        for c, n in zip(cc, new):
            c[:, :, 1384:1400] = n  # the newest slots of row 2, written after its first call
        results.append(ops.kv4_decode_attention(q, *cc, lens, starts, 0.088))
    assert all(torch.equal(results[0], r) for r in results[1:])
    cpu = [c.clone().cpu() for c in caches]
    for c, n in zip(cpu, new):
        c[:, :, 1384:1400] = n.cpu()
    ref = torch.ops.qoq.kv4_decode_attention(q.cpu(), *cpu, torch.tensor([t, 611, 1400], dtype=torch.int32),
                                             starts.cpu(), 0.088)
    assert_attention_close(results[0], ref)


def assert_quantized_equals_unfused(q, caches, lens, starts, sm_scale) -> None:
    """kv4_decode_attention_quantize on CUDA == quantize_per_token(kv4_decode_attention(...)) on CUDA, bit for bit,
    and its dequantized rows match the CPU reference attention within the attention tolerance plus half a step."""
    cq, cc, cl, cs = q.cuda(), [c.cuda() for c in caches], lens.cuda(), starts.cuda()
    x_q, x_s, x_sum = ops.kv4_decode_attention_quantize(cq, *cc, cl, cs, sm_scale)
    out = ops.kv4_decode_attention(cq, *cc, cl, cs, sm_scale)
    b, h_q, s_q, d = out.shape
    u_q, u_s, u_sum = ops.quantize_per_token(out.transpose(1, 2).reshape(b * s_q, h_q * d).contiguous())
    assert torch.equal(x_q, u_q) and torch.equal(x_s, u_s) and torch.equal(x_sum, u_sum)
    ref = torch.ops.qoq.kv4_decode_attention(q, *caches, lens, starts, sm_scale)
    ref_rows = ref.float().transpose(1, 2).reshape(b * s_q, h_q * d)
    deq = x_q.float().cpu() * x_s.cpu().unsqueeze(1)
    rel_tol, max_tol = TOLERANCE[q.dtype]
    bound = max_tol * ref_rows.abs().amax(1, keepdim=True) + x_s.cpu().unsqueeze(1) / 2 + 1e-6
    assert bool(((deq - ref_rows).abs() <= bound).all())


@needs_kernel
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("b,h_q,h_kv,s_q,d,t", [
    (1, 32, 8, 1, 128, 384),    # Llama-3 decode at batch 1: a few splits
    (1, 32, 8, 1, 128, 100),    # short: most of the one-token rule's 12 splits hold no slot
    (16, 32, 8, 1, 128, 300),
    (3, 8, 8, 1, 64, 37),
    (2, 12, 4, 3, 128, 129),    # multi-token rows: row b * S_q + i
    (1, 4, 2, 2, 256, 90),
    (1, 7, 1, 1, 128, 2000),    # many splits
    (2, 64, 8, 1, 128, 64),     # H_q * D = 8192 (more than 48 KB of shared memory)
])
def test_decode_quantize_equals_unfused_bit_exact(b, h_q, h_kv, s_q, d, t, dtype, gen):
    caches = random_cache(b, h_kv, t, d, gen)
    q = random_query(b, h_q, s_q, d, dtype, gen)
    lens = torch.randint(max(1, t // 2), t + 1, (b,), generator=gen, dtype=torch.int32)
    starts = torch.randint(0, max(1, t // 4), (b,), generator=gen, dtype=torch.int32)
    assert_quantized_equals_unfused(q, caches, lens, starts, 1 / math.sqrt(d))


@needs_kernel
@pytest.mark.parametrize("b,t,warps,merge_quantize", [
    (1, 384, 4, False), (1, 1024, 4, False),  # the one-token rule: 12 splits, merge kernel + quantize_per_token
    (1, 1025, 8, False),                       # past it: the 8-warp rule, 9 splits (more than merge-quantize takes)
    (2, 384, 8, True),                         # two tokens: the 8-warp rule, 3 splits in one merge-quantize block
])
def test_decode_quantize_one_token_rule(b, t, warps, merge_quantize, gen, monkeypatch):
    """One token (batch 1) on a cache of up to 1024 slots: 4-warp decode blocks and 12 splits, merged by the per-head
    merge kernel then quantize_per_token; otherwise the 8-warp rule. Either way the same bits as quantizing
    kv4_decode_attention."""
    from torch.profiler import ProfilerActivity, profile

    for name in ("QOQ_KV4_SPLITS", "QOQ_KV4_WARPS"):
        monkeypatch.delenv(name, raising=False)
    d, h_q, h_kv = 128, 32, 8
    caches = random_cache(b, h_kv, t, d, gen)
    q = random_query(b, h_q, 1, d, torch.bfloat16, gen)
    lens = torch.full((b,), t, dtype=torch.int32)
    starts = torch.zeros(b, dtype=torch.int32)
    assert_quantized_equals_unfused(q, caches, lens, starts, 1 / math.sqrt(d))
    args = (q.cuda(), *[c.cuda() for c in caches], lens.cuda(), starts.cuda(), 1 / math.sqrt(d))
    ops.kv4_decode_attention_quantize(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        ops.kv4_decode_attention_quantize(*args)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not names:
        pytest.skip("the profiler recorded no CUDA kernel on this setup")
    decode = [n for n in names if "kv4_decode_kernel" in n]
    assert len(decode) == 1 and f", 1, {warps}>(" in decode[0], names
    assert any("kv4_combine_quantize_kernel" in n for n in names) == merge_quantize, names
    assert any("quantize_rows" in n for n in names) != merge_quantize, names


@needs_kernel
def test_decode_quantize_long_context_empty_rows_and_large_batch(gen):
    d, h_q, h_kv = 128, 32, 8
    caches = random_cache(1, h_kv, 32768, d, gen)
    q = random_query(1, h_q, 1, d, torch.bfloat16, gen)
    assert_quantized_equals_unfused(q, caches, torch.tensor([32768], dtype=torch.int32),
                                    torch.tensor([5], dtype=torch.int32), 1 / math.sqrt(d))
    b, t = 64, 200
    caches = random_cache(b, h_kv, t, d, gen)
    q = random_query(b, h_q, 1, d, torch.float16, gen)
    lens = torch.randint(1, t + 1, (b,), generator=gen, dtype=torch.int32)
    starts = torch.zeros(b, dtype=torch.int32)
    starts[3] = lens[3]  # a row that sees no slot: zeros, scale 0
    assert_quantized_equals_unfused(q, caches, lens, starts, 1 / math.sqrt(d))
    x_q, x_s, x_sum = ops.kv4_decode_attention_quantize(q.cuda(), *[c.cuda() for c in caches], lens.cuda(),
                                                        starts.cuda(), 1 / math.sqrt(d))
    assert float(x_s[3]) == 0 and int(x_q[3].abs().sum()) == 0 and int(x_sum[3]) == 0


@needs_kernel
def test_decode_quantize_graph_capturable_and_opcheck(gen):
    d, h_q, h_kv, t = 128, 32, 8, 256
    caches = [c.cuda() for c in random_cache(2, h_kv, t, d, gen)]
    q = random_query(2, h_q, 1, d, torch.bfloat16, gen).cuda()
    lens = torch.tensor([100, 200], dtype=torch.int32, device="cuda")
    starts = torch.zeros(2, dtype=torch.int32, device="cuda")
    eager = ops.kv4_decode_attention_quantize(q, *caches, lens, starts, 0.1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.kv4_decode_attention_quantize(q, *caches, lens, starts, 0.1)
    lens.copy_(torch.tensor([150, 256], dtype=torch.int32))
    graph.replay()
    after = ops.kv4_decode_attention_quantize(q, *caches, lens, starts, 0.1)
    assert all(torch.equal(c, a) for c, a in zip(captured, after))
    assert not torch.equal(eager[0], after[0])  # the new lengths were read on the device
    torch.library.opcheck(torch.ops.qoq.kv4_decode_attention_quantize.default, (q, *caches, lens, starts, 0.1))


@needs_kernel
def test_decode_lengths_from_1_to_32k(gen):
    d, h_q, h_kv = 128, 32, 8
    t = 32768
    caches = random_cache(1, h_kv, t, d, gen)
    q = random_query(1, h_q, 1, d, torch.bfloat16, gen)
    cuda_caches = [c.cuda() for c in caches]
    for length in (1, 2, 15, 16, 17, 1000, 4096, 32768):
        lens, starts = torch.tensor([length], dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
        # The kernel sees the whole 32k cache (slots past the length masked); the reference only the prefix.
        out = ops.kv4_decode_attention(q.cuda(), *cuda_caches, lens.cuda(), starts.cuda(), 1 / math.sqrt(d))
        prefix = [c[:, :, :length].contiguous() for c in caches]
        assert_attention_close(out, torch.ops.qoq.kv4_decode_attention(q, *prefix, lens, starts, 1 / math.sqrt(d)))


@needs_kernel
def test_decode_large_batch_ragged(gen):
    b, h_q, h_kv, d, t = 256, 8, 2, 128, 160
    caches = random_cache(b, h_kv, t, d, gen)
    q = random_query(b, h_q, 1, d, torch.float16, gen)
    lens = torch.randint(1, t + 1, (b,), generator=gen, dtype=torch.int32)
    starts = (torch.rand(b, generator=gen) * lens.float()).int()
    out, ref = run_both(q, caches, lens, starts, 1 / math.sqrt(d))
    assert_attention_close(out, ref)


@needs_kernel
def test_decode_masked_slots_never_matter_and_empty_rows_are_zero(gen):
    b, h_q, h_kv, d, t = 3, 8, 2, 128, 100
    caches = random_cache(b, h_kv, t, d, gen)
    q = random_query(b, h_q, 1, d, torch.float16, gen)
    lens = torch.tensor([100, 60, 5], dtype=torch.int32)
    starts = torch.tensor([0, 20, 5], dtype=torch.int32)  # row 2 sees nothing
    cuda_caches = [c.cuda() for c in caches]
    args = (lens.cuda(), starts.cuda(), 1 / math.sqrt(d))
    out = ops.kv4_decode_attention(q.cuda(), *cuda_caches, *args)
    assert int(out[2].abs().sum()) == 0
    # NaN / inf params and other codes in the invisible slots: the output must not change at all.
    for cache, params in ((cuda_caches[0], cuda_caches[1]), (cuda_caches[2], cuda_caches[3])):
        cache[1, :, :20] = 0xAB
        cache[1, :, 60:] = 0x5C
        params[1, :, :20] = float("nan")
        params[1, :, 60:] = float("inf")
        params[2] = float("nan")
    out2 = ops.kv4_decode_attention(q.cuda(), *cuda_caches, *args)
    assert torch.equal(out, out2)


@needs_kernel
def test_decode_repeatable_and_graph_capturable(gen):
    b, h_q, h_kv, d, t = 1, 32, 8, 128, 5000
    caches = [c.cuda() for c in random_cache(b, h_kv, t, d, gen)]
    q = random_query(b, h_q, 1, d, torch.bfloat16, gen).cuda()
    lens = torch.tensor([4321], dtype=torch.int32, device="cuda")
    starts = torch.tensor([3], dtype=torch.int32, device="cuda")
    first = ops.kv4_decode_attention(q, *caches, lens, starts, 0.088)
    assert torch.equal(first, ops.kv4_decode_attention(q, *caches, lens, starts, 0.088))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph):
            captured = ops.kv4_decode_attention(q, *caches, lens, starts, 0.088)
    lens.fill_(5000)  # the graph reads the lengths on the device at replay time
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, ops.kv4_decode_attention(q, *caches, lens, starts, 0.088))
    assert not torch.equal(captured, first)


@needs_kernel
def test_opcheck_cuda(gen):
    caches = [c.cuda() for c in random_cache(2, 2, 40, 64, gen)]
    q = random_query(2, 4, 1, 64, torch.float16, gen).contiguous().cuda()
    lens = torch.tensor([40, 17], dtype=torch.int32, device="cuda")
    starts = torch.tensor([0, 2], dtype=torch.int32, device="cuda")
    torch.library.opcheck(torch.ops.qoq.kv4_decode_attention.default, (q, *caches, lens, starts, 0.125))
    k = torch.randn(2, 2, 3, 64, generator=gen).half().cuda()
    v = torch.randn(2, 2, 3, 64, generator=gen).half().cuda()
    torch.library.opcheck(torch.ops.qoq.kv4_append.default,
                          (*caches, k, v, torch.tensor([5, 6, 7], device="cuda")))


@needs_kernel
def test_bad_input_rejected(gen):
    caches = [c.cuda() for c in random_cache(2, 2, 40, 64, gen)]
    kc, kp, vc, vp = caches
    q = random_query(2, 4, 1, 64, torch.float16, gen).cuda()
    lens = torch.tensor([40, 17], dtype=torch.int32, device="cuda")
    starts = torch.zeros(2, dtype=torch.int32, device="cuda")
    k = torch.randn(2, 2, 3, 64, generator=gen).half().cuda()
    pos = torch.tensor([1, 2, 3], device="cuda")
    decode = torch.ops.qoq.kv4_decode_attention
    append = torch.ops.qoq.kv4_append
    cases = [
        (lambda: decode(q.float(), *caches, lens, starts, 0.1), "q must have dtype"),
        (lambda: decode(q, *caches, lens.long(), starts, 0.1), "kv_lens must have dtype"),
        (lambda: decode(q, *caches, lens, starts[:1], 0.1), "kv_starts must have shape"),
        (lambda: decode(q, kc.cpu(), kp, vc, vp, lens, starts, 0.1), "k_cache is on"),
        (lambda: decode(q, kc, kp.float(), vc, vp, lens, starts, 0.1), "k_params must have dtype"),
        (lambda: decode(q, kc, kp, vc[:, :, :20], vp, lens, starts, 0.1), "v_"),
        (lambda: decode(q[:, :3], *caches, lens, starts, 0.1), "multiple of KV heads"),
        (lambda: decode(torch.zeros(2, 4, 1, 48, dtype=torch.half, device="cuda"),
                        *[c.cuda() for c in random_cache(2, 2, 40, 48, gen)], lens, starts, 0.1), "head_dim"),
        (lambda: append(*caches, k, k.bfloat16(), pos), "v must have dtype"),
        (lambda: append(*caches, k, k, pos.int()), "cache_position must have dtype"),
        (lambda: append(*caches, k, k, pos[:2]), "cache_position must have shape"),
        (lambda: append(kc, kp, vc, vp.transpose(0, 1).contiguous().transpose(0, 1), k, k, pos), "v_params"),
        (lambda: append(*caches, k[..., :32], k[..., :32], pos), "k_cache"),
    ]
    for call, match in cases:
        with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
            call()
    # Slots out of range are skipped, never written out of bounds (checked on the data around them).
    before = [c.clone() for c in caches]
    append(*caches, k, k, torch.tensor([-1, 40, 1 << 40], device="cuda"))
    assert all(torch.equal(a, b) for a, b in zip(before, caches))


# ---- rope_kv4_append ------------------------------------------------------------------------------------

def _rope_kernel_built() -> bool:
    return torch.cuda.is_available() and "rope_kv4_append" in ops.extension_status()["cuda_ops"]


needs_rope_kernel = pytest.mark.skipif(not _rope_kernel_built(), reason="qoq_torch._C rope_kv4_append not built")


def rope_inputs(b: int, s: int, h_q: int, h_kv: int, d: int, dtype, cos_batch: int, gen: torch.Generator):
    """(qkv [B, S, (H_q + 2 H_kv) D], cos, sin [cos_batch, S, D]) on the CPU: rows of different ranges, real angles."""
    qkv = torch.randn(b, s, (h_q + 2 * h_kv) * d, generator=gen) * (torch.rand(b, s, 1, generator=gen) * 4 + 0.5)
    inv_freq = 1.0 / (500000 ** (torch.arange(0, d, 2).float() / d))
    angles = torch.randint(0, 8192, (cos_batch, s, 1), generator=gen).float() * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return qkv.to(dtype), angles.cos().to(dtype), angles.sin().to(dtype)


def assert_rope_append_exact(qkv, cos, sin, caches, pos, h_q, cuda_inputs=None) -> None:
    """The CUDA op (on `cuda_inputs` (qkv, cos, sin) if given: other layouts of the same values) against the CPU
    reference: q, caches and params equal bit for bit."""
    got = [c.cuda() for c in caches]
    inputs = cuda_inputs if cuda_inputs is not None else (qkv.cuda(), cos.cuda(), sin.cuda())
    q = ops.rope_kv4_append(*inputs, *got, pos.cuda(), h_q)
    ref = [c.clone() for c in caches]
    q_ref = torch.ops.qoq.rope_kv4_append(qkv, cos, sin, *ref, pos, h_q)
    assert q.shape == q_ref.shape and q.dtype == q_ref.dtype and q.is_contiguous()
    assert torch.equal(q.cpu(), q_ref), "q differs"
    for name, g, r in zip(("k_cache", "k_params", "v_cache", "v_params"), got, ref):
        assert torch.equal(g.cpu(), r), f"{name} differs"


@needs_rope_kernel
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("d", (64, 128))
@pytest.mark.parametrize("h_q,h_kv", ((8, 2), (4, 4)))
@pytest.mark.parametrize("s", (1, 5))
@pytest.mark.parametrize("b", (1, 3, 16))
def test_rope_append_bit_exact(b, s, h_q, h_kv, d, dtype, gen):
    t = 40
    qkv, cos, sin = rope_inputs(b, s, h_q, h_kv, d, dtype, 1 if b == 3 else b, gen)
    caches = random_cache(b, h_kv, t, d, gen)
    pos = torch.randperm(t - 3, generator=gen)[:s] + 3
    assert_rope_append_exact(qkv, cos, sin, caches, pos, h_q)


@needs_rope_kernel
@pytest.mark.parametrize("d", (66, 96, 256))  # general layout (partners straddling pairs at 66), 16-byte loads at 256
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_rope_append_other_head_dims(d, dtype, gen):
    b, s, h_q, h_kv, t = 3, 2, 6, 3, 20
    qkv, cos, sin = rope_inputs(b, s, h_q, h_kv, d, dtype, b, gen)
    assert_rope_append_exact(qkv, cos, sin, random_cache(b, h_kv, t, d, gen), torch.tensor([7, 19]), h_q)


@needs_rope_kernel
def test_rope_append_strided_and_unaligned_inputs(gen):
    b, s, h_q, h_kv, d, t = 4, 3, 8, 2, 128, 30
    qkv, cos, sin = rope_inputs(b, s, h_q, h_kv, d, torch.bfloat16, 1, gen)
    caches = random_cache(b, h_kv, t, d, gen)
    pos = torch.tensor([0, 29, 11])
    width = qkv.shape[-1]
    # Rows 2 elements apart from their neighbours' ends (4-byte aligned, not 8): the general layout in place.
    padded = torch.zeros(b, s, width + 2, dtype=qkv.dtype)
    padded[..., :width] = qkv
    cuda_cos = cos.cuda().expand(b, s, d)  # a broadcast batch given as stride 0
    assert_rope_append_exact(qkv, cos.expand(b, s, d), sin, caches, pos, h_q,
                             (padded.cuda()[..., :width], cuda_cos, sin.cuda()))
    # Contiguous but 2 bytes off alignment: copied first.
    flat = torch.zeros(qkv.numel() + 1, dtype=qkv.dtype, device="cuda")
    flat[1:] = qkv.flatten().cuda()
    assert_rope_append_exact(qkv, cos, sin, caches, pos, h_q, (flat[1:].view_as(qkv), cos.cuda(), sin.cuda()))


@needs_kernel
def test_append_unaligned_contiguous_input_bit_exact(gen):
    b, h, s, d, t = 2, 2, 3, 64, 10
    k = torch.randn(b, h, s, d, generator=gen).half()
    v = torch.randn(b, h, s, d, generator=gen).half()
    flat = torch.zeros(2 * k.numel() + 1, dtype=k.dtype, device="cuda")
    flat[1:] = torch.cat((k.flatten(), v.flatten())).cuda()
    k_dev, v_dev = flat[1:1 + k.numel()].view_as(k), flat[1 + k.numel():].view_as(v)  # 2 bytes off alignment
    caches = random_cache(b, h, t, d, gen)
    got = [c.cuda() for c in caches]
    ops.kv4_append(*got, k_dev, v_dev, torch.tensor([1, 5, 9], device="cuda"))
    ref = [c.clone() for c in caches]
    torch.ops.qoq.kv4_append(*ref, k, v, torch.tensor([1, 5, 9]))
    assert all(torch.equal(g.cpu(), r) for g, r in zip(got, ref))


@needs_rope_kernel
def test_rope_append_out_of_range_positions_still_return_q(gen):
    b, s, h_q, h_kv, d, t = 2, 3, 4, 2, 64, 16
    qkv, cos, sin = rope_inputs(b, s, h_q, h_kv, d, torch.float16, b, gen)
    caches = [c.cuda() for c in random_cache(b, h_kv, t, d, gen)]
    before = [c.clone() for c in caches]
    q = ops.rope_kv4_append(qkv.cuda(), cos.cuda(), sin.cuda(), *caches, torch.tensor([-1, 16, 1 << 40], device="cuda"),
                            h_q)
    assert all(torch.equal(a, c) for a, c in zip(before, caches))  # skipped, never written out of bounds
    want = ops.rope(qkv[..., : h_q * d].view(b, s, h_q, d).transpose(1, 2), cos.unsqueeze(1), sin.unsqueeze(1))
    assert torch.equal(q.cpu(), want)


@needs_rope_kernel
def test_rope_append_graph_capturable(gen):
    b, s, h_q, h_kv, d, t = 16, 1, 32, 8, 128, 64
    qkv, cos, sin = (x.cuda() for x in rope_inputs(b, s, h_q, h_kv, d, torch.bfloat16, b, gen))
    caches = [c.cuda() for c in random_cache(b, h_kv, t, d, gen)]
    pos = torch.tensor([5], device="cuda")
    ops.rope_kv4_append(qkv, cos, sin, *caches, pos, h_q)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph):
            captured = ops.rope_kv4_append(qkv, cos, sin, *caches, pos, h_q)
    new_qkv, new_cos, new_sin = rope_inputs(b, s, h_q, h_kv, d, torch.bfloat16, b, gen)
    qkv.copy_(new_qkv.cuda()), cos.copy_(new_cos.cuda()), sin.copy_(new_sin.cuda()), pos.fill_(42)
    ref = [c.cpu() for c in caches]
    graph.replay()
    torch.cuda.synchronize()
    q_ref = torch.ops.qoq.rope_kv4_append(new_qkv, new_cos, new_sin, *ref, torch.tensor([42]), h_q)
    assert torch.equal(captured.cpu(), q_ref)
    assert all(torch.equal(c.cpu(), r) for c, r in zip(caches, ref))


@needs_rope_kernel
def test_rope_append_opcheck_cuda(gen):
    qkv, cos, sin = (x.cuda() for x in rope_inputs(2, 3, 4, 2, 64, torch.float16, 1, gen))
    caches = [c.cuda() for c in random_cache(2, 2, 12, 64, gen)]
    torch.library.opcheck(torch.ops.qoq.rope_kv4_append.default,
                          (qkv, cos, sin, *caches, torch.tensor([4, 5, 6], device="cuda"), 4))


@needs_rope_kernel
def test_rope_append_bad_input_rejected(gen):
    b, s, h_q, h_kv, d = 2, 1, 4, 2, 64
    qkv, cos, sin = (x.cuda() for x in rope_inputs(b, s, h_q, h_kv, d, torch.float16, b, gen))
    caches = [c.cuda() for c in random_cache(b, h_kv, 8, d, gen)]
    pos = torch.tensor([2], device="cuda")
    op = torch.ops.qoq.rope_kv4_append
    cases = [
        (lambda: op(qkv.float(), cos, sin, *caches, pos, h_q), "qkv must have dtype"),
        (lambda: op(qkv, cos.bfloat16(), sin, *caches, pos, h_q), "cos must have dtype"),
        (lambda: op(qkv, cos, sin.cpu(), *caches, pos, h_q), "sin is on"),
        (lambda: op(qkv[..., : 7 * d], cos, sin, *caches, pos, 3), "multiple of the KV heads"),
        (lambda: op(qkv, cos, sin, *caches, pos, 2), "columns"),
        (lambda: op(qkv, cos[..., :32], sin, *caches, pos, h_q), "cos must have shape"),
        (lambda: op(qkv[:1], cos[:1], sin[:1], *caches, pos, h_q), "k_cache holds B="),
        (lambda: op(qkv, cos, sin, *caches, pos.int(), h_q), "cache_position must have dtype"),
        (lambda: op(qkv, cos, sin, caches[0], caches[1].float(), *caches[2:], pos, h_q), "k_params must have dtype"),
        (lambda: op(torch.stack((qkv, qkv), -1).flatten(-2)[..., ::2], cos, sin, *caches, pos, h_q), "contiguous rows"),
    ]
    for call, match in cases:
        with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
            call()
