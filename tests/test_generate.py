"""HF generate on QoQ models: exact agreement with a reference-op simulation, padding, caches, sampling."""
from __future__ import annotations

import weakref

import pytest
import torch
from transformers import DynamicCache

import qoq_torch
from qoq_torch.nn import KV4Cache, KV4StaticLayer
from qoq_torch.nn.attention import MAX_DECODE_QUERY_TOKENS
from tiny_models import GROUP_SIZE, SimulatedQoQ, left_padded, tiny_model

PROMPTS = [[5, 9, 33, 70, 8, 100, 4, 12, 19], [40, 41, 3, 99], [7, 250, 7, 31, 64, 64, 5, 17, 90, 11, 6, 3]]
NEW = 8


def _quantized(family="llama", group_size=GROUP_SIZE, **kw):
    model = tiny_model(family, **kw)
    return qoq_torch.quantize(model, config=qoq_torch.QoQConfig(group_size=group_size), progress=False)


def _greedy(model, ids, mask, **kw):
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, **kw)[:, ids.shape[1]:]


@pytest.mark.parametrize("family,group_size", [("llama", GROUP_SIZE), ("mistral", GROUP_SIZE),
                                               ("qwen2", -1), ("qwen3", GROUP_SIZE)])
def test_greedy_generate_equals_reference_simulation(family, group_size):
    model = _quantized(family, group_size)
    ids, mask = left_padded(PROMPTS)
    got = _greedy(model, ids, mask)
    expect = SimulatedQoQ(model, len(PROMPTS), 64).greedy(ids, mask, NEW)
    assert torch.equal(got, expect)
    assert len(set(got.flatten().tolist())) > 2  # a real continuation, not a constant


@pytest.mark.parametrize("group_size", [GROUP_SIZE, -1])
def test_a_quantized_lm_head_generates_like_the_simulation(group_size):
    model = tiny_model("llama", tie_word_embeddings=True)
    config = qoq_torch.QoQConfig(group_size=group_size, quantize_lm_head=True)
    qoq_torch.quantize(model, config=config, progress=False)
    assert isinstance(model.lm_head, qoq_torch.QoQLinear) and model.lm_head.group_size == group_size
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # the embeddings stay float
    ids, mask = left_padded(PROMPTS)
    got = _greedy(model, ids, mask)
    assert torch.equal(got, SimulatedQoQ(model, len(PROMPTS), 64).greedy(ids, mask, NEW))
    assert torch.equal(_greedy(model, ids, mask, cache_implementation="static"), got)
    assert len(set(got.flatten().tolist())) > 2


def test_batched_left_padded_equals_per_prompt_and_static_equals_dynamic():
    model = _quantized("llama")
    ids, mask = left_padded(PROMPTS)
    batched = _greedy(model, ids, mask)
    for i, prompt in enumerate(PROMPTS):
        alone = _greedy(model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long))
        assert torch.equal(alone[0], batched[i])
    assert torch.equal(_greedy(model, ids, mask, cache_implementation="static"), batched)


def test_generate_builds_the_kv4_cache_by_itself():
    model = _quantized("qwen3")
    ids, mask = left_padded(PROMPTS[:2])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, KV4Cache) and not out.past_key_values.is_static
    out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                         cache_implementation="static")
    assert isinstance(out.past_key_values.layers[0], KV4StaticLayer)
    # a cache the user passes is used as is (float path through Cache.update)
    float_out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                               past_key_values=DynamicCache(config=model.config), return_dict_in_generate=True)
    assert isinstance(float_out.past_key_values, DynamicCache)
    assert float_out.past_key_values.get_seq_length() == ids.shape[1] + 2


def test_sampling_is_reproducible_across_cache_kinds():
    model = _quantized("mistral")
    ids, mask = left_padded(PROMPTS)
    runs = []
    for implementation in (None, "static"):
        torch.manual_seed(7)
        runs.append(model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, top_k=20,
                                   temperature=1.5, cache_implementation=implementation)[:, ids.shape[1]:])
    assert torch.equal(runs[0], runs[1])
    assert int(runs[0].min()) >= 0 and int(runs[0].max()) < model.config.vocab_size
    assert not torch.equal(runs[0], _greedy(model, ids, mask))  # it really sampled


