"""The KV4 cache: a transformers ``Cache`` whose layers hold 4-bit packed K/V (docs/formats.md, "KV cache").

``KV4Layer`` grows by doubling its capacity (the default, like ``DynamicCache``); ``KV4StaticLayer`` has a fixed
``max_cache_len`` and keeps its length in a device tensor so that a decode step has no host sync and compiles
(like ``StaticLayer``). QoQAttention reads and writes the buffers directly; ``update`` (the generic Cache API)
appends and returns the dequantized K/V so any float attention can still use the cache.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import ops

MIN_CAPACITY = 64


def kv_starts_from_mask(attention_mask: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """int32 ``[B]``: first slot the last query token may see, read from the mask on the device (no host sync).

    The mask is the model's 4-D mask ``[B, 1, S_q, T]`` (bool: True = visible; float: 0 = visible) or a 2-D
    padding mask ``[B, T]``; None means every slot from 0 is visible.
    """
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.int32, device=device)
    row = attention_mask[:, 0, -1, :] if attention_mask.dim() == 4 else attention_mask
    visible = row if row.dtype == torch.bool else (row > torch.finfo(row.dtype).min / 2 if row.is_floating_point()
                                                   else row != 0)
    return visible.to(torch.int32).argmax(dim=-1).to(torch.int32).expand(batch).contiguous()


class KV4Layer(CacheLayerMixin):
    """One decoder layer's KV4 cache, growing by doubling (``k_cache``/``v_cache`` uint8 ``[B, H_kv, T_cap, D/2]``,
    ``k_params``/``v_params`` float16 ``[B, H_kv, T_cap, 2]`` of (scale, min))."""

    is_compileable = False
    is_croppable = True
    is_sliding = False
    BUFFERS = ("k_cache", "k_params", "v_cache", "v_params")

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.length = 0  # python int: tokens held (slots [0, length) of every row)

    # ---- allocation ------------------------------------------------------------------------------------
    def _allocate(self, capacity: int) -> None:
        b, h, d = self.batch_size, self.num_heads, self.head_dim
        self.k_cache = torch.zeros(b, h, capacity, d // 2, dtype=torch.uint8, device=self.device)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.k_params = torch.zeros(b, h, capacity, 2, dtype=torch.float16, device=self.device)
        self.v_params = torch.zeros_like(self.k_params)
        self.keys, self.values = self.k_cache, self.v_cache  # what generic Cache code inspects (device, batch)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"the KV4 cache stores float16/bfloat16 keys and values, got {key_states.dtype}")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads, _, self.head_dim = key_states.shape
        if self.head_dim % 2:
            raise ValueError(f"the KV4 cache needs an even head_dim, got {self.head_dim}")
        self._allocate(self._initial_capacity(key_states.shape[2]))
        self.is_initialized = True

    def _initial_capacity(self, tokens: int) -> int:
        return max(MIN_CAPACITY, tokens)

    def capacity(self) -> int:
        return self.k_cache.shape[2] if self.is_initialized else 0

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity():
            return
        capacity = max(needed, 2 * self.capacity())
        old = [getattr(self, name) for name in self.BUFFERS]
        self._allocate(capacity)
        for name, buf in zip(self.BUFFERS, old):
            getattr(self, name)[:, :, : self.length].copy_(buf[:, :, : self.length])

    # ---- writes --------------------------------------------------------------------------------------
    def _check_new(self, key_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        if (b, h, d) != (self.batch_size, self.num_heads, self.head_dim):
            raise ValueError(f"KV4 cache holds [B={self.batch_size}, H_kv={self.num_heads}, D={self.head_dim}], "
                             f"got new keys of shape {tuple(key_states.shape)}")

    def _prepare(self, key_states: torch.Tensor) -> None:
        """Allocate on the first write (from the new keys' shape, dtype and device), then check their shape."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, key_states)
        self._check_new(key_states)

    def _reserve(self, new_tokens: int) -> torch.Tensor:
        """Make room for ``new_tokens`` and return their slots (int64 ``[S]`` on the cache's device)."""
        self._ensure_capacity(self.length + new_tokens)
        return torch.arange(self.length, self.length + new_tokens, device=self.device)

    def _commit(self, new_tokens: int) -> None:
        self.length += new_tokens

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Quantize ``[B, H_kv, S, D]`` keys/values into the next ``S`` slots."""
        self._prepare(key_states)
        s = key_states.shape[2]
        positions = self._reserve(s)
        ops.kv4_append(self.k_cache, self.k_params, self.v_cache, self.v_params,
                       key_states.contiguous(), value_states.contiguous(), positions)
        self._commit(s)

    def append_rotary(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_q_heads: int) -> torch.Tensor:
        """RoPE + append from the fused projection (`ops.rope_kv4_append`): the rotated K and the V of
        ``qkv [B, S, (H_q + 2 H_kv) * D]`` go into the next ``S`` slots; returns the rotated ``q [B, H_q, S, D]``.

        ``cos``/``sin`` ``[B or 1, S, D]`` give D (RoPE over the whole head); the slots are those `append` uses.
        """
        d = cos.shape[-1]
        heads, rem = divmod(qkv.shape[-1], d)
        if rem or heads <= num_q_heads or (heads - num_q_heads) % 2:
            raise ValueError(f"qkv {tuple(qkv.shape)} is not [B, S, (H_q + 2 H_kv) * D] for H_q={num_q_heads}, D={d}")
        h_kv = (heads - num_q_heads) // 2
        # A view of the keys ([B, H_kv, S, D]): what `append` would get, for allocation and the shape check.
        keys = qkv[..., num_q_heads * d:(num_q_heads + h_kv) * d].unflatten(-1, (h_kv, d)).transpose(1, 2)
        self._prepare(keys)
        s = qkv.shape[1]
        positions = self._reserve(s)
        q = ops.rope_kv4_append(qkv, cos, sin, self.k_cache, self.k_params, self.v_cache, self.v_params, positions,
                                num_q_heads)
        self._commit(s)
        return q

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Generic Cache API: append, then return the dequantized ``[B, H_kv, T, D]`` K/V in the keys' dtype."""
        self.append(key_states, value_states)
        length = self.mask_length(key_states.shape[2])
        return self.dequantized(length, key_states.dtype)

    # ---- reads ---------------------------------------------------------------------------------------
    def dequantized(self, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of slots ``[0, length)`` as ``[B, H_kv, length, D]`` in ``dtype``."""
        k = ops.kv4_dequantize(self.k_cache, self.k_params, length).to(dtype)
        v = ops.kv4_dequantize(self.v_cache, self.v_params, length).to(dtype)
        return k, v

    def host_length(self) -> int:
        """Tokens held, as a python int (a host sync for the static layer)."""
        return self.length

    def kv_lens(self, batch: int) -> torch.Tensor:
        """int32 ``[B]``: end of the valid slots of each row (every row shares one length)."""
        return torch.full((batch,), self.length, dtype=torch.int32, device=self.device)

    def mask_length(self, query_length: int) -> int:
        """Slots covered by the attention mask the model builds for this cache after the append."""
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes allocated for this layer's K/V."""
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self.BUFFERS) \
            if self.is_initialized else 0

    # ---- housekeeping used by generate (beam search, contrastive search, assisted decoding) ------------
    def _map(self, fn) -> None:
        if self.is_initialized:
            for name in self.BUFFERS:
                setattr(self, name, fn(getattr(self, name)))
            self.keys, self.values = self.k_cache, self.v_cache
            self.batch_size = self.k_cache.shape[0]

    def reset(self) -> None:
        if self.is_initialized:
            for name in self.BUFFERS:
                getattr(self, name).zero_()
        self.length = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    @staticmethod
    def tokens_kept(held: int, tokens_to_remove: int | torch.Tensor) -> int:
        """Tokens left after ``crop(tokens_to_remove)`` on ``held``, as transformers' cache layers count: a negative
        count removes that many, 0 removes none (assisted decoding calls ``crop(-0)`` when every candidate was
        accepted), and a positive one (transformers' legacy form) keeps that many. A tensor count (assisted
        decoding's) is read on the host."""
        count = int(tokens_to_remove)
        if count == 0:
            return held
        return min(held, count if count > 0 else max(0, held + count))

    def crop(self, tokens_to_remove: int | torch.Tensor) -> None:
        """Drop tokens from the end (``tokens_kept``'s rule)."""
        self.length = self.tokens_kept(self.length, tokens_to_remove)

    def offload(self) -> None:
        raise NotImplementedError("the KV4 cache does not support offloading")

    def prefetch(self) -> None:
        raise NotImplementedError("the KV4 cache does not support offloading")


class SharedLength:
    """The token count of a static cache's layers, which advance together: a decoder appends the same tokens to
    every layer in order, layer 0 first. One device counter, advanced by the leading layer (layer 0), and the step's
    slot positions and lengths, which the leader computes and the other layers of the same forward reuse, so a
    compiled decode step computes them once instead of once per layer (each was a kernel of its own, ~5 per layer)."""

    def __init__(self) -> None:
        self.tensor = torch.tensor(0, dtype=torch.int64)
        self.step: tuple[torch.Tensor, int] | None = None  # (positions int64 [S], S) of the current forward
        self.lens: tuple[int, torch.Tensor] | None = None  # (B, int32 [B]) after the current forward's append


class KV4StaticLayer(KV4Layer):
    """Fixed-size KV4 layer: ``max_cache_len`` slots, length in a device tensor (no host sync per decode step).

    Alone it keeps its own length. In a ``KV4Cache`` its layers share one (``shared``): the leading layer (0) reserves
    the step's slots and advances the length, the others must then append the same number of tokens in the same
    forward, and the last one (``ends``) closes the step."""

    is_compileable = True
    is_croppable = True

    def __init__(self, max_cache_len: int, shared: SharedLength | None = None, leads: bool = True,
                 ends: bool = True, **kwargs) -> None:
        super().__init__()
        if max_cache_len <= 0:
            raise ValueError(f"max_cache_len must be positive, got {max_cache_len}")
        self.max_cache_len = max_cache_len
        self._shared = shared if shared is not None else SharedLength()
        self._leads, self._ends = leads, ends
        self._host_length: int | None = 0  # this layer's tokens, mirrored in eager mode; None once unknown

    @property
    def cumulative_length(self) -> torch.Tensor:
        """int64 scalar on the cache's device: tokens held (after the whole forward, for every layer)."""
        return self._shared.tensor

    def _initial_capacity(self, tokens: int) -> int:
        return self.max_cache_len

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        # The shared length lives on the leading layer's device; layers on other devices (a model dispatched over
        # several devices) read copies of the step's slots and lengths (_on_device).
        if self._leads and self._shared.tensor.device != self.device:
            self._shared.tensor = self._shared.tensor.to(self.device)
        if not torch.compiler.is_compiling():
            # Fixed addresses so compiled decode steps (and CUDA graphs) see the same buffers every step.
            for buf in [getattr(self, name) for name in self.BUFFERS] + ([self._shared.tensor] if self._leads else []):
                torch._dynamo.mark_static_address(buf)

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device == self.device else t.to(self.device)

    def _overflow(self, new_tokens: int, held: int | str) -> ValueError:
        return ValueError(f"the static KV4 cache holds at most {self.max_cache_len} tokens; it has {held} and "
                          f"{new_tokens} more were appended (raise max_new_tokens/max_cache_len headroom, or use the "
                          "default dynamic cache)")

    def _reserve(self, new_tokens: int) -> torch.Tensor:
        shared = self._shared
        if not self._leads and (shared.step is None or shared.step[1] != new_tokens):
            raise ValueError("the layers of a static KV4 cache advance together: layer 0 appends first, then every "
                             "other layer the same number of tokens in the same forward")
        if torch.compiler.is_compiling():
            self._host_length = None  # the compiled step cannot read the device counter back
        else:
            held = self.host_length()
            if held + new_tokens > self.max_cache_len:
                raise self._overflow(new_tokens, held)
            self._host_length = held + new_tokens
        if not self._leads:
            return self._on_device(shared.step[0])
        positions = torch.arange(new_tokens, device=self.device) + shared.tensor
        shared.step, shared.lens = (positions, new_tokens), None
        return positions

    def _commit(self, new_tokens: int) -> None:
        if self._leads:
            self._shared.tensor.add_(new_tokens)
        if self._ends:
            self._shared.step = None

    def host_length(self) -> int:
        if self._host_length is None:
            held = int(self._shared.tensor)
            if not self._leads and self._shared.step is not None:
                # Inside a forward the leader has already counted its tokens; this layer has not appended them yet
                # (its own append sets the mirror in _reserve).
                held -= self._shared.step[1]
            self._host_length = held
        return self._host_length

    def kv_lens(self, batch: int) -> torch.Tensor:
        shared = self._shared
        if shared.lens is not None and shared.lens[0] == batch:
            lens = shared.lens[1]
        else:
            lens = shared.tensor.to(torch.int32).expand(batch).contiguous()
            shared.lens = (batch, lens)
        if self._ends:  # no tensor of the step outlives its forward (a compiled step's outputs stay its own)
            shared.lens = None
        return self._on_device(lens)

    def mask_length(self, query_length: int) -> int:
        return self.max_cache_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_seq_length(self):
        return self._shared.tensor if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        if self.is_initialized:
            for name in self.BUFFERS:
                getattr(self, name).zero_()
        self._shared.tensor.zero_()
        self._shared.step = self._shared.lens = None
        self._host_length = 0

    def crop(self, tokens_to_remove: int | torch.Tensor) -> None:
        """``tokens_kept``'s rule (assisted decoding's rollback) on the shared length: the leading layer sets it
        (transformers' ``Cache.crop`` visits layer 0 first), the other layers then re-read it; the dropped slots are
        overwritten by the next append. A host sync (the length is read back), outside the decode step."""
        if int(tokens_to_remove) == 0:
            return
        if self._leads:
            keep = self.tokens_kept(self.host_length(), tokens_to_remove)
            self._shared.tensor.fill_(keep)
            self._shared.step = self._shared.lens = None
            self._host_length = keep
        else:
            self._host_length = None


class KV4Cache(Cache):
    """KV cache with 4-bit keys and values for QoQ models.

    ``KV4Cache(config)`` grows as needed (the default in ``generate``); ``KV4Cache(config, max_cache_len=N)`` is
    static (fixed size, compile- and CUDA-graph-friendly; what ``cache_implementation="static"`` gives).
    Memory per token and KV head: ``D/2 + 4`` bytes for each of K and V.
    ``defer_stop_check``: let generate read its stop flag one step late on CUDA (qoq_torch.nn.generation).
    """

    defer_stop_check: bool = True

    def __init__(self, config=None, max_cache_len: int | None = None, num_layers: int | None = None) -> None:
        if num_layers is None:
            if config is None:
                raise ValueError("KV4Cache needs a model config or num_layers")
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
        if max_cache_len is None:
            layers = [KV4Layer() for _ in range(num_layers)]
        else:
            shared = SharedLength()
            layers = [KV4StaticLayer(max_cache_len, shared, leads=i == 0, ends=i == num_layers - 1)
                      for i in range(num_layers)]
        super().__init__(layers=layers)
        self._static_len = max_cache_len
        self._kv_starts: list[tuple[torch.Tensor | None, torch.Tensor]] = []  # this forward's (mask, kv_starts)
        self._slots: torch.Tensor | None = None  # slot_indices

    @property
    def is_static(self) -> bool:
        return self._static_len is not None

    def nbytes(self) -> int:
        """Bytes allocated for K/V across layers."""
        return sum(layer.nbytes() for layer in self.layers)

    def slot_indices(self) -> torch.Tensor:
        """int64 ``[max_cache_len]`` slot numbers ``0..T-1`` on the cache's device, built once (a static cache whose
        layers are allocated)."""
        if not self.is_static or not self.layers[0].is_initialized:
            raise ValueError("slot_indices needs a static KV4 cache that holds tokens")
        device = self.layers[0].device
        if self._slots is None or self._slots.device != device:
            self._slots = torch.arange(self._static_len, device=device)
        return self._slots

    def kv_starts(self, layer_idx: int, attention_mask: torch.Tensor | None, batch: int,
                  device: torch.device) -> torch.Tensor:
        """``kv_starts_from_mask`` for layer ``layer_idx`` of a forward, computed once per mask in that forward
        (layer 0 opens it, the last layer closes it) rather than once per layer: a decoder hands every layer the same
        mask object (or one per layer type), and each recomputation was a kernel of its own in a decode step."""
        if layer_idx == 0:
            self._kv_starts = []
        starts = None
        for mask, value in self._kv_starts:
            if mask is attention_mask and value.shape[0] == batch:
                starts = value
                break
        if starts is None:
            starts = kv_starts_from_mask(attention_mask, batch, device)
            self._kv_starts.append((attention_mask, starts))
        if layer_idx == len(self.layers) - 1:  # no tensor of the forward outlives it
            self._kv_starts = []
        return starts
