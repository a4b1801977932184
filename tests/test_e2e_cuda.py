"""GPU end to end: the CUDA ops inside the HF integration (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch

import qoq_torch
from qoq_torch.nn import KV4Cache
from tiny_models import GROUP_SIZE, SimulatedQoQ, left_padded, tiny_model

pytestmark = pytest.mark.cuda
PROMPTS = [[5, 9, 33, 70, 8, 100, 4, 12, 19], [40, 41, 3, 99], [7, 250, 7, 31, 64, 64, 5, 17, 90, 11, 6, 3]]


# The CUDA decode attention takes head_dim 64/128/256: the GPU tests use head_dim 64.
CUDA_SHAPE = dict(hidden_size=256, intermediate_size=512)


def _models(family, quantize_lm_head=False, **overrides):
    shape = {**CUDA_SHAPE, **({"head_dim": 64} if family == "qwen3" else {}), **overrides}
    config = qoq_torch.QoQConfig(group_size=GROUP_SIZE, quantize_lm_head=quantize_lm_head)
    cpu = qoq_torch.quantize(tiny_model(family, dtype=torch.float16, **shape), config=config, progress=False)
    import copy

    return cpu, copy.deepcopy(cpu).to("cuda")


@pytest.mark.parametrize("family, quantize_lm_head", [("llama", False), ("qwen3", False), ("llama", True)])
def test_cuda_logits_match_cpu_reference(family, quantize_lm_head):
    cpu, gpu = _models(family, quantize_lm_head)
    assert isinstance(gpu.lm_head, qoq_torch.QoQLinear) == quantize_lm_head
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        ref = cpu(ids, attention_mask=mask).logits.float()
        got = gpu(ids.cuda(), attention_mask=mask.cuda()).logits.float().cpu()
    # Only real tokens: the logits of left-padding positions are not defined (fully masked rows).
    real = mask.bool()
    got, ref = got[real], ref[real]
    # CUDA's reductions may move x_q by 1 on a few elements (docs/formats.md): close, not bit-equal.
    assert ((got - ref).norm() / ref.norm()).item() < 2e-2


@pytest.mark.parametrize("static, quantize_lm_head", [(False, False), (True, False), (True, True)])
def test_cuda_greedy_generate_matches_cpu(static, quantize_lm_head):
    cpu, gpu = _models("llama", quantize_lm_head)
    ids, mask = left_padded(PROMPTS)
    kw = dict(max_new_tokens=8, do_sample=False, cache_implementation="static" if static else None)
    ref = cpu.generate(ids, attention_mask=mask, **kw)
    got = gpu.generate(ids.cuda(), attention_mask=mask.cuda(), **kw).cpu()
    # Allow a late divergence from ±1 rounding differences, but the first tokens must agree.
    assert torch.equal(got[:, : ids.shape[1] + 4], ref[:, : ids.shape[1] + 4])


def test_cuda_compiled_decode_with_cuda_graphs():
    _, gpu = _models("llama")
    ids, mask = left_padded(PROMPTS[:2])
    ids, mask = ids.cuda(), mask.cuda()
    cache = KV4Cache(gpu.config, max_cache_len=32)
    with torch.no_grad():
        gpu(ids, attention_mask=mask, past_key_values=cache)
        step = torch.compile(gpu.forward, mode="reduce-overhead", fullgraph=True)
        token = torch.tensor([[17], [23]], device="cuda")
        for i in range(3):
            step_mask = torch.cat([mask, torch.ones(2, i + 1, dtype=mask.dtype, device="cuda")], dim=1)
            pos = (step_mask.cumsum(-1) - 1)[:, -1:]
            logits = step(input_ids=token, attention_mask=step_mask, position_ids=pos, past_key_values=cache).logits
            token = logits[:, -1:].argmax(-1)
    assert int(cache.get_seq_length()) == ids.shape[1] + 3
    assert torch.isfinite(logits).all()


def test_cuda_generate_matches_simulation_first_tokens():
    cpu, gpu = _models("mistral")
    ids, mask = left_padded(PROMPTS)
    sim = SimulatedQoQ(cpu, len(PROMPTS), 64).greedy(ids, mask, 4)
    got = gpu.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=4, do_sample=False)[:, ids.shape[1]:]
    assert torch.equal(got.cpu()[:, :2], sim[:, :2])


@pytest.mark.parametrize("static", [False, True])
def test_cuda_deferred_stop_check_generates_what_the_per_step_check_does(static):
    """QoQ models read generate's stop flag one step late on CUDA; with end-of-sequence tokens hit at different
    steps, the output (and its length) must equal the per-step check's."""
    from qoq_torch.benchmarking import StopCheckMode

    _, gpu = _models("llama")
    ids, mask = left_padded(PROMPTS)
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(max_new_tokens=12, do_sample=False, cache_implementation="static" if static else None)
    free = gpu.generate(ids, attention_mask=mask, **kw)[:, ids.shape[1]:]
    first = next(k for k in range(2, 12) if int(free[1, k]) not in free[1, :k].tolist())
    eos = int(free[1, first])  # a token that ends row 1 early, other rows later or never
    outs = {}
    for mode in ("per-step", "model-default"):
        with StopCheckMode(mode) as stops:
            outs[mode] = gpu.generate(ids, attention_mask=mask, eos_token_id=eos, pad_token_id=0, **kw)
        outs[mode + " deferred"] = stops.deferred
    assert outs["per-step deferred"] == 0 and outs["model-default deferred"] == 1
    assert torch.equal(outs["per-step"], outs["model-default"])
    row = outs["per-step"][1, ids.shape[1]:]
    assert int(row[first]) == eos and bool((row[first + 1:] == 0).all())  # row 1 really stopped at its end-of-sequence token


def test_cuda_assisted_decoding_and_beam_search_generate():
    """Prompt lookup verifies several candidates in one forward (the decode attention with several query tokens) and
    crops the rejected ones off the KV4 cache (dynamic, or a static one the caller passes); beam search reorders its
    rows. On CUDA they must give greedy's / the CPU's first tokens."""
    cpu, gpu = _models("llama")
    prompt = torch.tensor([PROMPTS[0] * 3])
    mask = torch.ones_like(prompt)
    kw = dict(max_new_tokens=8, do_sample=False)
    greedy = gpu.generate(prompt.cuda(), attention_mask=mask.cuda(), **kw).cpu()
    lookup = gpu.generate(prompt.cuda(), attention_mask=mask.cuda(), prompt_lookup_num_tokens=3, **kw).cpu()
    n = prompt.shape[1]
    assert torch.equal(lookup[:, : n + 4], greedy[:, : n + 4])
    # a static KV4 cache the caller passes: its crop resets the shared length tensor on the GPU
    static = KV4Cache(gpu.config, max_cache_len=64)
    lookup_static = gpu.generate(prompt.cuda(), attention_mask=mask.cuda(), prompt_lookup_num_tokens=3,
                                 past_key_values=static, **kw).cpu()
    assert torch.equal(lookup_static[:, : n + 4], greedy[:, : n + 4])
    assert static.layers[0].host_length() == lookup_static.shape[1] - 1  # the last token is never fed back
    beams = dict(num_beams=3, **kw)
    ref = cpu.generate(prompt, attention_mask=mask, **beams)
    got = gpu.generate(prompt.cuda(), attention_mask=mask.cuda(), **beams).cpu()
    assert torch.equal(got[:, : n + 4], ref[:, : n + 4])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("static", [False, True])
def test_generate_on_a_model_dispatched_over_two_gpus(static):
    """Layers on two GPUs (accelerate device_map): each layer's KV4 cache lives on its layer's GPU; a static cache's
    layers share one length on layer 0's GPU and read copies of the step's slots and lengths. Same tokens as on one
    GPU."""
    import copy

    from accelerate import dispatch_model

    cpu, one_gpu = _models("llama")
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
                  "model.norm": 1, "lm_head": 1}
    two_gpus = dispatch_model(copy.deepcopy(cpu), device_map=device_map)
    assert next(two_gpus.model.layers[1].self_attn.buffers()).device == torch.device("cuda", 1)
    ids, mask = left_padded(PROMPTS)
    kw = dict(max_new_tokens=8, do_sample=False, cache_implementation="static" if static else None,
              return_dict_in_generate=True)
    ref = one_gpu.generate(ids.cuda(), attention_mask=mask.cuda(), **kw)
    got = two_gpus.generate(ids.cuda(), attention_mask=mask.cuda(), **kw)
    assert torch.equal(got.sequences.cpu(), ref.sequences.cpu())
    layers = got.past_key_values.layers
    assert layers[0].k_cache.device == torch.device("cuda", 0) and layers[1].k_cache.device == torch.device("cuda", 1)
    assert int(got.past_key_values.get_seq_length()) == ids.shape[1] + 7


@pytest.mark.parametrize("static", [False, True])
def test_cuda_per_layer_sliding_windows_decode_like_the_cpu(static):
    """Qwen2 with layer 0 on full attention and layer 1 on a window of 6, the CPU's tokens fed to both devices: each
    decode step's logits on CUDA must lie much nearer the CPU's than the CPU's with layer 1 on full attention (a
    wrong window). On CUDA the decode attention rounds P to 16 bits and o_proj's input codes move by 1 where that
    crosses a rounding boundary, so decode logits of these random models differ from the CPU's by a few percent
    with or without windows; a wrong window moves them by 20-60%. A static cache's compiled generate (one decode
    mask per layer kind) must also start like the CPU's."""
    import copy

    cpu, gpu = _models("qwen2", use_sliding_window=True, sliding_window=6, max_window_layers=1)
    assert gpu.config.layer_types == ["full_attention", "sliding_attention"]
    no_window = copy.deepcopy(cpu)
    no_window.config.layer_types = ["full_attention"] * 2
    ids, mask = left_padded(PROMPTS)
    n, steps = ids.shape[1], 8
    tokens = cpu.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False)[:, n:]
    full = torch.cat([mask, torch.ones(len(PROMPTS), steps, dtype=torch.long)], dim=1)
    positions = (full.cumsum(-1) - 1).clamp(min=0)

    def decode_logits(model, device):
        cache = KV4Cache(model.config, max_cache_len=32 if static else None)
        out = []
        with torch.no_grad():
            model(ids.to(device), attention_mask=mask.to(device), position_ids=positions[:, :n].to(device),
                  past_key_values=cache)
            for i in range(steps):
                out.append(model(tokens[:, i:i + 1].to(device), attention_mask=full[:, :n + i + 1].to(device),
                                 position_ids=positions[:, n + i:n + i + 1].to(device),
                                 past_key_values=cache).logits[:, -1].float().cpu())
        return torch.stack(out, dim=1)

    ref, wrong, got = decode_logits(cpu, "cpu"), decode_logits(no_window, "cpu"), decode_logits(gpu, "cuda")
    for i in range(steps):
        assert (got[:, i] - ref[:, i]).norm() < 0.5 * (got[:, i] - wrong[:, i]).norm(), i
    kw = dict(max_new_tokens=4, do_sample=False, cache_implementation="static" if static else None)
    generated = gpu.generate(ids.cuda(), attention_mask=mask.cuda(), **kw).cpu()
    assert torch.equal(generated[:, n:n + 2], tokens[:, :2])


@pytest.mark.parametrize("static", [False, True])
def test_generate_on_a_model_split_between_the_gpu_and_the_cpu(static):
    """The several-devices path on one GPU: layer 0 on the GPU, layer 1 (and the head) on the CPU. A static cache's
    shared length stays on layer 0's device and layer 1 reads copies of the step's slots and lengths; the tokens must
    equal the dynamic cache's (whose layers keep their own lengths) on the same split."""
    import copy

    from accelerate import dispatch_model

    cpu, _ = _models("llama")
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
                  "model.norm": "cpu", "lm_head": "cpu"}
    split = dispatch_model(copy.deepcopy(cpu), device_map=device_map, main_device="cpu")  # "cpu" runs there
    assert next(split.model.layers[1].self_attn.buffers()).device.type == "cpu"
    ids, mask = left_padded(PROMPTS)
    kw = dict(max_new_tokens=8, do_sample=False, disable_compile=True, return_dict_in_generate=True)
    dynamic = split.generate(ids.cuda(), attention_mask=mask.cuda(), **kw)
    got = split.generate(ids.cuda(), attention_mask=mask.cuda(), cache_implementation="static" if static else None,
                         **kw)
    assert torch.equal(got.sequences.cpu(), dynamic.sequences.cpu())
    layers = got.past_key_values.layers
    assert layers[0].k_cache.device.type == "cuda" and layers[1].k_cache.device.type == "cpu"
    assert int(got.past_key_values.get_seq_length()) == ids.shape[1] + 7
