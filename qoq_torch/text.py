"""Text to token ids for calibration and evaluation, which cut long texts into windows themselves."""
from __future__ import annotations

from typing import Any

import torch


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added and no truncation.

    ``tokenizer`` is a Hugging Face tokenizer or any callable returning ``{"input_ids": ids}`` (a list or a
    tensor). A Hugging Face tokenizer is called with ``verbose=False``: the callers cut the ids into blocks of the
    model's context themselves, so its warning about a text longer than ``model_max_length`` would be wrong.
    """
    kwargs: dict[str, Any] = {"add_special_tokens": False}
    if _is_hf_tokenizer(tokenizer):
        kwargs["verbose"] = False
    ids = tokenizer(text, **kwargs)["input_ids"]
    if isinstance(ids, torch.Tensor):
        return ids.reshape(-1).tolist()
    return list(ids)


def _is_hf_tokenizer(tokenizer: Any) -> bool:
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(tokenizer, PreTrainedTokenizerBase)
