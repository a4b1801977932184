"""The QoQ algorithm on tiny random Llama / Mistral / Qwen2 / Qwen3 models (CPU, float32, no download).

Every transform must leave the float model's logits unchanged; the returned weights must be the ops'
integer format of the transformed weights; with planted activation outliers QoQ must beat plain RTN.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from qoq_torch.data import load_calibration_documents
from qoq_torch.ops.formats import PerChannelWeight, PerGroupWeight, quantize_weight_per_channel, quantize_weight_per_group
from qoq_torch.quantization import (
    SUPPORTED_ARCHITECTURES,
    QoQConfig,
    prepare_qoq,
    rtn_weights,
    simulate_quantized_model,
)
from qoq_torch.quantization.rotation import rotation_matrix
from qoq_torch.quantization.smoothing import smooth_attention_scales

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
PROJ_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
VOCAB = 256
# Only the transform named is on; norm folding always happens.
NOTHING = dict(rotation=False, smooth_attention=False, smooth_output=False, reorder=False, clip_search=False)


def tiny_model(family: str, hidden: int = 64, tie: bool = False, seed: int = 0) -> torch.nn.Module:
    """A 2-layer random model with non-trivial norm weights (and q/k/v biases for Qwen2)."""
    torch.manual_seed(seed)
    config_cls, model_cls = FAMILIES[family]
    kwargs = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=tie)
    if family == "qwen3":
        kwargs["head_dim"] = hidden // 4
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def tokens(n: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


CALIB = tokens(4, 32, seed=1)
PROBE = tokens(2, 32, seed=2)


def logits(model: torch.nn.Module, ids: torch.Tensor = PROBE) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def max_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def rel_norm_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


# ------------------------------------------------------------------------------- float invariance
@pytest.fixture(scope="module")
def norm_folded_only():
    """Per family: (original logits, model after prepare_qoq with every optional transform off)."""
    out = {}
    for family in FAMILIES:
        model = tiny_model(family)
        ref = logits(model)
        prepare_qoq(model, QoQConfig(group_size=32, **NOTHING), calib_data=CALIB, progress=False)
        out[family] = (ref, model)
    return out


TRANSFORMS = {
    "rotation": (dict(rotation=True), "model.embed_tokens.weight"),
    "rotation_random": (dict(rotation=True, rotation_kind="random"), "model.layers.1.mlp.down_proj.weight"),
    "smooth_attention": (dict(smooth_attention=True), "model.layers.0.self_attn.k_proj.weight"),
    "smooth_output": (dict(smooth_output=True, smooth_output_alpha=0.5), "model.layers.0.self_attn.v_proj.weight"),
    "reorder": (dict(reorder=True), "model.layers.1.mlp.down_proj.weight"),
    "all": ({}, "model.layers.0.mlp.up_proj.weight"),
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_transform_keeps_float_logits(family, transform, norm_folded_only):
    ref, folded = norm_folded_only[family]
    assert max_rel_error(logits(folded), ref) < 1e-4  # norm folding alone
    settings, changed = TRANSFORMS[transform]
    if family == "qwen3" and transform == "smooth_attention":
        changed = "model.layers.0.self_attn.k_norm.weight"  # λ goes into the per-head norms
    config = QoQConfig(group_size=32, **(NOTHING | settings)) if transform != "all" else QoQConfig(group_size=32)
    model = tiny_model(family)
    prepare_qoq(model, config, calib_data=CALIB, progress=False)
    assert max_rel_error(logits(model), ref) < 1e-4
    before, after = dict(folded.named_parameters())[changed], dict(model.named_parameters())[changed]
    assert (after - before).abs().max() > 1e-3 * before.abs().max(), f"{transform} did not change {changed}"
    for name, p in model.named_parameters():
        if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")) or name == "model.norm.weight":
            assert bool((p == 1).all()), name


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tied_embeddings_are_untied_when_the_final_norm_is_folded(family):
    model = tiny_model(family, tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = logits(model)
    prepare_qoq(model, QoQConfig(group_size=32), calib_data=CALIB, progress=False)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    model.tie_weights()  # what loading and saving call: must not tie them again
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert max_rel_error(logits(model), ref) < 1e-4


def test_tied_embeddings_stay_tied_when_nothing_forces_it():
    model = tiny_model("llama", tie=True)
    with torch.no_grad():
        model.model.norm.weight.fill_(1.0)
    ref = logits(model)
    prepare_qoq(model, QoQConfig(group_size=32), calib_data=CALIB, progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # rotated once, shared
    assert max_rel_error(logits(model), ref) < 1e-4


def test_data_free_mode_rotates_but_does_not_smooth():
    model = tiny_model("qwen2")
    ref = logits(model)
    rotated_only = tiny_model("qwen2")
    prepare_qoq(rotated_only, QoQConfig(group_size=32, **(NOTHING | dict(rotation=True))), calib_data=CALIB,
                progress=False)
    weights = prepare_qoq(model, QoQConfig(group_size=32), progress=False)
    assert max_rel_error(logits(model), ref) < 1e-4
    for name in ("k_proj", "v_proj"):  # no SmoothAttention / output smoothing without activations
        torch.testing.assert_close(getattr(model.model.layers[0].self_attn, name).weight,
                                   getattr(rotated_only.model.layers[0].self_attn, name).weight, rtol=0, atol=0)
    assert len(weights) == 2 * len(PROJ_NAMES)


# ------------------------------------------------------------------------------- returned weights
@pytest.mark.parametrize("group_size", [32, -1])
def test_returned_weights_are_the_ops_format_of_the_transformed_weights(group_size):
    model = tiny_model("qwen2")
    config = QoQConfig(group_size=group_size, clip_search=False)
    weights = prepare_qoq(model, config, calib_data=CALIB, progress=False)
    assert set(weights) == {f"model.layers.{i}.{p}" for i in range(2) for p in PROJ_NAMES}
    for name, q in weights.items():
        w = model.get_submodule(name).weight
        n, k = w.shape
        assert q.w4.shape == (n, k) and q.w4.dtype == torch.uint8 and int(q.w4.max()) <= 15
        if group_size == -1:
            assert isinstance(q, PerChannelWeight)
            expect = quantize_weight_per_channel(w)
            assert torch.equal(q.scale, expect.scale) and torch.equal(q.zero, expect.zero)
        else:
            assert isinstance(q, PerGroupWeight)
            assert q.s2.shape == (n, k // group_size) and int(q.s2.min()) >= 1 and int(q.s2.max()) <= 16
            assert int(q.z2.max()) <= 15 and q.s1.dtype == torch.float16
            w8 = q.int8_weight()
            assert int(w8.min()) >= -128 and int(w8.max()) <= 127
            expect = quantize_weight_per_group(w, group_size)
            assert torch.equal(q.s2, expect.s2) and torch.equal(q.z2, expect.z2) and torch.equal(q.s1, expect.s1)
        assert torch.equal(q.w4, expect.w4)
        # the format represents the transformed float weight: rounding plus the zero point's rounding, at most
        # one step (per-group: half an INT8 step of level 1 plus one level-2 step)
        if group_size == -1:
            bound = q.scale.float()
        else:
            bound = q.s1.float() * (0.5 + q.s2.float().amax(1))
        assert bool(((q.dequantize() - w).abs().amax(1) <= bound * (1 + 1e-6)).all())


@pytest.mark.parametrize("group_size", [32, -1])
def test_lm_head_is_quantized_only_when_asked(group_size):
    plain = prepare_qoq(tiny_model("llama", tie=True), QoQConfig(group_size=group_size, clip_search=False),
                        calib_data=CALIB, progress=False)
    assert "lm_head" not in plain
    model = tiny_model("llama", tie=True)
    weights = prepare_qoq(model, QoQConfig(group_size=group_size, clip_search=False, quantize_lm_head=True),
                          calib_data=CALIB, progress=False)
    assert set(weights) == set(plain) | {"lm_head"}
    for name in plain:  # the head does not change how the layers are quantized
        assert torch.equal(weights[name].w4, plain[name].w4)
    head, w = weights["lm_head"], model.lm_head.weight
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # the folded final norm untied it
    assert isinstance(head, PerChannelWeight if group_size == -1 else PerGroupWeight)
    assert head.w4.shape == w.shape == (VOCAB, 64)
    # without clipping: the ops' format of the transformed head (within one quantization step)
    bound = head.scale.float() if group_size == -1 else head.s1.float() * (0.5 + head.s2.float().amax(1))
    assert bool(((head.dequantize() - w).abs().amax(1) <= bound * (1 + 1e-6)).all())
    data_free = prepare_qoq(tiny_model("llama"), QoQConfig(group_size=group_size, quantize_lm_head=True),
                            progress=False)
    assert "lm_head" in data_free


def test_lm_head_clipping_is_searched_on_what_the_head_reads():
    clipped_model, plain_model = tiny_model("llama"), tiny_model("llama")
    clipped = prepare_qoq(clipped_model, QoQConfig(group_size=32, quantize_lm_head=True), calib_data=CALIB,
                          progress=False)["lm_head"]
    plain = prepare_qoq(plain_model, QoQConfig(group_size=32, quantize_lm_head=True, clip_search=False),
                        calib_data=CALIB, progress=False)["lm_head"]
    w = clipped_model.lm_head.weight.detach()
    torch.testing.assert_close(plain_model.lm_head.weight, w, rtol=0, atol=0)  # clipping is not folded
    seen = []
    hook = clipped_model.lm_head.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, 64).float()))
    logits(clipped_model, CALIB)  # every calibration token (fewer than max_search_tokens): the search saw all
    hook.remove()
    x = torch.cat(seen)
    err_clipped = (x @ (clipped.dequantize() - w).t()).pow(2).sum(0)
    err_plain = (x @ (plain.dequantize() - w).t()).pow(2).sum(0)
    assert bool((err_clipped <= err_plain * (1 + 1e-5)).all()) and float(err_clipped.sum()) < float(err_plain.sum())


@pytest.mark.parametrize("with_inputs", [True, False])
def test_clip_search_in_row_blocks_chooses_what_one_block_does(monkeypatch, with_inputs):
    from qoq_torch.quantization import reorder_clip

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(100, 64, generator=gen) * torch.rand(100, 1, generator=gen)
    x = torch.randn(50, 64, generator=gen) if with_inputs else None
    whole = reorder_clip.search_clip_ratios(w, x, 32, 0.5, 11)
    monkeypatch.setattr(reorder_clip, "_SEARCH_BLOCK_ROWS", 16)  # 7 blocks, the last one partial
    blocked = reorder_clip.search_clip_ratios(w, x, 32, 0.5, 11)
    assert blocked.shape == (100,) and torch.equal(blocked, whole)
    assert len(set(whole.tolist())) > 1  # the rows really chose different ratios


def test_lm_head_needs_a_vocabulary_the_gemm_can_tile():
    model = tiny_model("llama")
    model.resize_token_embeddings(250)
    with pytest.raises(ValueError, match="multiple of 16"):
        prepare_qoq(model, QoQConfig(group_size=32, quantize_lm_head=True), calib_data=CALIB[:, :8] % 250,
                    progress=False)
    prepare_qoq(tiny_model("llama"), QoQConfig(group_size=32), progress=False)  # without the head: fine


def test_clip_search_lowers_the_layer_output_error():
    model = tiny_model("llama", hidden=128)
    clipped = copy.deepcopy(model)
    plain_w = prepare_qoq(model, QoQConfig(group_size=32, clip_search=False), calib_data=CALIB, progress=False)
    clip_w = prepare_qoq(clipped, QoQConfig(group_size=32), calib_data=CALIB, progress=False)
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(0))
    name = "model.layers.0.self_attn.q_proj"
    w = model.get_submodule(name).weight
    torch.testing.assert_close(clipped.get_submodule(name).weight, w, rtol=0, atol=0)  # clipping is not folded
    err_plain = (x @ (plain_w[name].dequantize() - w).t()).pow(2).sum()
    err_clip = (x @ (clip_w[name].dequantize() - w).t()).pow(2).sum()
    assert err_clip < err_plain
    assert not torch.equal(clip_w[name].s1, plain_w[name].s1)


def test_runs_are_deterministic():
    a, b = tiny_model("mistral"), tiny_model("mistral")
    wa = prepare_qoq(a, QoQConfig(group_size=32), calib_data=CALIB, progress=False)
    wb = prepare_qoq(b, QoQConfig(group_size=32), calib_data=CALIB, progress=False)
    for name in wa:
        assert torch.equal(wa[name].w4, wb[name].w4) and torch.equal(wa[name].s1, wb[name].s1)


# ------------------------------------------------------------------------------- building blocks
@pytest.mark.parametrize("n, kind", [(64, "hadamard"), (96, "hadamard"), (48, "random")])
def test_rotation_matrices_are_orthogonal(n, kind):
    q = rotation_matrix(n, kind, seed=0)
    torch.testing.assert_close(q @ q.t(), torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    if n == 64 and kind == "hadamard":  # a (signed) Hadamard matrix spreads every channel over all of them
        torch.testing.assert_close(q.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))


def test_smooth_attention_scales_share_rope_pairs():
    k_absmax = torch.rand(2, 8, generator=torch.Generator().manual_seed(0)) + 0.1
    lam = smooth_attention_scales(k_absmax, 0.5, shared_across_heads=False)
    torch.testing.assert_close(lam[:, :4], lam[:, 4:], rtol=0, atol=0)
    expect = torch.maximum(k_absmax[:, :4], k_absmax[:, 4:]).sqrt()
    torch.testing.assert_close(lam[:, :4], expect)
    shared = smooth_attention_scales(k_absmax, 0.5, shared_across_heads=True)
    torch.testing.assert_close(shared, lam.amax(0))


# ------------------------------------------------------------------------------- accuracy
def plant_outliers(model: torch.nn.Module) -> torch.nn.Module:
    """Make the activations of a random model look like an LLM's without changing its float function
    much: a few residual channels ×50 through the norm weights, a RoPE pair of key channels ×20 (queries
    ÷20, so attention is unchanged), and a few v_proj / up_proj channels ×30 (o_proj/down_proj inputs)."""
    g = torch.Generator().manual_seed(3)
    cfg = model.config
    with torch.no_grad():
        for layer in model.model.layers:
            ch = torch.randperm(cfg.hidden_size, generator=g)[:3]
            layer.input_layernorm.weight[ch] *= 50
            layer.post_attention_layernorm.weight[ch] *= 50
            attn = layer.self_attn
            d = attn.head_dim
            pair = torch.tensor([1, 1 + d // 2])
            if getattr(attn, "k_norm", None) is not None:
                attn.k_norm.weight[pair] *= 20
                attn.q_norm.weight[pair] /= 20
            else:
                for h in range(cfg.num_key_value_heads):
                    attn.k_proj.weight[h * d + pair] *= 20
                for h in range(cfg.num_attention_heads):
                    attn.q_proj.weight[h * d + pair] /= 20
            attn.v_proj.weight[torch.randperm(attn.v_proj.out_features, generator=g)[:2]] *= 30
            up = layer.mlp.up_proj
            up.weight[torch.randperm(up.out_features, generator=g)[:3]] *= 30
    return model


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_qoq_beats_rtn_with_activation_outliers(family):
    model = plant_outliers(tiny_model(family, hidden=128))
    ids = tokens(2, 48, seed=4)
    ref = logits(model, ids)
    rtn = copy.deepcopy(model)
    with simulate_quantized_model(rtn, rtn_weights(rtn, 32)) as sim:
        err_rtn = rel_norm_error(logits(sim, ids), ref)
    errors = {}
    for name, config in (("qoq", QoQConfig(group_size=32)), ("no_smooth_attention",
                                                             QoQConfig(group_size=32, smooth_attention=False))):
        m = copy.deepcopy(model)
        weights = prepare_qoq(m, config, calib_data=tokens(8, 48, seed=1), progress=False)
        with simulate_quantized_model(m, weights) as sim:
            errors[name] = rel_norm_error(logits(sim, ids), ref)
    assert errors["qoq"] < 0.7 * err_rtn, (errors, err_rtn)
    assert errors["qoq"] < 0.95 * errors["no_smooth_attention"], errors  # the planted keys need λ


def test_simulation_restores_the_float_model():
    model = tiny_model("llama")
    ref = logits(model)
    impl = model.config._attn_implementation
    with simulate_quantized_model(model, rtn_weights(model, 32)) as sim:
        assert rel_norm_error(logits(sim), ref) > 1e-3  # quantization is really simulated
    assert model.config._attn_implementation == impl
    torch.testing.assert_close(logits(model), ref, rtol=0, atol=0)


# ------------------------------------------------------------------------------- calibration inputs
class CharTokenizer:
    """Stands in for a Hugging Face tokenizer: one id per byte."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        return {"input_ids": torch.tensor([list(text.encode("utf-8"))], dtype=torch.long) % VOCAB}


