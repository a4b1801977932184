"""RMSNorm folding and the orthogonal rotation of the residual stream, folded into the weights.

Convention: a linear computes ``y = x W^T`` with ``W [N, K]`` and row-vector activations. Rotating the
residual stream ``h -> h Q`` (``Q`` orthogonal ``[H, H]``) is exact when every reader of the residual sees
``W Q`` (q/k/v/gate/up/lm_head, after their RMSNorm weight was folded in, because RMSNorm without weight
commutes with an orthogonal map) and every writer produces ``Q^T``-rotated weights (``Q^T W`` for o/down,
``E Q`` for the embeddings).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .architecture import base_model, decoder_layers

_ROW_CHUNK = 8192  # rows of an embedding/lm_head matrix rotated at once (bounds float64 temporaries)


def _set_weight(module: nn.Module, value: torch.Tensor) -> None:
    module.weight.data = value.to(dtype=module.weight.dtype, device=module.weight.device).contiguous()


def _scale_columns(linear: nn.Linear, scale: torch.Tensor) -> None:
    _set_weight(linear, linear.weight.double() * scale.double().to(linear.weight.device).unsqueeze(0))


def _untie_lm_head(model: nn.Module) -> None:
    """Give lm_head its own weight (the folds make it differ from the embeddings)."""
    head = model.lm_head
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text_config = getattr(model.config, "get_text_config", lambda: None)()
    if text_config is not None:
        text_config.tie_word_embeddings = False


def lm_head_is_tied(model: nn.Module) -> bool:
    return model.lm_head.weight is base_model(model).embed_tokens.weight


@torch.no_grad()
def fold_norms(model: nn.Module) -> None:
    """Fold every RMSNorm weight on the residual stream into the linears that read it; the norms become ones.

    input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, the final norm -> lm_head (untied from
    the embeddings first when the final norm is not already ones).
    """
    for view in decoder_layers(model):
        for norm, readers in (
            (view.input_layernorm, (view.q_proj, view.k_proj, view.v_proj)),
            (view.post_attention_layernorm, (view.gate_proj, view.up_proj)),
        ):
            for lin in readers:
                _scale_columns(lin, norm.weight)
            norm.weight.data.fill_(1.0)
    final = base_model(model).norm
    if bool((final.weight == 1).all()):
        return
    if lm_head_is_tied(model):
        _untie_lm_head(model)
    _scale_columns(model.lm_head, final.weight)
    final.weight.data.fill_(1.0)


def _sylvester_hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal ``[n, n]`` float64 matrix (QR of a Gaussian, signs fixed)."""
    a = torch.randn(n, n, dtype=torch.float64, generator=generator)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def rotation_matrix(n: int, kind: str, seed: int) -> torch.Tensor:
    """Orthogonal ``[n, n]`` float64 matrix on CPU.

    "hadamard": ``diag(random ±1) · (H_{2^a} ⊗ R_m) / sqrt(2^a)`` where ``n = 2^a · m`` with ``m`` odd and
    ``R_m`` random orthogonal (``m = 1`` for power-of-two sizes, giving a pure randomized Hadamard matrix).
    "random": a random orthogonal matrix.
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return random_orthogonal(n, g)
    if kind != "hadamard":
        raise ValueError(f"unknown rotation kind {kind!r}")
    power = n & (-n)  # largest power of two dividing n
    m = n // power
    q = _sylvester_hadamard(power) / math.sqrt(power)
    if m > 1:
        q = torch.kron(q.contiguous(), random_orthogonal(m, g).contiguous())
    signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
    return signs.unsqueeze(1) * q


def _rotate_rows_right(weight: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``weight @ q`` row chunk by row chunk, in float64, back in weight's dtype."""
    out = torch.empty_like(weight)
    for start in range(0, weight.shape[0], _ROW_CHUNK):
        out[start:start + _ROW_CHUNK] = (weight[start:start + _ROW_CHUNK].double() @ q).to(weight.dtype)
    return out


@torch.no_grad()
def rotate_residual(model: nn.Module, q: torch.Tensor) -> None:
    """Rotate the residual stream by the orthogonal ``q [H, H]``; the norms must already be folded."""
    embed = base_model(model).embed_tokens
    device = embed.weight.device
    q = q.to(device=device, dtype=torch.float64)
    embed.weight.data = _rotate_rows_right(embed.weight.data, q)
    if not lm_head_is_tied(model):  # a tied head was rotated with the embeddings
        model.lm_head.weight.data = _rotate_rows_right(model.lm_head.weight.data, q.to(model.lm_head.weight.device))
    for view in decoder_layers(model):
        qd = q.to(view.q_proj.weight.device)
        for lin in (view.q_proj, view.k_proj, view.v_proj, view.gate_proj, view.up_proj):
            _set_weight(lin, lin.weight.double() @ qd)
        for lin in (view.o_proj, view.down_proj):
            _set_weight(lin, qd.t() @ lin.weight.double())
            if lin.bias is not None:
                lin.bias.data = (qd.t() @ lin.bias.double()).to(lin.bias.dtype)
