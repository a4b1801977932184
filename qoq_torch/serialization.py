"""Save and load quantized models: safetensors tensors + ``qoq_config.json`` + the Hugging Face ``config.json``.

Loading builds the model skeleton from the HF config with its parameters on the meta device (no float weights are
materialised), swaps in empty QoQ modules of the recorded layout, then assigns the stored tensors.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .api import QOQ_CONFIG_ATTR, finish_patching, is_quantized
from .models import patch_model, spec_for
from .nn.linear import COMPUTE_DTYPES
from .quantization.config import QoQConfig

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
QOQ_CONFIG_NAME = "qoq_config.json"
HF_CONFIG_NAME = "config.json"


def _shared_tensor_aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{alias: source}`` for entries sharing storage with an earlier entry (tied embeddings)."""
    seen: dict[tuple, str] = {}
    aliases = {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
    return aliases


def save_quantized(model: nn.Module, path: str | os.PathLike, tokenizer=None) -> Path:
    """Write a quantized model (and optionally its tokenizer) to directory ``path``; returns the path."""
    if not is_quantized(model):
        raise ValueError("save_quantized expects a model quantized with qoq_torch.quantize()")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items()}
    aliases = _shared_tensor_aliases(state)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items() if k not in aliases}
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt", "qoq_format_version": str(FORMAT_VERSION)})
    config: QoQConfig = getattr(model, QOQ_CONFIG_ATTR)
    meta = {
        "format_version": FORMAT_VERSION,
        "architecture": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "qoq_config": config.to_dict(),
        "tied_tensors": aliases,
    }
    (path / QOQ_CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    model.config.save_pretrained(str(path))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def _read_meta(path: Path) -> dict:
    for name in (QOQ_CONFIG_NAME, HF_CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a QoQ checkpoint: {name} is missing (write one with "
                                    "qoq_torch.save_quantized)")
    try:
        meta = json.loads((path / QOQ_CONFIG_NAME).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"corrupt {path / QOQ_CONFIG_NAME}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path / QOQ_CONFIG_NAME} has format_version {meta.get('format_version')!r} "
                         f"(expected {FORMAT_VERSION}); re-save it with this version of qoq_torch")
    return meta


def _check_device(device: torch.device) -> None:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("load_quantized(device='cuda') but no CUDA GPU is visible; use device='cpu'")


def _build_skeleton(path: Path, meta: dict, dtype: torch.dtype) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.from_pretrained(str(path))
    except (ValueError, TypeError, OSError) as exc:
        raise ValueError(f"invalid {path / HF_CONFIG_NAME}: {exc}") from exc
    if "lm_head.weight" not in meta["tied_tensors"]:
        hf_config.tie_word_embeddings = False
    with init_empty_weights():  # parameters on meta; buffers (rotary inv_freq) stay real
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    if type(model).__name__ != meta["architecture"]:
        raise ValueError(f"config.json builds {type(model).__name__} but the checkpoint was saved from "
                         f"{meta['architecture']}")
    spec_for(model)
    return model


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a model written by ``save_quantized`` on ``device`` (compute dtype ``dtype``, default: as saved)."""
    path = Path(path)
    device = torch.device(device)
    _check_device(device)
    meta = _read_meta(path)
    saved_dtype = getattr(torch, meta["dtype"])
    dtype = saved_dtype if dtype is None else dtype
    if dtype not in COMPUTE_DTYPES:
        raise TypeError(f"QoQ models run in float16 or bfloat16, got dtype={dtype}")
    config = QoQConfig.from_dict(meta["qoq_config"])
    model = _build_skeleton(path, meta, dtype)
    patch_model(model, None, config.group_size, quantize_lm_head=config.quantize_lm_head)
    try:
        tensors = load_file(str(path / WEIGHTS_NAME), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"corrupt weights file {path / WEIGHTS_NAME}: {exc}") from exc
    for alias, source in meta["tied_tensors"].items():
        if source in tensors:
            tensors[alias] = tensors[source]
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match its config: missing tensors {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected tensors {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    own = model.state_dict()
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(own[name].shape):
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(t.shape)}, the model expects "
                             f"{tuple(own[name].shape)}")
        if t.is_floating_point() and own[name].is_floating_point():
            tensors[name] = t.to(own[name].dtype)  # the compute dtype; float16 scales stay float16
        elif t.dtype != own[name].dtype:
            raise ValueError(f"checkpoint tensor {name} is {t.dtype}, the model expects {own[name].dtype}")
    model.load_state_dict(tensors, strict=True, assign=True)
    model.to(device=device)
    if "lm_head.weight" in meta["tied_tensors"]:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    finish_patching(model, config)
    return model
