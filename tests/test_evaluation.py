"""Perplexity / zero-shot helpers (qoq_torch.evaluation) and the shipped corpus and reference model."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import qoq_torch.data as qdata
from qoq_torch.evaluation import (
    ChoiceItem,
    choice_accuracy,
    negative_log_likelihood,
    perplexity,
    sentence_completion_items,
    window_targets,
)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def direct_nll(model: torch.nn.Module, ids: torch.Tensor, seq_len: int) -> tuple[float, int]:
    """Non-overlapping windows, each scored on its seq_len - 1 next-token predictions, tail dropped."""
    nll, count = 0.0, 0
    for begin in range(0, ids.numel() - seq_len + 1, seq_len):
        window = ids[begin:begin + seq_len][None]
        with torch.no_grad():
            logits = model(input_ids=window).logits[0]
        nll += F.cross_entropy(logits[:-1].float(), window[0, 1:], reduction="sum").double().item()
        count += seq_len - 1
    return nll, count


def test_perplexity_matches_direct_cross_entropy(gen):
    model = tiny_llama()
    ids = torch.randint(0, 97, (16 * 10 + 7,), generator=gen)  # a 7-token tail that must be dropped
    nll, count = negative_log_likelihood(model, ids, seq_len=16, progress=False)
    want_nll, want_count = direct_nll(model, ids, 16)
    assert count == want_count == 10 * 15
    assert nll == pytest.approx(want_nll, rel=1e-12, abs=0)
    assert perplexity(model, ids, seq_len=16, progress=False) == pytest.approx(math.exp(want_nll / want_count),
                                                                               rel=1e-12)


def test_batched_windows_agree_with_one_at_a_time(gen):
    model = tiny_llama(seed=1)
    ids = torch.randint(0, 97, (16 * 9,), generator=gen)
    one = perplexity(model, ids, seq_len=16, batch_size=1, progress=False)
    batched = perplexity(model, ids, seq_len=16, batch_size=4, progress=False)  # 9 windows: batches 4, 4, 1
    assert batched == pytest.approx(one, rel=1e-5)


def test_uniform_model_has_perplexity_equal_to_vocab_size(gen):
    vocab = 50

    class Uniform(torch.nn.Module):
        def forward(self, input_ids, use_cache=False):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, vocab))

    ids = torch.randint(0, vocab, (200,), generator=gen)
    # float32 cross-entropy of log(50): exact up to float32 rounding
    assert perplexity(Uniform(), ids, seq_len=32, stride=8, progress=False) == pytest.approx(vocab, rel=1e-6)


def test_windows_score_each_token_once():
    # Overlapping windows: every token after the first is scored once, in order.
    for n, seq_len, stride in [(100, 16, 5), (64, 16, 1), (17, 16, 3)]:
        windows = window_targets(n, seq_len, stride)
        scored = [t for _, end, first in windows for t in range(first, end)]
        assert scored == list(range(1, windows[-1][1])), (n, seq_len, stride)
        assert all(end - begin == seq_len and begin < first for begin, end, first in windows)
    # Non-overlapping windows: 6 full windows of 16 (tail of 4 dropped), each window's first token unscored.
    windows = window_targets(100, 16, 16)
    assert [(b, e) for b, e, _ in windows] == [(16 * i, 16 * i + 16) for i in range(6)]
    assert [t for _, end, first in windows for t in range(first, end)] == [t for t in range(96) if t % 16]
    with pytest.raises(ValueError):
        window_targets(100, 16, 17)


def test_overlapping_stride_scores_with_more_context(gen):
    """With stride < seq_len each window scores only its last `stride` tokens, given the earlier context."""
    model = tiny_llama(seed=2)
    ids = torch.randint(0, 97, (40,), generator=gen)
    nll, count = negative_log_likelihood(model, ids, seq_len=16, stride=8, progress=False)
    want = 0.0
    for begin, end, first in window_targets(40, 16, 8):
        with torch.no_grad():
            logits = model(input_ids=ids[begin:end][None]).logits[0].float()
        want += F.cross_entropy(logits[first - begin - 1:-1], ids[first:end], reduction="sum").item()
    assert count == 39 - 40 % 8 and nll == pytest.approx(want, rel=1e-6)


def test_tokenizer_input_equals_id_input():
    tokenizer = AutoTokenizer.from_pretrained(str(qdata.reference_model_path()))
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
    text = qdata.load_calibration_texts(40)
    text = " ".join(text)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert perplexity(model, tokenizer, text, seq_len=32, progress=False) == \
        perplexity(model, ids, seq_len=32, progress=False)


def test_choice_accuracy_picks_the_likelier_continuation():
    tokenizer = AutoTokenizer.from_pretrained(str(qdata.reference_model_path()))
    yes, no = " module", " function"  # one token each in the shipped vocabulary
    assert len(tokenizer(yes, add_special_tokens=False)["input_ids"]) == 1
    favoured = tokenizer(yes, add_special_tokens=False)["input_ids"][0]

    class LikesYes(torch.nn.Module):  # puts almost all probability on one token
        def forward(self, input_ids, use_cache=False):
            logits = torch.zeros(*input_ids.shape, len(tokenizer))
            logits[..., favoured] = 20.0
            return SimpleNamespace(logits=logits)

    items = [ChoiceItem("Is it?", (yes, no), 0), ChoiceItem("Is it?", (no, yes), 1),
             ChoiceItem("Really?", (no, yes), 0)]
    assert choice_accuracy(LikesYes(), tokenizer, items, progress=False) == pytest.approx(2 / 3)


def test_sentence_completion_items_are_deterministic_and_well_formed():
    docs = qdata.load_eval_documents()[:3]
    items = sentence_completion_items(docs, 20, seed=3)
    assert items == sentence_completion_items(docs, 20, seed=3)
    assert len(items) == 20 and {i.answer for i in items} == {0, 1}
    for item in items:
        true_end = item.choices[item.answer]
        assert (item.context + true_end).replace(" ", "") in "".join(docs).replace(" ", "").replace("\n", "")
        assert item.choices[0] != item.choices[1]


def test_shipped_corpus_splits():
    calib = qdata.load_calibration_texts()
    assert len(qdata.load_calibration_texts(10)) == 10 and qdata.load_calibration_texts(10) == calib[:10]
    eval_docs, calib_docs = qdata.load_eval_documents(), qdata.load_calibration_documents()
    assert len(eval_docs) > 20 and len(calib_docs) > 10
    assert not set(eval_docs) & set(calib_docs)
    assert qdata.load_eval_text().startswith(eval_docs[0][:100])
    assert "</" not in "".join(eval_docs) and "role=" not in "".join(eval_docs)  # markup stripped


def test_reference_model_predicts_held_out_text():
    """The shipped checkpoint loads offline and is far better than chance (vocab 4096) on held-out text."""
    path = qdata.reference_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ppl = perplexity(model, tokenizer, qdata.load_eval_text(), seq_len=512, max_windows=4, progress=False)
    assert ppl < 100, ppl
    assert next(model.parameters()).numel() and model.config.vocab_size == len(tokenizer)


def test_corpus_extraction_keeps_prose_only():
    from qoq_torch.data.build_corpus import html_to_prose, split_of

    page = """<html><head><title>t</title><script>var x = 1;</script></head><body>
    <div class="sphinxsidebar">Navigation text that is long enough to count as a sentence here.</div>
    <div class="body" role="main"><section><h1>Tempfile<a class="headerlink" href="#t">¶</a></h1>
    <p>This module creates <code>temporary</code> files and directories &amp; works on all platforms.</p>
    <div class="highlight-python3"><div class="highlight"><pre>import tempfile
