"""QoQMLP: the decoder's post-attention RMSNorm + SwiGLU MLP with W4A8 GEMMs."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .linear import QoQLinear, check_compute_dtype


class QoQMLP(nn.Module):
    """``down(silu(gate(n(x))) * up(n(x)))`` with ``n`` the fused RMSNorm.

    ``gate_up_proj`` is one W4A8 GEMM with N = 2I (gate rows first), ``silu_mul_quantize`` produces the INT8
    input of ``down_proj`` directly. forward(x [..., hidden]) -> [..., hidden]; ``x`` is the residual stream (the
    decoder's ``post_attention_layernorm`` is fused here and replaced by an identity).

    More than ``max_rows_per_pass`` tokens (a batched prefill) go through in row chunks: every op is row-wise,
    so the result is the same, and the [tokens, 2I] intermediate (57 KB a token for Llama-3-8B) never exists for
    the whole prefill at once; the largest batch ``generate`` can prefill grows accordingly.
    """

    max_rows_per_pass: int = 16384

    def __init__(self, gate_up_proj: QoQLinear, down_proj: QoQLinear, norm_weight: torch.Tensor,
                 norm_eps: float) -> None:
        super().__init__()
        if gate_up_proj.out_features != 2 * down_proj.in_features:
            raise ValueError(f"gate_up_proj has {gate_up_proj.out_features} outputs, expected 2 x "
                             f"{down_proj.in_features} (down_proj's in_features)")
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj
        self.hidden_size = gate_up_proj.in_features
        self.intermediate_size = down_proj.in_features
        self.norm_weight = nn.Parameter(norm_weight.detach().clone(), requires_grad=False)
        self.norm_eps = float(norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., hidden]`` -> ``mlp(x)``; with ``residual`` (same shape): ``h + mlp(h)`` for ``h = residual + x``,
        the add fused into the norm (`add_rmsnorm_quantize`): the decoder layer's two residual adds around the MLP."""
        out_dtype = check_compute_dtype(x, "QoQMLP")
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.hidden_size).contiguous()
        if residual is not None and rows.shape[0] <= self.max_rows_per_pass:
            h, x_q, x_s, x_sum = ops.add_rmsnorm_quantize(rows, residual.reshape(rows.shape).contiguous(),
                                                          self.norm_weight, self.norm_eps)
            return self._quantized_rows(x_q, x_s, x_sum, out_dtype, residual=h).view(*lead, self.hidden_size)
        if residual is not None:  # a long prefill: the plain add, then the row chunks below
            h = residual + x
            return h + self.forward(h)
        if rows.shape[0] <= self.max_rows_per_pass:
            return self._rows(rows, out_dtype).view(*lead, self.hidden_size)
        out = torch.empty(rows.shape, dtype=out_dtype, device=rows.device)
        for start in range(0, rows.shape[0], self.max_rows_per_pass):
            stop = start + self.max_rows_per_pass
            out[start:stop] = self._rows(rows[start:stop], out_dtype)
        return out.view(*lead, self.hidden_size)

    def _rows(self, rows: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        x_q, x_s, x_sum = ops.rmsnorm_quantize(rows, self.norm_weight, self.norm_eps)
        return self._quantized_rows(x_q, x_s, x_sum, out_dtype)

    def _quantized_rows(self, x_q: torch.Tensor, x_s: torch.Tensor, x_sum: torch.Tensor, out_dtype: torch.dtype,
                        residual: torch.Tensor | None = None) -> torch.Tensor:
        """gate_up GEMM, SiLU-and-multiply with INT8 quantization, down GEMM: ``[M, hidden]`` in ``out_dtype``
        (plus ``residual``, added in the down GEMM's epilogue)."""
        gate_up = self.gate_up_proj.gemm(x_q, x_s, x_sum, out_dtype)
        del x_q
        h_q, h_s, h_sum = ops.silu_mul_quantize(gate_up)
        del gate_up
        return self.down_proj.gemm(h_q, h_s, h_sum, out_dtype, residual)


class FusedNorm(nn.Identity):
    """Stands where a decoder RMSNorm was: its weight now lives in the QoQ module that follows (``fused_into``)."""

    def __init__(self, fused_into: str) -> None:
        super().__init__()
        self.fused_into = fused_into

    def extra_repr(self) -> str:
        return f"fused into {self.fused_into}"
