"""torch.compile: a decode step with the static KV4 cache is one graph (fullgraph, no graph break)."""
from __future__ import annotations

import copy

import pytest
import torch

import qoq_torch
from qoq_torch.nn import KV4Cache
from tiny_models import GROUP_SIZE, left_padded, tiny_model


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_decode_step_compiles_fullgraph_without_graph_breaks(family):
    model = qoq_torch.quantize(tiny_model(family), config=qoq_torch.QoQConfig(group_size=GROUP_SIZE), progress=False)
    ids, mask = left_padded([[5, 9, 33, 70, 8], [40, 41, 3]])
    cache = KV4Cache(model.config, max_cache_len=16)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache)
        token = torch.tensor([[17], [23]])
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        position = (step_mask.cumsum(-1) - 1)[:, -1:]

        def step(c):
            return model(token, attention_mask=step_mask, position_ids=position, past_key_values=c).logits

        explanation = torch._dynamo.explain(step)(copy.deepcopy(cache))
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
        eager_cache, compiled_cache = copy.deepcopy(cache), copy.deepcopy(cache)
        eager = step(eager_cache)
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(compiled_cache)
    assert torch.equal(eager, compiled)
    assert torch.equal(eager_cache.layers[1].k_cache, compiled_cache.layers[1].k_cache)  # the append happened
    assert int(compiled_cache.get_seq_length()) == ids.shape[1] + 1
