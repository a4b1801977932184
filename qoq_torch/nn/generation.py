"""Make ``model.generate`` build a KV4 cache by itself for a quantized model.

transformers creates the cache in ``GenerationMixin._prepare_cache_for_generation`` from
``generation_config.cache_implementation``. We override that method on the model *instance* (not the class,
so other models are untouched): for ``cache_implementation`` None/"dynamic" it creates a growing ``KV4Cache``,
for "static" a fixed-size one (sized like transformers' static cache); any other implementation, a cache passed
by the user, or ``use_cache=False`` fall through to transformers' own logic. See docs/hf_integration.md.

Two decode-speed defaults come with the hook (both measured on an H100 in docs/benchmarks.md, "Run 7"):
  * the model's default compile config (what generate compiles the decode step with when the user gives no
    ``compile_config``; an instance override of ``_default_compile_config``) adds inductor freezing
    to CUDA graphs: the packed weights become constants of the compiled graph instead of graph inputs, whose
    per-replay checks cost the host about 1 ms a step for a QoQ model (it has ~2x the inputs of a float one);
  * on CUDA, generate reads its stop flag one step late for KV4 caches (transformers' ``DeferredStopCheck``, which
    it enables only on ``mps``), so the host queues the next step while the GPU runs this one. The extra step it
    runs after an end-of-sequence token is dropped by transformers; it is used only when the cache is not handed
    back to the user (nothing to roll back). ``KV4Cache.defer_stop_check = False`` turns it off.
"""
from __future__ import annotations

import functools
import types

import torch
from torch import nn
from transformers.generation import utils as generation_utils
from transformers.generation.configuration_utils import CompileConfig

from .kv_cache import KV4Cache

KV4_IMPLEMENTATIONS = (None, "dynamic", "static")
# mode="reduce-overhead" is {"triton.cudagraphs": True}; torch.compile takes either a mode or options, not both.
DECODE_COMPILE_OPTIONS = {"triton.cudagraphs": True, "freezing": True}
DEFER_STOP_DEVICES = ("cuda",)  # where the host would otherwise wait for the GPU every step


def decode_compile_config() -> CompileConfig:
    """The ``CompileConfig`` QoQ models default to: CUDA graphs + inductor freezing of the weights."""
    return CompileConfig(mode=None, options=dict(DECODE_COMPILE_OPTIONS))


def defers_stop_check(device: torch.device | str, cache, cache_is_returned: bool, is_assistant: bool) -> bool:
    """Whether generate should read its stop flag one step late: a KV4 cache on CUDA that stays inside generate."""
    return (torch.device(device).type in DEFER_STOP_DEVICES and isinstance(cache, KV4Cache) and cache.defer_stop_check
            and not cache_is_returned and not is_assistant)


def _install_deferred_stop_check() -> None:
    """Extend transformers' ``DeferredStopCheck.is_supported`` with ``defers_stop_check`` (once per process).

    The check sees only the device and the cache, so it is keyed on the cache type: other models keep
    transformers' behaviour."""
    cls = getattr(generation_utils, "DeferredStopCheck", None)
    if cls is None or "is_supported" not in cls.__dict__ or getattr(cls.is_supported, "_qoq_kv4", False):
        return  # an older transformers without the deferred check, or already installed
    original = cls.__dict__["is_supported"].__func__

    def is_supported(device, cache, cache_is_returned, is_assistant):
        return (defers_stop_check(device, cache, cache_is_returned, is_assistant)
                or original(device, cache, cache_is_returned, is_assistant))

    is_supported._qoq_kv4 = True
    cls.is_supported = staticmethod(is_supported)


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


def _default_compile_config(self) -> CompileConfig:  # named like the method it overrides (bound-method copies)
    return decode_compile_config()


def get_compiled_call(self, compile_config: CompileConfig | None):
    """transformers' compiled ``__call__``, run with inductor's global ``freezing`` flag set when the config asks
    for freezing: dynamo reads that global flag (not the backend's options) while tracing to decide how the
    parameters enter the graph, and with the option alone the weights stay graph inputs and the CUDA graphs are
    skipped (the KV cache's in-place updates then count as mutated graph inputs)."""
    compiled = type(self).get_compiled_call(self, compile_config)
    options = (compile_config or self._default_compile_config()).options or {}
    return functools.partial(_call_frozen, compiled) if options.get("freezing") else compiled


def _call_frozen(compiled, *args, **kwargs):
    from torch._inductor import config as inductor_config

    previous, inductor_config.freezing = inductor_config.freezing, True
    try:
        return compiled(*args, **kwargs)
    finally:
        inductor_config.freezing = previous


def enable_kv4_generate(model: nn.Module) -> None:
    """Install the KV4 cache hook on ``model`` (idempotent), the deferred stop check for KV4 caches on CUDA, and
    ``decode_compile_config`` as the model's default compile config."""
    model._prepare_cache_for_generation = types.MethodType(_prepare_kv4_cache_for_generation, model)
    model._default_compile_config = types.MethodType(_default_compile_config, model)
    model.get_compiled_call = types.MethodType(get_compiled_call, model)
    _install_deferred_stop_check()


def disable_kv4_generate(model: nn.Module) -> None:
    """Remove the hooks: generate goes back to transformers' float caches and default compile config."""
    model.__dict__.pop("_prepare_cache_for_generation", None)
    model.__dict__.pop("_default_compile_config", None)
    model.__dict__.pop("get_compiled_call", None)
