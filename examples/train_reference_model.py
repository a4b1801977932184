"""Train qoq_torch's reference model: a small Llama on the Python and Linux kernel documentation.

GPU (scripts/gpu_train.sh runs this), the Python manual alone:
    python examples/train_reference_model.py --out OUT_DIR
CPU smoke test (a few steps of a tiny model, well under a minute):
    python examples/train_reference_model.py --tiny --steps 5 --out /tmp/ref_tiny
The shipped model, on the python + linux corpus (``build_corpus --deb python3.11-doc_*.deb linux-doc-6.1_*.deb``
and ``build_tokenizer --vocab-size 8192``; docs/reference_model.md):
    python examples/train_reference_model.py --corpus .cache/reference_corpus_v2 --steps 1500,3000,4500 --out OUT_DIR
Other sizes: --hidden-size, --layers, --heads, --kv-heads, --intermediate-size.

Data: the train split (``python -m qoq_torch.data.build_corpus`` writes ``train.jsonl.gz``; default path
``.cache/reference_corpus/train.jsonl.gz``), the shipped tokenizer, the shipped calib split as validation and the
shipped eval split for the final held-out perplexity; ``--corpus DIR`` takes all three splits and the tokenizer
(``DIR/tokenizer``, from ``build_tokenizer``) from a corpus directory instead. The vocabulary size and special
tokens come from the tokenizer. The output directory is a Hugging Face checkpoint (config.json, float16
model.safetensors, tokenizer files) plus ``training_log.json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

import qoq_torch.data as qdata  # noqa: E402
from qoq_torch.evaluation import encode_documents, perplexity  # noqa: E402

# The shipped model: hidden 384, GQA 6/2 heads of dim 64, SwiGLU intermediate 1024, untied embeddings (as in
# Llama-3); with the 8192-entry tokenizer 15.7M parameters = 31.5 MB in float16 (the vocabulary size and the
# special token ids are replaced by the tokenizer's at run time).
REFERENCE_CONFIG = dict(
    vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
    num_key_value_heads=2, head_dim=64, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=1,
)
TINY_CONFIG = dict(REFERENCE_CONFIG, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=32)
# Size options of the command line -> LlamaConfig keys (unset: the base config's value).
SIZE_OPTIONS = {"hidden_size": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
                "kv_heads": "num_key_value_heads", "intermediate_size": "intermediate_size"}
# Document path prefix (build_corpus) -> where the text comes from.
CORPUS_SOURCES = {"linux-doc-6.1/": "Debian linux-doc-6.1 6.1.192-2 HTML, prose only (GPL-2)",
                  "": "Debian python3.11-doc 3.11.2-6+deb12u9 HTML, prose only (PSF licence)"}


def read_documents(jsonl_gz: Path) -> list[dict[str, str]]:
    """The ``{"path", "text"}`` records of a split written by ``build_corpus``."""
    if not jsonl_gz.is_file():
        raise SystemExit(f"{jsonl_gz} not found: make it with `python -m qoq_torch.data.build_corpus --deb "
                         "python3.11-doc_*.deb --out .cache/reference_corpus`")
    with gzip.open(jsonl_gz, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def load_token_stream(jsonl_gz: Path, tokenizer, max_docs: int | None = None) -> torch.Tensor:
    """All documents' tokens, each followed by EOS, as one ``[N] int64`` tensor."""
    return encode_documents([d["text"] for d in read_documents(jsonl_gz)[:max_docs]], tokenizer)


def corpus_sources(jsonl_gz: Path) -> dict[str, int]:
    """Documents of a split per source (``CORPUS_SOURCES``)."""
    counts: dict[str, int] = {}
    for d in read_documents(jsonl_gz):
        source = next(v for k, v in CORPUS_SOURCES.items() if d["path"].startswith(k))
        counts[source] = counts.get(source, 0) + 1
    return counts


