"""Held-out accuracy of the reference model under each quantization recipe -> docs/accuracy.md.

    python examples/accuracy_report.py                       # all rows, CPU float32, writes docs/accuracy.md
    python examples/accuracy_report.py --rows fp16,qoq-g128 --max-windows 32 --no-write   # quick look

Every quantized row is a fake-quant simulation of the deployed arithmetic
(``qoq_torch.quantization.simulate_quantized_model``): dequantized weights from the ops' quantization routines,
per-token INT8 inputs to every decoder linear, and a KV4 round trip of keys/values after RoPE. QoQ rows run
``prepare_qoq`` (calibrated on the shipped calib split) first. Metrics: perplexity over non-overlapping
512-token windows of the shipped eval split (documents joined by EOS, as in training), and the accuracy of a
two-choice sentence-completion task built from the same held-out text.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

import qoq_torch.data as qdata  # noqa: E402
from qoq_torch.evaluation import (  # noqa: E402
    choice_accuracy,
    encode_documents,
    perplexity,
    sentence_completion_items,
)
from qoq_torch.ops.formats import (  # noqa: E402
    quantize_weight_int8,
    quantize_weight_per_channel,
)
from qoq_torch.quantization import QoQConfig, prepare_qoq, rtn_weights, simulate_quantized_model  # noqa: E402

TABLE_BEGIN, TABLE_END = "<!-- accuracy-table:begin -->", "<!-- accuracy-table:end -->"


@dataclass
class DequantizedWeight:
    """A baseline weight format outside the op contract, held as its float32 dequantized value."""

    value: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return self.value


def int8_per_channel(w: torch.Tensor) -> DequantizedWeight:
    """W8 baseline: symmetric INT8 per output channel (the ops' level-1 routine, range ±119)."""
    w8, s1 = quantize_weight_int8(w)
    return DequantizedWeight(w8.float() * s1.float().unsqueeze(1))


def uint4_float_scale_per_group(w: torch.Tensor, group_size: int = 128) -> DequantizedWeight:
    """W4A16 baseline (AWQ/GPTQ storage): asymmetric UINT4 per group with a float16 scale, round to nearest.

    Each group is one row of the ops' per-channel UINT4 routine, so the rounding rules are the project's.
    """
    n, k = w.shape
    groups = quantize_weight_per_channel(w.reshape(n * k // group_size, group_size))
    return DequantizedWeight(groups.dequantize().reshape(n, k))


def _all_linears(model, fn) -> dict[str, DequantizedWeight]:
    return {name: fn(model.get_submodule(name).weight) for name in rtn_weights(model, 128)}


@dataclass
class Row:
    key: str
    label: str
    # model (a private copy) -> quantized weights by module name; None keeps float weights
    weights: Callable[..., dict | None]
    activations: bool
    kv4: bool


def qoq(tokenizer, **overrides) -> Callable:
    def run(model):
        return prepare_qoq(model, QoQConfig(**overrides), tokenizer, progress=False)
    return run


def rows(tokenizer) -> list[Row]:
    return [
        Row("fp16", "FP16 (no quantization)", lambda m: None, False, False),
        Row("w8a8", "W8A8 per-token (INT8 weights per channel, KV16), RTN", lambda m: _all_linears(m, int8_per_channel),
            True, False),
        Row("w4a16-g128", "W4A16 g128 (UINT4, float16 scale), RTN",
            lambda m: _all_linears(m, uint4_float_scale_per_group), False, False),
        Row("rtn-g128", "RTN W4A8KV4 g128", lambda m: rtn_weights(m, 128), True, True),
        Row("rtn-pc", "RTN W4A8KV4 per-channel", lambda m: rtn_weights(m, -1), True, True),
        Row("qoq-g128", "QoQ W4A8KV4 g128", qoq(tokenizer), True, True),
        Row("qoq-g128-seed1", "QoQ W4A8KV4 g128, calibration seed 1", qoq(tokenizer, seed=1), True, True),
        Row("qoq-g128-seed2", "QoQ W4A8KV4 g128, calibration seed 2", qoq(tokenizer, seed=2), True, True),
        Row("qoq-pc", "QoQ W4A8KV4 per-channel", qoq(tokenizer, group_size=-1), True, True),
        Row("qoq-g128-lmhead", "QoQ W4A8KV4 g128, lm_head W4A8 too", qoq(tokenizer, quantize_lm_head=True), True, True),
        Row("qoq-pc-lmhead", "QoQ W4A8KV4 per-channel, lm_head W4A8 too",
            qoq(tokenizer, group_size=-1, quantize_lm_head=True), True, True),
        Row("qoq-g128-kv16", "QoQ W4A8 g128, KV16 (cost of KV4)", qoq(tokenizer, kv_bits=16), True, False),
        Row("qoq-datafree", "QoQ W4A8KV4 g128, data-free (no calibration)", qoq(None), True, True),
        Row("abl-rotation", "QoQ g128 − rotation", qoq(tokenizer, rotation=False), True, True),
        Row("abl-smoothattn", "QoQ g128 − SmoothAttention", qoq(tokenizer, smooth_attention=False), True, True),
        Row("abl-smoothout", "QoQ g128 − output smoothing", qoq(tokenizer, smooth_output=False), True, True),
        Row("abl-reorder", "QoQ g128 − channel reordering", qoq(tokenizer, reorder=False), True, True),
        Row("abl-clip", "QoQ g128 − clipping search", qoq(tokenizer, clip_search=False), True, True),
    ]


def _metrics(model, tokenizer, eval_ids, items, args) -> tuple[float, float | None]:
    ppl = perplexity(model, eval_ids, seq_len=args.seq_len, batch_size=args.batch_size,
                     max_windows=args.max_windows, progress=args.progress)
    acc = choice_accuracy(model, tokenizer, items, progress=args.progress) if items else None
    return ppl, acc


def evaluate_row(row: Row, base, tokenizer, eval_ids, items, args) -> dict:
    t0 = time.time()
    model = copy.deepcopy(base)
    weights = row.weights(model)
    prepare_s = time.time() - t0
    if weights is None:
        ppl, acc = _metrics(model, tokenizer, eval_ids, items, args)
    else:
        with simulate_quantized_model(model, weights, quantize_activations=row.activations,
                                      quantize_kv=row.kv4) as sim:
            ppl, acc = _metrics(sim, tokenizer, eval_ids, items, args)
    result = {"row": row.key, "label": row.label, "perplexity": ppl, "completion_accuracy": acc,
              "prepare_seconds": round(prepare_s, 1), "total_seconds": round(time.time() - t0, 1)}
    print(json.dumps(result), flush=True)
    return result


def markdown_table(results: list[dict], meta: dict) -> str:
    base = next((r["perplexity"] for r in results if r["row"] == "fp16"), None)
    lines = [
        f"Model: `{meta['model']}` ({meta['parameters'] / 1e6:.1f}M parameters); eval: {meta['eval_tokens']} tokens "
        f"of the held-out split, {meta['windows']} windows of {meta['seq_len']}; zero-shot: {meta['items']} "
        f"two-choice completions; device {meta['device']}, dtype {meta['dtype']}, torch {meta['torch']}, "
        f"date {meta['date']}, commit: see git log.",
        "",
        "| recipe | perplexity | Δ vs FP16 | completion acc. |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error'][:80]} | | |")
            continue
        delta = "" if base is None or r["row"] == "fp16" else f"{100 * (r['perplexity'] / base - 1):+.1f}%"
        acc = "" if r["completion_accuracy"] is None else f"{100 * r['completion_accuracy']:.1f}%"
        lines.append(f"| {r['label']} | {r['perplexity']:.3f} | {delta} | {acc} |")
    return "\n".join(lines)


def write_into_doc(doc: Path, table: str) -> None:
    text = doc.read_text() if doc.exists() else f"# Accuracy\n\n{TABLE_BEGIN}\n{TABLE_END}\n"
    if TABLE_BEGIN not in text:
        text += f"\n{TABLE_BEGIN}\n{TABLE_END}\n"
    text = re.sub(re.escape(TABLE_BEGIN) + ".*?" + re.escape(TABLE_END),
                  lambda _: f"{TABLE_BEGIN}\n{table}\n{TABLE_END}", text, flags=re.S)
    doc.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=qdata.reference_model_path())
    ap.add_argument("--rows", default="all", help="comma list of row keys (see rows()) or 'all'")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="float32 on CPU (float16 weights upcast exactly)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--items", type=int, default=0, help="zero-shot completion items (0: skip)")
    ap.add_argument("--progress", action="store_true", help="progress bars")
    ap.add_argument("--json", type=Path, default=REPO_ROOT / "docs/accuracy.json")
    ap.add_argument("--doc", type=Path, default=REPO_ROOT / "docs/accuracy.md")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/ untouched")
    args = ap.parse_args()

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    base = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=getattr(torch, args.dtype),
                                                attn_implementation="sdpa").to(args.device).eval()
    eval_docs = qdata.load_eval_documents()
    eval_ids = encode_documents(eval_docs, tokenizer)
    items = sentence_completion_items(eval_docs, args.items, seed=0) if args.items else []
    all_rows = rows(tokenizer)
    wanted = [r for r in all_rows if args.rows == "all" or r.key in args.rows.split(",")]
    results = []
    for row in wanted:
        try:
            results.append(evaluate_row(row, base, tokenizer, eval_ids, items, args))
        except Exception as exc:  # keep going: one failing recipe must not lose the other rows
            print(f"row {row.key} failed: {exc!r}", flush=True)
            results.append({"row": row.key, "label": row.label, "error": repr(exc)})
        if args.json and not args.no_write:  # partial results survive a time limit
            args.json.write_text(json.dumps({"results": results}, indent=1))

    n_windows = (eval_ids.numel() // args.seq_len) if args.max_windows is None else args.max_windows
    meta = {"model": str(args.model.relative_to(REPO_ROOT) if args.model.is_relative_to(REPO_ROOT) else args.model),
            "parameters": sum(p.numel() for p in base.parameters()), "eval_tokens": eval_ids.numel(),
            "windows": n_windows, "seq_len": args.seq_len, "items": len(items),
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
            "dtype": args.dtype, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    table = markdown_table(results, meta)
    print(table)
    if not args.no_write:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        write_into_doc(args.doc, table)


if __name__ == "__main__":
    main()
