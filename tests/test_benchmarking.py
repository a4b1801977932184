"""The end-to-end benchmark's model builders and memory arithmetic (the timing itself runs on the GPU)."""
from __future__ import annotations

import pytest
import torch

from qoq_torch import benchmarking
from qoq_torch.cli import main
from qoq_torch.nn import QoQLinear


def test_random_quantized_model_runs_and_holds_valid_weights():
    model = benchmarking.build_quantized_model("tiny", group_size=128, device="cpu")
    linears = [m for m in model.modules() if isinstance(m, QoQLinear)]
    assert len(linears) == 4 * benchmarking.SHAPES["tiny"]["num_hidden_layers"]
    w8 = linears[0].quantized_weight().int8_weight()
    assert int(w8.abs().max()) > 0 and int(w8.min()) >= -128 and int(w8.max()) <= 127
    ids = torch.randint(1, 500, (2, 6))
    logits = model(ids).logits
    assert bool(torch.isfinite(logits).all()) and float(logits.float().std()) > 0
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3,
                         do_sample=False, pad_token_id=0)
    assert out.shape == (2, 9)


def test_variants_name_the_model_they_build():
    model = benchmarking.build_variant("tiny", "qoq-channel-lmhead", device="cpu")
    assert isinstance(model.lm_head, QoQLinear) and model.lm_head.group_size == -1
    assert int(model.lm_head.quantized_weight().w4.max()) > 0  # filled, not the empty skeleton
    assert model.qoq_config.quantize_lm_head and model.qoq_config.group_size == -1
    assert bool(torch.isfinite(model(torch.randint(1, 500, (1, 4))).logits).all())
    assert not isinstance(benchmarking.build_variant("tiny", "qoq-g128", device="cpu").lm_head, QoQLinear)
    with pytest.raises(ValueError, match="unknown variants"):
        benchmarking.build_variant("tiny", "qoq-g64", device="cpu")
    with pytest.raises(ValueError, match="unknown variants"):
        benchmarking.run_e2e(variants=("bf16", "w4a16"))


def test_random_float_model_has_working_rope():
    model = benchmarking.build_float_model("tiny", device="cpu")
    assert bool(torch.isfinite(model.model.rotary_emb.inv_freq).all())
    assert bool(torch.isfinite(model(torch.randint(1, 500, (1, 5))).logits).all())


def test_kv_bytes_and_largest_batch():
    # Llama-3-8B: 32 layers x 8 KV heads; bf16 K+V = 2*2*128 bytes per head, KV4 = 2*(64+4).
    config = benchmarking.model_config("llama3-8b")
    assert benchmarking.kv_bytes_per_token(config, kv4=False) == 32 * 8 * 512
    assert benchmarking.kv_bytes_per_token(config, kv4=True) == 32 * 8 * 136
    gib = 2**30
    bf16 = benchmarking.largest_batch(config, False, 15 * gib, 384, 80 * gib)
    qoq = benchmarking.largest_batch(config, True, 5 * gib, 384, 80 * gib)
    assert qoq > 3 * bf16 > 0


