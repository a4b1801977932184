"""Command line: ``qoq quantize MODEL OUT``, ``qoq generate OUT "prompt"``, ``qoq eval OUT``, ``qoq bench OUT``."""
from __future__ import annotations

import argparse
import sys
import time

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _tokenizer(path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"  # decoder-only batches pad on the left
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def cmd_quantize(args) -> None:
    from transformers import AutoModelForCausalLM

    import qoq_torch

    device = _device(args.device)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype], device_map=device)
    tok = _tokenizer(args.model)
    config = qoq_torch.QoQConfig(group_size=args.group_size, num_samples=args.num_samples, seq_len=args.seq_len,
                                 kv_bits=args.kv_bits, quantize_lm_head=args.quantize_lm_head)
    start = time.perf_counter()
    qoq_torch.quantize(model, None if args.data_free else tok, config=config)
    print(f"quantized in {time.perf_counter() - start:.1f} s")
    qoq_torch.save_quantized(model, args.out, tokenizer=tok)
    print(f"saved to {args.out}")


def _load(args):
    import qoq_torch

    return qoq_torch.load_quantized(args.path, device=_device(args.device), dtype=DTYPES[args.dtype]), \
        _tokenizer(args.path)


def cmd_generate(args) -> None:
    model, tok = _load(args)
    inputs = tok(args.prompt, return_tensors="pt", padding=True).to(model.device)
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                         cache_implementation="static" if args.static else None, pad_token_id=tok.pad_token_id)
    for text in tok.batch_decode(out, skip_special_tokens=True):
        print(text)


def _load_any(args):
    """A directory written by `qoq quantize` loads as is; any other HF checkpoint loads in float and, with
    --quantize, is quantized with QoQ on the fly."""
    from pathlib import Path

    from .serialization import QOQ_CONFIG_NAME

    if (Path(args.path) / QOQ_CONFIG_NAME).is_file():
        return _load(args)
    from transformers import AutoModelForCausalLM

    import qoq_torch

    tok = _tokenizer(args.path)
    model = AutoModelForCausalLM.from_pretrained(args.path, dtype=DTYPES[args.dtype], device_map=_device(args.device))
    if args.quantize:
        config = qoq_torch.QoQConfig(group_size=args.group_size, quantize_lm_head=args.quantize_lm_head)
        qoq_torch.quantize(model, tok, config=config)
    return model, tok


def cmd_eval(args) -> None:
    from .data import load_eval_text
    from .evaluation import perplexity

    model, tok = _load_any(args)
    if args.text:
        with open(args.text, encoding="utf-8") as fh:
            text, source = fh.read(), args.text
    else:
        text, source = load_eval_text(), "the held-out text shipped with qoq_torch"
    ppl = perplexity(model, tok, text, seq_len=args.seq_len, max_windows=args.max_windows)
    print(f"perplexity {ppl:.3f} ({source}, seq_len {args.seq_len})")
    if args.zero_shot:
        from .data import load_eval_documents
        from .evaluation import choice_accuracy, sentence_completion_items

        items = sentence_completion_items(load_eval_documents(), args.zero_shot)
        acc = choice_accuracy(model, tok, items)
        print(f"zero-shot sentence completion {100 * acc:.1f}% ({len(items)} two-choice items from the held-out text)")


def cmd_bench_e2e(args) -> None:
    from .benchmarking import format_table, run_e2e

    protocols = [tuple(int(v) for v in p.split("x")) for p in args.protocols]
    rows = run_e2e(args.shapes, args.variants, args.batches, protocols, json_path=args.json,
                   measure_max_batch=args.measure_max_batch or args.time_max_batch,
                   time_max_batch=args.time_max_batch, stop_checks=args.stop_checks,
                   compile_modes=args.compile_modes)
    print(format_table(rows))