def test_texts_with_a_tokenizer_calibrate():
    model = tiny_model("llama")
    ref = logits(model)
    texts = ["The quick brown fox jumps over the lazy dog. " * 20, "Pack my box with five dozen liquor jugs. " * 20]
    weights = prepare_qoq(model, QoQConfig(group_size=32, num_samples=3, seq_len=64), tokenizer=CharTokenizer(),
                          calib_data=texts, progress=False)
    assert len(weights) == 14 and max_rel_error(logits(model), ref) < 1e-4


def test_tokenizer_alone_uses_the_shipped_corpus():
    texts = load_calibration_documents()
    assert len(texts) > 0 and all(isinstance(t, str) and t for t in texts)
    model = tiny_model("llama")
    weights = prepare_qoq(model, QoQConfig(group_size=32, num_samples=2, seq_len=32), tokenizer=CharTokenizer(),
                          progress=False)
    assert len(weights) == 14


# ------------------------------------------------------------------------------- clear errors
def test_unsupported_architecture_names_the_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as info:
        prepare_qoq(model, QoQConfig(), progress=False)
    for name in SUPPORTED_ARCHITECTURES:
        assert name in str(info.value)


def test_non_finite_weights_are_rejected():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*non-finite"):
        prepare_qoq(model, QoQConfig(group_size=32), calib_data=CALIB, progress=False)


