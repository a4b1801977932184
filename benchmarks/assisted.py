"""Speculative decoding's verification forward on a QoQ model: a few new tokens on a filled KV4 cache through the KV4
decode attention (RoPE and the append in one op, `rope_kv4_append`, or as separate ops), against float attention over
the dequantized cache (what every multi-token continuation ran before).

Usage: python benchmarks/assisted.py --json OUT.json [--variant qoq-channel] [--contexts 1024 4096 16384]
Needs a CUDA GPU and the built extension. A random-weight Llama-3-8B-shaped model, batch 1: the cache is prefilled
with ``context`` tokens, then each timed forward appends ``--new`` tokens (as prompt lookup or an assistant model's
candidates do) and is cropped off again; wall-clock median ms of eager forwards, the paths alternated.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from qoq_torch.benchmarking import build_variant
from qoq_torch.nn import KV4Cache, attention

# path -> (the most new tokens the decode attention takes, RoPE and the append fused)
PATHS = {"decode attention": (attention.MAX_DECODE_QUERY_TOKENS, True),
         "decode attention, RoPE then append": (attention.MAX_DECODE_QUERY_TOKENS, False),
         "float attention": (0, True)}


def _select(path: str) -> None:
    attention.MAX_DECODE_QUERY_TOKENS, attention.QoQAttention.fuse_rope_append = PATHS[path]


def _forward_ms(model, cache: KV4Cache, tokens: torch.Tensor, context: int) -> tuple[float, torch.Tensor]:
    new = tokens.shape[1]
    positions = torch.arange(context, context + new, device=tokens.device)[None]
    torch.cuda.synchronize()
    start = time.perf_counter()
    logits = model(tokens, position_ids=positions, past_key_values=cache).logits
    torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) * 1e3
    cache.crop(-new)
    return elapsed, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--variant", default="qoq-channel")
    parser.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096, 16384])
    parser.add_argument("--new", type=int, default=4, help="new tokens a forward (candidates + 1)")
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()

    model = build_variant(args.shape, args.variant)
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        for context in args.contexts:
            prompt = torch.randint(100, model.config.vocab_size, (1, context), generator=gen).cuda()
            tokens = torch.randint(100, model.config.vocab_size, (1, args.new), generator=gen).cuda()
            cache = KV4Cache(model.config)
            model(prompt, past_key_values=cache)
            times: dict[str, list[float]] = {name: [] for name in PATHS}
            logits = {}
            for rep in range(args.reps + 2):  # two warm-up rounds
                for name in PATHS:
                    _select(name)
                    ms, logits[name] = _forward_ms(model, cache, tokens, context)
                    if rep >= 2:
                        times[name].append(ms)
            # the same tokens one forward each (the one-token decode path), as a token-by-token decode reads them
            _select("decode attention")
            single = torch.cat([model(tokens[:, i:i + 1], position_ids=torch.tensor([[context + i]], device="cuda"),
                                      past_key_values=cache).logits for i in range(args.new)], dim=1).float()
            cache.crop(-args.new)
            a, unfused, b = (logits[name].float() for name in PATHS)
            row = dict(context=context, new=args.new, **{f"{name} ms": statistics.median(t) for name, t in times.items()},
                       max_logit=float(single.abs().max()), fused_equals_unfused=bool(torch.equal(a, unfused)),
                       decode_vs_one_token=float((a - single).abs().max()),
                       float_vs_one_token=float((b - single).abs().max()))
            rows.append(row)
            print(f"context {context:6d}: " + ", ".join(f"{name} {statistics.median(t):7.2f} ms" for name, t in
                                                         times.items()) +
                  f"   max |logit - one token at a time|: decode {row['decode_vs_one_token']:.3f}, float "
                  f"{row['float_vs_one_token']:.3f} (max |logit| {row['max_logit']:.1f}); fused == unfused: "
                  f"{row['fused_equals_unfused']}")
    _select("decode attention")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, shape=args.shape,
                variant=args.variant, batch=1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
