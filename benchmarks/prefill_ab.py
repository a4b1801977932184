"""Time-to-first-token A/B of kernel settings on one random-weight model (one build, settings alternated).

Usage: python benchmarks/prefill_ab.py --variant qoq-g128 --batches 2 4 --prompt 128 \
           --setting QOQ_GEMM_WS_GROUP_MIN_M=256 [--setting NAME=VALUE,NAME=VALUE ...] [--json OUT.json]

For each batch, ``generate`` of one new token (the prompt's prefill, which yields it; eager, static cache) is
timed ``--reps`` times under each setting in turn (the default environment first), for ``--rounds`` rounds; the
table gives each setting's median ms per round. The settings are environment variables that the extension reads at
every call (docs/formats.md), so one process and one model serve every setting. Needs a CUDA GPU and the built
extension.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from qoq_torch.benchmarking import build_quantized_model, run_generate


def parse_setting(text: str) -> dict[str, str]:
    """``"A=1,B=2"`` -> ``{"A": "1", "B": "2"}``; ``"default"`` -> ``{}``."""
    if text == "default":
        return {}
    pairs = [item.split("=", 1) for item in text.split(",")]
    if any(len(p) != 2 or not p[0] for p in pairs):
        raise SystemExit(f"--setting {text!r}: expected NAME=VALUE[,NAME=VALUE...]")
    return dict(pairs)


def timed_ms(model: torch.nn.Module, input_ids: torch.Tensor, env: dict[str, str], reps: int) -> list[float]:
    """``reps`` wall times (ms) of a one-token ``generate`` with ``env`` set (restored afterwards)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        times = []
        for _ in range(reps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            run_generate(model, input_ids, 1, None)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=["qoq-g128", "qoq-channel"], default="qoq-g128")
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--batches", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--setting", action="append", default=[], help="NAME=VALUE[,NAME=VALUE...]; repeatable")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("prefill_ab needs a CUDA GPU")
    settings = ["default"] + args.setting
    envs = [parse_setting(s) for s in settings]
    model = build_quantized_model(args.shape, group_size=-1 if args.variant == "qoq-channel" else 128)
    vocab = model.config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for batch in args.batches:
        input_ids = torch.randint(1, vocab, (batch, args.prompt), generator=gen).to(model.device)
        for env in envs:
            timed_ms(model, input_ids, env, 2)  # warm-up: allocator, kernels' one-time set-up
        medians: dict[str, list[float]] = {s: [] for s in settings}
        for _ in range(args.rounds):
            for name, env in zip(settings, envs):
                medians[name].append(statistics.median(timed_ms(model, input_ids, env, args.reps)))
        for name in settings:
            rows.append({"variant": args.variant, "batch": batch, "prompt": args.prompt, "tokens": batch * args.prompt,
                         "setting": name, "median_ms_per_round": medians[name]})
            print(f"{args.variant} batch {batch} x {args.prompt} ({batch * args.prompt} tokens) {name}: "
                  + " / ".join(f"{m:.2f}" for m in medians[name]) + " ms")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
