"""W4A8 GEMM benchmark: qoq kernels side by side with PyTorch baselines at Llama-3-8B's and Qwen1.5-72B's layer shapes.

Usage:
    python benchmarks/gemm.py --json out.json [--png out.png] [--ms 1,16,1024] [--models llama3-8b,qwen1.5-72b]
    python benchmarks/gemm.py --check-small     # a few small cases vs the reference (for compute-sanitizer)
    python benchmarks/gemm.py --sweep-decode    # decode kernel variants and M <= 16 vs the tile kernel
    python benchmarks/gemm.py --sweep-skinny    # small-M kernel (rows per block) vs decode and tile kernels
    python benchmarks/gemm.py --sweep-stream    # streaming kernel (sm_90) variants vs the other small-M paths
    python benchmarks/gemm.py --layer-chain --ms 1,4,16 --json out.json   # a layer's 4 GEMMs back to back, all methods
    python benchmarks/gemm.py --chain-sweep     # small-M paths / streaming variants, each shape back to back

Default small-M paths: on sm_90 1 <= M <= 16 the streaming kernel (csrc/gemm/w4a8_stream.cu); elsewhere M <= 2 the
decode kernel (csrc/gemm/w4a8_gemv.cu); otherwise up to M = 32 per group / 16 per channel the small-M kernel
(csrc/gemm/w4a8_skinny.cu). Columns *_mma time the same calls on the mma.sync tile kernel (QOQ_GEMM_FORCE="0,0")
in the same run.

Times are medians of triton.testing.do_bench (which flushes L2 before every run, so weights come from HBM).
Methods: ours per-group (g=128) and per-channel (mma.sync kernel), and on sm_90 the opt-in wgmma kernel
(QOQ_GEMM_WGMMA, M >= 64; columns *_wgmma with 128 activation rows per CTA, *_wgmma256 with 256), bf16
F.linear, FP8 row-wise torch._scaled_mm, INT8 torch._int_mm (+ its row/column scaling, as a real W8A8 layer
would need), W4A16 torch._weight_int4pack_mm.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

import qoq_torch.ops as ops

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}  # (N, K)
# The main table's models: a layer's four GEMMs, (N, K). Qwen1.5-72B: hidden 8192, 64 query and 64 KV heads of 128,
# intermediate 24576 (gate and up fused, as QoQLinear runs them).
MODEL_SHAPES = {
    "llama3-8b": SHAPES,
    "qwen1.5-72b": {"qkv": (24576, 8192), "o": (8192, 8192), "gate_up": (49152, 8192), "down": (8192, 24576)},
}
MS = (1, 4, 8, 16, 64, 256, 1024, 4096, 8192)
BASELINES = ("bf16", "fp8_rowwise", "int8_int_mm", "w4a16_int4pack")
OURS = ("qoq_per_group", "qoq_per_channel")
# Same callables as OURS, timed with QOQ_GEMM_WGMMA set ("2,<bm>": the wgmma kernel or an error, never a silent
# fallback); only on sm_90 and for M >= 33, the sizes that path takes.
WGMMA = {"qoq_per_group_wgmma": ("qoq_per_group", "2,128"), "qoq_per_group_wgmma256": ("qoq_per_group", "2,256"),
         "qoq_per_channel_wgmma": ("qoq_per_channel", "2,128"),
         "qoq_per_channel_wgmma256": ("qoq_per_channel", "2,256")}


# Same callables as OURS on the mma.sync tile kernel, for M <= SMALL_M_MAX (decode / small-M kernels by default).
MMA_SMALL = {"qoq_per_group_mma": "qoq_per_group", "qoq_per_channel_mma": "qoq_per_channel"}
SMALL_M_MAX = 64  # the decode and small-M kernels' range: the tile kernel is timed beside them up to here


def wgmma_enabled(m: int) -> bool:
    return m >= 33 and torch.cuda.get_device_capability() == (9, 0)


def _rand_per_group(n: int, k: int, g: int, device: str):
    s2 = torch.randint(1, 17, (n, k // g), dtype=torch.int32, device=device)
    z2 = torch.randint(0, 16, (n, k // g), dtype=torch.int32, device=device)
    lo = torch.clamp(z2 - 128 // s2, min=0)
    hi = torch.clamp(z2 + 127 // s2, max=15)
    u = torch.rand(n, k // g, g, device=device)
    w4 = (lo.unsqueeze(-1) + (u * (hi - lo + 1).unsqueeze(-1)).floor().long()).clamp(max=hi.unsqueeze(-1))
    s1 = (torch.rand(n, device=device) * 0.01 + 1e-4).half()
    return w4.reshape(n, k).to(torch.uint8), s2.to(torch.uint8), z2.to(torch.uint8), s1


def make_weights(n: int, k: int, only_ours: bool = False) -> dict:
    """The random [n, k] layer weights of every method (ours only with only_ours), independent of M."""
    dev = "cuda"
    w4, s2, z2, s1 = _rand_per_group(n, k, 128, dev)
    w = {"qw": ops.pack_weights(w4), "s2": s2, "z2": z2, "s1": s1,
         "packed_scales": ops.pack_scales(s2, z2),  # as QoQLinear keeps it
         "zero": torch.randint(0, 16, (n,), dtype=torch.uint8, device=dev)}
    if only_ours:
        return w
    w["bf16"] = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    w["fp8"] = torch.randn(n, k, device=dev).to(torch.float8_e4m3fn)
    w["fp8_scale"] = torch.rand(1, n, device=dev)
    w["int8_t"] = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev).t()
    w["int8_scale"] = torch.rand(n, device=dev)
    try:
        # Timing only: core PyTorch's own packing of the same 4-bit values (its nibble order, not ours).
        w["int4pack"] = torch._convert_weight_to_int4pack((w4[:, ::2] << 4 | w4[:, 1::2]).contiguous(), 8)
        w["int4pack_sz"] = torch.rand(k // 128, n, 2, device=dev, dtype=torch.bfloat16)
    except Exception as exc:  # noqa: BLE001  (op missing or layout changed in this torch build)
        print(f"# w4a16_int4pack unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
    return w


def make_methods(m: int, n: int, k: int, only_ours: bool = False, weights: dict | None = None) -> dict:
    """name -> zero-argument callable computing the [m, n] layer output on random data (the weights of
    make_weights(n, k, only_ours), new ones unless given)."""
    dev = "cuda"
    w = make_weights(n, k, only_ours) if weights is None else weights
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=dev)
    x_s = torch.rand(m, device=dev) * 0.01
    x_sum = x_q.sum(1, dtype=torch.int32)
    methods = {
        "qoq_per_group": lambda: ops.w4a8_gemm_per_group(x_q, x_s, w["qw"], w["s2"], w["z2"], w["s1"], None, 128,
                                                         torch.bfloat16, None, w["packed_scales"], x_sum),
        "qoq_per_channel": lambda: ops.w4a8_gemm_per_channel(x_q, x_s, x_sum, w["qw"], w["s1"], w["zero"], None,
                                                             torch.bfloat16),
    }
    if only_ours:
        return methods
    methods["bf16"] = lambda: F.linear(x, w["bf16"])
    x8 = torch.randn(m, k, device=dev).to(torch.float8_e4m3fn)
    sa = torch.rand(m, 1, device=dev)
    methods["fp8_rowwise"] = lambda: torch._scaled_mm(x8, w["fp8"].t(), scale_a=sa, scale_b=w["fp8_scale"],
                                                      out_dtype=torch.bfloat16)
    methods["int8_int_mm"] = lambda: (torch._int_mm(x_q, w["int8_t"]).float() * x_s[:, None]
                                      * w["int8_scale"]).to(torch.bfloat16)
    if "int4pack" in w:
        methods["w4a16_int4pack"] = lambda: torch._weight_int4pack_mm(x, w["int4pack"], 128, w["int4pack_sz"])
    return methods


def bench(fn, wgmma_env: str | None = None, force_env: str | None = None) -> float | None:
    """Median us of fn; with wgmma_env / force_env, QOQ_GEMM_WGMMA / QOQ_GEMM_FORCE is set to it for the duration."""
    import os

    import triton.testing

    if wgmma_env is not None:
        os.environ["QOQ_GEMM_WGMMA"] = wgmma_env
    if force_env is not None:
        os.environ["QOQ_GEMM_FORCE"] = force_env
    try:
        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3  # us
    except Exception as exc:  # noqa: BLE001  (e.g. _int_mm's shape limits at tiny M)
        print(f"# failed: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
        return None
    finally:
        if wgmma_env is not None:
            os.environ.pop("QOQ_GEMM_WGMMA")
        if force_env is not None:
            os.environ.pop("QOQ_GEMM_FORCE")


def _sm_clock_mhz() -> int | None:
    """The SM clock now (NVML through torch), or None where NVML is missing."""
    try:
        return torch.cuda.clock_rate()
    except Exception:  # noqa: BLE001  (pynvml not installed, or no NVML on this driver)
        return None


def run(ms, models=tuple(MODEL_SHAPES), only: tuple[str, ...] | None = None, rounds: int = 1) -> dict:
    """Every method (or those in `only`) at every M on each model's four layer GEMMs (median µs, L2 flushed); rows
    carry the model and the SM clock (MHz, NVML) read after each timing. With rounds > 1 each shape's methods are
    timed `rounds` times in rotating order and the median kept: under sustained tensor-core load the H100's clock
    moves between ~1.25 and 1.98 GHz (power), which at M >= 1024 moves one reading by 10-20%."""
    import statistics

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": [], "models": {},
               "rounds": rounds}
    for model in models:
        shapes = MODEL_SHAPES[model]
        sums: dict[str, dict[str, float | None]] = {}
        for m in ms:
            totals: dict[str, float | None] = {}
            for shape, (n, k) in shapes.items():
                methods = make_methods(m, n, k)
                timed = [(name, fn, None, None) for name, fn in methods.items()]
                if wgmma_enabled(m):
                    timed += [(name, methods[base], env, None) for name, (base, env) in WGMMA.items()]
                if m <= SMALL_M_MAX:
                    timed += [(name, methods[base], None, "0,0") for name, base in MMA_SMALL.items()]
                if only is not None:
                    timed = [t for t in timed if t[0] in only]
                if not timed:
                    continue
                readings: dict[str, list] = {name: [] for name, *_ in timed}
                for r in range(rounds):
                    for name, fn, env, force in timed[r % len(timed):] + timed[:r % len(timed)]:
                        readings[name].append((bench(fn, env, force), _sm_clock_mhz()))
                for name, got in readings.items():
                    times = [us for us, _ in got if us is not None]
                    us = statistics.median(times) if len(times) == len(got) else None
                    results["rows"].append({"model": model, "m": m, "shape": shape, "n": n, "k": k, "method": name,
                                            "us": us, "tflops": None if us is None else 2 * m * n * k / us / 1e6,
                                            "us_rounds": [us for us, _ in got], "sm_clock_mhz": [c for _, c in got]})
                    prev = totals.get(name, 0.0)
                    totals[name] = None if (us is None or prev is None) else prev + us
                del methods, timed
                torch.cuda.empty_cache()
            sums[str(m)] = totals
            print(f"# {model} M={m}: " + ", ".join(f"{name} {us:.1f}" for name, us in totals.items()
                                                    if us is not None and name in OURS + BASELINES), flush=True)
        results["models"][model] = {"shapes": shapes, "layer_sum_us": sums}
    return results


def speedups(totals: dict) -> dict:
    """Layer sums of one (model, M) -> {format: (best baseline name, best / ours, FP8 / ours)} for our two formats."""
    present = {b: totals[b] for b in BASELINES if totals.get(b) is not None}
    best = min(present, key=present.get) if present else None
    out = {}
    for fmt in OURS:
        ours = totals.get(fmt)
        if ours is None or best is None:
            continue
        fp8 = totals.get("fp8_rowwise")
        out[fmt] = (best, present[best] / ours, None if fp8 is None else fp8 / ours)
    return out


def print_table(results: dict) -> None:
    print(f"# {results['device']}, torch {results['torch']}; median us (L2 flushed); speed-up = best baseline / ours")
    names = OURS + tuple(MMA_SMALL) + tuple(WGMMA) + BASELINES
    by_key = {(r.get("model", "llama3-8b"), r["m"], r["shape"], r["method"]): r for r in results["rows"]}
    for model, entry in results["models"].items():
        shapes = entry["shapes"]
        print(f"## {model}")
        print("| M | shape | " + " | ".join(names) + " | TFLOPS (per-group) | speed-up (per-group) | "
              "speed-up (per-group wgmma) |")
        print("|" + "---|" * (len(names) + 5))
        for m_str, totals in entry["layer_sum_us"].items():
            m = int(m_str)
            for shape in list(shapes) + ["sum"]:
                if shape == "sum":
                    us = {name: totals.get(name) for name in names}
                    flops = sum(2 * m * n * k for n, k in shapes.values())
                else:
                    us = {name: (by_key.get((model, m, shape, name)) or {}).get("us") for name in names}
                    n, k = shapes[shape]
                    flops = 2 * m * n * k
                cells = ["-" if us[x] is None else f"{us[x]:.1f}" for x in names]
                best = min((us[b] for b in BASELINES if us[b] is not None), default=None)
                ours = us["qoq_per_group"]
                tf = "-" if ours is None else f"{flops / ours / 1e6:.1f}"
                sp = "-" if (ours is None or best is None) else f"{best / ours:.2f}x"
                wg = min((us[w] for w in ("qoq_per_group_wgmma", "qoq_per_group_wgmma256") if us[w] is not None),
                         default=None)
                sp_wg = "-" if (wg is None or best is None) else f"{best / wg:.2f}x"
                print(f"| {m} | {shape} | " + " | ".join(cells) + f" | {tf} | {sp} | {sp_wg} |")
    print_summary(results)
    print_decode_summary(results)


def print_summary(results: dict) -> None:
    """Per model and M, the layer sums of our two formats against the best baseline and FP8 row-wise."""
    print("| model | M | per group µs | per channel µs | best baseline µs | per group / best | per channel / best "
          "| per group / FP8 | per channel / FP8 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model, entry in results["models"].items():
        for m_str, totals in entry["layer_sum_us"].items():
            sp = speedups(totals)
            if set(sp) != set(OURS):
                continue
            best = sp[OURS[0]][0]
            fp8 = ["-" if sp[f][2] is None else f"{sp[f][2]:.2f}x" for f in OURS]
            print(f"| {model} | {m_str} | {totals[OURS[0]]:.1f} | {totals[OURS[1]]:.1f} | {totals[best]:.1f} "
                  f"({best}) | {sp[OURS[0]][1]:.2f}x | {sp[OURS[1]][1]:.2f}x | {fp8[0]} | {fp8[1]} |")


def print_decode_summary(results: dict) -> None:
    """Default small-M path (decode / small-M kernel) against the mma.sync tile kernel, sum of the four GEMMs."""
    for model, entry in results["models"].items():
        for m_str, totals in entry["layer_sum_us"].items():
            cells = []
            for ours, mma in zip(OURS, MMA_SMALL):
                a, b = totals.get(ours), totals.get(mma)
                if a is not None and b is not None:
                    cells.append(f"{ours[4:]} {a:.1f} vs {b:.1f} us ({b / a:.2f}x)")
            if cells:
                print(f"# {model}: default vs mma tile kernel, M={m_str}: " + "; ".join(cells))


def plot(results: dict, path: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("# matplotlib not installed: no plot", file=sys.stderr)
        return
    from plot import plot_gemm_results  # benchmarks/plot.py, beside this script

    plot_gemm_results(results, path)


SWEEP = {1: (0, 4), 16: (0, 4, 7), 32: (2, 6, 7), 48: (2, 6, 7), 64: (0, 2, 3, 6, 7), 256: (2, 3, 5, 6),
         1024: (3, 5), 4096: (3, 5)}  # M -> tile configs
SWEEP_SPLITS = {1: (0, 2, 4, 8), 16: (0, 2, 4, 8)}


def sweep() -> dict:
    """Per-group kernel under each tile config / split count (QOQ_GEMM_FORCE); prints the layer sums."""
    import os

    rows = []
    for m, configs in SWEEP.items():
        for cfg in configs:
            for splits in SWEEP_SPLITS.get(m, (0, 1)):
                os.environ["QOQ_GEMM_FORCE"] = f"{cfg},{splits}"
                per_shape = {}
                for shape, (n, k) in SHAPES.items():
                    per_shape[shape] = bench(make_methods(m, n, k, only_ours=True)["qoq_per_group"])
                os.environ.pop("QOQ_GEMM_FORCE")
                total = None if None in per_shape.values() else sum(per_shape.values())
                rows.append({"m": m, "config": cfg, "splits": splits, "us": per_shape, "sum_us": total})
                cells = " ".join(f"{k}={v:.1f}" for k, v in per_shape.items() if v is not None)
                print(f"sweep M={m} config={cfg} splits={splits}: sum={total and round(total, 1)} us  {cells}")
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}


DECODE_SWEEP_MS = (1, 2, 3, 4, 8, 16)
DECODE_CONFIGS = range(5)  # QOQ_GEMM_DECODE_CONFIG variants (M <= 2)


def _sweep_variants(ms, variants_of, tag: str) -> dict:
    """Layer sums of both formats for each M and each (label, environment, QOQ_GEMM_FORCE) of variants_of(m)."""
    import os

    rows = []
    for m in ms:
        for label, env, force in variants_of(m):
            os.environ.update(env)
            try:
                sums = {}
                for fmt in OURS:
                    per_shape = {shape: bench(make_methods(m, n, k, only_ours=True)[fmt], force_env=force)
                                 for shape, (n, k) in SHAPES.items()}
                    total = None if None in per_shape.values() else sum(per_shape.values())
                    rows.append({"m": m, "variant": label, "method": fmt, "us": per_shape, "sum_us": total})
                    sums[fmt] = total
            finally:
                for name in env:
                    os.environ.pop(name, None)
            print(f"{tag} M={m} {label}: " + "  ".join(
                f"{fmt[4:]}={'-' if v is None else f'{v:.1f}'} us" for fmt, v in sums.items()), flush=True)
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}


def sweep_decode() -> dict:
    """Decode kernel at M <= 16 (QOQ_GEMM_DECODE_MAX_M=16), each of its M <= 2 variants, against the mma.sync
    tile kernel; prints the layer sums of both formats."""
    def variants(m):
        configs = DECODE_CONFIGS if m <= 2 else (0,)
        return [(f"decode{c}", {"QOQ_GEMM_DECODE_MAX_M": "16", "QOQ_GEMM_DECODE_CONFIG": str(c), "QOQ_GEMM_STREAM": "0"},
                 None)
                for c in configs] + [("mma", {}, "0,0")]
    return _sweep_variants(DECODE_SWEEP_MS, variants, "sweep-decode")


SKINNY_SWEEP_MS = (1, 2, 3, 4, 8, 16, 24, 32, 48, 64)


def sweep_skinny() -> dict:
    """Small-M kernel with its own rows-per-block choice and with 16 / 32 / 64 rows forced (QOQ_GEMM_SKINNY_RT),
    against the decode kernel (M <= 2) and the mma.sync tile kernel; prints the layer sums of both formats."""
    def variants(m):
        on = {"QOQ_GEMM_DECODE": "0", "QOQ_GEMM_SKINNY_MAX_M": "64", "QOQ_GEMM_STREAM": "0"}
        out = [("skinny-auto", on, None)] + [(f"skinny-rt{rt}", {**on, "QOQ_GEMM_SKINNY_RT": str(rt)}, None)
                                             for rt in (1, 2, 4)]
        if m <= 2:
            out.append(("decode", {"QOQ_GEMM_STREAM": "0"}, None))
        return out + [("mma", {}, "0,0")]
    return _sweep_variants(SKINNY_SWEEP_MS, variants, "sweep-skinny")


STREAM_SWEEP_MS = (1, 2, 3, 4, 8, 16, 24, 32)
STREAM_VARIANTS = range(4)  # QOQ_GEMM_STREAM_VARIANT: (rows per tile, consumer warps, blocks per SM)


def sweep_stream() -> dict:
    """Streaming kernel (sm_90), each variant forced (QOQ_GEMM_STREAM_VARIANT), against the dispatch without
    it (decode / small-M kernels) and the mma.sync tile kernel; prints the layer sums of both formats."""
    def variants(m):
        on = {"QOQ_GEMM_STREAM_MIN_M": "1", "QOQ_GEMM_STREAM_MAX_M": "32"}
        return ([(f"stream-v{v}", {**on, "QOQ_GEMM_STREAM_VARIANT": str(v)}, None) for v in STREAM_VARIANTS]
                + [("no-stream", {"QOQ_GEMM_STREAM": "0"}, None), ("mma", {}, "0,0")])
    return _sweep_variants(STREAM_SWEEP_MS, variants, "sweep-stream")


WGMMA_SPLIT_SWEEP_MS = (64, 128, 256, 512, 1024)
WGMMA_SPLITS = (1, 2, 4, 8, 16)
WGMMA_WS_SPLITS = (1, 2, 3, 4)


def sweep_wgmma_splits(ms=None) -> dict:
    """wgmma kernels (128-row tile; the warp-specialised 256-row one) with their own split-K choice and with
    split counts forced (QOQ_GEMM_WGMMA_SPLITS), against the default dispatch; prints the layer sums of both
    formats."""
    def variants(m):
        on = {"QOQ_GEMM_WGMMA": "1,128"}
        return ([("default", {}, None), ("wgmma-auto", on, None)]
                + [(f"wgmma-s{s}", {**on, "QOQ_GEMM_WGMMA_SPLITS": str(s)}, None) for s in WGMMA_SPLITS]
                + [("wgmma256", {"QOQ_GEMM_WGMMA": "2,256"}, None)]
                + [(f"wgmma256-s{s}", {"QOQ_GEMM_WGMMA": "2,256", "QOQ_GEMM_WGMMA_SPLITS": str(s)}, None)
                   for s in WGMMA_WS_SPLITS])
    return _sweep_variants(ms or WGMMA_SPLIT_SWEEP_MS, variants, "sweep-wgmma-splits")


CHAIN_BYTES = 400 << 20  # weights cycled per layer chain: 8x the 50 MB L2, so no weight is read from L2
CHAIN_METHODS = ("qoq_per_group", "qoq_per_channel", "bf16", "fp8_rowwise", "w4a16_int4pack")
WEIGHT_BYTES_PER_PARAM = {"qoq_per_group": 0.5 + 2 / 128, "qoq_per_channel": 0.5, "bf16": 2.0, "fp8_rowwise": 1.0,
                          "w4a16_int4pack": 0.5 + 4 / 128}


def _cold_times(fn, flush: torch.Tensor, mode: str, reps: int = 40) -> float:
    """Median µs of fn right after evicting L2 with a 256 MB buffer: `zero` writes it (as do_bench does, which leaves
    dirty lines that fn's reads must write back), `read` reads it (L2 left clean)."""
    import statistics

    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps + 5)]
    for start, end in events:
        if mode == "zero":
            flush.zero_()
        else:
            flush.sum()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in events[5:])


