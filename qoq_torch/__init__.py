"""qoq_torch: W4A8KV4 (QoQ) quantization of Hugging Face LLMs as torch.library custom ops.

``qoq_torch.quantize(model, tokenizer)`` quantizes a model in place; see README.md.
"""
from __future__ import annotations

from . import ops
from .ops import cuda_available, extension_status

__version__ = "0.1.0"

# The model-level API imports transformers: load it on first use so `import qoq_torch` stays light.
_LAZY = {
    "quantize": "api", "save_quantized": "serialization", "load_quantized": "serialization",
    "QoQConfig": "quantization.config", "QoQLinear": "nn", "QoQAttention": "nn", "QoQMLP": "nn", "KV4Cache": "nn",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["cuda_available", "extension_status", "ops", "__version__", "quantize", "QoQConfig", "save_quantized",
           "load_quantized", "QoQLinear", "QoQAttention", "QoQMLP", "KV4Cache"]
