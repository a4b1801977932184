"""The ops compile with fullgraph=True on CPU (no graph break) and give the eager result."""
from __future__ import annotations

import torch

from qoq_torch import ops


def test_compile_quantize_gemm_chain_fullgraph(gen):
    n, k = 64, 256
    pg = ops.quantize_weight_per_group(torch.randn(n, k, generator=gen), 128)
    packed, s2, z2, s1 = pg.packed(), pg.s2, pg.z2, pg.s1
    norm_w = torch.rand(k, generator=gen).half() + 0.5

    def block(x):
        x_q, x_s, _ = ops.rmsnorm_quantize(x, norm_w, 1e-6)
        y = ops.w4a8_gemm_per_group(x_q, x_s, packed, s2, z2, s1, None, 128, torch.float16)
        x_q, x_s, _ = ops.quantize_per_token(torch.relu(y))
        return x_q, x_s

    x = torch.randn(5, k, generator=gen).half()
    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)  # inductor
    for got, want in zip(compiled(x), block(x)):
        assert torch.equal(got, want)


def test_compile_kv4_append_and_decode_fullgraph(gen):
    b, h, t, d = 2, 2, 16, 64
    caches = [torch.zeros(b, h, t, d // 2, dtype=torch.uint8), torch.zeros(b, h, t, 2, dtype=torch.float16),
              torch.zeros(b, h, t, d // 2, dtype=torch.uint8), torch.zeros(b, h, t, 2, dtype=torch.float16)]
    lens = torch.tensor([6, 6], dtype=torch.int32)
    starts = torch.tensor([0, 2], dtype=torch.int32)

    def step(q, k, v, pos):
        ops.kv4_append(*caches, k, v, pos)
        return ops.kv4_decode_attention(q, *caches, lens, starts, 0.125)

    q = torch.randn(b, h, 1, d, generator=gen).half()
    k = torch.randn(b, h, 6, d, generator=gen).half()
    v = torch.randn(b, h, 6, d, generator=gen).half()
    explanation = torch._dynamo.explain(step)(q, k, v, torch.arange(6))
    assert explanation.graph_break_count == 0
    for c in caches:
        c.zero_()
    eager = step(q, k, v, torch.arange(6))
    for c in caches:
        c.zero_()
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(q, k, v, torch.arange(6)), eager)