def model_config(args: argparse.Namespace, tokenizer) -> LlamaConfig:
    """``REFERENCE_CONFIG`` (``TINY_CONFIG`` with ``--tiny``) with the size options applied.

    The head dimension is hidden size / heads; the vocabulary size and special token ids are the tokenizer's.
    """
    config = dict(TINY_CONFIG if args.tiny else REFERENCE_CONFIG)
    config.update({key: getattr(args, opt) for opt, key in SIZE_OPTIONS.items() if getattr(args, opt) is not None})
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    if config["hidden_size"] % heads or heads % kv_heads:
        raise SystemExit(f"hidden size {config['hidden_size']}, {heads} heads, {kv_heads} KV heads: the hidden "
                         "size must be a multiple of the heads and the heads a multiple of the KV heads")
    config.update(head_dim=config["hidden_size"] // heads, vocab_size=len(tokenizer),
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    return LlamaConfig(**config)


def load_data(args: argparse.Namespace) -> tuple[object, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tokenizer and the train, validation (calib) and eval token streams (each document + EOS)."""
    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
    train_ids = load_token_stream(args.train, tokenizer, max_docs=20 if args.tiny else None)
    val_ids = (load_token_stream(args.calib, tokenizer) if args.calib
               else encode_documents(qdata.load_calibration_documents(), tokenizer))
    eval_ids = (load_token_stream(args.eval, tokenizer) if args.eval
                else encode_documents(qdata.load_eval_documents(), tokenizer))
    return tokenizer, train_ids, val_ids, eval_ids


def lr_at(step: int, steps: int, peak: float, warmup: int, floor_ratio: float = 0.1) -> float:
    """Linear warm-up then cosine decay to ``floor_ratio * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (floor_ratio + (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args: argparse.Namespace, steps: int, data: tuple | None = None) -> tuple[LlamaForCausalLM, object, dict]:
    """Train one model for ``steps`` steps; returns the float16 model, the tokenizer and its training log.

    ``data`` is ``load_data(args)``, loaded here when not given.
    """
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer, train_ids, val_ids, eval_ids = data or load_data(args)
    val_windows = 8 if args.tiny else None
    config = model_config(args, tokenizer)
    model = LlamaForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M, train tokens {train_ids.numel()}, device {device}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(args.seed)
    train_gpu = train_ids.to(device)
    offsets = torch.arange(args.seq_len + 1, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    history, t0, loss_ema = [], time.time(), None
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, args.lr, args.warmup)
        starts = torch.randint(0, train_ids.numel() - args.seq_len - 1, (args.batch_size,), generator=gen)
        batch = train_gpu[starts.to(device)[:, None] + offsets]
        with autocast:
            loss = _lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == steps - 1:
            value = loss.item()
            loss_ema = value if loss_ema is None else 0.9 * loss_ema + 0.1 * value
            entry = {"step": step, "train_loss": round(value, 4), "lr": opt.param_groups[0]["lr"],
                     "seconds": round(time.time() - t0, 1)}
            if step % args.eval_every == 0 or step == steps - 1:
                model.eval()
                with autocast:
                    entry["val_ppl"] = round(perplexity(model, val_ids, seq_len=args.seq_len, batch_size=16,
                                                        max_windows=val_windows, progress=False), 3)
                model.train()
            history.append(entry)
            print(json.dumps(entry), flush=True)
    train_seconds = time.time() - t0
    sources = corpus_sources(args.train)

    # Ship float16 weights; report the held-out perplexity of exactly what ships.
    model = model.to(torch.float16).eval()
    eval_ppl = perplexity(model, eval_ids, seq_len=args.seq_len, batch_size=16, max_windows=val_windows,
                          progress=False)
    val_ppl = perplexity(model, val_ids, seq_len=args.seq_len, batch_size=16, max_windows=val_windows,
                         progress=False)
    log = {
        "data": {"corpus": " + ".join(sources), "train_file_documents": sources, "train_tokens": train_ids.numel(),
                 "val_tokens (calib split)": val_ids.numel(), "eval_tokens (eval split)": eval_ids.numel(),
                 "files": {"train": str(args.train), "calib": str(args.calib or "shipped"),
                           "eval": str(args.eval or "shipped"), "tokenizer": str(args.tokenizer)}},
        "model": {"parameters": n_params, "config": {k: v for k, v in config.to_dict().items()
                                                     if k in REFERENCE_CONFIG}},
        "training": {"steps": steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "tokens_seen": steps * args.batch_size * args.seq_len,
                     "epochs": steps * args.batch_size * args.seq_len / train_ids.numel(),
                     "peak_lr": args.lr, "warmup": args.warmup, "weight_decay": args.weight_decay,
                     "seed": args.seed, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "seconds": round(train_seconds, 1),
                     "final_train_loss": history[-1]["train_loss"]},
        "float16": {"eval_perplexity": round(eval_ppl, 4), "val_perplexity": round(val_ppl, 4),
                    "seq_len": args.seq_len, "windows": "non-overlapping, tail dropped"},
        "history": history,
    }
    print(json.dumps({k: log[k] for k in ("training", "float16")}, indent=1), flush=True)
    return model, tokenizer, log


def train_and_select(args: argparse.Namespace) -> dict:
    """Train once per entry of ``--steps`` (a comma list) and save the one with the best validation perplexity.

    Validation is the calib split, so the eval split stays untouched by the choice. Runs that would not finish
    inside ``--time-budget`` seconds (estimated from the first run's speed) are skipped.
    """
    t0, best, sweep = time.time(), None, []
    seconds_per_step = None
    data = load_data(args)
    print(f"data loaded in {time.time() - t0:.1f} s", flush=True)
    for steps in args.steps:
        if seconds_per_step is not None and time.time() - t0 + steps * seconds_per_step > args.time_budget:
            print(f"skip steps={steps}: would exceed the time budget", flush=True)
            continue
        run_start = time.time()
        model, tokenizer, log = train(args, steps, data)
        run_seconds = time.time() - run_start
        seconds_per_step = run_seconds / steps
        print(f"run steps={steps}: {run_seconds:.1f} s (training {log['training']['seconds']} s)", flush=True)
        sweep.append({"steps": steps, **log["float16"], "final_train_loss": log["training"]["final_train_loss"],
                      "seconds": round(run_seconds, 1)})
        if best is None or log["float16"]["val_perplexity"] < best[2]["float16"]["val_perplexity"]:
            best = (model, tokenizer, log)
    model, tokenizer, log = best
    log["selection"] = {"rule": "lowest val (calib split) perplexity over the step counts tried", "runs": sweep}
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out))
    tokenizer.save_pretrained(str(args.out))
    (args.out / "training_log.json").write_text(json.dumps(log, indent=1))
    print(json.dumps(log["selection"], indent=1))
    return log


def _lm_loss(model: LlamaForCausalLM, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch [B, T+1]`` (inputs ``[:, :-1]``, targets ``[:, 1:]``)."""
    logits = model(input_ids=batch[:, :-1], use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--corpus", type=Path, default=None, help="a build_corpus directory: the default --train, "
                    "--calib and --eval are its splits, the default --tokenizer is DIR/tokenizer")
    ap.add_argument("--train", type=Path, default=None, help="default .cache/reference_corpus/train.jsonl.gz")
    ap.add_argument("--calib", type=Path, default=None, help="validation split (default: the shipped calib split)")
    ap.add_argument("--eval", type=Path, default=None, help="held-out split (default: the shipped eval split)")
    ap.add_argument("--tokenizer", type=Path, default=None, help="default: the shipped reference model's")
    size = ap.add_argument_group("model size (default: the reference model's; with --tiny, the tiny model's)")
    size.add_argument("--hidden-size", type=int, default=None)
    size.add_argument("--layers", type=int, default=None)
    size.add_argument("--heads", type=int, default=None, help="query heads; head dimension = hidden size / heads")
    size.add_argument("--kv-heads", type=int, default=None)
    size.add_argument("--intermediate-size", type=int, default=None)
    ap.add_argument("--steps", type=lambda v: [int(x) for x in v.split(",")], default=[2000],
                    help="training steps; a comma list trains one model per value and keeps the best on validation")
    ap.add_argument("--time-budget", type=float, default=330.0, help="seconds for all runs of a --steps list")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--device", default=None)
    ap.add_argument("--tiny", action="store_true", help="tiny model on 20 documents (CPU smoke test)")
    args = ap.parse_args(argv)
    corpus = args.corpus
    args.train = args.train or (corpus or REPO_ROOT / ".cache/reference_corpus") / "train.jsonl.gz"
    args.calib = args.calib or (corpus and corpus / "calib.jsonl.gz")
    args.eval = args.eval or (corpus and corpus / "eval.jsonl.gz")
    args.tokenizer = args.tokenizer or (corpus / "tokenizer" if corpus else qdata.reference_model_path())
    if args.tiny:
        args.batch_size, args.seq_len, args.warmup = min(args.batch_size, 4), min(args.seq_len, 128), 2
        args.log_every = args.eval_every = max(1, max(args.steps) // 2)
    return args


if __name__ == "__main__":
    train_and_select(parse_args())
