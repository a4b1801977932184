"""QoQLinear: a drop-in for nn.Linear with W4 weights and per-token A8 activations."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..ops import PerChannelWeight, PerGroupWeight

QuantizedWeight = PerGroupWeight | PerChannelWeight
COMPUTE_DTYPES = (torch.float16, torch.bfloat16)


def check_compute_dtype(x: torch.Tensor, where: str) -> torch.dtype:
    """The output dtype of a QoQ module for input ``x``; raise a clear error for anything but fp16/bf16."""
    if x.dtype not in COMPUTE_DTYPES:
        raise TypeError(
            f"{where} computes in torch.float16 or torch.bfloat16, got input of dtype {x.dtype}; run the quantized "
            "model in float16/bfloat16 (e.g. model.to(torch.bfloat16) or load_quantized(..., dtype=torch.bfloat16))"
        )
    return x.dtype


def concat_weights(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack quantized weights along N (out features): exact, since every format is per output row."""
    first = weights[0]
    if any(type(w) is not type(first) for w in weights):
        raise ValueError("cannot fuse per-group and per-channel weights into one GEMM")
    if isinstance(first, PerGroupWeight):
        if any(w.group_size != first.group_size for w in weights):
            raise ValueError(f"cannot fuse weights with group sizes {[w.group_size for w in weights]}")
        return PerGroupWeight(
            w4=torch.cat([w.w4 for w in weights]), s2=torch.cat([w.s2 for w in weights]),
            z2=torch.cat([w.z2 for w in weights]), s1=torch.cat([w.s1 for w in weights]), group_size=first.group_size)
    return PerChannelWeight(w4=torch.cat([w.w4 for w in weights]), scale=torch.cat([w.scale for w in weights]),
                            zero=torch.cat([w.zero for w in weights]))


def _repack_scales_after_load(module: "QoQLinear", incompatible_keys) -> None:
    module.repack_scales()


