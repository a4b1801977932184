"""Activation-aware channel reordering of down_proj's inputs, and the per-channel weight clipping search."""
from __future__ import annotations

import torch

from .architecture import DecoderLayerView
from .fake_quant import fake_quantize_weight

_ERROR_CHUNK_ROWS = 4096  # output channels whose error is evaluated at once (bounds a [T, rows] temporary)
_SEARCH_BLOCK_ROWS = 32768  # output channels searched at once (bounds the float32 weight copies)


# ------------------------------------------------------------------------------------------- reordering
def salience_order(x_absmax: torch.Tensor) -> torch.Tensor:
    """int64 permutation sorting channels by decreasing activation magnitude, so that channels of like
    salience share a weight group (their group's scale then fits them instead of one outlier)."""
    return torch.argsort(x_absmax.float(), descending=True, stable=True)


@torch.no_grad()
def fold_mlp_reorder(view: DecoderLayerView, perm: torch.Tensor) -> None:
    """Permute the intermediate channels: gate/up output rows and down_proj input columns (exact)."""
    for lin in (view.gate_proj, view.up_proj):
        p = perm.to(lin.weight.device)
        lin.weight.data = lin.weight.data[p].contiguous()
        if lin.bias is not None:
            lin.bias.data = lin.bias.data[p].contiguous()
    down = view.down_proj
    down.weight.data = down.weight.data[:, perm.to(down.weight.device)].contiguous()


# ---------------------------------------------------------------------------------------------- clipping
def clip_ratio_grid(min_ratio: float, steps: int) -> list[float]:
    if steps == 1:
        return [1.0]
    return [1.0 - (1.0 - min_ratio) * i / (steps - 1) for i in range(steps)]


@torch.no_grad()
def search_clip_ratios(
    weight: torch.Tensor, x: torch.Tensor | None, group_size: int, min_ratio: float, steps: int
) -> torch.Tensor:
    """Per-output-channel clip ratio (float32 ``[N]``) minimising that channel's quantization error.

    weight: float [N, K]; x: float32 [T, K] sampled inputs (the error is ``Σ_t (x_t · Δw_n)²``), or None for
    the data-free weight error ``Σ_k Δw_nk²``. Each row's quantization depends only on its own ratio, so rows
    are chosen independently (and searched in blocks, which bounds the float32 copies of a large lm_head).
    Ratio 1.0 (no clipping) is always a candidate.
    """
    n = weight.shape[0]
    return torch.cat([_search_rows(weight[r:r + _SEARCH_BLOCK_ROWS], x, group_size, min_ratio, steps)
                      for r in range(0, n, _SEARCH_BLOCK_ROWS)])


def _search_rows(weight: torch.Tensor, x: torch.Tensor | None, group_size: int, min_ratio: float,
                 steps: int) -> torch.Tensor:
    wf = weight.float()
    n = wf.shape[0]
    best_err = torch.full((n,), float("inf"), device=wf.device)
    best_ratio = torch.ones(n, device=wf.device)
    for ratio in clip_ratio_grid(min_ratio, steps):
        delta = wf - fake_quantize_weight(wf, group_size, ratio).to(wf.device)
        if x is None:
            err = delta.pow(2).sum(dim=1)
        else:
            err = torch.cat([
                (x @ delta[r:r + _ERROR_CHUNK_ROWS].t()).pow(2).sum(dim=0) for r in range(0, n, _ERROR_CHUNK_ROWS)
            ])
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio
