"""save_quantized / load_quantized: identical logits, meta-device skeleton, clear errors."""
from __future__ import annotations

import json

import pytest
import torch

import qoq_torch
from qoq_torch.api import quantize_rtn
from tiny_models import GROUP_SIZE, left_padded, tiny_model

IDS, MASK = left_padded([[5, 9, 33, 70, 8, 100], [40, 41, 3]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = qoq_torch.quantize(tiny_model("qwen2"), config=qoq_torch.QoQConfig(group_size=GROUP_SIZE),
                               progress=False)
    path = tmp_path_factory.mktemp("qoq") / "ckpt"
    qoq_torch.save_quantized(model, path)
    return model, path


def test_reload_gives_identical_logits_and_generation(saved):
    model, path = saved
    loaded = qoq_torch.load_quantized(path)
    with torch.no_grad():
        assert torch.equal(model(IDS, attention_mask=MASK).logits, loaded(IDS, attention_mask=MASK).logits)
    kw = dict(attention_mask=MASK, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(IDS, **kw), loaded.generate(IDS, **kw))
    assert loaded.qoq_config == model.qoq_config


def test_tied_embeddings_survive_a_round_trip(tmp_path):
    model = quantize_rtn(tiny_model("llama", tie_word_embeddings=True), GROUP_SIZE)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    qoq_torch.save_quantized(model, tmp_path)
    loaded = qoq_torch.load_quantized(tmp_path, dtype=torch.float16)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert loaded.model.layers[0].mlp.down_proj.s1.dtype == torch.float16
    assert loaded(IDS).logits.dtype == torch.float16


def test_a_quantized_lm_head_survives_a_round_trip(tmp_path):
    config = qoq_torch.QoQConfig(group_size=GROUP_SIZE, quantize_lm_head=True)
    model = qoq_torch.quantize(tiny_model("llama", tie_word_embeddings=True), config=config, progress=False)
    qoq_torch.save_quantized(model, tmp_path)
    loaded = qoq_torch.load_quantized(tmp_path)
    assert isinstance(loaded.lm_head, qoq_torch.QoQLinear) and loaded.qoq_config.quantize_lm_head
    assert "lm_head.qweight" in loaded.state_dict() and "lm_head.weight" not in loaded.state_dict()
    with torch.no_grad():
        assert torch.equal(model(IDS, attention_mask=MASK).logits, loaded(IDS, attention_mask=MASK).logits)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_clear_errors(saved, tmp_path):
    model, path = saved
    with pytest.raises(FileNotFoundError, match="not a QoQ checkpoint"):
        qoq_torch.load_quantized(tmp_path)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        qoq_torch.load_quantized(path, dtype=torch.float32)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            qoq_torch.load_quantized(path, device="cuda")
    with pytest.raises(ValueError, match="expects a model quantized"):
        qoq_torch.save_quantized(tiny_model("llama"), tmp_path / "x")
    # corrupt weights
    bad = tmp_path / "corrupt"
    qoq_torch.save_quantized(model, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupt weights"):
        qoq_torch.load_quantized(bad)
    # config that does not match the tensors
    mismatch = tmp_path / "mismatch"
    qoq_torch.save_quantized(model, mismatch)
    cfg = json.loads((mismatch / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    cfg.pop("layer_types", None)
    (mismatch / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing tensors"):
        qoq_torch.load_quantized(mismatch)
    cfg["num_hidden_layers"], cfg["intermediate_size"] = 2, 384
    cfg.pop("max_window_layers", None)
    (mismatch / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has shape"):
        qoq_torch.load_quantized(mismatch)
    meta = json.loads((mismatch / "qoq_config.json").read_text())
    meta["format_version"] = 99
    (mismatch / "qoq_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version"):
        qoq_torch.load_quantized(mismatch)
