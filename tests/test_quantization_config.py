"""QoQConfig: defaults, validation and the dict/JSON round trip."""
from __future__ import annotations

import json

import pytest

from qoq_torch.quantization import QoQConfig


def test_defaults_follow_the_paper():
    c = QoQConfig()
    assert (c.group_size, c.rotation, c.smooth_attention, c.smooth_attention_alpha) == (128, True, True, 0.5)
    assert (c.smooth_output, c.reorder, c.clip_search, c.kv_bits, c.quantize_kv) == (True, True, True, 4, True)
    assert c.quantize_lm_head is False  # the head stays 16-bit unless asked for


def test_json_round_trip_keeps_every_field():
    c = QoQConfig(group_size=-1, rotation_kind="random", smooth_output_alpha=0.3, kv_bits=16, num_samples=7,
                  seq_len=33, seed=5, clip_steps=3, quantize_lm_head=True)
    text = c.to_json()
    assert json.loads(text)["group_size"] == -1
    back = QoQConfig.from_json(text)
    assert back == c
    assert QoQConfig.from_dict(c.to_dict()) == c
    assert back.quantize_kv is False


@pytest.mark.parametrize(
    "field, value",
    [("group_size", 0), ("group_size", 33), ("group_size", -2), ("group_size", True), ("rotation", 1),
     ("rotation_kind", "givens"), ("smooth_attention_alpha", 1.5), ("smooth_output_alpha", -0.1),
     ("clip_min_ratio", 0.0), ("clip_steps", 0), ("kv_bits", 8), ("num_samples", 0), ("seq_len", -1),
     ("seed", -1), ("max_search_tokens", 2.5), ("quantize_lm_head", 1)],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        QoQConfig(**{field: value})


def test_unknown_keys_are_rejected():
    with pytest.raises(ValueError, match="group_sise"):
        QoQConfig.from_dict({"group_sise": 64})


def test_configs_saved_before_the_lm_head_option_still_load():
    old = QoQConfig().to_dict()
    del old["quantize_lm_head"]
    assert QoQConfig.from_dict(old).quantize_lm_head is False
