"""Fake-quantized execution of a Hugging Face model: W4A8KV4 arithmetic simulated in float.

Dequantized weights replace the float ones, every decoder-layer linear sees per-token INT8 round-tripped
inputs, and keys/values (after RoPE) go through the KV4 round trip before attention. Numerically this is the
deployed arithmetic up to float accumulation order; it is what accuracy ablations measure.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from .fake_quant import QuantizedWeight, fake_quantize_kv4, fake_quantize_tokens

_KV4_PREFIX = "qoq_fake_kv4|"


def _kv4_attention_name(inner: str) -> str:
    """Register (once) an attention function that KV4-round-trips keys/values, then runs ``inner``."""
    name = _KV4_PREFIX + inner
    if name not in ALL_ATTENTION_FUNCTIONS:
        inner_fn = ALL_ATTENTION_FUNCTIONS.get_interface(inner, eager_attention_forward)

        def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Any, **kwargs: Any):
            key = fake_quantize_kv4(key).to(key.dtype)
            value = fake_quantize_kv4(value).to(value.dtype)
            return inner_fn(module, query, key, value, attention_mask, **kwargs)

        ALL_ATTENTION_FUNCTIONS.register(name, attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


def _quantize_input_hook(_module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    return (fake_quantize_tokens(x).to(x.dtype),) + tuple(args[1:])


@contextmanager
def simulate_quantized_model(
    model: nn.Module,
    weights: Mapping[str, QuantizedWeight],
    quantize_activations: bool = True,
    quantize_kv: bool = True,
) -> Iterator[nn.Module]:
    """Within the ``with`` block, ``model`` computes with the dequantized ``weights`` (full module name ->
    PerGroupWeight/PerChannelWeight), per-token INT8 inputs to those linears (if ``quantize_activations``)
    and a KV4 round trip of keys and values (if ``quantize_kv``). The float weights are restored on exit.
    """
    originals: dict[str, torch.Tensor] = {}
    handles = []
    config = model.config
    attn_before = config._attn_implementation
    try:
        for name, qweight in weights.items():
            linear = model.get_submodule(name)
            originals[name] = linear.weight.data
            linear.weight.data = qweight.dequantize().to(dtype=linear.weight.dtype, device=linear.weight.device)
            if quantize_activations:
                handles.append(linear.register_forward_pre_hook(_quantize_input_hook))
        if quantize_kv:
            config._attn_implementation = _kv4_attention_name(attn_before or "eager")
        yield model
    finally:
        config._attn_implementation = attn_before
        for h in handles:
            h.remove()
        for name, weight in originals.items():
            model.get_submodule(name).weight.data = weight
