"""QoQLinear, QoQMLP, the KV4 cache layers and the mask helper, against the reference ops."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from qoq_torch import ops
from qoq_torch.nn import KV4Cache, KV4Layer, KV4StaticLayer, QoQLinear, QoQMLP, concat_weights
from qoq_torch.nn.kv_cache import kv_starts_from_mask
from qoq_torch.ops import reference


def _linear(n, k, bias, gen, dtype=torch.bfloat16):
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=gen))
    return lin.to(dtype)


@pytest.mark.parametrize("group_size", [64, -1])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_reference_gemm(group_size, bias, gen):
    lin = _linear(48, 128, bias, gen)
    q = QoQLinear.from_linear(lin, group_size=group_size)
    x = torch.randn(2, 3, 128, generator=gen).to(torch.bfloat16)  # any leading dims
    y = q(x)
    assert y.shape == (2, 3, 48) and y.dtype == torch.bfloat16
    qw = (ops.quantize_weight_per_channel(lin.weight) if group_size == -1
          else ops.quantize_weight_per_group(lin.weight, group_size))
    x_q, x_s, x_sum = reference.quantize_per_token(x.reshape(6, 128))
    if group_size == -1:
        expect = reference.w4a8_gemm_per_channel(x_q, x_s, x_sum, qw.packed(), qw.scale, qw.zero, lin.bias,
                                                 torch.bfloat16)
    else:
        expect = reference.w4a8_gemm_per_group(x_q, x_s, qw.packed(), qw.s2, qw.z2, qw.s1, lin.bias, group_size,
                                               torch.bfloat16)
    assert torch.equal(y.reshape(6, 48), expect)
    # and it approximates the float layer to within the W4A8 error
    ref = lin(x).float()
    assert (y.float() - ref).norm() / ref.norm() < 0.15


def test_linear_round_trips_its_weight_and_state_dict(gen):
    qw = ops.quantize_weight_per_group(torch.randn(32, 128, generator=gen), 64)
    q = QoQLinear.from_weight(qw, dtype=torch.float16)
    back = q.quantized_weight()
    assert torch.equal(back.w4, qw.w4) and torch.equal(back.s1, qw.s1) and torch.equal(back.z2, qw.z2)
    other = QoQLinear(128, 32, group_size=64)
    other.load_state_dict(q.state_dict())
    x = torch.randn(4, 128, generator=gen).half()
    assert torch.equal(other(x), q(x))
    # packed_scales is derived from s2 / z2: not saved, rebuilt by load_weight and by every state-dict load
    assert set(q.state_dict()) == {"qweight", "s2", "z2", "s1"}
    assert torch.equal(q.packed_scales, ops.pack_scales(qw.s2, qw.z2))
    assert torch.equal(other.packed_scales, q.packed_scales)
    # reloading a weight rewrites the buffer in place (a compiled model keeps reading the same tensor)
    before = other.packed_scales
    fresh = ops.quantize_weight_per_group(torch.randn(32, 128, generator=gen), 64)
    other.load_weight(fresh)
    assert other.packed_scales is before and torch.equal(before, ops.pack_scales(fresh.s2, fresh.z2))
    assigned = QoQLinear(128, 32, group_size=64, device="meta")
    assigned.load_state_dict(q.state_dict(), assign=True)
    assert torch.equal(assigned.packed_scales, q.packed_scales)


def test_linear_keeps_float16_scales_under_model_dtype_casts(gen):
    q = QoQLinear.from_linear(_linear(16, 64, True, gen), group_size=-1)
    scale = q.scale.clone()
    q.to(torch.float32).to(torch.bfloat16)
    assert q.scale.dtype == torch.float16 and torch.equal(q.scale, scale)
    assert q.bias.dtype == torch.bfloat16


def test_linear_rejects_float32_input_and_bad_weights(gen):
    q = QoQLinear.from_linear(_linear(16, 64, False, gen), group_size=64)
    with pytest.raises(TypeError, match="float16 or torch.bfloat16"):
        q(torch.randn(2, 64))
    with pytest.raises(ValueError, match="group_size"):
        QoQLinear(96, 16, group_size=64)
    with pytest.raises(ValueError, match="module expects"):
        q.load_weight(ops.quantize_weight_per_group(torch.randn(16, 128), 64))
    with pytest.raises(ValueError, match="group_size"):
        q.load_weight(ops.quantize_weight_per_channel(torch.randn(16, 64)))
    with pytest.raises(ValueError, match="per-group and per-channel"):
        concat_weights([ops.quantize_weight_per_channel(torch.randn(16, 64)),
                        ops.quantize_weight_per_group(torch.randn(16, 64), 64)])


def test_fused_gemm_equals_separate_gemms(gen):
    a, b = _linear(32, 128, True, gen), _linear(16, 128, True, gen)
    qa, qb = QoQLinear.from_linear(a, 64), QoQLinear.from_linear(b, 64)
    fused = QoQLinear.from_weight(concat_weights([qa.quantized_weight(), qb.quantized_weight()]),
                                  torch.cat([a.bias, b.bias]), dtype=torch.bfloat16)
    x = torch.randn(5, 128, generator=gen).bfloat16()
    assert torch.equal(fused(x), torch.cat([qa(x), qb(x)], dim=1))


def test_mlp_is_norm_then_swiglu_of_quantized_linears(gen):
    hidden, inter = 128, 256
    gate, up, down = _linear(inter, hidden, False, gen), _linear(inter, hidden, False, gen), _linear(hidden, inter,
                                                                                                    False, gen)
    norm_w = (1 + 0.1 * torch.randn(hidden, generator=gen)).bfloat16()
    q = [QoQLinear.from_linear(lin, 64) for lin in (gate, up, down)]
    mlp = QoQMLP(QoQLinear.from_weight(concat_weights([q[0].quantized_weight(), q[1].quantized_weight()]),
                                       dtype=torch.bfloat16), q[2], norm_w, 1e-6)
    x = torch.randn(2, 3, hidden, generator=gen).bfloat16()
    y = mlp(x)
    x_q, x_s, x_sum = reference.rmsnorm_quantize(x.view(6, hidden), norm_w, 1e-6)
    gu = torch.cat([q[0].gemm(x_q, x_s, x_sum, torch.bfloat16), q[1].gemm(x_q, x_s, x_sum, torch.bfloat16)], 1)
    h_q, h_s, h_sum = reference.silu_mul_quantize(gu)
    assert torch.equal(y.view(6, hidden), q[2].gemm(h_q, h_s, h_sum, torch.bfloat16))
    with pytest.raises(ValueError, match="2 x"):
        QoQMLP(q[0], q[2], norm_w, 1e-6)
    # a prefill longer than max_rows_per_pass runs in row chunks (here 4, 4 and 2 rows): the same output
    x_long = torch.randn(2, 5, hidden, generator=gen).bfloat16()
    whole = mlp(x_long)
    mlp.max_rows_per_pass = 4
    chunked = mlp(x_long)
    assert chunked.shape == whole.shape and torch.equal(chunked, whole)


def _kv(b, h, s, d, gen):
    return (torch.randn(b, h, s, d, generator=gen).bfloat16(), torch.randn(b, h, s, d, generator=gen).bfloat16())


def test_dynamic_layer_grows_and_keeps_contents(gen):
    layer = KV4Layer()
    chunks = [_kv(2, 2, s, 32, gen) for s in (40, 30, 1, 1)]  # crosses the initial capacity (64)
    for k, v in chunks:
        layer.append(k, v)
    k_all = torch.cat([k for k, _ in chunks], dim=2)
    assert layer.get_seq_length() == 72 and layer.capacity() >= 72
    packed, params = reference.kv4_quantize(k_all)
    assert torch.equal(layer.k_cache[:, :, :72], packed) and torch.equal(layer.k_params[:, :, :72], params)
    k_deq, _ = layer.dequantized(72, torch.float32)
    assert torch.equal(k_deq, reference.kv4_dequantize(packed, params))
    assert layer.get_mask_sizes(3) == (75, 0)
    layer.crop(-2)
    assert layer.get_seq_length() == 70
    layer.batch_select_indices(torch.tensor([1]))
    assert layer.k_cache.shape[0] == 1 and torch.equal(layer.k_cache[0, :, :70], packed[1, :, :70])


def test_dynamic_layer_crops_as_transformers_layers_do(gen):
    """Negative: remove that many; 0 (also as a tensor, what assisted decoding passes when every candidate was
    accepted): nothing; positive (transformers' legacy form): keep that many, no-op beyond the length."""
    layer = KV4Layer()
    layer.append(*_kv(1, 2, 10, 32, gen))
    for count, length in ((0, 10), (torch.tensor(0), 10), (-0, 10), (torch.tensor(-3), 7), (-1, 6), (12, 6),
                          (4, 4), (-9, 0)):
        layer.crop(count)
        assert layer.get_seq_length() == length and isinstance(layer.get_seq_length(), int), count


def test_cache_reorders_and_repeats_rows_for_beam_search(gen):
    layer = KV4Layer()
    k, v = _kv(3, 2, 5, 32, gen)
    layer.append(k, v)
    rows = [layer.k_cache[i, :, :5].clone() for i in range(3)]
    params = [layer.v_params[i, :, :5].clone() for i in range(3)]
    layer.reorder_cache(torch.tensor([2, 2, 0]))
    assert all(torch.equal(layer.k_cache[i, :, :5], rows[j]) and torch.equal(layer.v_params[i, :, :5], params[j])
               for i, j in enumerate((2, 2, 0)))
    layer.batch_repeat_interleave(2)
    assert layer.batch_size == 6 and torch.equal(layer.k_cache[3, :, :5], rows[2])


def test_static_layer_counts_on_device_and_refuses_overflow(gen):
    layer = KV4StaticLayer(max_cache_len=8)
    k, v = _kv(1, 2, 6, 32, gen)
    layer.append(k, v)
    assert int(layer.get_seq_length()) == 6 and layer.get_mask_sizes(1) == (8, 0)
    assert torch.equal(layer.kv_lens(3), torch.full((3,), 6, dtype=torch.int32))
    k2, v2 = _kv(1, 2, 3, 32, gen)
    before = layer.k_cache.clone()
    with pytest.raises(ValueError, match="at most 8 tokens"):
        layer.append(k2, v2)
    assert torch.equal(layer.k_cache, before) and int(layer.cumulative_length) == 6  # nothing written
    for count, length in ((torch.tensor(0), 6), (-2, 4), (9, 4), (3, 3)):  # KV4Layer.crop's rule
        layer.crop(count)
        assert int(layer.get_seq_length()) == length and layer.host_length() == length, count
    layer.append(k2, v2)  # the next append overwrites the dropped slots
    assert int(layer.get_seq_length()) == 6
    assert torch.equal(layer.k_cache[:, :, 3:6], reference.kv4_quantize(k2)[0])
    with pytest.raises(ValueError, match="H_kv"):
        layer.append(*_kv(1, 4, 1, 32, gen))


def test_static_cache_layers_share_one_length_advanced_by_layer_0(gen):
    cache = KV4Cache(num_layers=3, max_cache_len=8)
    k, v = _kv(2, 2, 3, 32, gen)
    for layer in cache.layers:
        layer.append(k, v)
        assert torch.equal(layer.kv_lens(2), torch.full((2,), 3, dtype=torch.int32))
    assert all(int(cache.get_seq_length(i)) == 3 for i in range(3))
    assert cache.layers[0].cumulative_length is cache.layers[2].cumulative_length
    k1, v1 = _kv(2, 2, 1, 32, gen)
    cache.layers[0].append(k1, v1)
    lens = cache.layers[0].kv_lens(2)
    cache.layers[1].append(k1, v1)  # the slot layer 0 reserved, and its lengths, not recomputed
    assert cache.layers[1].kv_lens(2) is lens and int(lens[0]) == 4
    for layer, keys in zip(cache.layers[:2], (k, k)):
        packed, params = reference.kv4_quantize(torch.cat([keys, k1], dim=2))
        assert torch.equal(layer.k_cache[:, :, :4], packed) and torch.equal(layer.k_params[:, :, :4], params)
    with pytest.raises(ValueError, match="same number of tokens"):
        cache.layers[2].append(*_kv(2, 2, 2, 32, gen))
    cache.layers[2].append(k1, v1)  # closes the step: a follower alone now has no step to join
    with pytest.raises(ValueError, match="layer 0 appends first"):
        cache.layers[1].append(k1, v1)
    cache.crop(-2)  # every layer visited, the shared length cropped once
    assert int(cache.get_seq_length()) == 2 and all(layer.host_length() == 2 for layer in cache.layers)
    cache.crop(-1)  # the next forward right after a crop: layer 0 has counted its token, the others not yet
    cache.layers[0].append(k1, v1)
    assert [layer.host_length() for layer in cache.layers] == [2, 1, 1]
    for layer in cache.layers[1:]:
        layer.append(k1, v1)
    assert int(cache.get_seq_length()) == 2 and all(layer.host_length() == 2 for layer in cache.layers)
    cache.reset()
    assert int(cache.get_seq_length()) == 0 and all(layer.host_length() == 0 for layer in cache.layers)


def test_kv_starts_are_computed_once_per_mask_and_forward():
    cache = KV4Cache(num_layers=3)
    full = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool).view(2, 1, 1, 3)
    window = torch.tensor([[0, 0, 1], [0, 1, 1]], dtype=torch.bool).view(2, 1, 1, 3)  # another layer type's mask
    first = cache.kv_starts(0, full, 2, torch.device("cpu"))
    assert torch.equal(first, torch.tensor([1, 0], dtype=torch.int32))
    assert torch.equal(cache.kv_starts(1, window, 2, torch.device("cpu")), torch.tensor([2, 1], dtype=torch.int32))
    assert cache.kv_starts(2, full, 2, torch.device("cpu")) is first
    # the last layer closed the forward: the next one recomputes from its own mask
    again = cache.kv_starts(0, full.clone(), 2, torch.device("cpu"))
    assert again is not first and torch.equal(again, first)


