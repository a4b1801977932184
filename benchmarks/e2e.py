"""End-to-end HF generate benchmark: bfloat16 vs QoQ W4A8KV4 on random-weight models of real shapes.

Usage: python benchmarks/e2e.py --json OUT.json [--shapes llama3-8b] [--batches 1 16 64 256] [--compile-modes eager]
(the same as `qoq bench e2e`). Needs a CUDA GPU and the built extension.
"""
from __future__ import annotations

import argparse
import json

from qoq_torch.benchmarking import format_table, run_e2e


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--shapes", nargs="+", default=["llama3-8b"])
    parser.add_argument("--variants", nargs="+", default=["bf16", "qoq-g128", "qoq-channel"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64, 256])
    parser.add_argument("--protocols", nargs="+", default=["128x256"], help="PROMPTxOUTPUT, e.g. 128x256 1024x512")
    parser.add_argument("--measure-max-batch", action="store_true", help="also find the largest batch that fits")
    parser.add_argument("--compile-modes", nargs="+", default=["model-default"],
                        help="the decode step's compilation (a row each): model-default, a torch.compile mode, eager")
    args = parser.parse_args()
    protocols = [tuple(int(v) for v in p.split("x")) for p in args.protocols]
    rows = run_e2e(args.shapes, args.variants, args.batches, protocols, json_path=args.json,
                   measure_max_batch=args.measure_max_batch, compile_modes=args.compile_modes)
    print(format_table(rows))
    if args.json:
        with open(args.json) as fh:
            print(json.dumps(json.load(fh)["device"]))


if __name__ == "__main__":
    main()
