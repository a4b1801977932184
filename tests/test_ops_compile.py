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


def test_inductor_hands_every_kv4_op_the_same_step_tensors(gen):
    """Two layers' `rope_kv4_append` + `kv4_decode_attention` under inductor get the same buffers for the step's
    RoPE tables, positions and lengths (the ops' flexible_layout tag; under the default exact-stride constraint each
    call got its own copy, a kernel per input and layer), and the results equal eager."""
    import re

    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    b, h_q, h, t, d = 2, 4, 2, 16, 32
    layers = [[torch.zeros(b, h, t, d // 2, dtype=torch.uint8), torch.zeros(b, h, t, 2, dtype=torch.float16),
               torch.zeros(b, h, t, d // 2, dtype=torch.uint8), torch.zeros(b, h, t, 2, dtype=torch.float16)]
              for _ in range(2)]
    starts = torch.zeros(b, dtype=torch.int32)
    qkvs = [torch.randn(b, 1, (h_q + 2 * h) * d, generator=gen).bfloat16() for _ in range(2)]
    freqs = torch.randn(d, generator=gen)

    def step(qkv0, qkv1, length, freqs, caches):
        positions = torch.arange(1) + length
        cos, sin = freqs.cos().bfloat16().view(1, 1, d), freqs.sin().bfloat16().view(1, 1, d)
        lens = (length + 1).to(torch.int32).expand(b).contiguous()
        outs = []
        for qkv, layer in zip((qkv0, qkv1), caches):
            q = ops.rope_kv4_append(qkv, cos, sin, *layer, positions, h_q)
            outs.append(ops.kv4_decode_attention(q, *layer, lens, starts, 0.125))
        return outs

    length = torch.tensor(5)
    eager_layers = [[c.clone() for c in layer] for layer in layers]
    want = step(*qkvs, length, freqs, eager_layers)
    torch._dynamo.reset()
    with inductor_config.patch(fx_graph_cache=False):
        got, (code, *_) = run_and_get_code(torch.compile(step, fullgraph=True), *qkvs, length, freqs, layers)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    for e, c in zip(eager_layers, layers):
        assert all(torch.equal(x, y) for x, y in zip(e, c))
    ropes = re.findall(r"qoq\.rope_kv4_append\.default\(([^\n]*)\)", code)
    decodes = re.findall(r"qoq\.kv4_decode_attention\.default\(([^\n]*)\)", code)
    assert len(ropes) == 2 and len(decodes) == 2, code

    def top_level_args(call: str) -> list[str]:
        args, depth, start = [], 0, 0
        for i, ch in enumerate(call):
            depth += ch == "("
            depth -= ch == ")"
            if ch == "," and depth == 0:
                args.append(call[start:i].strip())
                start = i + 1
        return args + [call[start:].strip()]

    split = [top_level_args(call) for call in ropes + decodes]
    assert split[0][3] != split[1][3]  # each layer's own cache
    assert split[0][1:3] == split[1][1:3] and split[0][7] == split[1][7], ropes  # cos, sin; positions
    assert split[2][5] == split[3][5], decodes  # lens
