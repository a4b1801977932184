"""quantize() on a model dispatched with an accelerate device_map keeps its hooks and devices."""
from __future__ import annotations

import torch
from accelerate import dispatch_model

import qoq_torch
from tiny_models import GROUP_SIZE, tiny_model


def test_quantize_keeps_accelerate_hooks_and_generates():
    model = tiny_model("llama")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = dispatch_model(model, device_map=device_map, force_hooks=True)
    assert hasattr(model.model.layers[0], "_hf_hook")
    qoq_torch.quantize(model, config=qoq_torch.QoQConfig(group_size=GROUP_SIZE), progress=False)
    assert hasattr(model.model.layers[0], "_hf_hook") and model.hf_device_map == device_map
    assert next(model.model.layers[1].self_attn.buffers()).device.type == "cpu"
    out = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


def test_public_exports():
    for name in ("quantize", "QoQConfig", "save_quantized", "load_quantized", "QoQLinear", "QoQAttention", "QoQMLP"):
        assert name in qoq_torch.__all__ and getattr(qoq_torch, name) is not None
