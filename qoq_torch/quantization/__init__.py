"""The QoQ algorithm (W4A8KV4): transforms folded into a float model, then quantized integer weights.

``prepare_qoq(model, config, tokenizer, calib_data)`` transforms the model in place and returns every decoder
linear's weights in the logical integer format of docs/formats.md.
"""
from .architecture import SUPPORTED_ARCHITECTURES
from .config import QoQConfig
from .pipeline import prepare_qoq, rtn_weights
from .simulate import simulate_quantized_model

__all__ = [
    "QoQConfig",
    "SUPPORTED_ARCHITECTURES",
    "prepare_qoq",
    "rtn_weights",
    "simulate_quantized_model",
]