def _graph_us_per_pass(calls, passes: int, replays: int = 10) -> float:
    """Median µs of one pass over `calls` (zero-argument callables) from CUDA-graph replays of `passes` passes."""
    from qoq_torch.benchmarking import graph_replay_us

    def record():
        for _ in range(passes):
            for fn in calls:
                fn()
    return graph_replay_us(record, passes, replays)


def layer_chain(ms, methods=CHAIN_METHODS, with_cold: bool = True, model: str = "llama3-8b") -> dict:
    """A model's four layer GEMMs (MODEL_SHAPES) back to back in a CUDA graph (our kernels launched with PDL, so each
    one's start overlaps the previous one's tail; in a decode step a quantization kernel sits between them), cycling
    over enough layer copies that the weights read per pass (>= CHAIN_BYTES) never fit L2. Reported per layer, beside
    the per-GEMM sums of the same calls timed cold (L2 evicted by a write, as triton's do_bench does, and by a read).
    As in a model, the weights are allocated once and every M runs on them, and the chains of all M are timed before
    any cold timing: new weights for each M and the cold timings' 256 MB memsets between two chains moved our chain
    times by up to 4-6 us a layer from one M to the next (docs/benchmarks.md, "The layer chain's set-up").
    """
    import math

    shapes = MODEL_SHAPES[model]
    params = sum(n * k for n, k in shapes.values())
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda").view(torch.float32)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    copies = {name: max(1, math.ceil(CHAIN_BYTES / (params * WEIGHT_BYTES_PER_PARAM[name]))) for name in methods}
    only_ours = set(methods) <= set(OURS)
    weights = [{shape: make_weights(n, k, only_ours) for shape, (n, k) in shapes.items()}
               for _ in range(max(copies.values()))]

    def layer_for(m: int, w: dict) -> dict:
        return {shape: make_methods(m, n, k, only_ours, weights=w[shape]) for shape, (n, k) in shapes.items()}

    rows = {}
    for m in ms:
        layers = [layer_for(m, w) for w in weights]
        for name in methods:
            per_layer = [{shape: layer[shape][name] for shape in shapes} for layer in layers[:copies[name]]]
            calls = [fn for layer in per_layer for fn in layer.values()]
            chain = _graph_us_per_pass(calls, passes=max(1, 8 // len(per_layer))) / len(per_layer)
            rows[(m, name)] = {"model": model, "m": m, "method": name, "layer_chain_us": chain,
                               "layer_copies": len(per_layer)}
            gbs = params * WEIGHT_BYTES_PER_PARAM[name] / chain / 1e3
            print(f"layer-chain M={m} {name}: chain {chain:.1f} us/layer ({gbs:.0f} GB/s of weights)"
                  + ("" if model == "llama3-8b" else f" [{model}]"), flush=True)
        del layers
    for m in ms if with_cold else ():
        first = layer_for(m, weights[0])  # the cold timings use the first layer copy only
        for name in methods:
            cold = {mode: sum(_cold_times(first[shape][name], flush, mode) for shape in shapes)
                    for mode in ("zero", "read")}
            rows[(m, name)].update(cold_zero_flush_sum_us=cold["zero"], cold_read_flush_sum_us=cold["read"])
            print(f"layer-chain M={m} {name}: cold sums {cold['zero']:.1f} (zero flush) / {cold['read']:.1f} "
                  f"(read flush) us" + ("" if model == "llama3-8b" else f" [{model}]"), flush=True)
        del first
    results["rows"] = list(rows.values())
    del weights
    torch.cuda.empty_cache()
    return results


CHAIN_SWEEP_MS = (1, 2, 3, 4, 8, 16, 24, 32)


def chain_sweep(ms) -> dict:
    """Our small-M paths under the layer-chain timing, one shape at a time: each GEMM shape back to back over enough
    weight copies (>= CHAIN_BYTES) in a CUDA graph, for the default dispatch, each streaming variant forced, and the
    dispatch without the streaming kernel; prints per-shape µs and their sum per format."""
    import math
    import os

    stream_on = {"QOQ_GEMM_STREAM_MIN_M": "1", "QOQ_GEMM_STREAM_MAX_M": "32"}
    variants = ([("default", {})] + [(f"stream-v{v}", {**stream_on, "QOQ_GEMM_STREAM_VARIANT": str(v)})
                                     for v in STREAM_VARIANTS] + [("no-stream", {"QOQ_GEMM_STREAM": "0"})])
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    # the weights once for all M, as layer_chain does (new weights for each M moved the chain times)
    weights = {shape: [make_weights(n, k, only_ours=True)
                       for _ in range(math.ceil(CHAIN_BYTES / (n * k * WEIGHT_BYTES_PER_PARAM["qoq_per_group"])))]
               for shape, (n, k) in SHAPES.items()}
    for m in ms:
        copies = {shape: [make_methods(m, *SHAPES[shape], only_ours=True, weights=w) for w in shape_weights]
                  for shape, shape_weights in weights.items()}
        for label, env in variants:
            os.environ.update(env)
            try:
                sums = {}
                for fmt in OURS:
                    per_shape = {}
                    for shape, layer_copies in copies.items():
                        calls = [c[fmt] for c in layer_copies]
                        per_shape[shape] = _graph_us_per_pass(calls, passes=2) / len(calls)
                    sums[fmt] = sum(per_shape.values())
                    results["rows"].append({"m": m, "variant": label, "method": fmt, "us": per_shape,
                                            "sum_us": sums[fmt]})
                    print(f"chain-sweep M={m} {label} {fmt[4:]}: sum {sums[fmt]:.1f} us  " + " ".join(
                        f"{k}={v:.2f}" for k, v in per_shape.items()), flush=True)
            except Exception as exc:  # noqa: BLE001  (a variant a shape does not support)
                print(f"chain-sweep M={m} {label}: failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            finally:
                for name in env:
                    os.environ.pop(name, None)
        del copies
    del weights
    torch.cuda.empty_cache()
    return results


def check_small() -> None:
    """Small cases covering every tile config, split-K, the decode kernel and both formats; raises on any mismatch.
    Cases with M <= 16 run twice: on the decode kernel (default) and on the mma.sync kernel (QOQ_GEMM_FORCE)."""
    import os

    gen = torch.Generator().manual_seed(0)
    cases = [(1, 64, 1024), (3, 48, 192), (9, 32, 4160), (16, 16, 2048), (20, 144, 256), (130, 272, 512)]
    for (m, n, k), force in [(c, f) for c in cases for f in ((None, "0,0") if c[0] <= SMALL_M_MAX else (None,))]:
        if force is not None:
            os.environ["QOQ_GEMM_FORCE"] = force
        x_q = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
        x_s = torch.rand(m, generator=gen) + 0.1
        x_sum = x_q.sum(1, dtype=torch.int32)
        w4, s2, z2, s1 = (t.cpu() for t in _rand_per_group(n, k, 64, "cpu"))
        qw = ops.pack_weights(w4)
        bias = torch.randn(n, generator=gen)
        ref = torch.ops.qoq.w4a8_gemm_per_group(x_q, x_s, qw, s2, z2, s1, bias, 64, torch.float16)
        cu = [t.cuda() for t in (x_q, x_s, qw, s2, z2, s1, bias)]
        out = torch.ops.qoq.w4a8_gemm_per_group(*cu, 64, torch.float16)
        assert torch.equal(out.cpu(), ref), (m, n, k, force)
        ref = torch.ops.qoq.w4a8_gemm_per_channel(x_q, x_s, x_sum, qw, s1, z2[:, 0].contiguous(), None, torch.bfloat16)
        out = torch.ops.qoq.w4a8_gemm_per_channel(x_q.cuda(), x_s.cuda(), x_sum.cuda(), qw.cuda(), s1.cuda(),
                                                  z2[:, 0].contiguous().cuda(), None, torch.bfloat16)
        torch.cuda.synchronize()
        os.environ.pop("QOQ_GEMM_FORCE", None)
        assert torch.equal(out.cpu(), ref), (m, n, k, force)
    _check_small_decode_configs(gen)
    _check_small_skinny(gen)
    if torch.cuda.get_device_capability()[0] >= 9:
        _check_small_stream(gen)
    if torch.cuda.get_device_capability() == (9, 0):
        for g in (64, 128):  # 128: a k tile in one scale group (one half's scales read)
            _check_small_wgmma(gen, g)
            # stream-K: 3 x 13 (n tile, k tile) pairs over 3 groups of 2 CTAs (pieces start and end mid-tile)
            # and one pair a group, in both instantiations
            for ctas, deep in (("7", "0"), ("7", "1"), ("1000", "0")):
                env = {"QOQ_GEMM_WGMMA": "2,128", "QOQ_GEMM_STREAMK": "1", "QOQ_GEMM_STREAMK_CTAS": ctas,
                       "QOQ_GEMM_STREAMK_DEEP": deep}
                _check_small_both_formats(gen, 130, 272, 1664, g, env, ("stream-K", ctas, deep))
            # the 256-row kernel's tail split, forced: all 3 tiles' 13 k tiles in 3 pieces
            env = {"QOQ_GEMM_WGMMA": "2,256", "QOQ_GEMM_WS_TAIL_SPLIT": "3"}
            _check_small_both_formats(gen, 130, 272, 1664, g, env, ("tail split", 3))
    print("check-small: OK")


def _check_small_decode_configs(gen: torch.Generator) -> None:
    """Every M <= 2 decode variant (QOQ_GEMM_DECODE_CONFIG), per-group, on a case with a partial last K pass."""
    import os

    for m, config in [(m, c) for m in (1, 2) for c in DECODE_CONFIGS]:
        n, k, g = 48, 4160, 64
        x_q = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
        x_s = torch.rand(m, generator=gen) + 0.1
        w4, s2, z2, s1 = _rand_per_group(n, k, g, "cpu")
        qw = ops.pack_weights(w4)
        ref = torch.ops.qoq.w4a8_gemm_per_group(x_q, x_s, qw, s2, z2, s1, None, g, torch.float16)
        os.environ.update({"QOQ_GEMM_DECODE_CONFIG": str(config), "QOQ_GEMM_STREAM": "0"})
        try:
            out = torch.ops.qoq.w4a8_gemm_per_group(*[t.cuda() for t in (x_q, x_s, qw, s2, z2, s1)], None, g,
                                                    torch.float16)
            torch.cuda.synchronize()
        finally:
            os.environ.pop("QOQ_GEMM_DECODE_CONFIG")
            os.environ.pop("QOQ_GEMM_STREAM")
        assert torch.equal(out.cpu(), ref), ("decode config", m, config)


def _check_small_both_formats(gen: torch.Generator, m: int, n: int, k: int, g: int, env: dict, label) -> None:
    """One random case in both formats through the CUDA ops with `env` set for the calls; equal to the reference."""
    import os

    x_q = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    x_s = torch.rand(m, generator=gen) + 0.1
    x_sum = x_q.sum(1, dtype=torch.int32)
    w4, s2, z2, s1 = _rand_per_group(n, k, g, "cpu")
    qw = ops.pack_weights(w4)
    ref_g = torch.ops.qoq.w4a8_gemm_per_group(x_q, x_s, qw, s2, z2, s1, None, g, torch.float16)
    ref_c = torch.ops.qoq.w4a8_gemm_per_channel(x_q, x_s, x_sum, qw, s1, z2[:, 0].contiguous(), None, torch.bfloat16)
    os.environ.update(env)
    try:
        out_g = torch.ops.qoq.w4a8_gemm_per_group(*[t.cuda() for t in (x_q, x_s, qw, s2, z2, s1)], None, g,
                                                  torch.float16)
        out_c = torch.ops.qoq.w4a8_gemm_per_channel(*[t.cuda() for t in (x_q, x_s, x_sum, qw, s1)],
                                                    z2[:, 0].contiguous().cuda(), None, torch.bfloat16)
        torch.cuda.synchronize()
    finally:
        for name in env:
            os.environ.pop(name)
    assert torch.equal(out_g.cpu(), ref_g), (label, "per-group", m, n, k, g)
    assert torch.equal(out_c.cpu(), ref_c), (label, "per-channel", m, n, k)


def _check_small_skinny(gen: torch.Generator) -> None:
    """The small-M kernel at each rows-per-block choice, both formats, M in every token-tile bucket."""
    for m, rt in [(m, rt) for m in (3, 16, 33) for rt in (1, 2, 4)]:
        _check_small_both_formats(gen, m, 128, 1152, 64, {"QOQ_GEMM_SKINNY_RT": str(rt), "QOQ_GEMM_STREAM": "0"},
                                  ("small-M", rt))


def _check_small_stream(gen: torch.Generator) -> None:
    """The streaming kernel in each variant, both formats, group sizes 64 and 128, with blocks that walk several tiles
    (more tiles than SMs) and tiles whose stages wrap around the shared-memory ring (K = 14336)."""
    cases = ((1, 2240, 2560), (9, 32, 14336), (32, 4480, 1024))
    for (m, n, k), variant, g in [(c, v, g) for c in cases for v in STREAM_VARIANTS for g in (64, 128)]:
        env = {"QOQ_GEMM_STREAM_MIN_M": "1", "QOQ_GEMM_STREAM_MAX_M": "32", "QOQ_GEMM_STREAM_VARIANT": str(variant)}
        _check_small_both_formats(gen, m, n, k, g, env, ("streaming", variant))


def _check_small_wgmma(gen: torch.Generator, g: int = 64) -> None:
    """The wgmma kernel (both tiles, both formats; the 128-row one with 8 stages and one CTA an SM, as this small grid
    takes by default, and with 4 and two) on a small case with M, N and K tails of its tiles."""
    import os

    m, n, k = 130, 272, 1664  # 13 k tiles: more than the 256-row kernel's 5 stages
    x_q = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    x_s = torch.rand(m, generator=gen) + 0.1
    x_sum = x_q.sum(1, dtype=torch.int32)
    w4, s2, z2, s1 = _rand_per_group(n, k, g, "cpu")
    qw = ops.pack_weights(w4)
    bias = torch.randn(n, generator=gen).half()
    ref_g = torch.ops.qoq.w4a8_gemm_per_group(x_q, x_s, qw, s2, z2, s1, bias, g, torch.bfloat16)
    ref_c = torch.ops.qoq.w4a8_gemm_per_channel(x_q, x_s, x_sum, qw, s1, z2[:, 0].contiguous(), None, torch.float16)
    cu = [t.cuda() for t in (x_q, x_s, x_sum, qw, s2, z2, s1, bias)]
    x_q_c, x_s_c, x_sum_c, qw_c, s2_c, z2_c, s1_c, bias_c = cu
    # splits 3: split K, 13 k tiles as 5 + 5 + 3; deep 0: the 128-row kernel's two-CTA instantiation
    for bm, splits, deep in ((128, "1", "1"), (128, "1", "0"), (256, "1", "1"), (128, "3", "1"), (128, "3", "0"),
                             (256, "3", "1")):
        os.environ["QOQ_GEMM_WGMMA"] = f"2,{bm}"
        os.environ["QOQ_GEMM_WGMMA_SPLITS"] = splits
        os.environ["QOQ_GEMM_WGMMA_DEEP"] = deep
        try:
            out_g = torch.ops.qoq.w4a8_gemm_per_group(x_q_c, x_s_c, qw_c, s2_c, z2_c, s1_c, bias_c, g, torch.bfloat16)
            out_c = torch.ops.qoq.w4a8_gemm_per_channel(x_q_c, x_s_c, x_sum_c, qw_c, s1_c, z2_c[:, 0].contiguous(),
                                                        None, torch.float16)
            torch.cuda.synchronize()
        finally:
            os.environ.pop("QOQ_GEMM_WGMMA")
            os.environ.pop("QOQ_GEMM_WGMMA_SPLITS")
            os.environ.pop("QOQ_GEMM_WGMMA_DEEP")
        assert torch.equal(out_g.cpu(), ref_g), ("wgmma per-group", g, bm, splits, deep)
        assert torch.equal(out_c.cpu(), ref_c), ("wgmma per-channel", bm, splits, deep)


LM_HEADS = {"llama3-8b": (128256, 4096), "qwen1.5-72b": (152064, 8192)}  # (vocab N, hidden K)
LM_HEAD_MS = (1, 16, 64, 256)


def lm_head(ms=LM_HEAD_MS) -> dict:
    """The output projection (lm_head) at each M: our two formats (the GEMM alone and with the activation's
    per-token quantization before it, what a quantized head runs) against every baseline, median us."""
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for name, (n, k) in LM_HEADS.items():
        weights = make_weights(n, k)
        for m in ms:
            methods = make_methods(m, n, k, weights=weights)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for fmt in OURS:
                gemm = methods[fmt]
                methods[fmt + "+quantize"] = lambda gemm=gemm: (ops.quantize_per_token(x), gemm())
            row = {"head": name, "n": n, "k": k, "m": m}
            for label, fn in methods.items():
                row[label] = bench(fn)
            print(json.dumps(row), flush=True)
            results["rows"].append(row)
        del weights
        torch.cuda.empty_cache()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--png", help="write a plot here (needs matplotlib)")
    ap.add_argument("--ms", help="comma-separated M values (default: MS, or CHAIN_SWEEP_MS for the chain timings)")
    ap.add_argument("--models", default=None,
                    help="comma-separated subset of " + ",".join(MODEL_SHAPES) + " for the main table (default: all) "
                    "and --layer-chain (default: llama3-8b)")
    ap.add_argument("--sweep", action="store_true", help="tile-config / split-K sweep of the per-group kernel")
    ap.add_argument("--sweep-decode", action="store_true",
                    help="decode kernel variants (QOQ_GEMM_DECODE_CONFIG) and M <= 16 against the tile kernel")
    ap.add_argument("--sweep-skinny", action="store_true",
                    help="small-M kernel rows per block (QOQ_GEMM_SKINNY_RT) against the decode and tile kernels")
    ap.add_argument("--sweep-stream", action="store_true",
                    help="streaming kernel variants (QOQ_GEMM_STREAM_VARIANT) against the other small-M paths")
    ap.add_argument("--sweep-wgmma-splits", action="store_true",
                    help="wgmma kernel split-K counts (QOQ_GEMM_WGMMA_SPLITS) against the default dispatch")
    ap.add_argument("--layer-chain", action="store_true",
                    help="a layer's four GEMMs back to back in a CUDA graph vs cold per-GEMM sums (--ms)")
    ap.add_argument("--methods", help="comma-separated subset of " + ",".join(CHAIN_METHODS) + " for --layer-chain, "
                    "or of the main table's columns")
    ap.add_argument("--rounds", type=int, default=1,
                    help="main table: time each shape's methods this many times in rotating order, keep the median")
    ap.add_argument("--no-cold", action="store_true", help="--layer-chain without the cold per-GEMM sums")
    ap.add_argument("--chain-sweep", action="store_true",
                    help="small-M paths and streaming variants, each shape timed back to back in a CUDA graph")
    ap.add_argument("--lm-head", action="store_true",
                    help="the lm_head shapes (Llama-3-8B, Qwen1.5-72B vocabularies) at M = 1, 16, 64, 256 (or --ms)")
    ap.add_argument("--check-small", action="store_true", help="only run small correctness cases")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    if args.check_small:
        check_small()
        return
    ms = None if args.ms is None else [int(m) for m in args.ms.split(",")]
    models = None if args.models is None else tuple(args.models.split(","))
    if models is not None and set(models) - set(MODEL_SHAPES):
        sys.exit(f"unknown --models {sorted(set(models) - set(MODEL_SHAPES))}; choose from {', '.join(MODEL_SHAPES)}")
    if args.layer_chain:
        methods = CHAIN_METHODS if args.methods is None else tuple(args.methods.split(","))
        unknown = set(methods) - set(CHAIN_METHODS)
        if unknown:
            sys.exit(f"unknown --methods {sorted(unknown)}; choose from {', '.join(CHAIN_METHODS)}")
        results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
        for model in models or ("llama3-8b",):
            results["rows"] += layer_chain(ms or CHAIN_SWEEP_MS, methods, not args.no_cold, model)["rows"]
    elif args.chain_sweep:
        results = chain_sweep(ms or CHAIN_SWEEP_MS)
    elif args.lm_head:
        results = lm_head(ms or LM_HEAD_MS)
    elif args.sweep_decode:
        results = sweep_decode()
    elif args.sweep_skinny:
        results = sweep_skinny()
    elif args.sweep_stream:
        results = sweep_stream()
    elif args.sweep_wgmma_splits:
        results = sweep_wgmma_splits(ms)
    elif args.sweep:
        results = sweep()
    else:
        only = None if args.methods is None else tuple(args.methods.split(","))
        results = run(ms or MS, models or tuple(MODEL_SHAPES), only, max(1, args.rounds))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    if args.sweep or args.sweep_decode or args.sweep_skinny or args.sweep_stream or args.sweep_wgmma_splits \
            or args.layer_chain or args.chain_sweep or args.lm_head:
        return  # their rows are printed as they are timed
    if args.png:
        plot(results, args.png)
    print_table(results)


if __name__ == "__main__":
    main()
