"""QoQConfig: every knob of the QoQ algorithm, validated, with a JSON round trip."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

ROTATION_KINDS = ("hadamard", "random")
KV_BITS = (4, 16)  # 16 = keep the KV cache in the model's float dtype


@dataclass
class QoQConfig:
    """Settings of the QoQ (W4A8KV4) algorithm.

    group_size: weight group size (divides every linear's in-features); -1 = per-channel UINT4.
    rotation / rotation_kind: rotate the residual stream by an orthogonal matrix ("hadamard": a randomized
        Hadamard-based matrix, "random": a random orthogonal one), folded into the weights.
    smooth_attention / smooth_attention_alpha: SmoothAttention (λ = max|K|^α) folded into q/k projections.
    smooth_output / smooth_output_alpha: smoothing of o_proj/down_proj inputs folded into v_proj/up_proj;
        alpha None searches α on a grid (0, 0.1, ..., 1, plus "no smoothing") for the lowest output error.
    reorder: activation-aware reordering of down_proj's input channels (folded into gate/up/down).
    clip_search / clip_min_ratio / clip_steps: per-output-channel search of the weight clipping ratio in
        [clip_min_ratio, 1] over clip_steps values, minimising the layer output error.
    kv_bits: 4 (KV4 cache) or 16 (float KV cache; SmoothAttention is then skipped).
    quantize_lm_head: also quantize ``lm_head`` to W4A8 (same group size, clipping search on the final norm's
        output). Off by default (the head's error lands directly on the logits); in 16-bit the head is about a
        quarter of the bytes a W4 Llama-3-8B decode step reads.
    num_samples, seq_len, calib_batch_size: calibration sequences, their length, and how many run at once.
    max_search_tokens: tokens per layer kept for the smoothing and clipping searches (bounds memory/time).
    seed: seeds the rotation, the choice of calibration blocks and the token subsample.
    """

    group_size: int = 128
    rotation: bool = True
    rotation_kind: str = "hadamard"
    smooth_attention: bool = True
    smooth_attention_alpha: float = 0.5
    smooth_output: bool = True
    smooth_output_alpha: float | None = None
    reorder: bool = True
    clip_search: bool = True
    clip_min_ratio: float = 0.5
    clip_steps: int = 11
    kv_bits: int = 4
    quantize_lm_head: bool = False
    num_samples: int = 64
    seq_len: int = 512
    calib_batch_size: int = 8
    max_search_tokens: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    @property
    def quantize_kv(self) -> bool:
        """True when the KV cache is 4-bit."""
        return self.kv_bits == 4

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        def _int(name: str, minimum: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"QoQConfig.{name} must be an integer >= {minimum}, got {value!r}")

        def _bool(name: str) -> None:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"QoQConfig.{name} must be a bool, got {getattr(self, name)!r}")

        def _unit(name: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"QoQConfig.{name} must be a number in [0, 1], got {value!r}")

        gs = self.group_size
        if isinstance(gs, bool) or not isinstance(gs, int) or not (gs == -1 or (gs > 0 and gs % 2 == 0)):
            raise ValueError(f"QoQConfig.group_size must be -1 (per-channel) or a positive even integer, got {gs!r}")
        for name in ("rotation", "smooth_attention", "smooth_output", "reorder", "clip_search", "quantize_lm_head"):
            _bool(name)
        if self.rotation_kind not in ROTATION_KINDS:
            raise ValueError(f"QoQConfig.rotation_kind must be one of {ROTATION_KINDS}, got {self.rotation_kind!r}")
        _unit("smooth_attention_alpha", self.smooth_attention_alpha)
        if self.smooth_output_alpha is not None:
            _unit("smooth_output_alpha", self.smooth_output_alpha)
        m = self.clip_min_ratio
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 < float(m) <= 1.0:
            raise ValueError(f"QoQConfig.clip_min_ratio must be a number in (0, 1], got {m!r}")
        _int("clip_steps", 1)
        if self.kv_bits not in KV_BITS or isinstance(self.kv_bits, bool):
            raise ValueError(f"QoQConfig.kv_bits must be one of {KV_BITS}, got {self.kv_bits!r}")
        for name in ("num_samples", "seq_len", "calib_batch_size", "max_search_tokens"):
            _int(name, 1)
        _int("seed", 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QoQConfig":
        """Build from a dict; unknown keys are an error (a typo must not silently fall back to a default)."""
        if not isinstance(data, dict):
            raise ValueError(f"QoQConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QoQConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "QoQConfig":
        return cls.from_dict(json.loads(text))
