"""The decode-step masks built for static KV4 caches equal transformers' own, step by step, and generate is unchanged."""
from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import create_masks_for_generate

import qoq_torch
from qoq_torch.nn import KV4Cache, decode_mask
from tiny_models import GROUP_SIZE, left_padded, tiny_model

PROMPTS = [[5, 9, 33, 70, 8, 100, 4, 12, 19], [40, 41, 3, 99], [7, 250, 7, 31, 64, 64, 5, 17, 90, 11, 6, 3]]
NEW = 10  # past the tiny Mistral's 6-token window

FAMILIES = [("llama", {}), ("mistral", {}), ("qwen3", {}),
            ("qwen2", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1))]


def _quantized(family, **overrides):
    model = tiny_model(family, **overrides)
    return qoq_torch.quantize(model, config=qoq_torch.QoQConfig(group_size=GROUP_SIZE), progress=False)


def _same_masks(ours, theirs) -> bool:
    if isinstance(theirs, dict):
        return isinstance(ours, dict) and ours.keys() == theirs.keys() and all(
            _same_masks(ours[k], theirs[k]) for k in theirs)
    return (ours.dtype == theirs.dtype == torch.bool and ours.shape == theirs.shape
            and torch.equal(ours, theirs.expand_as(ours)))


@pytest.mark.parametrize("family,overrides", FAMILIES, ids=[f for f, _ in FAMILIES])
def test_every_decode_step_gets_transformers_masks(family, overrides):
    model = _quantized(family, **overrides)
    built = model.create_masks_for_generate
    steps = []

    def spy(**kwargs):
        ours = built(**kwargs)
        theirs = create_masks_for_generate(**kwargs)
        fast = decode_mask.decode_step_masks(**kwargs) is not None
        steps.append((fast, _same_masks(ours, theirs)))
        return ours

    model.create_masks_for_generate = spy
    ids, mask = left_padded(PROMPTS)
    model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, cache_implementation="static")
    assert [fast for fast, _ in steps] == [False] + [True] * (NEW - 1)  # prefill: transformers; then every step
    assert all(same for _, same in steps)


@pytest.mark.parametrize("family,overrides", FAMILIES[:2], ids=[f for f, _ in FAMILIES[:2]])
def test_generate_is_unchanged_by_the_decode_masks(family, overrides, monkeypatch):
    model = _quantized(family, **overrides)
    ids, mask = left_padded(PROMPTS)
    kw = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=False, cache_implementation="static")
    fast = model.generate(ids, **kw)
    monkeypatch.setattr(decode_mask, "ENABLED", False)
    assert torch.equal(model.generate(ids, **kw), fast)
    assert len(set(fast[:, ids.shape[1]:].flatten().tolist())) > 2


def _mask_inputs(model, cache, batch=1, tokens=1, held=4):
    embeds = torch.empty(batch, tokens, 0, dtype=torch.bfloat16)
    model(torch.tensor([[3, 4, 5, 6][:held]] * batch), past_key_values=cache)
    return dict(config=model.config, inputs_embeds=embeds, attention_mask=torch.ones(batch, held + tokens,
                                                                                      dtype=torch.long),
                past_key_values=cache, position_ids=torch.full((batch, tokens), held))


def test_other_steps_and_settings_fall_back_to_transformers():
    model = _quantized("llama")
    static = KV4Cache(model.config, max_cache_len=32)
    kwargs = _mask_inputs(model, static)
    got = decode_mask.decode_step_masks(**kwargs)
    assert got.shape == (1, 1, 1, 32) and got[0, 0, 0].tolist() == [True] * 5 + [False] * 27
    # several query tokens, a growing cache, an extra mask function, the eager (float) mask: transformers builds them
    assert decode_mask.decode_step_masks(**_mask_inputs(model, KV4Cache(model.config, max_cache_len=32),
                                                        tokens=2)) is None
    assert decode_mask.decode_step_masks(**{**kwargs, "past_key_values": KV4Cache(model.config)}) is None
    assert decode_mask.decode_step_masks(**kwargs, and_mask_function=lambda *a: True) is None
    model.set_attn_implementation("eager")
    assert decode_mask.decode_step_masks(**kwargs) is None
    assert model.create_masks_for_generate(**kwargs).dtype == torch.bfloat16  # transformers' float mask


def test_slot_indices_need_an_allocated_static_cache():
    model = _quantized("llama")
    with pytest.raises(ValueError, match="static"):
        KV4Cache(model.config).slot_indices()
    with pytest.raises(ValueError, match="static"):
        KV4Cache(model.config, max_cache_len=8).slot_indices()
