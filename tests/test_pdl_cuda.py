"""Programmatic dependent launch (QOQ_PDL, docs/formats.md): a decode-like MLP chain rmsnorm_quantize -> W4A8 GEMM ->
silu_mul_quantize -> W4A8 GEMM -> rmsnorm_quantize, captured in a CUDA graph and replayed with new inputs.

With PDL on (sm_90) each kernel of the chain may start while the previous one still runs and reads its weights before
it waits; a missing or misplaced wait shows up as stale activations (the previous replay's) in some output. Each
replay is compared bit for bit with the same chain run eagerly, and each stage with the CPU reference on the inputs
it actually got (the quant ops within the usual ±1 tolerance, the GEMMs exactly).
"""
from __future__ import annotations

import pytest
import torch

import qoq_torch.ops as ops
from test_gemm_cuda import random_bias, random_per_channel, random_per_group
from test_quant_cuda import assert_close_quantization, random_rows

pytestmark = pytest.mark.cuda

CHAIN_OPS = ("rmsnorm_quantize", "silu_mul_quantize", "w4a8_gemm_per_group", "w4a8_gemm_per_channel")
HIDDEN, INTER, GROUP, EPS = 1024, 4096, 128, 1e-6  # K % 512 == 0: every small-M GEMM kernel takes both GEMMs
DTYPE = torch.bfloat16  # random weights: the down projection's outputs can exceed the float16 range
REPLAYS = 3


def _kernels_built() -> bool:
    return torch.cuda.is_available() and set(CHAIN_OPS) <= set(ops.extension_status()["cuda_ops"])


needs_kernel = pytest.mark.skipif(not _kernels_built(), reason="qoq_torch._C kernels not built")


class Linear:
    """Random W4A8 weights of one format on the GPU (CPU copies for the reference)."""

    def __init__(self, n: int, k: int, per_group: bool, bias: bool, gen: torch.Generator):
        self.per_group = per_group
        if per_group:
            w4, s2, z2, s1 = random_per_group(n, k, GROUP, gen)
            self.cpu = (ops.pack_weights(w4), s2, z2, s1)
        else:
            w4, scale, zero = random_per_channel(n, k, gen)
            self.cpu = (ops.pack_weights(w4), scale, zero)
        self.bias_cpu = random_bias(n, DTYPE, gen) if bias else None
        self.dev = tuple(t.cuda() for t in self.cpu)
        self.bias = None if self.bias_cpu is None else self.bias_cpu.cuda()

    def __call__(self, x_q, x_s, x_sum):
        if self.per_group:
            return ops.w4a8_gemm_per_group(x_q, x_s, *self.dev, bias=self.bias, group_size=GROUP, out_dtype=DTYPE)
        return ops.w4a8_gemm_per_channel(x_q, x_s, x_sum, *self.dev, bias=self.bias, out_dtype=DTYPE)

    def reference(self, x_q, x_s, x_sum):
        x_q, x_s, x_sum = x_q.cpu(), x_s.cpu(), x_sum.cpu()
        if self.per_group:
            return torch.ops.qoq.w4a8_gemm_per_group(x_q, x_s, *self.cpu, self.bias_cpu, GROUP, DTYPE)
        return torch.ops.qoq.w4a8_gemm_per_channel(x_q, x_s, x_sum, *self.cpu, self.bias_cpu, DTYPE)


def check_chain_in_graph(m: int, per_group: bool, gen: torch.Generator) -> None:
    norm1 = (torch.rand(HIDDEN, generator=gen) + 0.5).to(DTYPE).cuda()
    norm2 = (torch.rand(HIDDEN, generator=gen) + 0.5).to(DTYPE).cuda()
    gate_up_proj = Linear(2 * INTER, HIDDEN, per_group, bias=True, gen=gen)
    down_proj = Linear(HIDDEN, INTER, per_group, bias=False, gen=gen)

    def chain(x):
        a = ops.rmsnorm_quantize(x, norm1, EPS)
        gate_up = gate_up_proj(*a)
        h = ops.silu_mul_quantize(gate_up)
        y = down_proj(*h)
        return a, gate_up, h, y, ops.rmsnorm_quantize(y, norm2, EPS)

    x = random_rows(m, HIDDEN, DTYPE, gen).cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chain(x)  # warm-up outside the capture (first-call probes, shared-memory opt-ins)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = chain(x)

    for replay in range(REPLAYS):
        x.copy_(random_rows(m, HIDDEN, DTYPE, gen).cuda())
        graph.replay()
        torch.cuda.synchronize()
        a, gate_up, h, y, z = outs
        eager = chain(x)
        torch.cuda.synchronize()
        for got, want in zip((*a, gate_up, *h, y, *z), (*eager[0], eager[1], *eager[2], eager[3], *eager[4])):
            assert torch.equal(got, want), f"replay {replay}: graph and eager results differ"
        assert_close_quantization(a, torch.ops.qoq.rmsnorm_quantize(x.cpu(), norm1.cpu(), EPS))
        assert torch.equal(gate_up.cpu(), gate_up_proj.reference(*a)), f"replay {replay}: gate_up"
        assert_close_quantization(h, torch.ops.qoq.silu_mul_quantize(gate_up.cpu()))
        assert torch.equal(y.cpu(), down_proj.reference(*h)), f"replay {replay}: down"
        assert torch.isfinite(y).all()
        assert_close_quantization(z, torch.ops.qoq.rmsnorm_quantize(y.cpu(), norm2.cpu(), EPS))


