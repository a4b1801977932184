"""SmoothAttention and the smoothing of o_proj / down_proj inputs, each folded into the float weights.

Both are exact rescalings: a per-channel factor divides one side of a product and multiplies the other.
"""
from __future__ import annotations

import torch

from .architecture import DecoderLayerView
from .fake_quant import fake_quantize_tokens, fake_quantize_weight

SMOOTH_ALPHA_GRID = tuple(i / 10 for i in range(11))
_EPS = 1e-5


# ---------------------------------------------------------------------------------------- SmoothAttention
def smooth_attention_scales(k_absmax: torch.Tensor, alpha: float, shared_across_heads: bool) -> torch.Tensor:
    """λ from the post-RoPE key magnitudes ``k_absmax [H_kv, D]``: ``λ = max|K|^α`` with ``λ_j = λ_{j+D/2}``.

    RoPE rotates the pairs (j, j + D/2), so both members get one scale (their max) and the rotation
    commutes with the scaling. ``shared_across_heads`` (Qwen3's per-head q_norm/k_norm share one weight
    ``[D]``) takes the max over heads and returns ``[D]``; otherwise ``[H_kv, D]``. float32.
    """
    d = k_absmax.shape[-1]
    mag = k_absmax.float().clamp(min=_EPS)
    pair = torch.maximum(mag[..., : d // 2], mag[..., d // 2:])
    mag = torch.cat((pair, pair), dim=-1)
    if shared_across_heads:
        mag = mag.amax(dim=0)
    return mag.pow(alpha)


@torch.no_grad()
def fold_smooth_attention(view: DecoderLayerView, lam: torch.Tensor) -> None:
    """Multiply queries and divide keys by λ (``[H_kv, D]``, or ``[D]`` into q_norm/k_norm when present)."""
    if view.k_norm is not None:
        if lam.dim() != 1:
            raise ValueError("models with q_norm/k_norm need a head-shared λ of shape [D]")
        for norm, factor in ((view.q_norm, lam), (view.k_norm, 1.0 / lam)):
            norm.weight.data = (norm.weight.double() * factor.double().to(norm.weight.device)).to(norm.weight.dtype)
        return
    n_rep = view.num_heads // view.num_kv_heads
    lam_q = lam.repeat_interleave(n_rep, dim=0).reshape(-1)
    _scale_rows(view.q_proj, lam_q)
    _scale_rows(view.k_proj, 1.0 / lam.reshape(-1))


# ------------------------------------------------------------------------------------ output smoothing
def _scale_rows(linear: torch.nn.Linear, scale: torch.Tensor) -> None:
    s = scale.double().to(linear.weight.device)
    linear.weight.data = (linear.weight.double() * s.unsqueeze(1)).to(linear.weight.dtype)
    if linear.bias is not None:
        linear.bias.data = (linear.bias.double() * s).to(linear.bias.dtype)


def _scale_columns(linear: torch.nn.Linear, scale: torch.Tensor) -> None:
    s = scale.double().to(linear.weight.device)
    linear.weight.data = (linear.weight.double() * s.unsqueeze(0)).to(linear.weight.dtype)


def smoothing_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant scales ``s = max|X|^α / max|W|^(1-α)`` per channel, normalised to geometric mean 1."""
    s = x_absmax.float().clamp(min=_EPS).pow(alpha) / w_absmax.float().clamp(min=_EPS).pow(1.0 - alpha)
    s = s.clamp(min=_EPS)
    return s / torch.exp(torch.log(s).mean())


def _output_error(x: torch.Tensor, w: torch.Tensor, y_ref: torch.Tensor, group_size: int) -> float:
    y = fake_quantize_tokens(x) @ fake_quantize_weight(w, group_size).t()
    return float((y - y_ref).pow(2).sum())


@torch.no_grad()
def search_output_smoothing(
    x: torch.Tensor,
    x_absmax: torch.Tensor,
    weight: torch.Tensor,
    group_index: torch.Tensor,
    group_size: int,
    alpha: float | None,
) -> torch.Tensor | None:
    """Scales for a consumer linear's input channels, or None where not smoothing is best.

    x: float32 [T, K] sampled consumer inputs; x_absmax: float32 [K] over all calibration tokens;
    weight: [N, K] consumer weight; group_index: int64 [K], the producer channel feeding each input column
    (columns of one producer channel must share a scale, e.g. query heads reading one KV head).
    Returns float32 scales per producer channel ``[group_index.max() + 1]``. The search minimises the
    consumer's output error with per-token INT8 inputs and quantized weights; alpha=None tries
    SMOOTH_ALPHA_GRID and no smoothing, a fixed alpha is used as given.
    """
    n_src = int(group_index.max()) + 1
    wf = weight.float()
    src_x = torch.zeros(n_src, device=x.device).scatter_reduce(0, group_index, x_absmax.float(), "amax")
    src_w = torch.zeros(n_src, device=x.device).scatter_reduce(0, group_index, wf.abs().amax(0), "amax")
    if alpha is not None:
        return smoothing_scales(src_x, src_w, alpha)
    y_ref = x @ wf.t()
    best_scale, best_err = None, _output_error(x, wf, y_ref, group_size)
    for a in SMOOTH_ALPHA_GRID:
        s = smoothing_scales(src_x, src_w, a)
        s_cols = s[group_index]
        err = _output_error(x / s_cols, wf * s_cols, y_ref, group_size)
        if err < best_err:
            best_scale, best_err = s, err
    return best_scale


@torch.no_grad()
def fold_output_smoothing(producer: torch.nn.Linear, consumer: torch.nn.Linear, scales: torch.Tensor,
                          group_index: torch.Tensor) -> None:
    """Divide the producer's output channels by ``scales`` and multiply the consumer's matching columns."""
    _scale_rows(producer, 1.0 / scales)
    _scale_columns(consumer, scales[group_index])


def o_proj_group_index(view: DecoderLayerView, device: torch.device) -> torch.Tensor:
    """int64 [H * D]: the v_proj channel behind each o_proj input column (GQA repeats KV heads)."""
    n_rep = view.num_heads // view.num_kv_heads
    head = torch.arange(view.num_heads, device=device) // n_rep
    return (head.unsqueeze(1) * view.head_dim + torch.arange(view.head_dim, device=device)).reshape(-1)