def _continuation_and_steps(model, static: bool, new: int, prompts=PROMPTS[:2]):
    """Logits of ``new`` tokens appended to a prefilled KV4 cache in one forward, and one token at a time."""
    ids, mask = left_padded(prompts)
    extra = torch.arange(11, 11 + 2 * new).view(2, new)
    full_mask = torch.cat([mask, torch.ones(2, new, dtype=torch.long)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    n = ids.shape[1]

    def prefilled():
        cache = KV4Cache(model.config, max_cache_len=64 if static else None)
        model(ids, attention_mask=mask, position_ids=positions[:, :n], past_key_values=cache)
        return cache

    with torch.no_grad():
        together = model(extra, attention_mask=full_mask, position_ids=positions[:, n:],
                         past_key_values=prefilled()).logits
        cache = prefilled()
        steps = [model(extra[:, i:i + 1], attention_mask=full_mask[:, :n + i + 1],
                       position_ids=positions[:, n + i:n + i + 1], past_key_values=cache).logits for i in range(new)]
    return together.float(), torch.cat(steps, dim=1).float()


def _decode_query_lengths(monkeypatch) -> list[int]:
    """Records S_q of every ``kv4_decode_attention_quantize`` call."""
    seen = []
    op = qoq_torch.ops.kv4_decode_attention_quantize
    monkeypatch.setattr(qoq_torch.ops, "kv4_decode_attention_quantize",
                        lambda q, *args: (seen.append(q.shape[2]), op(q, *args))[1])
    return seen


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("new", [3, MAX_DECODE_QUERY_TOKENS + 1])
def test_multi_token_continuation_equals_token_by_token_decode(static, new, monkeypatch):
    """A few new tokens (speculative decoding's verification) take the KV4 decode attention, causal among them;
    more take float attention on the dequantized cache. Either equals decoding them one at a time: same quantized
    K/V, both in float32, so equal up to summation order; a wrong mask or slot bookkeeping moves logits by O(max)."""
    model = _quantized("llama")
    seen = _decode_query_lengths(monkeypatch)
    together, steps = _continuation_and_steps(model, static, new)
    assert (new in seen) == (new <= MAX_DECODE_QUERY_TOKENS)
    assert torch.allclose(together, steps, atol=1e-2 * steps.abs().max().item(), rtol=0)


def test_a_continuation_that_a_sliding_window_cuts_takes_float_attention(monkeypatch):
    """The decode attention takes one first visible slot per row (the last query's), so a few new tokens take it
    only where the window cannot cut any query's context; past that, float attention with the model's mask."""
    seen = _decode_query_lengths(monkeypatch)
    for window, kernel in ((32, True), (8, False)):  # 12 prompt slots + 3 new tokens
        model = _quantized("mistral", sliding_window=window)
        seen.clear()
        together, steps = _continuation_and_steps(model, False, 3, prompts=[PROMPTS[2], PROMPTS[0]])
        assert (3 in seen) == kernel, window
        assert torch.allclose(together, steps, atol=1e-2 * steps.abs().max().item(), rtol=0), window


def test_quantized_models_defer_the_stop_check_for_kv4_caches_on_cuda():
    from transformers.generation import utils as gen_utils

    model = _quantized("llama")  # quantize installs the rule (once per process)
    check = gen_utils.DeferredStopCheck.is_supported
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    cache = KV4Cache(model.config)
    assert check(cuda, cache, False, False)
    assert not check(cuda, cache, True, False)  # a returned cache: nothing is rolled back, so read every step
    assert not check(cuda, cache, False, True)  # assisted decoding
    assert not check(cpu, cache, False, False)  # the host does not wait for a CPU "device"
    assert not check(cuda, DynamicCache(config=model.config), False, False)  # transformers' rule for other caches
    cache.defer_stop_check = False
    assert not check(cuda, cache, False, False)


def test_static_cache_is_kept_between_generate_calls_and_reset():
    from qoq_torch.nn.generation import KEPT_CACHE

    model = _quantized("llama")
    ids, mask = left_padded(PROMPTS)
    first = _greedy(model, ids, mask, cache_implementation="static")
    kept = weakref.ref(model.__dict__[KEPT_CACHE])  # a strong reference here would stop the reuse
    pointers = [layer.k_cache.data_ptr() for layer in kept().layers]
    # the same buffers (a compiled decode step's CUDA graph stays valid), reset: the same tokens again
    assert torch.equal(_greedy(model, ids, mask, cache_implementation="static"), first)
    assert model.__dict__[KEPT_CACHE] is kept()
    assert [layer.k_cache.data_ptr() for layer in kept().layers] == pointers
    # a shorter call keeps the longer cache (lengths never shrink, as transformers' static cache)
    short = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                           cache_implementation="static")[:, ids.shape[1]:]
    assert model.__dict__[KEPT_CACHE] is kept() and torch.equal(short, first[:, :3])
    # another batch size gets a new cache
    one = _greedy(model, torch.tensor([PROMPTS[1]]), torch.ones(1, len(PROMPTS[1]), dtype=torch.long),
                  cache_implementation="static")
    assert kept() is None and torch.equal(one[0], first[1])  # the old cache was freed


def test_a_static_cache_held_outside_the_model_is_never_reset_by_a_later_generate():
    from qoq_torch.nn.generation import KEPT_CACHE, disable_kv4_generate

    model = _quantized("llama")
    ids, mask = left_padded(PROMPTS)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                         cache_implementation="static")
    returned = out.past_key_values
    assert KEPT_CACHE not in model.__dict__  # handed back: the user's, not the model's
    length = int(returned.get_seq_length())
    k0 = returned.layers[0].k_cache.clone()
    _greedy(model, ids, mask, cache_implementation="static")
    held = model.__dict__[KEPT_CACHE]  # a reference outside the model: the next call must not reuse it
    _greedy(model, ids, mask, cache_implementation="static")
    assert model.__dict__[KEPT_CACHE] is not held
    assert int(held.get_seq_length()) == ids.shape[1] + NEW - 1  # untouched since its own call
    assert int(returned.get_seq_length()) == length and torch.equal(returned.layers[0].k_cache, k0)
    disable_kv4_generate(model)
    assert KEPT_CACHE not in model.__dict__