def test_group_size_must_divide_in_features():
    model = tiny_model("llama", hidden=96)  # q/k/v/gate/up have K=96, o K=96, down K=192
    with pytest.raises(ValueError, match=r"group_size=64.*K=96.*model\.layers\.0\.self_attn\.q_proj"):
        prepare_qoq(model, QoQConfig(group_size=64), calib_data=CALIB, progress=False)


def test_non_finite_calibration_activations_are_reported():
    model = tiny_model("llama").half()
    with torch.no_grad():  # gate*up overflows float16 in layer 0
        model.model.layers[0].mlp.gate_proj.weight.mul_(3000)
        model.model.layers[0].mlp.up_proj.weight.mul_(3000)
    with pytest.raises(ValueError, match=r"non-finite activations.*model\.layers\.0"):
        prepare_qoq(model, QoQConfig(group_size=32, rotation=False), calib_data=CALIB, progress=False)


@pytest.mark.parametrize("calib_data, tokenizer, match", [
    (["some text"], None, "needs a tokenizer"),
    (torch.zeros(4, dtype=torch.long), None, "token ids"),
    (torch.zeros(2, 8), None, "token ids"),
    ("a string", CharTokenizer(), "list of strings"),
])
def test_bad_calibration_data(calib_data, tokenizer, match):
    with pytest.raises(ValueError, match=match):
        prepare_qoq(tiny_model("llama"), QoQConfig(group_size=32), tokenizer=tokenizer, calib_data=calib_data,
                    progress=False)


