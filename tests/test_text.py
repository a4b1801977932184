"""Text encoding for calibration and evaluation: no special tokens, no truncation, no misleading length warning."""
import torch
from transformers import AutoTokenizer

import qoq_torch.data as qdata
from qoq_torch.quantization.calibration import tokenize_blocks
from qoq_torch.text import encode_text

LENGTH_WARNING = "sequence-length-is-longer-than-the-specified-maximum"


def _long_text_and_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(str(qdata.reference_model_path()))
    text = "\n\n".join(qdata.load_calibration_texts(200))
    return text, tokenizer


def test_long_text_encodes_whole_without_the_length_warning():
    text, tokenizer = _long_text_and_tokenizer()
    ids = encode_text(tokenizer, text)
    assert len(ids) > 4 * tokenizer.model_max_length  # long enough that a plain call warns
    assert not tokenizer.deprecation_warnings.get(LENGTH_WARNING, False)
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]  # the same ids; this call does warn
    assert ids == plain and tokenizer.deprecation_warnings.get(LENGTH_WARNING, False)


def test_calibration_blocks_come_from_the_whole_text_without_the_length_warning():
    text, tokenizer = _long_text_and_tokenizer()
    seq_len = tokenizer.model_max_length
    blocks = tokenize_blocks([text], tokenizer, num_samples=10**6, seq_len=seq_len, seed=0)
    assert not tokenizer.deprecation_warnings.get(LENGTH_WARNING, False)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    n = ids.numel() // seq_len
    assert blocks.shape == (n, seq_len) and n > 4 and torch.equal(blocks.reshape(-1), ids[: n * seq_len])


def test_plain_callables_and_tensor_ids_are_accepted():
    class ByteTokenizer:  # not a Hugging Face tokenizer: no verbose argument, returns a [1, n] tensor
        def __call__(self, text, add_special_tokens=True):
            assert add_special_tokens is False
            return {"input_ids": torch.tensor([list(text.encode("utf-8"))])}

    assert encode_text(ByteTokenizer(), "abc") == [97, 98, 99]