def test_assisted_decoding_equals_greedy_and_rolls_the_kv4_cache_back(monkeypatch):
    """Prompt-lookup and assistant-model decoding verify several candidate tokens in one forward and crop the
    rejected ones off the cache (``crop(-n)``; ``crop(0)`` when all were accepted): greedy tokens either way."""
    from qoq_torch.nn import KV4Layer

    crops = []
    for cls in (KV4Layer, KV4StaticLayer):
        monkeypatch.setattr(cls, "crop", lambda self, n, crop=cls.crop: (crops.append(int(n)), crop(self, n))[1])
    model = _quantized("llama")
    prompt = torch.tensor([PROMPTS[0] * 3])  # repeated n-grams: prompt lookup proposes candidates
    mask = torch.ones_like(prompt)
    expect = _greedy(model, prompt, mask)
    static = KV4Cache(model.config, max_cache_len=64)  # a static cache the caller passes (transformers refuses
    # cache_implementation="static" here, not a cache object)
    for kwargs in (dict(prompt_lookup_num_tokens=3), dict(assistant_model=_quantized("llama", seed=3)),
                   dict(prompt_lookup_num_tokens=3, past_key_values=static)):
        crops.clear()
        assert torch.equal(_greedy(model, prompt, mask, **kwargs), expect), kwargs
        assert 0 in crops and min(crops) < 0, crops  # both an accepted step and a rollback happened


