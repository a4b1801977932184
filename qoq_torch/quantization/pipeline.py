"""prepare_qoq: the QoQ algorithm end to end on a Hugging Face decoder model."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .architecture import (
    DecoderLayerView,
    base_model,
    check_finite_weights,
    check_group_size,
    check_lm_head_quantizable,
    check_supported,
    decoder_layers,
    module_names,
)
from .calibration import capture_layer_inputs, resolve_calibration_tokens
from .config import QoQConfig
from .fake_quant import QuantizedWeight, quantize_weight
from .layer_statistics import run_layer_with_statistics, sample_token_rows, tokens_per_batch
from .reorder_clip import fold_mlp_reorder, salience_order, search_clip_ratios
from .rotation import fold_norms, rotate_residual, rotation_matrix
from .smoothing import (
    fold_output_smoothing,
    fold_smooth_attention,
    o_proj_group_index,
    search_output_smoothing,
    smooth_attention_scales,
)


def _quantize_linear(linear: nn.Linear, x: torch.Tensor | None, config: QoQConfig) -> QuantizedWeight:
    ratio: float | torch.Tensor = 1.0
    if config.clip_search:
        ratio = search_clip_ratios(linear.weight, x, config.group_size, config.clip_min_ratio, config.clip_steps)
    return quantize_weight(linear.weight, config.group_size, ratio)


def _smooth_consumer_input(producer: nn.Linear, consumer: nn.Linear, x: torch.Tensor, absmax: torch.Tensor,
                           group_index: torch.Tensor, config: QoQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth the consumer's input channels (folded into the producer); returns the smoothed (x, absmax)."""
    scales = search_output_smoothing(x, absmax, consumer.weight, group_index, config.group_size,
                                     config.smooth_output_alpha)
    if scales is None:
        return x, absmax
    fold_output_smoothing(producer, consumer, scales, group_index)
    s_cols = scales[group_index]
    return x / s_cols, absmax / s_cols


@torch.no_grad()
def _calibrated_layer(view: DecoderLayerView, stats: Any, config: QoQConfig) -> dict[str, QuantizedWeight]:
    """Apply SmoothAttention, output smoothing and reordering to one layer, then quantize its linears."""
    x = stats.finish()
    if config.smooth_attention and config.quantize_kv:
        lam = smooth_attention_scales(stats.k_absmax, config.smooth_attention_alpha, view.k_norm is not None)
        fold_smooth_attention(view, lam)
    o_x, o_absmax = x["o_x"], stats.o_absmax
    down_x, down_absmax = x["down_x"], stats.down_absmax
    if config.smooth_output:
        o_x, o_absmax = _smooth_consumer_input(view.v_proj, view.o_proj, o_x, o_absmax,
                                               o_proj_group_index(view, o_x.device), config)
        down_index = torch.arange(down_x.shape[1], device=down_x.device)
        down_x, down_absmax = _smooth_consumer_input(view.up_proj, view.down_proj, down_x, down_absmax,
                                                     down_index, config)
    if config.reorder and config.group_size != -1:  # order within a row only matters for groups
        perm = salience_order(down_absmax)
        fold_mlp_reorder(view, perm)
        down_x = down_x[:, perm]
    inputs = {"q_proj": x["attn_x"], "k_proj": x["attn_x"], "v_proj": x["attn_x"], "o_proj": o_x,
              "gate_proj": x["mlp_x"], "up_proj": x["mlp_x"], "down_proj": down_x}
    return {short: _quantize_linear(lin, inputs[short], config) for short, lin in view.linears().items()}


def _quantize_lm_head(model: nn.Module, x: torch.Tensor | None, config: QoQConfig, progress: bool) -> QuantizedWeight:
    with tqdm(total=1, desc="QoQ lm_head", unit="linear", disable=not progress) as bar:
        weight = _quantize_linear(model.lm_head, x, config)
        bar.update()
    return weight


@torch.no_grad()
def lm_head_inputs(model: nn.Module, hidden: list[torch.Tensor], max_tokens: int,
                   generator: torch.Generator) -> torch.Tensor:
    """float32 ``[T, H]`` on lm_head's device: the final norm applied to up to ``max_tokens`` tokens sampled from
    the last decoder layer's outputs ``hidden`` (one ``[b, s, H]`` tensor per calibration batch)."""
    norm = base_model(model).norm
    device = model.lm_head.weight.device
    per_batch = tokens_per_batch(max_tokens, len(hidden))
    rows = []
    for h in hidden:
        flat = h.reshape(-1, h.shape[-1])
        pick = sample_token_rows(flat.shape[0], per_batch, generator)
        rows.append(norm(flat[pick.to(flat.device)].to(norm.weight.device)).float().to(device))
    return torch.cat(rows)


