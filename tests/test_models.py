"""Per-family patching: module layout, closeness to the float model, unsupported models."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import qoq_torch
from qoq_torch.api import quantize_rtn
from qoq_torch.nn import FusedNorm, QoQAttention, QoQMLP
from tiny_models import GROUP_SIZE, tiny_model

IDS = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_quantized_logits_stay_close_to_the_float_model(family):
    model = tiny_model(family, dtype=torch.float32)
    with torch.no_grad():
        ref = model(IDS).logits
    model = qoq_torch.quantize(model.to(torch.bfloat16), config=qoq_torch.QoQConfig(group_size=GROUP_SIZE),
                               progress=False)
    layer = model.model.layers[1]
    assert isinstance(layer.self_attn, QoQAttention) and isinstance(layer.mlp, QoQMLP)
    assert isinstance(layer.input_layernorm, FusedNorm) and isinstance(layer.post_attention_layernorm, FusedNorm)
    assert (layer.self_attn.q_norm is not None) == (family == "qwen3")
    assert (layer.self_attn.qkv_proj.bias is not None) == (family == "qwen2")
    assert layer.self_attn.sliding_window == (6 if family == "mistral" else None)
    with torch.no_grad():
        out = model(IDS).logits.float()
    rel = ((out - ref).norm() / ref.norm()).item()
    # 4-bit weights and 8-bit activations of a random 2-layer model: ~0.23 measured; a broken layer gives > 1.
    assert 0.01 < rel < 0.35


def test_rtn_per_channel_also_runs():
    model = quantize_rtn(tiny_model("llama"), group_size=-1)
    assert model.model.layers[0].mlp.down_proj.group_size == -1
    assert torch.isfinite(model(IDS).logits).all()


def test_unsupported_models_and_bad_inputs():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=64)).to(torch.bfloat16)
    with pytest.raises(ValueError, match="supported model families: llama .*mistral.*qwen2.*qwen3"):
        qoq_torch.quantize(gpt2)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        qoq_torch.quantize(tiny_model("llama", dtype=torch.float32))
    model = quantize_rtn(tiny_model("llama"), GROUP_SIZE)
    with pytest.raises(ValueError, match="already quantized"):
        qoq_torch.quantize(model)
    with pytest.raises(TypeError, match="float16 or torch.bfloat16"):
        model.model.layers[0].self_attn(torch.randn(1, 3, 128), (torch.ones(1, 3, 32), torch.zeros(1, 3, 32)))
    with pytest.raises(TypeError, match="QoQConfig"):
        qoq_torch.quantize(tiny_model("llama"), config={"group_size": 64})
