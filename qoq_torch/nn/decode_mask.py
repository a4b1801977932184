"""The attention masks of a decode step on a static KV4 cache, built in a handful of kernels.

On a compileable cache transformers' ``generate`` builds each decode step's 4-D mask eagerly, before the compiled
forward (``create_masks_for_generate`` in ``prepare_inputs_for_generation``): about twenty small tensor ops and
their Python, host time that a batch-1 step pays on top of its CUDA graph. ``decode_step_masks`` builds the same
boolean masks (``sdpa`` layout ``[B, 1, 1, T]``, True = visible) from the 2-D padding mask, the cache's device
length and a slot index kept on the cache: visible slots are ``j <= q`` (causal; ``q`` the new token's slot), not
padding, and for sliding layers ``j > q - window``. It returns None wherever it does not reproduce transformers'
masks exactly (several query tokens, another cache or attention implementation, extra mask functions, other layer
types), and the caller then falls back to transformers.
"""
from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F

from .kv_cache import KV4Cache

MASK_KINDS = ("full_attention", "sliding_attention")

# QOQ_FAST_DECODE_MASK=0 makes every step use transformers' mask builder (A/B timing).
ENABLED = os.environ.get("QOQ_FAST_DECODE_MASK", "1") != "0"


def mask_plan(config) -> dict[str, int | None] | int | None | bool:
    """The masks transformers would build for ``config``: ``{kind: window}`` for configs with ``layer_types``, else
    one window (None: plain causal); False where that is something this module does not build (another attention
    implementation or layer kind, a chunked or bidirectional mask)."""
    text = config.get_text_config()
    if getattr(text, "_attn_implementation", None) != "sdpa" or not getattr(text, "is_causal", True):
        return False
    window = getattr(text, "sliding_window", None)
    if hasattr(text, "layer_types"):
        kinds = text.layer_types
        if kinds is None or not set(kinds) <= set(MASK_KINDS) or ("sliding_attention" in kinds and window is None):
            return False  # (a sliding layer without a window: transformers raises; let it)
        return {kind: (window if kind == "sliding_attention" else None) for kind in set(kinds)}
    if window is None and getattr(text, "attention_chunk_size", None) is not None:
        return False
    return window


_plans: dict[int, tuple[weakref.ref, str, object]] = {}  # id(config) -> (config, attention implementation, plan)


def _cached_mask_plan(config):
    """``mask_plan(config)``, worked out once per config and attention implementation: a decode step asks every
    step, and config attributes are slow to read."""
    implementation = config._attn_implementation
    entry = _plans.get(id(config))
    if entry is None or entry[0]() is not config or entry[1] != implementation:
        for key in [key for key, (ref, _, _) in _plans.items() if ref() is None]:
            del _plans[key]  # configs that are gone
        entry = (weakref.ref(config), implementation, mask_plan(config))
        _plans[id(config)] = entry
    return entry[2]


def decode_step_masks(config, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, past_key_values,
                      position_ids: torch.Tensor | None = None, or_mask_function=None, and_mask_function=None,
                      block_sequence_ids: torch.Tensor | None = None, **kwargs):
    """transformers' ``create_masks_for_generate`` for one query token on a static ``KV4Cache``, or None.

    ``inputs_embeds`` ``[B, 1, ·]`` gives batch and device; ``attention_mask`` int/bool ``[B, L]`` (1 = token).
    Returns a bool ``[B, 1, 1, T]`` mask (``T = max_cache_len``), or ``{layer kind: mask}`` for configs with
    ``layer_types``, as transformers does."""
    if not (ENABLED and isinstance(past_key_values, KV4Cache) and past_key_values.is_static
            and inputs_embeds.dim() == 3 and inputs_embeds.shape[1] == 1
            and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
            and or_mask_function is None and and_mask_function is None and block_sequence_ids is None
            and past_key_values.layers[0].is_initialized):
        return None
    windows = _cached_mask_plan(config)
    if windows is False:
        return None
    device = inputs_embeds.device
    slots = past_key_values.slot_indices()
    total = slots.shape[0]
    if slots.device != device:
        return None
    query_slot = past_key_values.get_query_offset(0)  # the new token's slot: the tokens held, on the device
    padding = attention_mask[:, :total].to(device=device, dtype=torch.bool)
    visible = F.pad(padding, (0, total - padding.shape[1])) & (slots <= query_slot)

    def mask(window: int | None) -> torch.Tensor:
        rows = visible if window is None else visible & (slots > query_slot - window)
        return rows[:, None, None, :]

    if isinstance(windows, dict):
        return {kind: mask(window) for kind, window in windows.items()}
    return mask(windows)
