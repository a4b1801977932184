"""Make ``model.generate`` build a KV4 cache by itself for a quantized model.

transformers creates the cache in ``GenerationMixin._prepare_cache_for_generation`` from
``generation_config.cache_implementation``. We override that method on the model *instance* (not the class,
so other models are untouched): for ``cache_implementation`` None/"dynamic" it creates a growing ``KV4Cache``,
for "static" a fixed-size one (sized like transformers' static cache); any other implementation, a cache passed
by the user, or ``use_cache=False`` fall through to transformers' own logic. See docs/hf_integration.md.
"""
from __future__ import annotations

import types

from torch import nn

from .kv_cache import KV4Cache

KV4_IMPLEMENTATIONS = (None, "dynamic", "static")


def _prepare_kv4_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
    implementation = generation_config.cache_implementation
    if (model_kwargs.get("past_key_values") is not None or generation_config.use_cache is False
            or implementation not in KV4_IMPLEMENTATIONS):
        return type(self)._prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode,
                                                        batch_size, max_cache_length)
    config = self.config.get_text_config(decoder=True)
    if implementation == "static":
        if generation_config.max_cache_len is not None:
            max_cache_length = max(max_cache_length, generation_config.max_cache_len)
        cache = KV4Cache(config, max_cache_len=max_cache_length)
    else:
        cache = KV4Cache(config)
    model_kwargs["past_key_values"] = cache


def enable_kv4_generate(model: nn.Module) -> None:
    """Install the KV4 cache hook on ``model`` (idempotent)."""
    model._prepare_cache_for_generation = types.MethodType(_prepare_kv4_cache_for_generation, model)


def disable_kv4_generate(model: nn.Module) -> None:
    """Remove the hook: generate goes back to transformers' float caches."""
    model.__dict__.pop("_prepare_cache_for_generation", None)
