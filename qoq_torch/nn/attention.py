"""QoQAttention: the decoder's input RMSNorm + attention with W4A8 projections and a KV4 cache.

It replaces a Hugging Face ``*Attention`` module (Llama, Mistral, Qwen2, Qwen3) and keeps its forward signature
and return value. With a ``KV4Cache``:
  * prefill (empty cache, several tokens): attention on the float q/k/v (the model's own attention function and
    mask), then the new K/V are quantized into the cache;
  * decode (one new token per row): append, then ``kv4_decode_attention_quantize`` over the cache (its INT8 output
    is o_proj's GEMM input); the valid slots of a row
    are ``[kv_start, kv_len)`` with ``kv_start`` read from the attention mask on the device (left padding, sliding
    window), so a step has no host sync and compiles into one graph;
  * a few new tokens on a non-empty cache (up to ``MAX_DECODE_QUERY_TOKENS``: speculative decoding's
    verification): as decode, the attention causal among the new tokens (not where a sliding window could cut the
    context);
  * on both, without q/k norms, RoPE and the append are one op on the fused projection (``rope_kv4_append``), which
    also returns the rotated q;
  * longer continuations (several tokens on a non-empty cache): append, then attention over the dequantized cache.
With any other ``Cache`` (e.g. kv_bits=16) the float K/V go through ``cache.update`` as in transformers.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from .. import ops
from ..ops.reference import split_qkv
from .kv_cache import KV4Cache
from .linear import QoQLinear, check_compute_dtype

SUPPORTED_ATTENTION = ("sdpa", "eager")
# The most new tokens per row that the KV4 decode attention takes on a non-empty cache (each GQA group of query rows
# is a block's 16 rows, so more tokens mean more blocks reading the same K/V); longer continuations (chunked
# prefill) run float attention on the dequantized cache.
MAX_DECODE_QUERY_TOKENS = 16


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """RoPE as in transformers (``cos``/``sin`` ``[B, S, D]``; q/k ``[B, H, S, D]``), computed in float32 and
    rounded to q/k's dtype once (`ops.rope`: the formula `rope_kv4_append` uses, so prefill and decode store
    the same K bit for bit)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return ops.rope(q, cos, sin), ops.rope(k, cos, sin)


