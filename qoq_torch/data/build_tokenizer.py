"""Train the reference model's byte-level BPE tokenizer on the corpus' train split.

``python -m qoq_torch.data.build_tokenizer --train .cache/reference_corpus/train.jsonl.gz --out DIR`` writes a
Hugging Face ``PreTrainedTokenizerFast`` directory (``tokenizer.json``, ``tokenizer_config.json``) that
``AutoTokenizer.from_pretrained(DIR)`` loads offline. ``<|endoftext|>`` separates documents and serves as BOS/EOS
(GPT-2 style: nothing is added automatically); ``<|pad|>`` pads.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def iter_texts(jsonl_gz: Path) -> Iterator[str]:
    """Texts of a ``{"path", "text"}`` JSON-lines file (gzip)."""
    with gzip.open(jsonl_gz, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def train_byte_level_bpe(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (the GPT-2 / Llama-3 family of tokenizers) with the two special tokens first."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_as_hf_tokenizer(tok: Tokenizer, out_dir: Path, model_max_length: int) -> None:
    """Wrap in ``PreTrainedTokenizerFast`` and save (tokenizer.json + tokenizer_config.json)."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=None,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        padding_side="left",  # decoder-only generation pads on the left
        clean_up_tokenization_spaces=False,
    )
    hf.save_pretrained(str(out_dir))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=Path, required=True, help="train.jsonl.gz from build_corpus")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--model-max-length", type=int, default=512)
    args = ap.parse_args()
    tok = train_byte_level_bpe(iter_texts(args.train), args.vocab_size)
    args.out.mkdir(parents=True, exist_ok=True)
    save_as_hf_tokenizer(tok, args.out, args.model_max_length)
    print(f"vocab {tok.get_vocab_size()} -> {args.out}")


if __name__ == "__main__":
    main()
