"""Count the CUDA graphs torch.compile records during a sequence of `generate` calls (GPU only).

A compiled decode step is replayed as a CUDA graph while its static inputs (weights, the cache's buffers) stay at
the same addresses; otherwise torch.compile's CUDA-graph trees record the graph again. This runs the benchmark's
call sequence (warm-up, a 1-token call, timed calls) on a random-weight Llama-3-8B-shaped model and prints, per
call, the seconds, tokens/s and graphs recorded. For QoQ models `--no-reuse` makes every call allocate a new static
KV4 cache (the behaviour before the kept cache, and that of transformers' StaticCache).

    python benchmarks/graph_records.py --variant qoq-g128 [--no-reuse] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch._inductor.cudagraph_trees as cudagraph_trees  # noqa: E402

import qoq_torch.benchmarking as bench  # noqa: E402
import qoq_torch.nn.generation as generation  # noqa: E402

CALLS = (("warmup", 256), ("ttft", 1), ("timed", 256), ("timed2", 256), ("ttft2", 1), ("timed3", 256))


def count_records() -> list[float]:
    """Patch the CUDA-graph tree manager so that every recording appends its time to the returned list."""
    records: list[float] = []
    original = cudagraph_trees.CUDAGraphTreeManager.record_function

    def counting(self, *args, **kwargs):
        records.append(time.perf_counter())
        return original(self, *args, **kwargs)

    cudagraph_trees.CUDAGraphTreeManager.record_function = counting
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="qoq-g128", choices=sorted(bench.VARIANTS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--no-reuse", action="store_true", help="a new static KV4 cache every call (QoQ only)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    records = count_records()
    if args.no_reuse:
        generation._reusable_static_cache = lambda *a, **k: None
    model = bench.build_variant("llama3-8b", args.variant)
    ids = torch.randint(1, model.config.vocab_size, (args.batch, 128), device="cuda")
    rows = []
    for phase, tokens in CALLS:
        before = len(records)
        torch.cuda.synchronize()
        start = time.perf_counter()
        bench.run_generate(model, ids, tokens, bench.MODEL_DEFAULT)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        row = {"variant": args.variant, "reuse": not args.no_reuse, "phase": phase, "tokens": tokens,
               "s": round(seconds, 4), "tok_s": round(args.batch * tokens / seconds, 1),
               "recordings": len(records) - before}
        rows.append(row)
        print(row, flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
