"""Where the QoQ transforms find their modules in the supported Hugging Face decoder families."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class DecoderLayerView:
    """The modules of one decoder layer that the transforms touch."""

    index: int
    layer: nn.Module
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear
    input_layernorm: nn.Module
    post_attention_layernorm: nn.Module
    q_norm: nn.Module | None  # Qwen3: per-head RMSNorm on q / k before RoPE
    k_norm: nn.Module | None
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def linears(self) -> dict[str, nn.Linear]:
        """The seven quantized linears by short name."""
        return {name: getattr(self, name) for name in ATTENTION_LINEARS + MLP_LINEARS}


def check_supported(model: nn.Module) -> None:
    """Raise ValueError unless ``model`` is one of SUPPORTED_ARCHITECTURES."""
    name = type(model).__name__
    if name not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"QoQ does not support {name}; supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack (``model.model``) holding embed_tokens, layers, norm and rotary_emb."""
    return model.model


def decoder_layers(model: nn.Module) -> list[DecoderLayerView]:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    views = []
    for i, layer in enumerate(base_model(model).layers):
        attn, mlp = layer.self_attn, layer.mlp
        views.append(
            DecoderLayerView(
                index=i, layer=layer,
                q_proj=attn.q_proj, k_proj=attn.k_proj, v_proj=attn.v_proj, o_proj=attn.o_proj,
                gate_proj=mlp.gate_proj, up_proj=mlp.up_proj, down_proj=mlp.down_proj,
                input_layernorm=layer.input_layernorm, post_attention_layernorm=layer.post_attention_layernorm,
                q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None),
                num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads, head_dim=head_dim,
            )
        )
    return views


def module_names(model: nn.Module) -> dict[int, str]:
    """id(module) -> its full name in ``model`` (e.g. "model.layers.0.self_attn.q_proj")."""
    return {id(m): n for n, m in model.named_modules()}


def check_finite_weights(model: nn.Module) -> None:
    """Raise ValueError naming the first parameter holding inf or nan."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise ValueError(f"parameter {name} contains non-finite values (inf or nan); cannot quantize")


def check_group_size(model: nn.Module, group_size: int) -> None:
    """Raise ValueError if ``group_size`` does not divide some decoder linear's in-features."""
    if group_size == -1:
        return
    names = module_names(model)
    for view in decoder_layers(model):
        for lin in view.linears().values():
            if lin.in_features % group_size != 0:
                raise ValueError(
                    f"group_size={group_size} does not divide the in-features K={lin.in_features} of "
                    f"{names[id(lin)]}: every weight group must lie inside one row; choose a group size that "
                    f"divides {lin.in_features} or -1 (per-channel)"
                )


LM_HEAD_N_MULTIPLE = 16  # the CUDA W4A8 GEMM's N granularity (csrc/gemm/w4a8_gemm.cu)


def check_lm_head_quantizable(model: nn.Module, group_size: int) -> None:
    """Raise ValueError unless ``lm_head`` can become a W4A8 linear: no bias, the vocabulary a multiple of 16 (the
    CUDA GEMM's N granularity, checked on every device so a checkpoint stays portable), K divisible by the group."""
    head = model.lm_head
    if not isinstance(head, nn.Linear):
        raise ValueError(f"quantize_lm_head expects lm_head to be an nn.Linear, got {type(head).__name__}")
    if head.bias is not None:
        raise ValueError("quantize_lm_head does not support an lm_head with a bias")
    if head.out_features % LM_HEAD_N_MULTIPLE:
        raise ValueError(f"quantize_lm_head needs the vocabulary size to be a multiple of {LM_HEAD_N_MULTIPLE} "
                         f"(the W4A8 GEMM's N granularity), got {head.out_features}; keep lm_head in 16-bit "
                         "(quantize_lm_head=False)")
    if group_size != -1 and head.in_features % group_size:
        raise ValueError(f"group_size={group_size} does not divide lm_head's in-features K={head.in_features}")
