"""Text and the reference model that ship with qoq_torch (no network needed).

The corpus is plain prose extracted from the Python 3.11 documentation as packaged by Debian
(``python3.11-doc``, PSF licence; see ``corpus/COPYRIGHT.debian-python3.11-doc``). Whole documents are split
three ways (``build_corpus``): ``eval`` (held-out perplexity), ``calib`` (calibration of ``quantize()``) and
``train`` (not shipped). The reference model is a small Llama trained on the train split
(``examples/train_reference_model.py``; docs/reference_model.md).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

_DATA_DIR = Path(__file__).resolve().parent
_CORPUS_DIR = _DATA_DIR / "corpus"


def _load_documents(split: str) -> list[str]:
    with gzip.open(_CORPUS_DIR / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def load_calibration_texts(n: int | None = None) -> list[str]:
    """Calibration texts: the paragraphs of the calib split, in a fixed order.

    Args:
        n: how many texts to return (``None``: all, about 1,500 paragraphs / 240k characters).
    Returns:
        ``list[str]``, each one paragraph (a few sentences) of documents used neither for training nor eval.
    """
    paragraphs = [p for doc in _load_documents("calib") for p in doc.split("\n") if p.strip()]
    return paragraphs if n is None else paragraphs[:n]


def load_calibration_documents() -> list[str]:
    """The calib split as whole documents (for calibration on long sequences)."""
    return _load_documents("calib")


def load_eval_documents() -> list[str]:
    """The held-out eval split as whole documents (33 documents, ~540k characters)."""
    return _load_documents("eval")


def load_eval_text() -> str:
    """The held-out eval split as one string, documents separated by a blank line (for perplexity)."""
    return "\n\n".join(load_eval_documents())


def reference_model_path() -> Path:
    """Directory of the shipped reference model (HF checkpoint: config, float16 safetensors, tokenizer)."""
    return _DATA_DIR / "reference_model"


__all__ = [
    "load_calibration_texts",
    "load_calibration_documents",
    "load_eval_documents",
    "load_eval_text",
    "reference_model_path",
]