print("a code line that is long enough")</pre></div></div>
    <p>Short fragment.</p><ul><li>A list item that is also a full sentence of prose.</li></ul></section></div>
    <div class="footer">Footer text that is long enough to count as a sentence here.</div></body></html>"""
    assert html_to_prose(page) == ("This module creates temporary files and directories & works on all platforms.\n"
                                   "A list item that is also a full sentence of prose.")
    assert split_of("library/tempfile.html") == split_of("library/tempfile.html")
    assert {split_of(f"page{i}.html") for i in range(200)} == {"train", "calib", "eval"}


def test_train_reference_model_smoke(tmp_path):
    """The training script runs end to end on CPU (tiny model) and writes a loadable checkpoint and its log."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "train_reference_model.py"
    spec = importlib.util.spec_from_file_location("train_reference_model", script)
    trainer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trainer)
    calib_as_train = qdata.reference_model_path().parent / "corpus" / "calib.jsonl.gz"
    args = trainer.parse_args(["--tiny", "--steps", "2,3", "--out", str(tmp_path), "--train", str(calib_as_train)])
    log = trainer.train_and_select(args)
    assert [r["steps"] for r in log["selection"]["runs"]] == [2, 3]
    assert log["training"]["steps"] == min(log["selection"]["runs"], key=lambda r: r["val_perplexity"])["steps"]
    saved = json.loads((tmp_path / "training_log.json").read_text())
    model = LlamaForCausalLM.from_pretrained(str(tmp_path))
    # below the vocabulary size: better than a uniform guess after a few steps
    assert saved["float16"]["eval_perplexity"] == log["float16"]["eval_perplexity"] < model.config.vocab_size
    assert model.dtype == torch.float16 and model.config.hidden_size == trainer.TINY_CONFIG["hidden_size"]
    AutoTokenizer.from_pretrained(str(tmp_path))
