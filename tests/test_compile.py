"""torch.compile: a decode step with the static KV4 cache is one graph (fullgraph, no graph break)."""
from __future__ import annotations

import copy

import pytest
import torch

import qoq_torch
from qoq_torch.nn import KV4Cache
from tiny_models import GROUP_SIZE, left_padded, tiny_model


PROMPTS = [[5, 9, 33, 70, 8], [40, 41, 3]]


def _quantized_after_prefill(family: str = "llama", quantize_lm_head: bool = False):
    """A quantized tiny model, its static KV4 cache after a left-padded prefill, and the next step's inputs:
    ``(model, cache, token [2, 1], step_mask [2, T + 1])``."""
    config = qoq_torch.QoQConfig(group_size=GROUP_SIZE, quantize_lm_head=quantize_lm_head)
    model = qoq_torch.quantize(tiny_model(family), config=config, progress=False)
    ids, mask = left_padded(PROMPTS)
    cache = KV4Cache(model.config, max_cache_len=16)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache)
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    return model, cache, torch.tensor([[17], [23]]), step_mask


def _eager_and_compiled_step(model, cache, token, step_mask, compile_fn):
    """Logits of one decode step run eagerly and through ``compile_fn(model)``, each on its own copy of ``cache``."""
    eager_cache, compiled_cache = copy.deepcopy(cache), copy.deepcopy(cache)
    with torch.no_grad():
        eager = model(token, attention_mask=step_mask, past_key_values=eager_cache).logits
        torch._dynamo.reset()
        got = compile_fn(model)(token, attention_mask=step_mask, past_key_values=compiled_cache).logits
    return eager, got


@pytest.mark.parametrize("family, quantize_lm_head", [("llama", False), ("qwen3", False), ("llama", True)])
def test_decode_step_compiles_fullgraph_without_graph_breaks(family, quantize_lm_head):
    model, cache, token, step_mask = _quantized_after_prefill(family, quantize_lm_head)
    assert isinstance(model.lm_head, qoq_torch.QoQLinear) == quantize_lm_head
    with torch.no_grad():
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
    assert int(compiled_cache.get_seq_length()) == step_mask.shape[1]


def test_generate_compiles_with_the_fixed_layout_guard_filter():
    from qoq_torch.nn.generation import skip_fixed_layout_guards

    model, cache, token, step_mask = _quantized_after_prefill()
    config = model._default_compile_config()  # what generate's automatic compilation uses
    assert config.mode is None and config.backend == "inductor"
    assert config.options == {"triton.cudagraphs": True, "guard_filter_fn": skip_fixed_layout_guards}

    seen = {}

    def recording_filter(entries):
        keep = skip_fixed_layout_guards(entries)
        seen["dropped"] = sorted({e.name.rsplit("'", 2)[-2] for e, k in zip(entries, keep)
                                  if not k and "past_key_values" not in e.name})
        seen["dropped_cache"] = sorted(e.name.split("past_key_values']")[1] for e, k in zip(entries, keep)
                                       if not k and "past_key_values" in e.name)
        seen["kept_tensors"] = [e.name for e, k in zip(entries, keep) if k and e.guard_type == "TENSOR_MATCH"]
        return keep

    eager, got = _eager_and_compiled_step(
        model, cache, token, step_mask,
        lambda m: torch._dynamo.optimize("aot_eager", nopython=True, guard_filter_fn=recording_filter)(m))
    assert torch.equal(got, eager)
    # the packed weights' guards go, and those of the cache layers after the first; the norm weights', the
    # embedding's and cache layer 0's stay
    assert seen["dropped"] == ["packed_scales", "qweight", "s1", "s2", "z2"]
    buffers = ("k_cache", "k_params", "v_cache", "v_params")
    assert seen["dropped_cache"] == sorted(f".layers[{i}].{b}" for i in range(1, len(cache.layers)) for b in buffers)
    assert any("norm_weight" in name for name in seen["kept_tensors"])
    assert any("embed_tokens" in name for name in seen["kept_tensors"])
    assert sorted(n.split(".layers[0].")[1] for n in seen["kept_tensors"] if ".layers[0]." in n) == \
        ["_shared.tensor", *buffers]


def test_a_cache_of_another_size_recompiles_under_the_guard_filter():
    from qoq_torch.nn.generation import skip_fixed_layout_guards

    model, cache, token, step_mask = _quantized_after_prefill()
    ids, mask = left_padded(PROMPTS)
    larger = KV4Cache(model.config, max_cache_len=24)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=larger)
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch._dynamo.optimize(counting_backend, nopython=True, guard_filter_fn=skip_fixed_layout_guards)(model)
    with torch.no_grad():
        for c in (cache, larger):
            eager = model(token, attention_mask=step_mask, past_key_values=copy.deepcopy(c)).logits
            assert torch.equal(compiled(token, attention_mask=step_mask, past_key_values=copy.deepcopy(c)).logits,
                               eager)
    assert len(compiles) == 2