@pytest.mark.parametrize("bad_id", [-1, 256])
def test_out_of_vocabulary_calibration_ids_are_rejected_before_the_model_changes(bad_id):
    model = tiny_model("llama")  # vocabulary 256
    before = {name: p.clone() for name, p in model.state_dict().items()}
    calib = torch.randint(3, 256, (2, 16))
    calib[1, 5] = bad_id
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 256\)"):
        prepare_qoq(model, QoQConfig(group_size=32), calib_data=calib, progress=False)
    assert all(torch.equal(p, before[name]) for name, p in model.state_dict().items())  # not half-transformed


def test_layer_statistics_build_no_autograd_graph():
    """The calibration pass records statistics without autograd even when the caller has grad enabled and the
    weights require grad (the graph would keep every batch's activations alive)."""
    from qoq_torch.quantization.architecture import decoder_layers
    from qoq_torch.quantization.calibration import capture_layer_inputs
    from qoq_torch.quantization.layer_statistics import run_layer_with_statistics

    model = tiny_model("llama")
    model.requires_grad_(True)
    tokens = torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        inputs = capture_layer_inputs(model, tokens, batch_size=1)
    kwargs = [per_batch[0] for per_batch in inputs.layer_kwargs]
    with torch.enable_grad():
        stats = run_layer_with_statistics(decoder_layers(model)[0], inputs.hidden, kwargs, 64,
                                          torch.Generator().manual_seed(0), "layer 0")
    assert stats.attn_x and not any(t.requires_grad for t in inputs.hidden + stats.attn_x + stats.down_x)
