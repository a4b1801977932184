"""``quantize``: the one-line entry point (calibrate + transform + swap modules)."""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .models import patch_model, spec_for
from .nn.generation import enable_kv4_generate
from .nn.linear import COMPUTE_DTYPES
from .quantization.config import QoQConfig

QOQ_CONFIG_ATTR = "qoq_config"


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, QOQ_CONFIG_ATTR, None) is not None


def check_quantizable(model: nn.Module) -> None:
    """Raise a clear error for models ``quantize`` cannot handle (before any work is done)."""
    spec_for(model)  # unsupported architecture -> lists the supported families
    if is_quantized(model):
        raise ValueError("the model is already quantized with QoQ")
    dtype = next(model.parameters()).dtype
    if dtype not in COMPUTE_DTYPES:
        raise TypeError(f"QoQ models run in float16 or bfloat16, but the model is {dtype}; load it with "
                        "dtype=torch.float16 / torch.bfloat16 (or call model.to(torch.bfloat16)) before quantize()")


def use_supported_attention(model: nn.Module) -> None:
    """QoQAttention runs sdpa or eager attention for prefill; switch other implementations to sdpa."""
    impl = model.config._attn_implementation
    if impl not in ("sdpa", "eager"):
        warnings.warn(f"attn_implementation={impl!r} is not supported by QoQAttention; switching to 'sdpa'",
                      stacklevel=3)
        model.set_attn_implementation("sdpa")


def finish_patching(model: nn.Module, config: QoQConfig) -> None:
    """Record the QoQ config on the model and let generate build the KV4 cache by itself."""
    setattr(model, QOQ_CONFIG_ATTR, config)
    if config.kv_bits == 4:
        enable_kv4_generate(model)


def quantize(model: nn.Module, tokenizer: Any = None, config: QoQConfig | None = None,
             calib_data: torch.Tensor | list[str] | None = None, progress: bool = True) -> nn.Module:
    """Quantize a Hugging Face causal LM in place to W4A8KV4 (QoQ) and return it.

    model: a Llama / Mistral / Qwen2 / Qwen3 ``*ForCausalLM`` in float16 or bfloat16, on any device (or dispatched
    with an accelerate ``device_map``). tokenizer / calib_data: calibration (token ids ``[n, seq]`` or texts);
    with a tokenizer and no data the shipped corpus is used; with neither the algorithm runs data-free.
    config: ``QoQConfig`` (defaults: group size 128, rotation, smoothing, KV4, ``lm_head`` kept in 16-bit).
    After the call every decoder layer runs QoQAttention / QoQMLP (and ``lm_head`` is a QoQLinear with
    ``config.quantize_lm_head``), and ``model.generate`` uses the KV4 cache.
    """
    from .quantization import prepare_qoq  # the algorithm package is heavy; import on use

    config = QoQConfig() if config is None else config
    if not isinstance(config, QoQConfig):
        raise TypeError(f"config must be a QoQConfig, got {type(config).__name__}")
    check_quantizable(model)
    use_supported_attention(model)
    weights = prepare_qoq(model, config, tokenizer=tokenizer, calib_data=calib_data, progress=progress)
    patch_model(model, weights, config.group_size, quantize_lm_head=config.quantize_lm_head)
    finish_patching(model, config)
    return model


def quantize_rtn(model: nn.Module, group_size: int = 128, kv_bits: int = 4) -> nn.Module:
    """Round-to-nearest baseline: swap the modules with the weights quantized as they are (no transform)."""
    check_quantizable(model)
    use_supported_attention(model)
    from .quantization import rtn_weights

    patch_model(model, rtn_weights(model, group_size), group_size)
    finish_patching(model, QoQConfig(group_size=group_size, rotation=False, smooth_attention=False,
                                     smooth_output=False, reorder=False, clip_search=False, kv_bits=kv_bits))
    return model
