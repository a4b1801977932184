"""Tiny random models of each supported family, and a pure-PyTorch simulation of a QoQ model.

The simulation re-implements a quantized decoder step by step from the reference functions
(``qoq_torch.ops.reference``): its own KV4 cache bookkeeping, masks, positions, GQA and sliding window, and none of
transformers' Cache/mask/generate machinery. A QoQ model must generate exactly what it generates.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from qoq_torch.ops import reference

COMMON = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": lambda **kw: LlamaConfig(**{**COMMON, **kw}),
    "mistral": lambda **kw: MistralConfig(**{**COMMON, "sliding_window": 6, **kw}),
    "qwen2": lambda **kw: Qwen2Config(**{**COMMON, **kw}),
    "qwen3": lambda **kw: Qwen3Config(**{**COMMON, "head_dim": 32, **kw}),
}
GROUP_SIZE = 64


def tiny_model(family: str = "llama", dtype: torch.dtype = torch.bfloat16, seed: int = 0, **overrides):
    """A random ``*ForCausalLM`` with weights of a realistic spread (norm weights not all ones)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[family](**overrides), dtype=dtype,
                                             attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p.float()))
            elif p.dim() == 2:
                p.copy_(torch.randn_like(p.float()) * (0.5 if "embed" in name else 0.08))
            else:
                p.copy_(0.05 * torch.randn_like(p.float()))
    return model


def left_padded(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` int64 ``[B, max_len]`` with left padding."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


# ---- simulation ------------------------------------------------------------------------------------------------

def _gemm(linear, x_q, x_s, x_sum, dtype):
    if linear.group_size > 0:
        return reference.w4a8_gemm_per_group(x_q, x_s, linear.qweight, linear.s2, linear.z2, linear.s1, linear.bias,
                                             linear.group_size, dtype)
    return reference.w4a8_gemm_per_channel(x_q, x_s, x_sum, linear.qweight, linear.scale, linear.zero, linear.bias,
                                           dtype)


def _rope(x, cos, sin):
    """RoPE as docs/formats.md states it: float32 products and sum, rounded to x's dtype once."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos.float().unsqueeze(1) + rotated * sin.float().unsqueeze(1)).to(x.dtype)


class SimulatedQoQ:
    """Greedy/sampled decoding of a patched QoQ model, computed with the reference ops only."""

    def __init__(self, model, batch: int, max_len: int) -> None:
        self.model = model
        cfg = model.config
        self.h_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        # Sliding windows per layer: Mistral's applies to every layer; Qwen2/Qwen3 list their sliding layers in
        # layer_types (use_sliding_window, max_window_layers).
        window, kinds = getattr(cfg, "sliding_window", None), getattr(cfg, "layer_types", None)
        if kinds is None:
            kinds = ["sliding_attention" if type(model).__name__ == "MistralForCausalLM" else "full_attention"] * \
                len(model.model.layers)
        self.windows = [window if kind == "sliding_attention" else None for kind in kinds]
        shape = (batch, self.h_kv, max_len)
        self.cache = [[torch.zeros(*shape, self.head_dim // 2, dtype=torch.uint8) if i % 2 == 0 else
                       torch.zeros(*shape, 2, dtype=torch.float16) for i in range(4)] for _ in model.model.layers]
        self.length = 0

    @staticmethod
    def _visible(starts, q_pos, t, window):
        j = torch.arange(t)
        vis = (j.view(1, 1, -1) >= starts.view(-1, 1, 1)) & (j.view(1, 1, -1) <= q_pos.view(1, -1, 1))
        if window is not None:
            vis &= (q_pos.view(1, -1, 1) - j.view(1, 1, -1)) < window
        return vis

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, vocab]`` of the last token after feeding ``ids [B, S]`` (S > 1 only on an empty cache)."""
        model, b, s = self.model, ids.shape[0], ids.shape[1]
        h = model.model.embed_tokens(ids)
        dtype = h.dtype
        cos, sin = model.model.rotary_emb(h, positions)
        slots = torch.arange(self.length, self.length + s)
        for layer, cache, window in zip(model.model.layers, self.cache, self.windows):
            attn, mlp = layer.self_attn, layer.mlp
            x_q, x_s, x_sum = reference.rmsnorm_quantize(h.reshape(b * s, -1), attn.norm_weight, attn.norm_eps)
            qkv = _gemm(attn.qkv_proj, x_q, x_s, x_sum, dtype).view(b, s, -1, self.head_dim)
            n_q = attn.num_heads
            q, k, v = qkv[:, :, :n_q], qkv[:, :, n_q:n_q + self.h_kv], qkv[:, :, n_q + self.h_kv:]
            if attn.q_norm is not None:
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k, v = (_rope(q.transpose(1, 2), cos, sin), _rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2))
            for buf, par, x in ((cache[0], cache[1], k), (cache[2], cache[3], v)):
                packed, params = reference.kv4_quantize(x)
                buf[:, :, slots], par[:, :, slots] = packed, params
            if self.length == 0:  # prefill: float attention on the new tokens
                mask = self._visible(starts, slots, s, window).unsqueeze(1)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=True)
            else:
                assert s == 1
                start = starts
                if window is not None:
                    start = torch.maximum(starts, torch.tensor(self.length - window + 1))
                lens = torch.full((b,), self.length + 1, dtype=torch.int32)
                out = reference.kv4_decode_attention(q, *cache, lens, start.to(torch.int32), attn.scaling)
            o_q, o_s, o_sum = reference.quantize_per_token(out.transpose(1, 2).reshape(b * s, -1))
            h = h + _gemm(attn.o_proj, o_q, o_s, o_sum, dtype).view(b, s, -1)
            x_q, x_s, x_sum = reference.rmsnorm_quantize(h.reshape(b * s, -1), mlp.norm_weight, mlp.norm_eps)
            gate_up = _gemm(mlp.gate_up_proj, x_q, x_s, x_sum, dtype)
            g_q, g_s, g_sum = reference.silu_mul_quantize(gate_up)
            h = h + _gemm(mlp.down_proj, g_q, g_s, g_sum, dtype).view(b, s, -1)
        self.length += s
        return model.lm_head(model.model.norm(h[:, -1]))

    def greedy(self, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Generated tokens ``[B, new_tokens]`` for left-padded ``ids``/``mask``."""
        starts = (mask == 0).sum(dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.forward(ids, positions, starts)
        out = []
        next_pos = positions[:, -1:] + 1
        for _ in range(new_tokens):
            token = logits.float().argmax(-1, keepdim=True)
            out.append(token)
            logits = self.forward(token, next_pos, starts)
            next_pos = next_pos + 1
        return torch.cat(out, dim=1)
