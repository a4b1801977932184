"""One calibration pass through one decoder layer: the activation statistics QoQ's transforms need."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # shared by all supported families

from .architecture import DecoderLayerView


@dataclass
class LayerStatistics:
    """Statistics of one decoder layer over the calibration set (float32, on the layer's device).

    ``*_x`` are sampled input tokens ``[T, K]`` of the linears (the same token positions for all of them);
    ``*_absmax`` are per-input-channel maxima of |x| over every calibration token; ``k_absmax [H_kv, D]`` is
    the per-channel max of the keys after RoPE (what the KV cache stores).
    """

    attn_x: list[torch.Tensor] = field(default_factory=list)
    o_x: list[torch.Tensor] = field(default_factory=list)
    mlp_x: list[torch.Tensor] = field(default_factory=list)
    down_x: list[torch.Tensor] = field(default_factory=list)
    o_absmax: torch.Tensor | None = None
    down_absmax: torch.Tensor | None = None
    k_absmax: torch.Tensor | None = None

    def finish(self) -> dict[str, torch.Tensor]:
        return {name: torch.cat(getattr(self, name)) for name in ("attn_x", "o_x", "mlp_x", "down_x")}


def _running_max(current: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if current is None else torch.maximum(current, new)


def _rotary_keys(view: DecoderLayerView, x: torch.Tensor, position_embeddings: Any) -> torch.Tensor:
    """Keys ``[b, H_kv, s, D]`` after k_norm (if any) and RoPE, computed from the attention input ``x``."""
    b, s, _ = x.shape
    k = view.k_proj(x).view(b, s, view.num_kv_heads, view.head_dim)
    if view.k_norm is not None:
        k = view.k_norm(k)
    k = k.transpose(1, 2)
    cos, sin = position_embeddings
    if cos.shape[-1] != view.head_dim:
        raise ValueError(f"partial rotary embeddings ({cos.shape[-1]} of {view.head_dim} dims) are not supported")
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return k


def tokens_per_batch(max_tokens: int, batches: int) -> int:
    """How many tokens each calibration batch contributes so that all of them give about ``max_tokens``."""
    return math.ceil(max_tokens / batches)


def sample_token_rows(n_tokens: int, per_batch: int, generator: torch.Generator) -> torch.Tensor:
    """Sorted int64 indices of up to ``per_batch`` distinct tokens among ``n_tokens`` (a batch's flattened rows)."""
    return torch.randperm(n_tokens, generator=generator)[: min(per_batch, n_tokens)].sort().values


@torch.no_grad()
def run_layer_with_statistics(
    view: DecoderLayerView,
    hidden: list[torch.Tensor],
    layer_kwargs: list[dict[str, Any]],
    max_tokens: int,
    generator: torch.Generator,
    layer_name: str,
) -> LayerStatistics:
    """Run the layer on every calibration batch, replacing ``hidden[j]`` by the layer's output, and collect
    the statistics. Only one batch's intermediate activations exist at a time."""
    stats = LayerStatistics()
    per_batch = tokens_per_batch(max_tokens, len(hidden))
    state: dict[str, Any] = {}

    def sample(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])[state["rows"]].float()

    def on_attn_input(_m: Any, args: tuple) -> None:
        x = args[0]
        stats.attn_x.append(sample(x))
        k = _rotary_keys(view, x, state["position_embeddings"])
        stats.k_absmax = _running_max(stats.k_absmax, k.float().abs().amax(dim=(0, 2)))

    def on_o_input(_m: Any, args: tuple) -> None:
        stats.o_x.append(sample(args[0]))
        stats.o_absmax = _running_max(stats.o_absmax, args[0].float().abs().reshape(-1, args[0].shape[-1]).amax(0))

    def on_mlp_input(_m: Any, args: tuple) -> None:
        stats.mlp_x.append(sample(args[0]))

    def on_down_input(_m: Any, args: tuple) -> None:
        stats.down_x.append(sample(args[0]))
        x = args[0].float().abs().reshape(-1, args[0].shape[-1])
        stats.down_absmax = _running_max(stats.down_absmax, x.amax(0))

    handles = [
        view.q_proj.register_forward_pre_hook(on_attn_input),
        view.o_proj.register_forward_pre_hook(on_o_input),
        view.gate_proj.register_forward_pre_hook(on_mlp_input),
        view.down_proj.register_forward_pre_hook(on_down_input),
    ]
    try:
        for j, (x, kwargs) in enumerate(zip(hidden, layer_kwargs)):
            n_tokens = x.shape[0] * x.shape[1]
            rows = sample_token_rows(n_tokens, per_batch, generator)
            state["rows"] = rows.to(x.device)
            state["position_embeddings"] = kwargs["position_embeddings"]
            out = view.layer(x, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            if not bool(torch.isfinite(out).all()):
                raise ValueError(
                    f"non-finite activations (inf or nan) at the output of {layer_name} on calibration batch {j}; "
                    "the model overflows in its dtype on this data (try float32/bfloat16 or other data)"
                )
            hidden[j] = out
    finally:
        for h in handles:
            h.remove()
    return stats