@needs_kernel
@pytest.mark.parametrize("pdl", ("0", "1"))
@pytest.mark.parametrize("per_group", (True, False), ids=("g128", "per_channel"))
@pytest.mark.parametrize("m", (1, 4, 16))
def test_chain_under_cuda_graph(m, per_group, pdl, gen, monkeypatch):
    """The default dispatch (the streaming kernel at M <= 16 on sm_90), PDL on and off (QOQ_PDL is read at every
    launch, so it applies to the capture)."""
    monkeypatch.setenv("QOQ_PDL", pdl)
    check_chain_in_graph(m, per_group, gen)


# The other GEMM kernels, each launched with PDL after a quant kernel and followed by one.
PATHS = {
    "skinny": (16, {"QOQ_GEMM_STREAM": "0"}),
    "decode": (16, {"QOQ_GEMM_STREAM": "0", "QOQ_GEMM_DECODE_MAX_M": "16"}),
    "tile_split_k": (16, {"QOQ_GEMM_FORCE": "0,0", "QOQ_QUANT_SPLIT": "64"}),  # zeroed workspace; every quant op split
    "wgmma": (64, {"QOQ_GEMM_WGMMA": "1"}),  # the mma.sync tile kernel where the device or build lacks wgmma
}


@needs_kernel
@pytest.mark.parametrize("per_group", (True, False), ids=("g128", "per_channel"))
@pytest.mark.parametrize("path", tuple(PATHS))
def test_chain_other_gemm_paths(path, per_group, gen, monkeypatch):
    m, env = PATHS[path]
    monkeypatch.setenv("QOQ_PDL", "1")
    for name in ("QOQ_GEMM_STREAM", "QOQ_GEMM_DECODE_MAX_M", "QOQ_GEMM_FORCE", "QOQ_GEMM_WGMMA", "QOQ_QUANT_SPLIT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    check_chain_in_graph(m, per_group, gen)


ATTENTION_OPS = ("rope_kv4_append", "kv4_decode_attention_quantize")


@pytest.mark.skipif(not (_kernels_built() and set(ATTENTION_OPS) <= set(ops.extension_status()["cuda_ops"])),
                    reason="qoq_torch._C attention kernels not built")
@pytest.mark.parametrize("pdl", ("0", "1"))
@pytest.mark.parametrize("b", (1, 8))
def test_attention_chain_under_cuda_graph(b, pdl, gen, monkeypatch):
    """A decode step's attention chain rmsnorm_quantize -> q/k/v GEMM -> rope_kv4_append -> decode attention with
    o_proj's quantization -> o GEMM, captured once and replayed at successive positions: each replay appends to the
    cache the decode kernel reads right after, so a decode that starts before the append is done reads a stale slot.
    Every replay must equal the same step run eagerly on a second cache, bit for bit (outputs and caches)."""
    monkeypatch.setenv("QOQ_PDL", pdl)
    h_q, h_kv, d, t = 8, 2, 128, 16
    norm = (torch.rand(HIDDEN, generator=gen) + 0.5).to(DTYPE).cuda()
    qkv_proj = Linear((h_q + 2 * h_kv) * d, HIDDEN, per_group=True, bias=False, gen=gen)
    o_proj = Linear(HIDDEN, h_q * d, per_group=True, bias=False, gen=gen)
    x = random_rows(b, HIDDEN, DTYPE, gen).cuda()
    angles = torch.rand(b, 1, d // 2, generator=gen) * 100
    cos, sin = (f(torch.cat((angles, angles), -1)).to(DTYPE).cuda() for f in (torch.cos, torch.sin))
    pos = torch.zeros(1, dtype=torch.long, device="cuda")
    lens = torch.ones(b, dtype=torch.int32, device="cuda")
    starts = torch.zeros(b, dtype=torch.int32, device="cuda")

    def new_cache():
        return [torch.zeros(b, h_kv, t, d // 2, dtype=torch.uint8, device="cuda"),
                torch.zeros(b, h_kv, t, 2, dtype=torch.float16, device="cuda"),
                torch.zeros(b, h_kv, t, d // 2, dtype=torch.uint8, device="cuda"),
                torch.zeros(b, h_kv, t, 2, dtype=torch.float16, device="cuda")]

    def step(caches):
        qkv = qkv_proj(*ops.rmsnorm_quantize(x, norm, EPS)).view(b, 1, -1)
        q = ops.rope_kv4_append(qkv, cos, sin, *caches, pos, h_q)
        return o_proj(*ops.kv4_decode_attention_quantize(q, *caches, lens, starts, d ** -0.5))

    graph_cache, eager_cache = new_cache(), new_cache()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(new_cache())  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(graph_cache)
    for position in range(REPLAYS + 2):
        x.copy_(random_rows(b, HIDDEN, DTYPE, gen).cuda())
        pos.fill_(position)
        lens.fill_(position + 1)
        graph.replay()
        want = step(eager_cache)
        torch.cuda.synchronize()
        assert torch.equal(out, want), f"position {position}: graph and eager outputs differ"
        assert all(torch.equal(g, e) for g, e in zip(graph_cache, eager_cache)), f"position {position}: caches"
        assert torch.isfinite(out).all()