def test_fixed_layout_guard_filter_keeps_what_it_does_not_recognise():
    from types import SimpleNamespace

    from qoq_torch.nn.generation import skip_fixed_layout_guards

    u8 = torch.zeros(2, dtype=torch.uint8)
    entries = [
        SimpleNamespace(guard_type="TENSOR_MATCH", name="L['self']._modules['o_proj']._buffers['qweight']", value=u8),
        SimpleNamespace(guard_type="TENSOR_MATCH", name="L['self']._modules['norm']._buffers['scale']",
                        value=torch.zeros(2, dtype=torch.bfloat16)),  # a float-model buffer of that name
        SimpleNamespace(guard_type="ID_MATCH", name="L['self']._modules['o_proj']._buffers['qweight']", value=u8),
        SimpleNamespace(guard_type="TENSOR_MATCH", name="L['self']._parameters['weight']", value=u8),
        SimpleNamespace(guard_type="TENSOR_MATCH"),  # no name: not a guard it knows
        SimpleNamespace(guard_type="TENSOR_MATCH", name="L['kwargs']['past_key_values'].layers[12].v_params",
                        value=torch.zeros(2, dtype=torch.float16)),
        SimpleNamespace(guard_type="TENSOR_MATCH", name="L['kwargs']['past_key_values'].layers[0].v_params",
                        value=torch.zeros(2, dtype=torch.float16)),  # layer 0 fixes the others' layout
        SimpleNamespace(guard_type="TENSOR_MATCH", name="L['kwargs']['past_key_values'].layers[10].keys",
                        value=torch.zeros(2, dtype=torch.bfloat16)),  # a float cache's tensors
    ]
    assert skip_fixed_layout_guards(entries) == [False, True, True, True, True, False, True, True]


def test_decode_step_graph_fuses_the_residual_add_into_the_mlp_norm():
    model, cache, token, step_mask = _quantized_after_prefill()
    targets = []

    def recording_backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    eager, got = _eager_and_compiled_step(model, cache, token, step_mask,
                                          lambda m: torch.compile(m, fullgraph=True, backend=recording_backend))
    assert torch.equal(got, eager)
    layers = model.config.num_hidden_layers
    assert sum("add_rmsnorm_quantize" in t for t in targets) == layers  # one per layer: the MLP's norm
    plain = [t for t in targets if "rmsnorm_quantize" in t and "add_rmsnorm_quantize" not in t]
    assert len(plain) == layers  # the attention's norm


def test_decode_step_computes_its_cache_positions_and_masks_once_not_per_layer():
    """The static KV4 cache's per-step tensors (slot positions, lengths, the counter's update, the first visible
    slot) are traced once per forward: the graph of a 4-layer model has as many of those ops as a 2-layer one's."""
    import collections

    def op_counts(layers):
        model = qoq_torch.quantize(tiny_model("llama", num_hidden_layers=layers),
                                   config=qoq_torch.QoQConfig(group_size=GROUP_SIZE), progress=False)
        ids, mask = left_padded(PROMPTS)
        cache = KV4Cache(model.config, max_cache_len=16)
        graphs = []

        def backend(gm, inputs):
            graphs.append(gm)
            return gm

        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        with torch.no_grad():
            model(ids, attention_mask=mask, past_key_values=cache)
            torch._dynamo.reset()
            torch.compile(model, backend=backend, fullgraph=True)(
                torch.tensor([[17], [23]]), attention_mask=step_mask, past_key_values=cache)
        assert int(cache.get_seq_length()) == step_mask.shape[1]
        return collections.Counter(str(getattr(n.target, "__name__", n.target)) for gm in graphs
                                   for n in gm.graph.nodes if n.op in ("call_function", "call_method"))

    two, four = op_counts(2), op_counts(4)
    assert four["rope_kv4_append"] == 2 * two["rope_kv4_append"] == 4  # both traced every layer
    for op in ("arange", "argmax", "add_", "expand"):
        assert four[op] == two[op], (op, two[op], four[op])


def test_an_eager_continuation_after_a_compiled_step_fits_a_cache_of_exactly_its_size():
    """A compiled decode step leaves the layers' host copies of the static cache's length unknown; the next eager
    forward (a multi-turn continuation) re-reads the device counter, which layer 0 has already advanced by that
    forward's tokens when the later layers append theirs: they must not count them twice (a cache of exactly the
    needed size overflowed)."""
    model, exact, token, step_mask = _quantized_after_prefill()  # a static cache of 16 slots
    more = 16 - step_mask.shape[1]  # the continuation fills them exactly
    with torch.no_grad():
        position = (step_mask.cumsum(-1) - 1)[:, -1:]
        torch._dynamo.reset()
        torch.compile(model, fullgraph=True, backend="aot_eager")(token, attention_mask=step_mask,
                                                                  position_ids=position, past_key_values=exact)
        assert all(layer._host_length is None for layer in exact.layers)  # what a compiled step leaves
        ids = torch.arange(1, 2 * more + 1).view(2, more)
        mask = torch.cat([step_mask, torch.ones(2, more, dtype=torch.long)], dim=1)
        model(ids, attention_mask=mask, past_key_values=exact)
    assert int(exact.get_seq_length()) == 16 and all(layer.host_length() == 16 for layer in exact.layers)