class QoQLinear(nn.Module):
    """``y = x W^T (+ b)`` with W in QoQ's W4 format and x quantized per token to INT8 on the fly.

    Buffers (saved in ``state_dict`` and moved by ``.to(device)``):
      qweight uint8 [N, K/2] (packed by ``ops.pack_weights``); per-group (``group_size > 0``): s2, z2 uint8
      [N, K/g], s1 float16 [N]; per-channel (``group_size == -1``): scale float16 [N], zero uint8 [N];
      bias [N] in the model's float dtype (optional).
    The float16 scales keep their dtype under ``model.to(dtype)`` (the kernels read float16 scales).
    """

    _fixed_dtype_buffers = ("s1", "scale")
    # Every buffer that can hold the quantized weight (either format): fixed shape and dtype once built.
    WEIGHT_BUFFERS = ("qweight", "s2", "z2", "s1", "scale", "zero", "packed_scales")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 128,
                 dtype: torch.dtype = torch.float16, device: torch.device | str | None = None) -> None:
        super().__init__()
        if in_features % 2:
            raise ValueError(f"in_features must be even (two 4-bit weights a byte), got {in_features}")
        if group_size != -1 and (group_size <= 0 or in_features % group_size):
            raise ValueError(f"group_size={group_size} must be -1 (per-channel) or divide in_features={in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n, k = out_features, in_features
        u8 = dict(dtype=torch.uint8, device=device)
        self.register_buffer("qweight", torch.zeros(n, k // 2, **u8))
        if group_size > 0:
            self.register_buffer("s2", torch.ones(n, k // group_size, **u8))
            self.register_buffer("z2", torch.zeros(n, k // group_size, **u8))
            self.register_buffer("s1", torch.zeros(n, dtype=torch.float16, device=device))
            # The CUDA GEMM's copy of s2 / z2 (ops.pack_scales): derived, so not in the state dict; rebuilt
            # whenever s2 / z2 are loaded.
            self.register_buffer("packed_scales", ops.pack_scales(self.s2, self.z2), persistent=False)
            self.register_load_state_dict_post_hook(_repack_scales_after_load)
        else:
            self.register_buffer("scale", torch.zeros(n, dtype=torch.float16, device=device))
            self.register_buffer("zero", torch.zeros(n, **u8))
        self.register_buffer("bias", torch.zeros(n, dtype=dtype, device=device) if bias else None)

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_weight(cls, weight: QuantizedWeight, bias: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float16) -> "QoQLinear":
        """Module holding an already quantized ``weight`` (logical format) and an optional float ``bias [N]``."""
        n, k = weight.w4.shape
        group_size = weight.group_size if isinstance(weight, PerGroupWeight) else -1
        module = cls(k, n, bias=bias is not None, group_size=group_size, dtype=dtype, device=weight.w4.device)
        module.load_weight(weight, bias)
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> "QoQLinear":
        """Round-to-nearest quantization of ``linear`` (no calibration). Output dtype follows the input."""
        w = linear.weight.detach()
        qw = (ops.quantize_weight_per_channel(w) if group_size == -1
              else ops.quantize_weight_per_group(w, group_size=group_size))
        dtype = w.dtype if w.dtype in COMPUTE_DTYPES else torch.float16
        return cls.from_weight(qw, None if linear.bias is None else linear.bias.detach(), dtype=dtype)

    @torch.no_grad()
    def load_weight(self, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        """Copy a logical quantized weight (and bias) into this module's buffers (packing the 4-bit values)."""
        if tuple(weight.w4.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight is {tuple(weight.w4.shape)}, module expects "
                             f"[{self.out_features}, {self.in_features}]")
        per_group = isinstance(weight, PerGroupWeight)
        if per_group != (self.group_size > 0) or (per_group and weight.group_size != self.group_size):
            raise ValueError(f"weight format (group_size={getattr(weight, 'group_size', -1)}) does not match the "
                             f"module's group_size={self.group_size}")
        device = self.qweight.device
        self.qweight.copy_(ops.pack_weights(weight.w4.to(device)))
        if per_group:
            self.s2.copy_(weight.s2)
            self.z2.copy_(weight.z2)
            self.s1.copy_(weight.s1)
            self.repack_scales()
        else:
            self.scale.copy_(weight.scale)
            self.zero.copy_(weight.zero)
        if (bias is None) != (self.bias is None):
            raise ValueError("bias presence does not match the module")
        if bias is not None:
            self.bias.copy_(bias)

    @torch.no_grad()
    def repack_scales(self) -> None:
        """Rebuild ``packed_scales`` from ``s2`` / ``z2`` (after anything wrote them). In place when the buffer
        already lives where s2 does, as the other weight buffers are written: a compiled model keeps reading the
        same tensor (its guards skip the weight buffers); replaced only after ``load_state_dict(assign=True)``."""
        packed = ops.pack_scales(self.s2, self.z2)
        current = self._buffers["packed_scales"]
        if current.device == packed.device and current.shape == packed.shape and not current.is_meta:
            current.copy_(packed)
        else:
            self._buffers["packed_scales"] = packed

    def quantized_weight(self) -> QuantizedWeight:
        """The logical quantized weight held by this module (unpacked; for tests and inspection)."""
        w4 = ops.unpack_weights(self.qweight)
        if self.group_size > 0:
            return PerGroupWeight(w4=w4, s2=self.s2.clone(), z2=self.z2.clone(), s1=self.s1.clone(),
                                  group_size=self.group_size)
        return PerChannelWeight(w4=w4, scale=self.scale.clone(), zero=self.zero.clone())

    # ---- compute -----------------------------------------------------------------------------------
    def gemm(self, x_q: torch.Tensor, x_s: torch.Tensor, x_sum: torch.Tensor, out_dtype: torch.dtype,
             residual: torch.Tensor | None = None) -> torch.Tensor:
        """W4A8 GEMM of already quantized activations ``x_q int8 [M, K]`` -> ``[M, N]`` in ``out_dtype``
        (``residual + y`` when ``residual [M, N]`` is given, the add in the GEMM's epilogue)."""
        if self.group_size > 0:
            return ops.w4a8_gemm_per_group(x_q, x_s, self.qweight, self.s2, self.z2, self.s1, self.bias,
                                           self.group_size, out_dtype, residual, self.packed_scales, x_sum)
        return ops.w4a8_gemm_per_channel(x_q, x_s, x_sum, self.qweight, self.scale, self.zero, self.bias, out_dtype,
                                         residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K]`` float16/bfloat16 -> ``[..., N]`` in x's dtype."""
        out_dtype = check_compute_dtype(x, "QoQLinear")
        lead = x.shape[:-1]
        x_q, x_s, x_sum = ops.quantize_per_token(x.reshape(-1, self.in_features).contiguous())
        return self.gemm(x_q, x_s, x_sum, out_dtype).view(*lead, self.out_features)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) must move the float16 scales but never change their dtype.
        kept = {name: self._buffers[name] for name in self._fixed_dtype_buffers if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, original in kept.items():
            current = self._buffers[name]
            if current.dtype != original.dtype:
                self._buffers[name] = (torch.empty(current.shape, dtype=original.dtype, device=current.device)
                                       if original.is_meta else original.to(device=current.device))
        return self

    def extra_repr(self) -> str:
        fmt = "per-channel" if self.group_size == -1 else f"group_size={self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {fmt}, bias={self.bias is not None}"
