"""qoq_torch: W4A8KV4 (QoQ) quantization of Hugging Face LLMs as torch.library custom ops.

``qoq_torch.quantize(model, tokenizer)`` quantizes a model in place; see README.md.
"""
from __future__ import annotations

from . import ops
from .ops import cuda_available, extension_status

__version__ = "0.1.0"

__all__ = ["cuda_available", "extension_status", "ops", "__version__"]
