"""Per-architecture patch tables (Llama, Mistral, Qwen2, Qwen3) and the module swap."""
from __future__ import annotations

from .patch import decoder_layer_prefixes, patch_model
from .registry import ARCHITECTURES, ArchitectureSpec, spec_for, supported_families

__all__ = ["ARCHITECTURES", "ArchitectureSpec", "decoder_layer_prefixes", "patch_model", "spec_for",
           "supported_families"]
