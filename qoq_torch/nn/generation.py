"""Make ``model.generate`` build a KV4 cache by itself for a quantized model.

transformers creates the cache in ``GenerationMixin._prepare_cache_for_generation`` from
``generation_config.cache_implementation``. We override that method on the model *instance* (not the class,
so other models are untouched): for ``cache_implementation`` None/"dynamic" it creates a growing ``KV4Cache``,
for "static" a fixed-size one (sized like transformers' static cache); any other implementation, a cache passed
by the user, or ``use_cache=False`` fall through to transformers' own logic. See docs/hf_integration.md.

A decode-speed default comes with the hook (measured on an H100 in docs/benchmarks.md, "Run 7"): on CUDA,
generate reads its stop flag one step late for KV4 caches (transformers' ``DeferredStopCheck``, which it enables
only on ``mps``), so the host queues the next step while the GPU runs this one. The extra step it runs after an
end-of-sequence token is dropped by transformers; it is used only when the cache is not handed back to the user
(nothing to roll back). ``KV4Cache.defer_stop_check = False`` turns it off.

A static KV4 cache is kept on the model between ``generate`` calls and reset for the next call when it fits (same
batch, device and length) and nothing outside the model holds it: a compiled decode step replays its CUDA graph only
while the cache's buffers (marked static addresses) stay where they were, and a new cache at new addresses makes
torch.compile's CUDA-graph trees record the whole decode graph again on the next call. Like transformers, the length
of a static cache never shrinks from one call to the next (``_previous_max_cache_length``).
"""
from __future__ import annotations

import re
import sys
import types

import torch
from torch import nn
from transformers.generation import utils as generation_utils
from transformers.masking_utils import create_masks_for_generate

from .decode_mask import decode_step_masks
from .kv_cache import KV4Cache, KV4Layer
from .linear import QoQLinear

KV4_IMPLEMENTATIONS = (None, "dynamic", "static")