def test_cache_update_returns_dequantized_states(gen):
    cache = KV4Cache(num_layers=2)
    k, v = _kv(1, 2, 5, 32, gen)
    keys, values = cache.update(k, v, 1)
    assert keys.shape == (1, 2, 5, 32) and keys.dtype == torch.bfloat16
    scale = reference.kv4_quantize(k)[1][..., 0].float().unsqueeze(-1)
    assert bool(((keys.float() - k.float()).abs() <= scale / 2 + 2e-2 * k.float().abs()).all())
    assert cache.get_seq_length(1) == 5 and cache.get_seq_length(0) == 0


def test_kv_starts_from_masks():
    bool_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)
    expect = torch.tensor([2, 0, 4], dtype=torch.int32)
    assert torch.equal(kv_starts_from_mask(bool_mask.view(3, 1, 1, 5), 3, torch.device("cpu")), expect)
    float_mask = torch.where(bool_mask, 0.0, torch.finfo(torch.bfloat16).min).bfloat16().view(3, 1, 1, 5)
    assert torch.equal(kv_starts_from_mask(float_mask, 3, torch.device("cpu")), expect)
    assert torch.equal(kv_starts_from_mask(bool_mask.long(), 3, torch.device("cpu")), expect)
    assert torch.equal(kv_starts_from_mask(None, 2, torch.device("cpu")), torch.zeros(2, dtype=torch.int32))
