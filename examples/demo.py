"""Quantize a small model with QoQ (W4A8KV4), generate text, and compare memory and speed with float16.

Uses the reference model shipped with qoq_torch when present, else a tiny random Llama built from a config.
Runs on the GPU when one is available, else on the CPU (the CPU path runs the exact reference ops: slow).
    python examples/demo.py [--new-tokens 32]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import qoq_torch
from qoq_torch.benchmarking import kv_bytes_per_token, weight_bytes
from qoq_torch.data import reference_model_path


def load_float_model(device: str, dtype: torch.dtype):
    path = reference_model_path()
    if (path / "model.safetensors").is_file():
        tok = AutoTokenizer.from_pretrained(str(path))
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval(), tok, "reference model"
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval(), None, "random tiny Llama"


def tokens_per_second(model, ids, new_tokens: int, repeats: int = 3) -> tuple[float, torch.Tensor]:
    """Best of ``repeats`` timed generations, after a warm-up of the same length (GPU clocks, allocator, caches)."""
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    out = model.generate(ids, **kw)
    best = float("inf")
    for _ in range(repeats):
        if ids.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids, **kw)
        if ids.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return ids.shape[0] * new_tokens / best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt", default="The Python standard library")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    model, tok, what = load_float_model(device, dtype)
    print(f"{what} on {device} ({dtype}); CUDA kernels: {qoq_torch.extension_status()['message']}")
    ids = (tok(args.prompt, return_tensors="pt").input_ids if tok is not None
           else torch.tensor([[1, 20, 300, 4000]])).to(device)

    float_model = copy.deepcopy(model)
    float_speed, _ = tokens_per_second(float_model, ids, args.new_tokens)
    float_bytes = weight_bytes(float_model)
    del float_model

    start = time.perf_counter()
    qoq_torch.quantize(model, tok, config=qoq_torch.QoQConfig(group_size=64, num_samples=16, seq_len=256))
    print(f"quantized in {time.perf_counter() - start:.1f} s")
    speed, out = tokens_per_second(model, ids, args.new_tokens)
    if tok is not None:
        print("generated:", tok.decode(out[0], skip_special_tokens=True))
    print(f"weights+buffers: {float_bytes / 2**20:.1f} MiB ({dtype}) -> {weight_bytes(model) / 2**20:.1f} MiB (QoQ; "
          "embeddings and lm_head stay 16-bit)")
    kv16, kv4 = kv_bytes_per_token(model.config, kv4=False), kv_bytes_per_token(model.config, kv4=True)
    print(f"KV cache per token: {kv16} bytes (16-bit) -> {kv4} bytes (KV4)")
    print(f"decode: {float_speed:.1f} tokens/s (16-bit) vs {speed:.1f} tokens/s (QoQ) on {device}")
    if device == "cpu":
        print("(CPU timings are not meaningful: the CPU path runs the exact reference ops; use a GPU for speed)")


if __name__ == "__main__":
    main()