def test_assisted_decoding_fits_a_static_cache_of_exactly_the_needed_size():
    """After a rollback the layers of a static cache re-read the shared length. Inside the next forward layer 0 has
    already counted that forward's tokens when the other layers append theirs, so they must not count them twice
    (they did: their lengths read one token long, and a cache of exactly the needed size overflowed)."""
    model = _quantized("llama")
    prompt = torch.tensor([PROMPTS[0] * 3])
    mask = torch.ones_like(prompt)
    expect = _greedy(model, prompt, mask)
    needed = prompt.shape[1] + NEW - 1  # generate never feeds its last token back
    cache = KV4Cache(model.config, max_cache_len=needed)
    assert torch.equal(_greedy(model, prompt, mask, prompt_lookup_num_tokens=3, past_key_values=cache), expect)
    assert int(cache.layers[0].cumulative_length) == needed
    assert [layer.host_length() for layer in cache.layers] == [needed] * len(cache.layers)


@pytest.mark.parametrize("implementation", [None, "static"])
def test_beam_search_scores_equal_a_token_by_token_rescoring(implementation):
    """Beam search reorders and repeats the KV4 cache's rows (``reorder_cache``, ``batch_repeat_interleave``): each
    returned beam's score must be the sum of its tokens' log-probabilities when the model reads it one token at a
    time; a beam continued on another beam's cache rows scores differently."""
    model = _quantized("llama")
    prompt = torch.tensor([PROMPTS[0]])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, min_new_tokens=NEW,
                         num_beams=4, num_return_sequences=4, length_penalty=0.0, do_sample=False,
                         return_dict_in_generate=True, output_scores=True, cache_implementation=implementation)
    n = prompt.shape[1]
    assert len({tuple(s) for s in out.sequences[:, n:].tolist()}) == 4
    for sequence, score in zip(out.sequences, out.sequences_scores.tolist()):
        cache, total = KV4Cache(model.config), 0.0
        with torch.no_grad():
            logits = model(sequence[None, :n], past_key_values=cache).logits[0, -1]
            for i in range(n, sequence.shape[0]):
                total += torch.log_softmax(logits.float(), -1)[sequence[i]].item()
                logits = model(sequence[None, i:i + 1], past_key_values=cache).logits[0, -1]
        assert total == pytest.approx(score, abs=1e-3)


def test_chunked_prefill_equals_the_same_chunks_by_hand():
    """``prefill_chunk_size``: the first chunk is a prefill, the next ones continue on the KV4 cache (the multi-token
    continuation path); generate must give what those forwards and a greedy decode give by hand."""
    model = _quantized("llama")
    prompt = torch.tensor([PROMPTS[2]])  # 12 tokens: chunks of 5, 5 and 2
    n, chunk = prompt.shape[1], 5
    got = _greedy(model, prompt, torch.ones_like(prompt), prefill_chunk_size=chunk)
    cache, tokens = KV4Cache(model.config), []
    with torch.no_grad():
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            logits = model(prompt[:, start:end], attention_mask=torch.ones(1, end, dtype=torch.long),
                           position_ids=torch.arange(start, end)[None], past_key_values=cache).logits
        for i in range(NEW):
            tokens.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[tokens[-1]]]), attention_mask=torch.ones(1, n + i + 1, dtype=torch.long),
                           position_ids=torch.tensor([[n + i]]), past_key_values=cache).logits
    assert got[0].tolist() == tokens


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_per_layer_sliding_windows_generate_like_the_simulation(family):
    """Qwen2/Qwen3 with use_sliding_window: layer 0 full attention, layer 1 a window of 6 (prompts up to 12 tokens):
    each layer's decode attention must take its own window, on both cache kinds."""
    model = tiny_model(family, use_sliding_window=True, sliding_window=6, max_window_layers=1)
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    qoq_torch.quantize(model, config=qoq_torch.QoQConfig(group_size=GROUP_SIZE), progress=False)
    ids, mask = left_padded(PROMPTS)
    got = _greedy(model, ids, mask)
    assert torch.equal(got, SimulatedQoQ(model, len(PROMPTS), 64).greedy(ids, mask, NEW))
    assert torch.equal(_greedy(model, ids, mask, cache_implementation="static"), got)