@torch.no_grad()
def prepare_qoq(
    model: nn.Module,
    config: QoQConfig | None = None,
    tokenizer: Any = None,
    calib_data: torch.Tensor | list[str] | None = None,
    progress: bool = True,
) -> dict[str, QuantizedWeight]:
    """Transform ``model`` in place with QoQ and return the quantized weights of every decoder-layer linear.

    model: LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM, on any device/dtype.
    calib_data: int64 token ids ``[n, seq]`` or a list of texts (needs ``tokenizer``); with a tokenizer and no
    data the shipped corpus is used; with neither the algorithm runs data-free (norm folding, rotation and a
    weight-error clipping search only).

    After the call the float model computes the same function as before (up to float rounding): every
    decoder-layer RMSNorm weight is ones, the residual stream is rotated, SmoothAttention sits in q/k_proj (or
    q_norm/k_norm), o_proj/down_proj inputs are smoothed into v_proj/up_proj and down_proj inputs reordered.
    Returns ``{"model.layers.<i>.<self_attn|mlp>.<proj>": PerGroupWeight | PerChannelWeight}`` (group_size -1
    gives PerChannelWeight), quantized from the transformed float weights; biases stay in the modules. With
    ``config.quantize_lm_head`` it also holds ``"lm_head"`` (clipping searched on the final norm's output).
    """
    config = QoQConfig() if config is None else config
    if not isinstance(config, QoQConfig):
        raise TypeError(f"config must be a QoQConfig, got {type(config).__name__}")
    config.validate()
    check_supported(model)
    check_finite_weights(model)
    check_group_size(model, config.group_size)
    if config.quantize_lm_head:
        check_lm_head_quantizable(model, config.group_size)
    tokens = resolve_calibration_tokens(calib_data, tokenizer, config.num_samples, config.seq_len, config.seed)
    vocab = model.get_input_embeddings().num_embeddings
    if tokens is not None and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        # checked before the model is transformed in place: a failed call must leave it as it was
        raise ValueError(f"calib_data token ids must lie in [0, {vocab}) (the model's vocabulary), got "
                         f"[{int(tokens.min())}, {int(tokens.max())}]")

    fold_norms(model)
    if config.rotation:
        rotate_residual(model, rotation_matrix(model.config.hidden_size, config.rotation_kind, config.seed))

    names = module_names(model)
    views = decoder_layers(model)
    weights: dict[str, QuantizedWeight] = {}
    bar = tqdm(views, desc="QoQ", unit="layer", disable=not progress)
    if tokens is None:
        for view in bar:
            for lin in view.linears().values():
                weights[names[id(lin)]] = _quantize_linear(lin, None, config)
        if config.quantize_lm_head:
            weights["lm_head"] = _quantize_lm_head(model, None, config, progress)
        return weights

    inputs = capture_layer_inputs(model, tokens, config.calib_batch_size)
    for j, h in enumerate(inputs.hidden):
        if not bool(torch.isfinite(h).all()):
            raise ValueError(f"non-finite embeddings (inf or nan) for calibration batch {j}")
    generator = torch.Generator().manual_seed(config.seed)
    for view in bar:
        stats = run_layer_with_statistics(
            view, inputs.hidden, [kw[view.index] for kw in inputs.layer_kwargs], config.max_search_tokens,
            generator, names[id(view.layer)],
        )
        for short, qweight in _calibrated_layer(view, stats, config).items():
            weights[names[id(getattr(view, short))]] = qweight
        del stats
    if config.quantize_lm_head:
        x_head = lm_head_inputs(model, inputs.hidden, config.max_search_tokens, generator)
        weights["lm_head"] = _quantize_lm_head(model, x_head, config, progress)
    return weights


def rtn_weights(model: nn.Module, group_size: int = 128) -> dict[str, QuantizedWeight]:
    """Plain round-to-nearest baseline: every decoder-layer linear quantized as is, the model untouched."""
    check_supported(model)
    check_group_size(model, group_size)
    names = module_names(model)
    return {
        names[id(lin)]: quantize_weight(lin.weight, group_size)
        for view in decoder_layers(model) for lin in view.linears().values()
    }


__all__ = ["prepare_qoq", "rtn_weights"]
