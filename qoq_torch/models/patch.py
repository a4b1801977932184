"""Swap a Hugging Face decoder's attention, MLP and norms for the QoQ modules, layer by layer."""
from __future__ import annotations

import types
from collections.abc import Mapping

import torch
from torch import nn

from ..nn import FusedNorm, QoQAttention, QoQLinear, QoQMLP, concat_weights
from ..nn.linear import QuantizedWeight
from .registry import ArchitectureSpec, spec_for

ATTENTION_PROJ = ("q_proj", "k_proj", "v_proj")
MLP_PROJ = ("gate_proj", "up_proj")


def _norm_eps(norm: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps"):
        if hasattr(norm, attr):
            return float(getattr(norm, attr))
    raise ValueError(f"cannot find the epsilon of {type(norm).__name__}")


def _fused_bias(linears: list[nn.Linear]) -> torch.Tensor | None:
    if all(lin.bias is None for lin in linears):
        return None
    return torch.cat([lin.bias.detach() if lin.bias is not None else
                      torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device)
                      for lin in linears])


def _qoq_linear(linears: list[nn.Linear], names: list[str], weights: Mapping[str, QuantizedWeight] | None,
                group_size: int, dtype: torch.dtype) -> QoQLinear:
    """One QoQLinear for ``linears`` fused along N; empty (meta buffers) when ``weights`` is None."""
    bias = _fused_bias(linears)
    if weights is None:
        n = sum(lin.out_features for lin in linears)
        return QoQLinear(linears[0].in_features, n, bias=bias is not None, group_size=group_size, dtype=dtype,
                         device="meta")
    missing = [name for name in names if name not in weights]
    if missing:
        raise KeyError(f"no quantized weight for {missing}")
    device = linears[0].weight.device
    qweight = concat_weights([_to_device(weights[name], device) for name in names])
    return QoQLinear.from_weight(qweight, None if bias is None else bias.to(dtype), dtype=dtype)


def _to_device(w: QuantizedWeight, device: torch.device) -> QuantizedWeight:
    fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(w).items()}
    return type(w)(**fields)


def _carry_hook(old: nn.Module, new: nn.Module) -> None:
    """Keep accelerate's device-alignment hook (device_map dispatch) on the replacement module."""
    hook = getattr(old, "_hf_hook", None)
    if hook is not None:
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(new, hook)


def _sliding_window(spec: ArchitectureSpec, attn: nn.Module, config) -> int | None:
    if spec.sliding_window_from_config:
        return getattr(config, "sliding_window", None)
    return getattr(attn, "sliding_window", None)


def patch_layer(model: nn.Module, spec: ArchitectureSpec, layer: nn.Module, prefix: str,
                weights: Mapping[str, QuantizedWeight] | None, group_size: int) -> None:
    """Replace ``layer``'s self_attn / mlp by QoQ modules and its two norms by ``FusedNorm``."""
    config = model.config
    attn, mlp = layer.self_attn, layer.mlp
    dtype = attn.q_proj.weight.dtype
    qkv = _qoq_linear([getattr(attn, n) for n in ATTENTION_PROJ], [f"{prefix}.self_attn.{n}" for n in ATTENTION_PROJ],
                      weights, group_size, dtype)
    o_proj = _qoq_linear([attn.o_proj], [f"{prefix}.self_attn.o_proj"], weights, group_size, dtype)
    gate_up = _qoq_linear([getattr(mlp, n) for n in MLP_PROJ], [f"{prefix}.mlp.{n}" for n in MLP_PROJ],
                          weights, group_size, dtype)
    down = _qoq_linear([mlp.down_proj], [f"{prefix}.mlp.down_proj"], weights, group_size, dtype)
    in_norm, post_norm = layer.input_layernorm, layer.post_attention_layernorm
    new_attn = QoQAttention(
        config, attn.layer_idx, qkv, o_proj, in_norm.weight, _norm_eps(in_norm),
        q_norm=attn.q_norm if spec.qk_norm else None, k_norm=attn.k_norm if spec.qk_norm else None,
        sliding_window=_sliding_window(spec, attn, config),
    )
    new_mlp = QoQMLP(gate_up, down, post_norm.weight, _norm_eps(post_norm))
    _carry_hook(attn, new_attn)
    _carry_hook(mlp, new_mlp)
    layer.self_attn, layer.mlp = new_attn, new_mlp
    layer.input_layernorm = FusedNorm("self_attn")
    layer.post_attention_layernorm = FusedNorm("mlp")
    layer.forward = types.MethodType(fused_residual_forward, layer)  # this instance only


def fused_residual_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                           position_ids: torch.Tensor | None = None, past_key_values=None, use_cache: bool | None = False,
                           position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
    """A patched decoder layer's forward: transformers' (norm, attention, add, norm, MLP, add) for these families,
    with both norms fused into the QoQ modules and the residual add after attention fused into the MLP's norm
    (`QoQMLP.forward(x, residual)`, which also adds the second residual in its down GEMM): two kernels fewer a layer."""
    attn_out, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                 past_key_values=past_key_values, use_cache=use_cache,
                                 position_embeddings=position_embeddings, **kwargs)
    return self.mlp(attn_out, residual=hidden_states)


def decoder_layer_prefixes(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[("model.layers.<i>", layer), ...]`` for every decoder layer."""
    return [(f"model.layers.{i}", layer) for i, layer in enumerate(model.model.layers)]


LM_HEAD = "lm_head"


def patch_lm_head(model: nn.Module, weights: Mapping[str, QuantizedWeight] | None, group_size: int) -> None:
    """Replace ``model.lm_head`` (an ``nn.Linear``) by a ``QoQLinear`` holding ``weights["lm_head"]`` (an empty one
    on the meta device when ``weights`` is None). The embeddings keep their float weight: a tied head is untied."""
    head = model.lm_head
    if isinstance(head, QoQLinear):
        raise ValueError("lm_head is already quantized")
    new_head = _qoq_linear([head], [LM_HEAD], weights, group_size, head.weight.dtype)
    _carry_hook(head, new_head)
    model.lm_head = new_head
    model.config.tie_word_embeddings = False


@torch.no_grad()
def patch_model(model: nn.Module, weights: Mapping[str, QuantizedWeight] | None, group_size: int,
                quantize_lm_head: bool = False) -> None:
    """Swap every decoder layer's modules in place (and ``lm_head`` when ``quantize_lm_head``).

    weights: ``{"model.layers.<i>.self_attn.q_proj": PerGroupWeight | PerChannelWeight, ...}`` for the seven
    linears of every layer, plus ``"lm_head"`` with ``quantize_lm_head`` (what ``prepare_qoq`` returns); None
    builds empty modules on the meta device (shapes only; ``load_quantized`` fills them from a checkpoint).
    """
    spec = spec_for(model)
    if quantize_lm_head and weights is not None and LM_HEAD not in weights:
        raise KeyError("quantize_lm_head=True but there is no quantized weight for 'lm_head'")
    for prefix, layer in decoder_layer_prefixes(model):
        if isinstance(layer.self_attn, QoQAttention):
            raise ValueError(f"{prefix} is already quantized")
        patch_layer(model, spec, layer, prefix, weights, group_size)
    if quantize_lm_head:
        patch_lm_head(model, weights, group_size)
