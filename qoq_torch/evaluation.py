"""Accuracy metrics for causal LMs: perplexity over fixed windows and a two-choice zero-shot scorer.

Both work with any module that maps ``input_ids [B, T] int64`` to an object with ``.logits [B, T, V]`` (Hugging
Face causal LMs, quantized or not), on CPU or CUDA. They are what ``qoq eval`` and ``examples/accuracy_report.py``
report.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .text import encode_text

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm comes with transformers
    tqdm = None


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _encode(tokenizer_or_ids, text: str | None) -> torch.Tensor:
    """Token ids ``[N] int64`` of ``text`` (no special tokens added), or the given ids flattened."""
    if isinstance(tokenizer_or_ids, torch.Tensor):
        return tokenizer_or_ids.reshape(-1).long()
    if text is None:
        raise ValueError("text is required when a tokenizer is given")
    return torch.tensor(encode_text(tokenizer_or_ids, text), dtype=torch.long)


def encode_documents(docs: Sequence[str], tokenizer) -> torch.Tensor:
    """Token ids ``[N] int64`` of the documents, each followed by the tokenizer's EOS token.

    This is how the reference model saw its training text, so held-out perplexity uses the same joining.
    """
    ids: list[int] = []
    for doc in docs:
        ids += encode_text(tokenizer, doc) + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def window_targets(num_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows that perplexity scores, as ``(begin, end, first_target)`` token offsets.

    Windows of exactly ``seq_len`` tokens start every ``stride`` tokens; a tail shorter than ``seq_len`` is
    dropped (the GPTQ/QServe WikiText convention). Each window predicts the positions ``[first_target, end)``
    that no earlier window scored, and never its own first token (it has no context), so with
    ``stride == seq_len`` every window scores ``seq_len - 1`` tokens.
    """
    if seq_len < 2 or not 1 <= stride <= seq_len:
        raise ValueError(f"need seq_len >= 2 and 1 <= stride <= seq_len, got seq_len={seq_len}, stride={stride}")
    windows, scored_until = [], 0
    for begin in range(0, num_tokens - seq_len + 1, stride):
        end = begin + seq_len
        windows.append((begin, end, max(begin + 1, scored_until)))
        scored_until = end
    return windows


@torch.no_grad()
def negative_log_likelihood(
    model: torch.nn.Module,
    tokenizer_or_ids,
    text: str | None = None,
    seq_len: int = 2048,
    stride: int | None = None,
    batch_size: int = 1,
    max_windows: int | None = None,
    progress: bool = True,
) -> tuple[float, int]:
    """Summed next-token NLL (nats, accumulated in float64) and the number of scored tokens.

    Args:
        model: causal LM; called as ``model(input_ids=ids[B, seq_len]).logits`` on its own device.
        tokenizer_or_ids: a tokenizer (then ``text`` is encoded without special tokens) or ``[N]`` int ids.
        seq_len: window length in tokens. stride: distance between window starts (default ``seq_len``:
            non-overlapping windows; smaller values give each scored token more context).
        batch_size: windows per forward pass. max_windows: score only the first windows (quick checks).
    """
    ids = _encode(tokenizer_or_ids, text)
    windows = window_targets(ids.numel(), seq_len, stride or seq_len)[:max_windows]
    if not windows:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    device = _model_device(model)
    total_nll, total_count = 0.0, 0
    batches = range(0, len(windows), batch_size)
    if progress and tqdm is not None:
        batches = tqdm(batches, desc="perplexity", unit="batch", leave=False)
    for first in batches:
        chunk = windows[first:first + batch_size]
        input_ids = torch.stack([ids[b:e] for b, e, _ in chunk]).to(device)
        logits = model(input_ids=input_ids, use_cache=False).logits
        for row, (begin, _, first_target) in enumerate(chunk):
            # logits at position p predict token p + 1 of the window.
            pred = logits[row, first_target - begin - 1:-1].float()
            target = input_ids[row, first_target - begin:]
            total_nll += F.cross_entropy(pred, target, reduction="sum").double().item()
            total_count += target.numel()
    return total_nll, total_count


def perplexity(
    model: torch.nn.Module,
    tokenizer_or_ids,
    text: str | None = None,
    seq_len: int = 2048,
    stride: int | None = None,
    batch_size: int = 1,
    max_windows: int | None = None,
    progress: bool = True,
) -> float:
    """Perplexity ``exp(mean NLL)`` of ``text`` over windows of ``seq_len`` tokens (see ``negative_log_likelihood``).

    Example: ``perplexity(model, tokenizer, qoq_torch.data.load_eval_text(), seq_len=512)``.
    """
    nll, count = negative_log_likelihood(model, tokenizer_or_ids, text, seq_len, stride, batch_size,
                                         max_windows, progress)
    return math.exp(nll / count)


@dataclass(frozen=True)
class ChoiceItem:
    """A context and candidate continuations; ``answer`` indexes the true one."""

    context: str
    choices: tuple[str, ...]
    answer: int


@torch.no_grad()
def continuation_logprob(model: torch.nn.Module, tokenizer, context: str, continuation: str) -> float:
    """Log-probability (nats) of ``continuation``'s tokens after ``context``.

    The two strings are tokenized separately and concatenated, so every choice of an item is scored on the same
    context tokens.
    """
    ctx = encode_text(tokenizer, context)
    cont = encode_text(tokenizer, continuation)
    if not ctx or not cont:
        raise ValueError("context and continuation must each encode to at least one token")
    ids = torch.tensor([ctx + cont], dtype=torch.long, device=_model_device(model))
    logprobs = model(input_ids=ids, use_cache=False).logits[0, len(ctx) - 1:-1].float().log_softmax(-1)
    return logprobs.gather(-1, ids[0, len(ctx):, None]).sum().item()


def choice_accuracy(model: torch.nn.Module, tokenizer, items: Sequence[ChoiceItem], progress: bool = True) -> float:
    """Fraction of items whose true continuation has the highest log-likelihood (zero-shot, no normalisation)."""
    iterator = items
    if progress and tqdm is not None:
        iterator = tqdm(items, desc="zero-shot", unit="item", leave=False)
    correct = 0
    for item in iterator:
        scores = [continuation_logprob(model, tokenizer, item.context, c) for c in item.choices]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == item.answer)
    return correct / len(items)


def sentence_completion_items(texts: Sequence[str], n: int, seed: int = 0, min_words: int = 12) -> list[ChoiceItem]:
    """A two-choice completion task built from held-out prose.

    Each item is the first half of a sentence; the true choice is its second half and the distractor the second
    half of another sentence of similar length. Deterministic for a given ``seed``.
    """
    sentences = [s.split() for t in texts for s in re.split(r"(?<=[.!?])\s+", t)]
    sentences = [s for s in sentences if len(s) >= min_words]
    if len(sentences) < 2:
        raise ValueError("need at least two sentences of min_words words")
    rng = random.Random(seed)
    picked = rng.sample(range(len(sentences)), min(n, len(sentences)))
    items = []
    for idx in picked:
        words = sentences[idx]
        cut = len(words) // 2
        other = sentences[rng.choice([j for j in range(max(0, idx - 50), min(len(sentences), idx + 50)) if j != idx])]
        true_end = " " + " ".join(words[cut:])
        false_end = " " + " ".join(other[len(other) // 2:])
        answer = rng.randrange(2)
        choices = (true_end, false_end) if answer == 0 else (false_end, true_end)
        items.append(ChoiceItem(" ".join(words[:cut]), choices, answer))
    return items