def cmd_bench(args) -> None:
    if args.path == "e2e":
        cmd_bench_e2e(args)
        return
    model, tok = _load(args)
    ids = torch.randint(10, len(tok), (args.batch, args.prompt_len), device=model.device)
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
              cache_implementation="static" if args.static else None, pad_token_id=tok.pad_token_id)
    model.generate(ids, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, **kw)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(f"{args.batch * args.new_tokens / seconds:.1f} tokens/s (batch {args.batch}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, {model.device})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qoq", description="W4A8KV4 (QoQ) quantization of Hugging Face LLMs")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
        p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))

    q = sub.add_parser("quantize", help="quantize a Hugging Face model directory and save it")
    q.add_argument("model", help="path of a Hugging Face model (Llama, Mistral, Qwen2, Qwen3)")
    q.add_argument("out", help="output directory")
    q.add_argument("--group-size", type=int, default=128, help="weight group size, -1 for per-channel")
    q.add_argument("--num-samples", type=int, default=64, help="calibration sequences")
    q.add_argument("--seq-len", type=int, default=512, help="calibration sequence length")
    q.add_argument("--kv-bits", type=int, default=4, choices=(4, 16))
    q.add_argument("--data-free", action="store_true", help="no calibration (rotation + RTN + clipping search)")
    q.add_argument("--quantize-lm-head", action="store_true", help="also quantize lm_head to W4A8 (faster decode, "
                                                                   "some accuracy: docs/accuracy.md)")
    common(q)
    q.set_defaults(func=cmd_quantize)

    g = sub.add_parser("generate", help="generate text with a quantized model")
    g.add_argument("path", help="directory written by `qoq quantize`")
    g.add_argument("prompt", nargs="+", help="one or more prompts (batched)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--static", action="store_true", help="static KV4 cache")
    common(g)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="perplexity of a quantized or float checkpoint (held-out text shipped with "
                                    "qoq_torch, or --text FILE)")
    e.add_argument("path", help="directory written by `qoq quantize`, or any local Hugging Face checkpoint")
    e.add_argument("--quantize", action="store_true", help="quantize a float checkpoint with QoQ before evaluating")
    e.add_argument("--group-size", type=int, default=128, help="with --quantize: -1 for per-channel")
    e.add_argument("--quantize-lm-head", action="store_true", help="with --quantize: lm_head to W4A8 as well")
    e.add_argument("--text", default=None, help="a UTF-8 text file to evaluate on")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows")
    e.add_argument("--zero-shot", type=int, default=0, metavar="N",
                   help="also score N two-choice sentence completions built from the held-out text")
    common(e)
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="generation throughput (tokens/s) of a saved model, or `qoq bench e2e`",
                       description="`qoq bench PATH`: tokens/s of a saved quantized model. `qoq bench e2e`: bfloat16 vs "
                                   "QoQ W4A8KV4 through HF generate on random-weight Llama-3-8B / Qwen1.5-72B-shaped "
                                   "models (GPU).")
    b.add_argument("path", help="directory written by `qoq quantize`, or `e2e`")
    b.add_argument("--shapes", nargs="+", default=["llama3-8b"], help="e2e: llama3-8b, qwen1.5-72b, tiny")
    b.add_argument("--variants", nargs="+", default=["bf16", "qoq-g128", "qoq-channel"],
                   help="e2e variants: bf16, qoq-g128, qoq-channel, qoq-g128-lmhead, qoq-channel-lmhead")
    b.add_argument("--batches", nargs="*", type=int, default=[1, 16, 64, 256],
                   help="e2e batch sizes (none: only --measure-max-batch)")
    b.add_argument("--protocols", nargs="+", default=["128x256"], help="e2e PROMPTxOUTPUT lengths")
    b.add_argument("--json", default=None, help="e2e: write the rows to this JSON file")
    b.add_argument("--measure-max-batch", action="store_true",
                   help="e2e: also find the largest batch that fits the GPU (bisection with short generate calls)")
    b.add_argument("--time-max-batch", action="store_true",
                   help="e2e: also time generate at the largest batch found (implies --measure-max-batch)")
    b.add_argument("--stop-checks", nargs="+", default=["model-default"],
                   choices=["model-default", "per-step", "deferred"],
                   help="e2e: how generate reads its stop flag on CUDA (a row each): what it does for the model "
                        "(bf16: every step; QoQ: one step late), forced every step, or forced one step late")
    b.add_argument("--compile-modes", nargs="+", default=["model-default"],
                   help="e2e: compile settings of the decode step (a row each): 'model-default' (what generate "
                        "uses without a compile_config: reduce-overhead), a torch.compile mode, or 'eager' (no "
                        "compilation)")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--prompt-len", type=int, default=128)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--static", action="store_true")
    common(b)
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        print(f"qoq {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