def defers_stop_check(device: torch.device | str, cache, cache_is_returned: bool, is_assistant: bool) -> bool:
    """Whether generate should read its stop flag one step late: a KV4 cache on CUDA that stays inside generate."""
    return (torch.device(device).type == "cuda" and isinstance(cache, KV4Cache) and cache.defer_stop_check
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
        max_cache_length = max(max_cache_length, getattr(self, "_previous_max_cache_length", -1))
        self._previous_max_cache_length = max_cache_length
        cache_batch = max(generation_config.num_beams, generation_config.num_return_sequences) * batch_size
        cache = _reusable_static_cache(self, cache_batch, max_cache_length)
        if cache is None:
            self.__dict__.pop(KEPT_CACHE, None)  # free the old buffers before allocating the new ones
            cache = KV4Cache(config, max_cache_len=max_cache_length)
        if not generation_config.return_dict_in_generate:  # a cache handed back to the user is theirs
            self.__dict__[KEPT_CACHE] = cache
    else:
        cache = KV4Cache(config)
    model_kwargs["past_key_values"] = cache


KEPT_CACHE = "_qoq_kept_static_cache"
# References to the kept cache when only the model holds it: the instance dict, the local name in
# `_reusable_static_cache` and getrefcount's argument.
_ONLY_MODEL_REFS = 3


def _reusable_static_cache(model: nn.Module, batch: int, max_cache_len: int) -> KV4Cache | None:
    """The static KV4 cache kept from the previous ``generate``, reset, if it fits this call; else None."""
    cache = model.__dict__.get(KEPT_CACHE)
    if cache is None or sys.getrefcount(cache) > _ONLY_MODEL_REFS or cache._static_len != max_cache_len:
        return None
    layers = cache.layers
    if not all(layer.is_initialized for layer in layers):
        return None  # never written (an interrupted call): its allocation shapes are unknown
    first = layers[0]
    if first.batch_size != batch or first.device != model.device:
        return None
    cache.reset()
    return cache


_PACKED_WEIGHT_SUFFIXES = tuple(f"._buffers['{name}']" for name in QoQLinear.WEIGHT_BUFFERS)
# A cache layer's buffers past the first: `...past_key_values'].layers[3].k_cache`.
_LATER_CACHE_LAYER_BUFFER = re.compile(r"past_key_values'?\]?\.layers\[([1-9][0-9]*)\]\.(?:%s)$"
                                       % "|".join(KV4Layer.BUFFERS))


def _fixed_layout_tensor(entry) -> bool:
    """Whether a guard entry is a TENSOR_MATCH on a QoQLinear weight buffer or on a KV4 cache layer's buffer other
    than layer 0's."""
    if entry.guard_type != "TENSOR_MATCH" or not isinstance(entry.name, str) \
            or not isinstance(entry.value, torch.Tensor) or entry.value.dtype not in (torch.uint8, torch.float16):
        return False
    return entry.name.endswith(_PACKED_WEIGHT_SUFFIXES) or _LATER_CACHE_LAYER_BUFFER.search(entry.name) is not None


def skip_fixed_layout_guards(guard_entries) -> list[bool]:
    """torch.compile ``guard_filter_fn``: drop dynamo's per-tensor guards on tensors whose layout is fixed by others
    that stay guarded; keep the rest.

    A decode step re-checks every guard on every call (a tensor guard costs ~0.4 µs of host time). Dropped: the
    QoQLinear weight buffers (packed weights, group scales and zeros: about twice the float model's weight tensors),
    which never change shape or dtype, and the buffers of KV4 cache layers 1..L-1, which a cache allocates with the
    shapes of layer 0's (batch, the model's KV heads and head size, ``max_cache_len``), whose guards stay. The
    guards that remain (the modules, the norm weights, the embedding, layer 0's cache, the inputs) still catch a
    model moved to another device or dtype and a cache of another size. Anything unexpected in an entry keeps its
    guard."""
    keep = []
    for entry in guard_entries:
        try:
            drop = _fixed_layout_tensor(entry)
        except Exception:  # noqa: BLE001 - guard entries are not a stable API: keep the guard
            drop = False
        keep.append(not drop)
    return keep


def _kv4_default_compile_config(self):
    """transformers' default ``CompileConfig`` (inductor, "reduce-overhead") with ``skip_fixed_layout_guards``;
    any other default (another backend or mode) is returned unchanged."""
    from transformers.generation.configuration_utils import CompileConfig

    config = type(self)._default_compile_config(self)
    if config.backend != "inductor" or config.mode != "reduce-overhead" or config.options is not None:
        return config
    # torch.compile takes `mode` or `options`, not both: "reduce-overhead" is inductor's CUDA graphs option.
    return CompileConfig(fullgraph=config.fullgraph, dynamic=config.dynamic, backend=config.backend, mode=None,
                         options={"triton.cudagraphs": True, "guard_filter_fn": skip_fixed_layout_guards})


def _kv4_create_masks_for_generate(self, **kwargs):
    """generate's mask builder for compileable caches: ``decode_step_masks`` on a static KV4 cache's decode steps,
    transformers' ``create_masks_for_generate`` otherwise."""
    masks = decode_step_masks(**kwargs)
    return create_masks_for_generate(**kwargs) if masks is None else masks


def enable_kv4_generate(model: nn.Module) -> None:
    """Install the KV4 cache hook on ``model`` (idempotent), its default compile config for generate's decode step
    (``_kv4_default_compile_config``), the decode-step mask builder (``decode_step_masks``; not on models whose
    class builds its own masks) and the deferred stop check for KV4 caches on CUDA."""
    model._prepare_cache_for_generation = types.MethodType(_prepare_kv4_cache_for_generation, model)
    model._default_compile_config = types.MethodType(_kv4_default_compile_config, model)
    if not hasattr(type(model), "create_masks_for_generate"):
        model.create_masks_for_generate = types.MethodType(_kv4_create_masks_for_generate, model)
    _install_deferred_stop_check()


def disable_kv4_generate(model: nn.Module) -> None:
    """Remove the hook (and the kept cache): generate goes back to transformers' float caches."""
    model.__dict__.pop("_prepare_cache_for_generation", None)
    model.__dict__.pop("_default_compile_config", None)
    model.__dict__.pop("create_masks_for_generate", None)
    model.__dict__.pop(KEPT_CACHE, None)
