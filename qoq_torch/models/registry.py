"""Per-architecture patch tables: where each supported Hugging Face family keeps what QoQ replaces."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchitectureSpec:
    """How to patch one decoder family.

    family: short name; qk_norm: attention has per-head q_norm/k_norm (Qwen3); sliding_window_from_config: the
    attention's sliding window is ``config.sliding_window`` (Mistral) rather than the module's ``sliding_window``
    attribute (Qwen2/Qwen3, set per layer type). The attribute names are the same in all four families:
    ``model.layers[i].{input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,up,down}_proj}``.
    """

    family: str
    qk_norm: bool = False
    sliding_window_from_config: bool = False


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "LlamaForCausalLM": ArchitectureSpec("llama"),
    "MistralForCausalLM": ArchitectureSpec("mistral", sliding_window_from_config=True),
    "Qwen2ForCausalLM": ArchitectureSpec("qwen2"),
    "Qwen3ForCausalLM": ArchitectureSpec("qwen3", qk_norm=True),
}


def supported_families() -> str:
    return ", ".join(f"{spec.family} ({name})" for name, spec in ARCHITECTURES.items())


def spec_for(model: nn.Module) -> ArchitectureSpec:
    """The patch table of ``model``'s class; ValueError listing the supported families otherwise."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise ValueError(f"qoq_torch does not support {name}; supported model families: {supported_families()}")
    return ARCHITECTURES[name]
