"""Calibration data: the shipped corpus, tokenization into fixed-length blocks, and the decoder-layer inputs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..data import load_calibration_documents
from ..text import encode_text
from .architecture import base_model

def tokenize_blocks(texts: Sequence[str], tokenizer: Any, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """int64 ``[n, seq_len]`` blocks of the concatenated tokenized texts, ``n = min(num_samples, available)``.

    The texts are joined with blank lines, tokenized once and cut into non-overlapping blocks; when there are
    more blocks than ``num_samples``, a seeded random subset is taken (in corpus order).
    """
    if tokenizer is None:
        raise ValueError("calib_data given as texts needs a tokenizer")
    ids = torch.tensor(encode_text(tokenizer, "\n\n".join(texts)), dtype=torch.long)
    n_blocks = ids.numel() // seq_len
    if n_blocks == 0:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    blocks = ids[: n_blocks * seq_len].view(n_blocks, seq_len)
    if n_blocks > num_samples:
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(n_blocks, generator=g)[:num_samples].sort().values
        blocks = blocks[keep]
    return blocks.long()


def resolve_calibration_tokens(calib_data: Any, tokenizer: Any, num_samples: int, seq_len: int,
                               seed: int) -> torch.Tensor | None:
    """Token ids ``[n, seq]`` to calibrate on, or None for data-free quantization."""
    if calib_data is None:
        if tokenizer is None:
            return None
        return tokenize_blocks(load_calibration_documents(), tokenizer, num_samples, seq_len, seed)
    if isinstance(calib_data, torch.Tensor):
        if calib_data.dim() != 2 or calib_data.dtype not in (torch.int64, torch.int32) or calib_data.numel() == 0:
            raise ValueError(
                f"calib_data tensor must be non-empty integer token ids [n, seq], got {calib_data.dtype} "
                f"{tuple(calib_data.shape)}"
            )
        return calib_data.long()
    if isinstance(calib_data, str) or not all(isinstance(t, str) for t in calib_data):
        raise ValueError("calib_data must be a LongTensor [n, seq] of token ids or a list of strings")
    return tokenize_blocks(list(calib_data), tokenizer, num_samples, seq_len, seed)


@dataclass
class LayerInputs:
    """Hidden states entering the current decoder layer, one tensor per calibration batch, with the keyword
    arguments the model passes to each layer for that batch (masks, position embeddings)."""

    hidden: list[torch.Tensor]  # [b, seq, H] in the model's dtype, one per batch
    layer_kwargs: list[list[dict[str, Any]]]  # [batch][layer] -> kwargs


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records its kwargs (and layer 0's input), passes hidden states on."""

    def __init__(self, index: int, sink: dict[int, Any]):
        super().__init__()
        self.index, self.sink = index, sink

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise RuntimeError("decoder layers are expected to receive keyword arguments only")
        if self.index == 0:
            self.sink["hidden"] = hidden_states
        self.sink[self.index] = kwargs
        return hidden_states


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, tokens: torch.Tensor, batch_size: int) -> LayerInputs:
    """Run the embeddings and mask/RoPE preparation of ``model`` on ``tokens [n, seq]`` with every decoder layer
    replaced by a recorder, so that no layer computes; returns the first layer's inputs and every layer's kwargs."""
    base = base_model(model)
    device = base.embed_tokens.weight.device
    layers = base.layers
    originals = list(layers)
    hidden, kwargs = [], []
    try:
        for start in range(0, tokens.shape[0], batch_size):
            sink: dict[int, Any] = {}
            for i in range(len(originals)):
                layers[i] = _Recorder(i, sink)
            base(input_ids=tokens[start:start + batch_size].to(device), use_cache=False)
            hidden.append(sink["hidden"])
            kwargs.append([sink[i] for i in range(len(originals))])
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return LayerInputs(hidden=hidden, layer_kwargs=kwargs)