class QoQAttention(nn.Module):
    """Fused input RMSNorm + W4A8 q/k/v (one GEMM) + RoPE (+ Qwen3 q/k norms) + attention + W4A8 o_proj.

    forward(hidden_states [B, S, hidden], position_embeddings (cos, sin) [B, S, D], attention_mask, past_key_values,
    cache_position=None, **kwargs) -> (attn_output [B, S, hidden], None). ``hidden_states`` is the residual stream
    (the decoder's ``input_layernorm`` is fused here and replaced by an identity).
    """

    def __init__(self, config, layer_idx: int, qkv_proj: QoQLinear, o_proj: QoQLinear, norm_weight: torch.Tensor,
                 norm_eps: float, q_norm: nn.Module | None = None, k_norm: nn.Module | None = None,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = 0.0
        self.is_causal = True
        self.sliding_window = sliding_window
        expected = (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim
        if qkv_proj.out_features != expected:
            raise ValueError(f"qkv_proj has {qkv_proj.out_features} outputs, expected {expected}")
        self.qkv_proj = qkv_proj
        self.o_proj = o_proj
        self.norm_weight = nn.Parameter(norm_weight.detach().clone(), requires_grad=False)
        self.norm_eps = float(norm_eps)
        self.q_norm = q_norm
        self.k_norm = k_norm

    # Decode steps (and a few new tokens) on a KV4 cache use the fused RoPE + append op where it applies (tests
    # switch it off to compare).
    fuse_rope_append: bool = True

    def _qkv(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Input RMSNorm + the fused q/k/v GEMM: ``[B * S, (H_q + 2 H_kv) * D]`` in the input's dtype."""
        b, s, hidden = hidden_states.shape
        out_dtype = check_compute_dtype(hidden_states, "QoQAttention")
        x_q, x_s, x_sum = ops.rmsnorm_quantize(hidden_states.reshape(b * s, hidden).contiguous(),
                                              self.norm_weight, self.norm_eps)
        return self.qkv_proj.gemm(x_q, x_s, x_sum, out_dtype)

    def _project(self, hidden_states: torch.Tensor, position_embeddings):
        b, s, _ = hidden_states.shape
        q, k, v = split_qkv(self._qkv(hidden_states).view(b, s, -1), self.num_heads, self.num_key_value_heads,
                            self.head_dim)
        if self.q_norm is not None:  # per head vector (the last dim), so after the transpose as before it
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = apply_rope(q, k, cos, sin)
        return q, k, v

    def _float_attention(self, q, k, v, attention_mask, **kwargs) -> torch.Tensor:
        """The model's own attention function (sdpa or eager) -> ``[B, S, H, D]``."""
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, _ = interface(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling,
                           sliding_window=self.sliding_window, **kwargs)
        return out

    def _fuses_rope_append(self, position_embeddings) -> bool:
        """Whether RoPE and the KV4 append can be one op: RoPE over the whole head and no q/k norms."""
        return self.fuse_rope_append and self.q_norm is None and position_embeddings[0].shape[-1] == self.head_dim

    def _decode(self, cache: KV4Cache, hidden_states: torch.Tensor, position_embeddings,
                attention_mask) -> torch.Tensor:
        """Decode step or a few new tokens per row: append the new K/V (through `rope_kv4_append` where RoPE and the
        append fuse), then the KV4 decode attention and o_proj -> ``[B, S, hidden]``."""
        layer = cache.layers[self.layer_idx]
        if self._fuses_rope_append(position_embeddings):
            b, s, _ = hidden_states.shape
            cos, sin = position_embeddings
            q = layer.append_rotary(self._qkv(hidden_states).view(b, s, -1), cos, sin, self.num_heads)
        else:
            q, k, v = self._project(hidden_states, position_embeddings)
            layer.append(k, v)
        return self._decode_attention(cache, layer, q, attention_mask)

    def _decode_attention(self, cache: KV4Cache, layer, q: torch.Tensor, attention_mask) -> torch.Tensor:
        """``kv4_decode_attention_quantize`` of ``q [B, H_q, S, D]`` over the layer (no host sync), whose INT8
        output feeds o_proj's GEMM directly -> ``[B, S, hidden]``."""
        b, _, s, _ = q.shape
        kv_starts = cache.kv_starts(self.layer_idx, attention_mask, b, q.device)
        x_q, x_s, x_sum = ops.kv4_decode_attention_quantize(q.contiguous(), layer.k_cache, layer.k_params,
                                                            layer.v_cache, layer.v_params, layer.kv_lens(b),
                                                            kv_starts, self.scaling)
        return self.o_proj.gemm(x_q, x_s, x_sum, q.dtype).view(b, s, self.o_proj.out_features)

    def _few_new_tokens(self, cache: KV4Cache, s: int) -> bool:
        """Whether ``s`` new tokens per row on a cache that already holds tokens (speculative decoding's
        verification, a short continuation) run the KV4 decode attention, which is causal among them, rather than
        float attention over the whole dequantized cache. Not where a sliding window could cut the context: the
        decode attention takes one first visible slot per row, the last query's."""
        layer = cache.layers[self.layer_idx]
        if s > MAX_DECODE_QUERY_TOKENS or not layer.is_initialized:
            return False
        held = layer.host_length()
        return held > 0 and (self.sliding_window is None or held + s <= self.sliding_window)

    def _kv4_attention(self, cache: KV4Cache, q, k, v, attention_mask, **kwargs) -> torch.Tensor:
        layer = cache.layers[self.layer_idx]
        s = q.shape[2]
        if not layer.is_initialized or layer.host_length() == 0:  # prefill: float attention, then store
            mask = attention_mask[..., :s] if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 \
                else attention_mask
            out = self._float_attention(q, k, v, mask, **kwargs)
            layer.append(k, v)
            return out
        layer.append(k, v)  # continuation: attend to the dequantized cache under the model's mask
        length = attention_mask.shape[-1] if isinstance(attention_mask, torch.Tensor) else layer.host_length()
        # float32 like the decode kernel: rounding dequantized K/V to 16 bits would add error of its own
        k_all, v_all = layer.dequantized(length, torch.float32)
        return self._float_attention(q.float(), k_all, v_all, attention_mask, **kwargs).to(q.dtype)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, past_key_values: Cache | None = None,
                cache_position: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
        if self.config._attn_implementation not in SUPPORTED_ATTENTION:
            raise ValueError(f"QoQAttention supports attn_implementation in {SUPPORTED_ATTENTION}, got "
                             f"{self.config._attn_implementation!r}; call model.set_attn_implementation('sdpa')")
        kwargs.pop("position_ids", None)
        kwargs.pop("use_cache", None)
        b, s, _ = hidden_states.shape
        # decode: no host sync on the one-token path
        if isinstance(past_key_values, KV4Cache) and (s == 1 or self._few_new_tokens(past_key_values, s)):
            return self._decode(past_key_values, hidden_states, position_embeddings, attention_mask), None
        q, k, v = self._project(hidden_states, position_embeddings)
        if isinstance(past_key_values, KV4Cache):
            out = self._kv4_attention(past_key_values, q, k, v, attention_mask, **kwargs)
        else:
            if past_key_values is not None:
                k, v = past_key_values.update(k, v, self.layer_idx)
            out = self._float_attention(q, k, v, attention_mask, **kwargs)
        out = out.reshape(b, s, self.num_heads * self.head_dim)
        return self.o_proj(out), None
