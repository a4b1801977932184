"""The `qoq` command line on the packaged reference model (CPU)."""
from __future__ import annotations

import json

import pytest

from qoq_torch.cli import build_parser, main
from qoq_torch.data import reference_model_path


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("quantize", "generate", "eval", "bench"):
        assert command in out


@pytest.mark.skipif(not (reference_model_path() / "model.safetensors").is_file(), reason="no reference model")
def test_quantize_generate_eval_bench(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(reference_model_path()), str(out), "--device", "cpu", "--dtype", "bfloat16",
                 "--group-size", "64", "--data-free"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert main(["generate", str(out), "The Python", "A list is", "--max-new-tokens", "6", "--device", "cpu",
                 "--dtype", "bfloat16"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("The Python") and lines[-1].startswith("A list is")
    assert main(["eval", str(out), "--device", "cpu", "--dtype", "bfloat16", "--seq-len", "128",
                 "--max-windows", "4", "--zero-shot", "8"]) == 0
    printed = capsys.readouterr().out
    ppl = float(printed.split()[1])
    assert "zero-shot sentence completion" in printed and "(8 two-choice items" in printed
    assert 1.0 < ppl < 200.0  # a trained model, not noise (uniform over 4096 tokens would be 4096)
    # Any float HF checkpoint evaluates too, on a user's own text file.
    text = tmp_path / "text.txt"
    text.write_text("The Python language has lists, dictionaries and sets. " * 40)
    assert main(["eval", str(reference_model_path()), "--device", "cpu", "--dtype", "bfloat16", "--seq-len", "64",
                 "--text", str(text), "--max-windows", "2"]) == 0
    float_ppl = float(capsys.readouterr().out.split()[1])
    assert 1.0 < float_ppl < 200.0
    assert main(["bench", str(out), "--device", "cpu", "--dtype", "bfloat16", "--prompt-len", "8",
                 "--new-tokens", "4"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    assert main(["generate", str(tmp_path / "missing"), "x", "--device", "cpu"]) == 2
    head = tmp_path / "head"
    assert main(["quantize", str(reference_model_path()), str(head), "--device", "cpu", "--dtype", "bfloat16",
                 "--group-size", "64", "--data-free", "--quantize-lm-head"]) == 0
    assert json.loads((head / "qoq_config.json").read_text())["qoq_config"]["quantize_lm_head"] is True
    assert main(["eval", str(head), "--device", "cpu", "--dtype", "bfloat16", "--seq-len", "128",
                 "--max-windows", "4"]) == 0
    head_ppl = float(capsys.readouterr().out.split("perplexity ")[1].split()[0])
    assert 1.0 < head_ppl < 200.0