def test_unknown_shape_and_cpu_only_e2e(capsys):
    with pytest.raises(ValueError, match="unknown model shape"):
        benchmarking.model_config("llama-9000")
    if not torch.cuda.is_available():
        assert main(["bench", "e2e", "--shapes", "tiny"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("threshold,upper", [(1, 10), (7, 10), (10, 10), (37, 5000), (4321, 5000), (0, 64), (90, 64)])
def test_search_largest_finds_the_threshold(threshold, upper):
    probes = []

    def fits(n):
        probes.append(n)
        return n <= threshold

    found = benchmarking.search_largest(fits, upper, rel_tol=0.03)
    expected = min(threshold, upper)
    assert expected * 0.97 - 1 <= found <= expected
    assert found == 0 or fits(found)
    assert len(probes) <= 30


def test_stop_after_ends_generate_early_with_the_full_cache():
    """The largest-batch probe (run_generate with stop_after) sizes the static cache for all new tokens but
    stops after two; without stop_after every requested token is generated."""
    model = benchmarking.build_float_model("tiny", dtype=torch.float32, device="cpu")
    ids = torch.randint(2, 500, (2, 5))
    assert benchmarking.run_generate(model, ids, 20, None, stop_after=2).shape == (2, 7)
    assert benchmarking.run_generate(model, ids, 6, None).shape == (2, 11)


def test_stop_check_mode_forces_or_keeps_transformers_decision_and_restores_it():
    from transformers.generation import utils as gen_utils

    check = gen_utils.DeferredStopCheck.__dict__["is_supported"]
    cuda, cpu = torch.device("cuda"), torch.device("cpu")

    class Cache:
        def __init__(self, croppable):
            self.is_croppable = croppable

    assert not gen_utils.DeferredStopCheck.is_supported(cuda, None, False, False)  # transformers' rule: mps only
    with benchmarking.StopCheckMode("deferred") as deferred:
        patched = gen_utils.DeferredStopCheck.is_supported
        assert patched(cuda, None, False, False)
        assert patched(cuda, Cache(False), False, False)  # a cache that is not returned need not be croppable
        assert not patched(cuda, Cache(False), True, False)
        assert patched(cuda, Cache(True), True, False)
        assert not patched(cuda, None, False, True)  # never with an assistant model
        assert not patched(cpu, None, False, False)  # other devices keep transformers' rule
        assert deferred.deferred == 3
    with benchmarking.StopCheckMode("per-step") as per_step:
        assert not gen_utils.DeferredStopCheck.is_supported(cuda, None, False, False)
        assert per_step.deferred == 0
    with benchmarking.StopCheckMode("model-default") as default:  # the decision is left to the installed rule
        assert not gen_utils.DeferredStopCheck.is_supported(cuda, Cache(True), False, False)
        assert default.deferred == 0
    assert gen_utils.DeferredStopCheck.__dict__["is_supported"] is check
    with pytest.raises(ValueError, match="unknown stop check"):
        benchmarking.StopCheckMode("sometimes")


def test_e2e_option_checks_and_table_rows():
    with pytest.raises(ValueError, match="unknown stop checks"):
        benchmarking.run_e2e(stop_checks=("sometimes",))
    with pytest.raises(ValueError, match="needs measure_max_batch"):
        benchmarking.run_e2e(time_max_batch=True)
    rows = [
        dict(model="m", variant="qoq-g128", batch=1, prompt_len=128, new_tokens=256, tokens_per_s=200.0,
             decode_tokens_per_s=201.0, ttft_ms=20.0, peak_mem_gb=5.0, error=None, extra={"stop_check": "deferred"}),
        dict(model="m", variant="bf16", batch=760, prompt_len=128, new_tokens=256, tokens_per_s=4000.0,
             decode_tokens_per_s=4100.0, ttft_ms=900.0, peak_mem_gb=70.0, error=None,
             extra={"measured_largest_batch": 844, "largest_batch_estimate": 800}),
    ]
    table = benchmarking.format_table(rows).splitlines()
    assert "| qoq-g128 (deferred stop) | 1 |" in table[2]
    assert "| 844 (largest that fits, measured), timed at 760 | 128/256 | 4000 |" in table[3]


def test_recorded_compile_config_is_json():
    import json

    model = benchmarking.build_quantized_model("tiny", group_size=128, device="cpu")
    config = benchmarking.compile_config_for(model, benchmarking.MODEL_DEFAULT)
    text = json.dumps(benchmarking._json_safe(config.to_dict()))  # a function in options must not break the JSON
    assert "qoq_torch.nn.generation.skip_fixed_layout_guards" in text and '"triton.cudagraphs": true' in text


def test_eager_rows_generate_without_compiling_and_have_no_fallback(monkeypatch):
    model = benchmarking.build_quantized_model("tiny", group_size=128, device="cpu")
    assert benchmarking.compile_config_for(model, benchmarking.EAGER) is None
    assert benchmarking.compile_config_for(model, "max-autotune").mode == "max-autotune"
    seen = []
    real_generate = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **kw: (seen.append(kw["generation_config"]),
                                                             real_generate(*a, **kw))[1])
    out = benchmarking.run_generate(model, torch.randint(1, 500, (1, 4)), 2, benchmarking.EAGER)
    assert out.shape == (1, 6)
    assert seen[0].disable_compile and seen[0].compile_config is None

    modes = []

    def failing(*args, compile_mode, **kwargs):
        modes.append(compile_mode)
        return benchmarking.GenerateResult("m", "v", 1, 4, 2, error="RuntimeError: capture failed")

    monkeypatch.setattr(benchmarking, "time_generate", failing)
    benchmarking._time_with_fallback(model, "m", "v", 1, 4, 2, "model-default", benchmarking.EAGER)
    assert modes == [benchmarking.EAGER]  # a failed eager row is not retried compiled
    modes.clear()
    benchmarking._time_with_fallback(model, "m", "v", 1, 4, 2, "model-default", "reduce-overhead")
    assert modes == ["reduce-overhead", benchmarking.PLAIN_INDUCTOR]
