"""KV4 cache ops: quantization error, append, decode attention against float attention."""
from __future__ import annotations

import math

import pytest
import torch

from qoq_torch import ops


def _empty_cache(b, h, t, d):
    return (torch.zeros(b, h, t, d // 2, dtype=torch.uint8), torch.zeros(b, h, t, 2, dtype=torch.float16),
            torch.zeros(b, h, t, d // 2, dtype=torch.uint8), torch.zeros(b, h, t, 2, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kv4_quantize_error_within_half_step(dtype, gen):
    x = (torch.randn(2, 4, 33, 128, generator=gen) * torch.rand(2, 4, 33, 1, generator=gen) * 4).to(dtype)
    packed, params = ops.kv4_quantize(x)
    xhat = ops.kv4_dequantize(packed, params)
    scale, mn = params[..., 0:1].float(), params[..., 1:2].float()
    # Half a step, plus the float16 rounding of the stored min (the only inexact part of the format).
    bound = scale / 2 + (x.float().amin(-1, keepdim=True) - mn).abs() + 1e-6
    assert bool(((xhat - x.float()).abs() <= bound).all())
    q = torch.stack((packed & 15, packed >> 4), -1).flatten(-2)
    assert int(q.max()) <= 15


def test_kv4_constant_vector_is_exact():
    x = torch.full((1, 1, 3, 64), 0.75, dtype=torch.float16)
    packed, params = ops.kv4_quantize(x)
    assert torch.equal(ops.kv4_dequantize(packed, params), x.float())


def test_kv4_append_writes_only_the_given_slots(gen):
    b, h, t, d = 2, 3, 16, 64
    caches = _empty_cache(b, h, t, d)
    k = torch.randn(b, h, 3, d, generator=gen).half()
    v = torch.randn(b, h, 3, d, generator=gen).half()
    pos = torch.tensor([4, 5, 9])
    ops.kv4_append(*caches, k, v, pos)
    kp, kparams = ops.kv4_quantize(k)
    assert torch.equal(caches[0][:, :, pos], kp) and torch.equal(caches[1][:, :, pos], kparams)
    untouched = torch.ones(t, dtype=torch.bool)
    untouched[pos] = False
    assert int(caches[0][:, :, untouched].sum()) == 0 and int(caches[3][:, :, untouched].abs().sum()) == 0


def _fill_cache(b, h_kv, t, d, gen, dtype=torch.float16):
    caches = _empty_cache(b, h_kv, t, d)
    k = torch.randn(b, h_kv, t, d, generator=gen).to(dtype)
    v = torch.randn(b, h_kv, t, d, generator=gen).to(dtype)
    ops.kv4_append(*caches, k, v, torch.arange(t))
    return caches


def _float_attention(q, caches, starts, lens):
    """Plain softmax attention over the dequantized cache, one row/query at a time."""
    k_cache, k_params, v_cache, v_params = caches
    k = ops.kv4_dequantize(k_cache, k_params).double()
    v = ops.kv4_dequantize(v_cache, v_params).double()
    b, h_q, s_q, d = q.shape
    group = h_q // k.shape[1]
    out = torch.zeros(b, h_q, s_q, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h_q):
            for i in range(s_q):
                end = int(lens[bi]) - (s_q - 1 - i)
                start = int(starts[bi])
                if end <= start:
                    continue
                kk, vv = k[bi, hi // group, start:end], v[bi, hi // group, start:end]
                p = torch.softmax(q[bi, hi, i].double() @ kk.t() / math.sqrt(d), dim=-1)
                out[bi, hi, i] = p @ vv
    return out


@pytest.mark.parametrize("length", [1, 2, 37, 512, 4096])
def test_decode_attention_matches_softmax_gqa(length, gen):
    b, h_q, h_kv, d = 2, 8, 2, 64
    caches = _fill_cache(b, h_kv, length, d, gen)
    q = torch.randn(b, h_q, 1, d, generator=gen).half()
    lens = torch.full((b,), length, dtype=torch.int32)
    starts = torch.zeros(b, dtype=torch.int32)
    out = ops.kv4_decode_attention(q, *caches, lens, starts, 1 / math.sqrt(d))
    torch.testing.assert_close(out.double(), _float_attention(q, caches, starts, lens), rtol=0, atol=2e-3)


def test_decode_attention_padding_and_ragged_rows(gen):
    b, h_q, h_kv, t, d = 3, 4, 4, 40, 128
    caches = _fill_cache(b, h_kv, t, d, gen, torch.bfloat16)
    q = torch.randn(b, h_q, 1, d, generator=gen).bfloat16()
    starts = torch.tensor([0, 7, 39], dtype=torch.int32)  # left padding
    lens = torch.tensor([40, 25, 40], dtype=torch.int32)  # ragged ends
    out = ops.kv4_decode_attention(q, *caches, lens, starts, 1 / math.sqrt(d))
    torch.testing.assert_close(out.double(), _float_attention(q, caches, starts, lens), rtol=0, atol=1e-2)
    # Garbage in the masked slots must not matter.
    caches[0][1, :, :7] = 0xAB
    caches[1][1, :, :7] = 100.0
    out2 = ops.kv4_decode_attention(q, *caches, lens, starts, 1 / math.sqrt(d))
    assert torch.equal(out, out2)


def test_decode_attention_multi_token_is_causal(gen):
    b, h, t, d, s_q = 2, 2, 30, 64, 4
    caches = _fill_cache(b, h, t, d, gen)
    q = torch.randn(b, h, s_q, d, generator=gen).half()
    lens = torch.tensor([30, 20], dtype=torch.int32)
    starts = torch.tensor([0, 3], dtype=torch.int32)
    out = ops.kv4_decode_attention(q, *caches, lens, starts, 1 / math.sqrt(d))
    torch.testing.assert_close(out.double(), _float_attention(q, caches, starts, lens), rtol=0, atol=2e-3)


def test_decode_attention_row_with_no_visible_slot_is_zero(gen):
    caches = _fill_cache(1, 1, 8, 64, gen)
    q = torch.randn(1, 1, 1, 64, generator=gen).half()
    out = ops.kv4_decode_attention(q, *caches, torch.tensor([3], dtype=torch.int32),
                                   torch.tensor([3], dtype=torch.int32), 0.125)
    assert int(out.abs().sum()) == 0


def test_opcheck_kv4_ops(gen):
    b, h_q, h_kv, t, d = 2, 4, 2, 16, 64
    caches = _empty_cache(b, h_kv, t, d)
    k = torch.randn(b, h_kv, 3, d, generator=gen).half()
    v = torch.randn(b, h_kv, 3, d, generator=gen).half()
    torch.library.opcheck(torch.ops.qoq.kv4_append.default, (*caches, k, v, torch.tensor([0, 1, 2])))
    q = torch.randn(b, h_q, 1, d, generator=gen).half()
    lens = torch.tensor([3, 2], dtype=torch.int32)
    starts = torch.tensor([0, 1], dtype=torch.int32)
    torch.library.opcheck(torch.ops.qoq.kv4_decode_attention.default, (q, *caches, lens, starts, 0.125))


def test_kv4_bad_input(gen):
    b, h, t, d = 1, 2, 8, 64
    caches = _empty_cache(b, h, t, d)
    k = torch.randn(b, h, 1, d).half()
    pos = torch.tensor([0])
    with pytest.raises(TypeError, match="cache_position must have dtype"):
        ops.kv4_append(*caches, k, k, pos.int())
    with pytest.raises(ValueError, match="k_cache is for"):
        ops.kv4_append(*caches, torch.randn(b, h + 1, 1, d).half(), torch.randn(b, h + 1, 1, d).half(), pos)
    with pytest.raises(TypeError, match="v must have dtype"):
        ops.kv4_append(*caches, k, k.float(), pos)
    q = torch.randn(b, 3, 1, d).half()
    lens = torch.tensor([1], dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        ops.kv4_decode_attention(q, *caches, lens, lens, 0.1)
    with pytest.raises(TypeError, match="kv_lens must have dtype"):
        ops.kv4_decode_attention(torch.randn(b, 4, 1, d).half(), *caches, lens.long(), lens, 0.1)
    with pytest.raises(ValueError, match="k_params must have shape"):
        ops.kv4_decode_attention(torch.randn(b, 4, 1, d).half(), caches[0], caches[1][:, :, :4].contiguous(),
                                 caches[2], caches[3], lens, lens, 0.1)


@pytest.mark.parametrize("s_q", [1, 3])
def test_decode_attention_quantize_rows_are_tokens_with_heads_side_by_side(s_q, gen):
    b, h_q, h_kv, t, d = 2, 4, 2, 24, 64
    caches = _fill_cache(b, h_kv, t, d, gen)
    q = torch.randn(b, h_q, s_q, d, generator=gen).half()
    lens = torch.tensor([t, 17], dtype=torch.int32)
    starts = torch.tensor([0, 5], dtype=torch.int32)
    x_q, x_s, x_sum = ops.kv4_decode_attention_quantize(q, *caches, lens, starts, 0.125)
    assert x_q.shape == (b * s_q, h_q * d) and x_q.dtype == torch.int8
    assert x_s.shape == (b * s_q,) and x_s.dtype == torch.float32 and x_sum.dtype == torch.int32
    out = ops.kv4_decode_attention(q, *caches, lens, starts, 0.125).float()
    for row in range(b * s_q):
        bi, i = divmod(row, s_q)
        expected = out[bi, :, i, :].reshape(-1)  # token i of row bi, heads side by side
        assert float(x_s[row]) == pytest.approx(float(expected.abs().max()) / 127, rel=1e-6)
        assert bool(((x_q[row].float() * x_s[row] - expected).abs() <= x_s[row] / 2 + 1e-6).all())
        assert int(x_sum[row]) == int(x_q[row].int().sum())


def test_opcheck_kv4_decode_attention_quantize(gen):
    b, h_q, h_kv, t, d = 2, 4, 2, 16, 64
    caches = _fill_cache(b, h_kv, t, d, gen)
    q = torch.randn(b, h_q, 2, d, generator=gen).bfloat16()
    lens = torch.tensor([16, 9], dtype=torch.int32)
    starts = torch.tensor([0, 2], dtype=torch.int32)
    torch.library.opcheck(torch.ops.qoq.kv4_decode_attention_quantize.default, (q, *caches, lens, starts, 0.125))


def test_kv4_decode_attention_quantize_bad_input(gen):
    caches = _empty_cache(1, 2, 8, 64)
    lens = torch.tensor([1], dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        ops.kv4_decode_attention_quantize(torch.randn(1, 3, 1, 64).half(), *caches, lens, lens, 0.1)
    with pytest.raises(TypeError, match="q must have dtype"):
        ops.kv4_decode_attention_quantize(torch.randn(1, 4, 1, 64), *caches, lens, lens, 0.1)
