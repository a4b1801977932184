"""Fused activation-quantization kernels against their unfused PyTorch equivalents and a plain copy.

For each op and M (tokens) at Llama-3-8B widths (hidden 4096, intermediate 14336): our CUDA kernel, the
reference chain of PyTorch ops on the GPU (qoq_torch.ops.reference: what the model would run without
the fused kernel), and a device copy of the op's input bytes (the floor for a one-pass kernel), both as the
driver's memcpy (`copy_`) and as an elementwise kernel (`torch.add(x, 0, out=...)`, the same bytes), beside an
almost empty kernel (`fill_` of one element: what any kernel launch costs in the graph).
Median µs of CUDA-graph replays, rotating over input sets larger than L2.

    python benchmarks/quant.py [--json out.json]
    python benchmarks/quant.py --check-small     # small cases, for compute-sanitizer
"""
from __future__ import annotations

import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qoq_torch.ops as ops  # noqa: E402
from attention import ROTATE_BYTES, kernel_benchmark_parser, time_graph  # noqa: E402
from qoq_torch.ops import reference  # noqa: E402

HIDDEN, INTERMEDIATE = 4096, 14336
MS = (1, 16, 256, 4096)


def cases(m: int):
    """(op name, input shape, fused call, unfused call, output bytes) at this M."""
    eps = 1e-5
    return [
        ("quantize_per_token", (m, HIDDEN), lambda x, w: ops.quantize_per_token(x),
         lambda x, w: reference.quantize_per_token(x), m * HIDDEN + 8 * m),
        ("rmsnorm_quantize", (m, HIDDEN), lambda x, w: ops.rmsnorm_quantize(x, w, eps),
         lambda x, w: reference.rmsnorm_quantize(x, w, eps), m * HIDDEN + 8 * m),
        ("silu_mul_quantize", (m, 2 * INTERMEDIATE), lambda x, w: ops.silu_mul_quantize(x),
         lambda x, w: reference.silu_mul_quantize(x), m * INTERMEDIATE + 8 * m),
        # the decoder's residual add + the MLP's norm: fused, against the add followed by our rmsnorm_quantize
        # kernel (what a layer ran before the fusion); reads x and the residual, writes h and the codes
        ("add_rmsnorm_quantize", (m, HIDDEN), lambda x, w, r: ops.add_rmsnorm_quantize(x, r, w, eps),
         lambda x, w, r: ops.rmsnorm_quantize(r + x, w, eps), 5 * m * HIDDEN + 8 * m),  # + residual read, h, codes
    ]


def bench(m: int) -> list[dict]:
    rows = []
    for name, shape, fused, unfused, out_bytes in cases(m):
        in_bytes = shape[0] * shape[1] * 2
        sets = max(1, min(64, math.ceil(ROTATE_BYTES / in_bytes)))
        xs = [torch.randn(shape, device="cuda", dtype=torch.float16) * 3 for _ in range(sets)]
        w = torch.rand(HIDDEN, device="cuda", dtype=torch.float16) + 0.5
        dst = [torch.empty_like(x) for x in xs]
        row = {"op": name, "m": m, "shape": list(shape), "in_bytes": in_bytes, "out_bytes": out_bytes}
        if name == "add_rmsnorm_quantize":  # two inputs: x and the next set as the residual
            def call(fn, i):
                return fn(xs[i], w, xs[(i + 1) % sets])
        else:
            def call(fn, i):
                return fn(xs[i], w)
        row["fused_us"] = time_graph(lambda i: call(fused, i), sets)
        row["unfused_us"] = time_graph(lambda i: call(unfused, i), sets)
        row["copy_us"] = time_graph(lambda i: dst[i].copy_(xs[i]), sets)
        row["copy_kernel_us"] = time_graph(lambda i: torch.add(xs[i], 0, out=dst[i]), sets)
        row["empty_kernel_us"] = time_graph(lambda i: dst[i][:1, :1].fill_(1.0), sets)
        row["fused_gbs"] = (in_bytes + out_bytes) / row["fused_us"] / 1e3
        row["copy_gbs"] = 2 * in_bytes / row["copy_us"] / 1e3
        row["speedup_vs_unfused"] = row["unfused_us"] / row["fused_us"]
        rows.append(row)
        del xs, dst
    return rows


def check_small() -> None:
    """Every code path once (vector and scalar loads, each dtype), compared with the CPU reference."""
    gen = torch.Generator().manual_seed(0)
    for m, k in ((3, 256), (2, 13), (1, 4096), (70, 4104), (66, 14336)):  # M > 64: rows in registers, then too long for them
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(m, k, generator=gen).to(dtype)
            w = (torch.rand(k, generator=gen) + 0.5).to(dtype)
            for got, ref in ((ops.quantize_per_token(x.cuda()), torch.ops.qoq.quantize_per_token(x)),
                             (ops.rmsnorm_quantize(x.cuda(), w.cuda(), 1e-6), torch.ops.qoq.rmsnorm_quantize(x, w, 1e-6)),
                             (ops.silu_mul_quantize(torch.cat((x, x), 1).cuda()),
                              torch.ops.qoq.silu_mul_quantize(torch.cat((x, x), 1))),
                             (ops.add_rmsnorm_quantize(x.cuda(), x.flip(0).cuda(), w.cuda(), 1e-6)[1:],
                              torch.ops.qoq.add_rmsnorm_quantize(x, x.flip(0), w, 1e-6)[1:])):
                assert int((got[0].cpu().int() - ref[0].int()).abs().max()) <= 1
        x32 = torch.randn(m, k, generator=gen)
        assert torch.equal(ops.quantize_per_token(x32.cuda())[0].cpu(), torch.ops.qoq.quantize_per_token(x32)[0])
    torch.cuda.synchronize()
    print("check-small ok")


def main() -> None:
    args = kernel_benchmark_parser(__doc__).parse_args()
    if args.check_small:
        check_small()
        return
    torch.manual_seed(0)
    rows = [r for m in MS for r in bench(m)]
    print(f"\nFused quantization kernels ({torch.cuda.get_device_name()}, torch {torch.__version__}), float16 input")
    print("| op | M | fused µs | GB/s | unfused PyTorch µs | speed-up | copy of input µs (memcpy / kernel) | "
          "empty kernel µs |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['m']} | {r['fused_us']:.1f} | {r['fused_gbs']:.0f} | {r['unfused_us']:.1f} | "
              f"{r['speedup_vs_unfused']:.1f}x | {r['copy_us']:.1f} / {r['copy_kernel_us']:.1f} | "
              f"{r['empty_kernel_us']:.1f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__}, "rows": rows},
                      fh, indent=1)


if __name__ == "__main__":
    main()
