"""Prompt-lookup (speculative) decoding on a QoQ model: the verification forward's few new tokens on the KV4 decode
attention against float attention over the dequantized cache (what every multi-token continuation ran before).

Usage: python benchmarks/assisted.py --json OUT.json [--variant qoq-channel] [--rounds 3]
Needs a CUDA GPU and the built extension. Greedy on a random-weight Llama-3-8B-shaped model: a prompt made of a
repeated random block gives prompt lookup candidates at every step; tokens/s are wall-clock medians over rounds,
the two paths alternated in one process.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from qoq_torch.benchmarking import build_variant
from qoq_torch.nn import attention


def _generate(model, ids: torch.Tensor, new_tokens: int, lookup: int | None) -> tuple[torch.Tensor, float]:
    kw = dict(prompt_lookup_num_tokens=lookup) if lookup else {}
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None, **kw)
    torch.cuda.synchronize()
    return out[:, ids.shape[1]:], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--variant", default="qoq-channel")
    parser.add_argument("--block", type=int, default=32, help="tokens of the repeated random block")
    parser.add_argument("--repeats", type=int, default=8, help="copies of the block in the prompt")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--lookup", type=int, default=3, help="prompt_lookup_num_tokens")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    model = build_variant(args.shape, args.variant)
    gen = torch.Generator().manual_seed(0)
    block = torch.randint(100, model.config.vocab_size, (1, args.block), generator=gen)
    ids = block.repeat(1, args.repeats).cuda()
    cases = {"greedy": (None, attention.MAX_DECODE_QUERY_TOKENS),
             "lookup, decode attention": (args.lookup, attention.MAX_DECODE_QUERY_TOKENS),
             "lookup, float attention": (args.lookup, 0)}
    times: dict[str, list[float]] = {name: [] for name in cases}
    tokens: dict[str, list[int]] = {}
    forwards: dict[str, int] = {}
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    for name, (lookup, max_queries) in cases.items():  # warm-up (and each path's tokens and forward count)
        attention.MAX_DECODE_QUERY_TOKENS = max_queries
        calls.clear()
        tokens[name] = _generate(model, ids, args.new_tokens, lookup)[0][0].tolist()
        forwards[name] = len(calls)
    hook.remove()
    for _ in range(args.rounds):
        for name, (lookup, max_queries) in cases.items():
            attention.MAX_DECODE_QUERY_TOKENS = max_queries
            times[name].append(_generate(model, ids, args.new_tokens, lookup)[1])
    greedy = tokens["greedy"]
    rows = []
    for name in cases:
        same = next((i for i, (a, b) in enumerate(zip(tokens[name], greedy)) if a != b), len(greedy))
        rows.append(dict(case=name, tok_s=args.new_tokens / statistics.median(times[name]),
                         seconds=times[name], forwards=forwards[name], tokens_equal_to_greedy=same))
        print(f"{name:28s} {rows[-1]['tok_s']:8.1f} tok/s   {forwards[name]} forwards   first {same} tokens equal "
              "greedy's")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, shape=args.shape,
                variant=args.variant, prompt=ids.shape[1], new_tokens=args.new_tokens, lookup=args.lookup)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
