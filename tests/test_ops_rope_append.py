"""rope_kv4_append (RoPE + KV4 append from the fused qkv projection) on the CPU: exact against split + float32
RoPE + kv4_append, transformers' RoPE convention, opcheck, fake shapes, compile, bad input."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from qoq_torch import ops

SHAPES = [  # (B, S, H_q, H_kv, D)
    (1, 1, 4, 1, 64),
    (3, 1, 8, 2, 128),
    (2, 5, 4, 4, 64),
    (2, 3, 6, 3, 128),
]


def random_cache(b: int, h_kv: int, t: int, d: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Stale random contents everywhere: slots the op must not touch keep them."""
    out = []
    for _ in range(2):
        out.append(torch.randint(0, 256, (b, h_kv, t, d // 2), generator=gen, dtype=torch.uint8))
        out.append(torch.randn(b, h_kv, t, 2, generator=gen).half())
    return out


def random_inputs(b, s, h_q, h_kv, d, dtype, cos_batch, gen):
    """Non-zero qkv with rows of different ranges, and cos/sin of real rotary angles."""
    qkv = (torch.randn(b, s, (h_q + 2 * h_kv) * d, generator=gen) * (torch.rand(b, s, 1, generator=gen) * 4 + 0.5))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    pos = torch.randint(0, 4000, (cos_batch, s, 1), generator=gen).float()
    angles = torch.cat((pos * inv_freq, pos * inv_freq), dim=-1)
    return qkv.to(dtype), angles.cos().to(dtype), angles.sin().to(dtype)


def expected(qkv, cos, sin, caches, positions, h_q):
    """Split by hand, RoPE in float32 (products and sum rounded separately), round once, then kv4_append."""
    b, s, _ = qkv.shape
    h_kv, d = caches[0].shape[1], 2 * caches[0].shape[3]
    heads = qkv.view(b, s, h_q + 2 * h_kv, d).permute(0, 2, 1, 3)
    c, sn = cos.float()[:, None], sin.float()[:, None]

    def rope(x):
        xf = x.float()
        x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
        c1, c2, s1, s2 = c[..., : d // 2], c[..., d // 2:], sn[..., : d // 2], sn[..., d // 2:]
        return torch.cat((x1 * c1 + (-x2) * s1, x2 * c2 + x1 * s2), dim=-1).to(x.dtype)

    q, k, v = rope(heads[:, :h_q]), rope(heads[:, h_q:h_q + h_kv]), heads[:, h_q + h_kv:]
    ref = [t.clone() for t in caches]
    ops.kv4_append(*ref, k.contiguous(), v.contiguous(), positions)
    return q, ref


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,s,h_q,h_kv,d", SHAPES)
@pytest.mark.parametrize("cos_batch_one", [False, True])
def test_equals_split_rope_then_kv4_append(b, s, h_q, h_kv, d, dtype, cos_batch_one, gen):
    t = 24
    qkv, cos, sin = random_inputs(b, s, h_q, h_kv, d, dtype, 1 if cos_batch_one else b, gen)
    caches = random_cache(b, h_kv, t, d, gen)
    positions = torch.randperm(t - 7, generator=gen)[:s] + 7  # not starting at 0, any order
    want_q, want_caches = expected(qkv, cos, sin, caches, positions, h_q)
    q = ops.rope_kv4_append(qkv, cos, sin, *caches, positions, h_q)
    assert q.shape == (b, h_q, s, d) and q.dtype == dtype and q.is_contiguous()
    assert torch.equal(q, want_q)
    for name, got, want in zip(("k_cache", "k_params", "v_cache", "v_params"), caches, want_caches):
        assert torch.equal(got, want), f"{name} differs"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rope_is_transformers_rope_in_float32(dtype, gen):
    qkv, cos, sin = random_inputs(2, 3, 4, 2, 64, dtype, 2, gen)
    x = qkv[..., : 4 * 64].view(2, 3, 4, 64).transpose(1, 2)
    # transformers' formula on float32 inputs rounds each product and the sum to float32: the op's contract.
    hf, _ = apply_rotary_pos_emb(x.float(), x.float(), cos.float(), sin.float())
    assert torch.equal(ops.rope(x, cos.unsqueeze(1), sin.unsqueeze(1)), hf.to(dtype))


def test_returned_q_does_not_depend_on_the_cache(gen):
    qkv, cos, sin = random_inputs(2, 1, 8, 2, 128, torch.bfloat16, 2, gen)
    q1 = ops.rope_kv4_append(qkv, cos, sin, *random_cache(2, 2, 8, 128, gen), torch.tensor([3]), 8)
    q2 = ops.rope_kv4_append(qkv, cos, sin, *random_cache(2, 2, 16, 128, gen), torch.tensor([11]), 8)
    assert torch.equal(q1, q2)
    want = ops.rope(qkv[..., : 8 * 128].view(2, 1, 8, 128).transpose(1, 2), cos.unsqueeze(1), sin.unsqueeze(1))
    assert torch.equal(q1, want)


@pytest.mark.parametrize("b,s,h_q,h_kv,d", [(2, 1, 4, 2, 64), (1, 3, 2, 2, 128)])
def test_opcheck(b, s, h_q, h_kv, d, gen):
    qkv, cos, sin = random_inputs(b, s, h_q, h_kv, d, torch.float16, 1, gen)
    caches = random_cache(b, h_kv, 10, d, gen)
    torch.library.opcheck(torch.ops.qoq.rope_kv4_append.default,
                          (qkv, cos, sin, *caches, torch.arange(2, 2 + s), h_q))


def test_fake_tensor_shapes(gen):
    qkv, cos, sin = random_inputs(3, 2, 8, 2, 128, torch.bfloat16, 3, gen)
    caches = random_cache(3, 2, 16, 128, gen)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (qkv, cos, sin, *caches, torch.tensor([4, 5]))]
        q = torch.ops.qoq.rope_kv4_append(*fake, 8)
        assert q.shape == (3, 8, 2, 128) and q.dtype == torch.bfloat16
        with pytest.raises(ValueError, match="multiple of the KV heads"):
            torch.ops.qoq.rope_kv4_append(*fake, 7)


def test_compiles_fullgraph_with_decode_attention(gen):
    b, h_q, h_kv, d, t = 2, 4, 2, 64, 8
    caches = random_cache(b, h_kv, t, d, gen)
    lens, starts = torch.tensor([4, 4], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32)

    def step(qkv, cos, sin, pos):
        q = ops.rope_kv4_append(qkv, cos, sin, *caches, pos, h_q)
        return ops.kv4_decode_attention(q, *caches, lens, starts, 0.125)

    qkv, cos, sin = random_inputs(b, 1, h_q, h_kv, d, torch.float16, b, gen)
    pos = torch.tensor([3])
    before = [c.clone() for c in caches]
    eager = step(qkv, cos, sin, pos)
    eager_caches = [c.clone() for c in caches]
    for c, old in zip(caches, before):
        c.copy_(old)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(qkv, cos, sin, pos), eager)
    assert all(torch.equal(c, e) for c, e in zip(caches, eager_caches))


def test_bad_input_raises(gen):
    b, s, h_q, h_kv, d = 2, 1, 4, 2, 64
    qkv, cos, sin = random_inputs(b, s, h_q, h_kv, d, torch.float16, b, gen)
    caches = random_cache(b, h_kv, 8, d, gen)
    pos = torch.tensor([2])
    op = ops.rope_kv4_append
    cases = [
        (TypeError, "qkv must have dtype", lambda: op(qkv.float(), cos, sin, *caches, pos, h_q)),
        (TypeError, "cos must have dtype", lambda: op(qkv, cos.bfloat16(), sin, *caches, pos, h_q)),
        (ValueError, "multiple of the KV heads", lambda: op(qkv[..., : (3 + 4) * d], cos, sin, *caches, pos, 3)),
        (ValueError, "columns", lambda: op(qkv, cos, sin, *caches, pos, 2)),
        (ValueError, "cos must have shape", lambda: op(qkv, cos[..., :32], sin, *caches, pos, h_q)),
        (ValueError, "sin must have shape", lambda: op(qkv, cos, sin[:1].expand(3, s, d), *caches, pos, h_q)),
        (ValueError, "qkv must be 3-D", lambda: op(qkv[0], cos, sin, *caches, pos, h_q)),
        (ValueError, "contiguous rows", lambda: op(torch.stack((qkv, qkv), -1).flatten(-2)[..., ::2], cos, sin,
                                                   *caches, pos, h_q)),
        (ValueError, "k_cache holds B=", lambda: op(qkv[:1], cos[:1], sin[:1], *caches, pos, h_q)),
        (TypeError, "cache_position must have dtype", lambda: op(qkv, cos, sin, *caches, pos.int(), h_q)),
        (ValueError, "cache_position must have shape", lambda: op(qkv, cos, sin, *caches, torch.tensor([1, 2]), h_q)),
        (IndexError, "cache_position values", lambda: op(qkv, cos, sin, *caches, torch.tensor([8]), h_q)),
        (IndexError, "cache_position values", lambda: op(qkv, cos, sin, *caches, torch.tensor([-1]), h_q)),
    ]
    before = [c.clone() for c in caches]
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()
    assert all(torch.equal(c, o) for c, o in zip(caches, before))  # a rejected call writes nothing
