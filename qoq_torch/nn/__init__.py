"""QoQ modules (QoQLinear, QoQAttention, QoQMLP) and the KV4 cache."""
from __future__ import annotations

from .attention import QoQAttention
from .kv_cache import KV4Cache, KV4Layer, KV4StaticLayer
from .linear import QoQLinear, concat_weights
from .mlp import FusedNorm, QoQMLP

__all__ = ["FusedNorm", "KV4Cache", "KV4Layer", "KV4StaticLayer", "QoQAttention", "QoQLinear", "QoQMLP",
           "concat_weights"]
