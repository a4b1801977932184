"""KV4 decode attention (qoq::kv4_decode_attention) against bfloat16 SDPA decode, side by side in one run.

Llama-3-8B attention shapes: 32 query heads, 8 KV heads, head_dim 128, one new token per row, every row
attending to its full context. The baseline is F.scaled_dot_product_attention(enable_gqa=True) on a
bfloat16 cache, timed with each SDPA backend that accepts the inputs; the fastest counts. Times are
medians of CUDA-graph replays (no launch gaps), rotating over enough copies of the inputs to defeat L2.
GB/s counts the cache bytes each kernel must read; the copy bandwidth is measured in the same run.

The same run also times the decode step's RoPE + append (qoq::rope_kv4_append on the qkv projection's output)
against the unfused chain QoQAttention runs without it (split, float32 RoPE, contiguous copies, kv4_append),
eager and under torch.compile (inductor), at batch 1, 16, 64, 256 (JSON key "append_rows").

The decode attention with o_proj's input quantization fused (qoq::kv4_decode_attention_quantize) is timed against
kv4_decode_attention followed by quantize_per_token with --quantize-only (JSON key "quantize_rows").

    python benchmarks/attention.py [--json out.json] [--png out.png] [--quick] [--append-only] [--quantize-only]
    python benchmarks/attention.py --check-small     # small cases, for compute-sanitizer
    python benchmarks/attention.py --sweep-splits [--batches 1 4]   # the decode kernel at forced split counts
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qoq_torch.ops as ops  # noqa: E402
from qoq_torch.nn.attention import apply_rope  # noqa: E402
from qoq_torch.benchmarking import graph_replay_us  # noqa: E402
from qoq_torch.ops import reference  # noqa: E402

H_Q, H_KV, HEAD_DIM = 32, 8, 128
BATCHES = (1, 16, 64, 256)
CONTEXTS = (1024, 4096, 16384, 32768)
ROTATE_BYTES = 200 << 20  # inputs cycled per graph replay: 4x the 50 MB L2


def time_graph(calls_of_set, n_sets: int, target_us: float = 2000.0, replays: int = 10) -> float:
    """Median µs of one call, from CUDA-graph replays; `calls_of_set(i)` runs the op on input set i."""
    calls_of_set(0)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    calls_of_set(0)
    end.record()
    end.synchronize()
    estimate_us = max(start.elapsed_time(end) * 1000, 1.0)
    calls = max(n_sets, min(200, math.ceil(target_us / estimate_us)))

    def record():
        for i in range(calls):
            calls_of_set(i % n_sets)
    return graph_replay_us(record, calls, replays)


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB, counting bytes read plus bytes written."""
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    us = time_graph(lambda i: dst.copy_(src), 1, target_us=20000, replays=5)
    return 2 * src.numel() * 4 / us / 1e3


def sdpa_backends():
    from torch.nn.attention import SDPBackend
    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def make_kv4(k: torch.Tensor, v: torch.Tensor):
    """KV4 cache holding exactly k, v [B, H_kv, T, D] (quantized by the CUDA kv4_append)."""
    b, h, t, d = k.shape
    caches = (torch.empty(b, h, t, d // 2, dtype=torch.uint8, device="cuda"),
              torch.empty(b, h, t, 2, dtype=torch.float16, device="cuda"),
              torch.empty(b, h, t, d // 2, dtype=torch.uint8, device="cuda"),
              torch.empty(b, h, t, 2, dtype=torch.float16, device="cuda"))
    ops.kv4_append(*caches, k, v, torch.arange(t, device="cuda"))
    return caches


def bench_case(b: int, t: int, copy_gbs: float, backends: dict) -> dict | None:
    d = HEAD_DIM
    bf16_bytes = 2 * b * H_KV * t * d * 2
    kv4_bytes = 2 * b * H_KV * t * (d // 2 + 4)
    free, _ = torch.cuda.mem_get_info()
    if bf16_bytes + kv4_bytes + (1 << 30) > 0.9 * free:
        return None
    # Input sets cycled through by the timed graph so that neither kernel reads from L2.
    sets = max(1, min(64, math.ceil(ROTATE_BYTES / kv4_bytes)))
    sdpa_sets = max(1, min(sets, math.ceil(ROTATE_BYTES / bf16_bytes)))
    if sets * (bf16_bytes + kv4_bytes) + (1 << 30) > 0.9 * free:
        return None
    scale = 1 / math.sqrt(d)
    data = []
    for _ in range(sets):
        k = torch.randn(b, H_KV, t, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, H_KV, t, d, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(b, H_Q, 1, d, device="cuda", dtype=torch.bfloat16)
        data.append((q, k, v, make_kv4(k, v)))
    lens = torch.full((b,), t, dtype=torch.int32, device="cuda")
    starts = torch.zeros(b, dtype=torch.int32, device="cuda")

    def ours(i):
        q, _, _, caches = data[i]
        return ops.kv4_decode_attention(q, *caches, lens, starts, scale)

    row = {"batch": b, "context": t, "kv4_bytes": kv4_bytes, "bf16_bytes": bf16_bytes}
    sdpa_us = {}
    # The math backend first, then a pause: right after its ~14 ms calls (batch 16 at 16k, batch 64 at 4k) the next
    # kernel timed ran up to 16% slower for ~0.1 s at unchanged clocks (H100: ours 122.1 against 104.8 us, cuDNN
    # 358.4 against 349.6), which once landed on our kernel alone.
    for name, backend in sorted(backends.items(), key=lambda item: item[0] != "math"):
        if name == "math" and b * t > 64 * 4096:
            continue  # materializes [B, 32, 1, T] float scores plus repeated K/V: slow and large

        def sdpa(i, backend=backend):
            q, k, v, _ = data[i]
            with torch.nn.attention.sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

        try:
            sdpa_us[name] = time_graph(sdpa, sdpa_sets)
        except Exception as exc:  # a backend that rejects these inputs
            sdpa_us[name] = None
            row.setdefault("sdpa_errors", {})[name] = str(exc).splitlines()[0][:120]
        if name == "math":
            torch.cuda.synchronize()
            time.sleep(1.0)
    timed = {k: v for k, v in sdpa_us.items() if v is not None}
    row["ours_us"] = time_graph(ours, sets)
    # Sanity: same function as SDPA up to the 4-bit cache error.
    q, k, v, _ = data[0]
    ref = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True).float()
    row["rel_err_vs_bf16"] = float((ours(0).float() - ref).norm() / ref.norm())
    row["sdpa_us"] = sdpa_us
    if timed:
        best = min(timed, key=timed.get)
        row["sdpa_best"], row["sdpa_best_us"] = best, timed[best]
        row["sdpa_gbs"] = bf16_bytes / timed[best] / 1e3
        row["speedup"] = timed[best] / row["ours_us"]
    row["ours_gbs"] = kv4_bytes / row["ours_us"] / 1e3
    row["ours_pct_copy"] = 100 * row["ours_gbs"] / copy_gbs
    del data
    torch.cuda.empty_cache()
    return row


def unfused_rope_append(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches, pos: torch.Tensor):
    """The decode step's RoPE + append without the fused op, as QoQAttention runs it: q [B, H_q, 1, D] contiguous."""
    q, k, v = reference.split_qkv(qkv, H_Q, H_KV, HEAD_DIM)
    q, k = apply_rope(q, k, cos, sin)
    ops.kv4_append(*caches, k.contiguous(), v.contiguous(), pos)
    return q.contiguous()


def rope_append_inputs(b: int, t: int = 16):
    """(qkv [B, 1, (H_q + 2 H_kv) D], cos, sin [B, 1, D] bf16, KV4 caches of t slots, position [1])."""
    qkv = torch.randn(b, 1, (H_Q + 2 * H_KV) * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    angles = torch.rand(b, 1, HEAD_DIM // 2, device="cuda") * 1000
    angles = torch.cat((angles, angles), dim=-1)
    caches = (torch.zeros(b, H_KV, t, HEAD_DIM // 2, dtype=torch.uint8, device="cuda"),
              torch.zeros(b, H_KV, t, 2, dtype=torch.float16, device="cuda"),
              torch.zeros(b, H_KV, t, HEAD_DIM // 2, dtype=torch.uint8, device="cuda"),
              torch.zeros(b, H_KV, t, 2, dtype=torch.float16, device="cuda"))
    return qkv, angles.cos().bfloat16(), angles.sin().bfloat16(), caches, torch.tensor([t // 2], device="cuda")


def bench_rope_append(b: int, compiled_unfused) -> dict:
    """Fused rope_kv4_append against the unfused chain (eager and compiled) at batch b, one new token per row."""
    qkv_bytes = b * (H_Q + 2 * H_KV) * HEAD_DIM * 2
    sets = max(1, min(64, math.ceil(ROTATE_BYTES / qkv_bytes)))
    data = [rope_append_inputs(b) for _ in range(sets)]
    moved = qkv_bytes + 2 * b * HEAD_DIM * 2 + b * H_Q * HEAD_DIM * 2 + 2 * b * H_KV * (HEAD_DIM // 2 + 4)

    def fused(i):
        qkv, cos, sin, caches, pos = data[i]
        return ops.rope_kv4_append(qkv, cos, sin, *caches, pos, H_Q)

    def unfused(i, fn=unfused_rope_append):
        qkv, cos, sin, caches, pos = data[i]
        return fn(qkv, cos, sin, caches, pos)

    row = {"batch": b, "bytes": moved, "fused_us": time_graph(fused, sets)}
    row["unfused_eager_us"] = time_graph(unfused, sets)
    try:
        row["unfused_compiled_us"] = time_graph(lambda i: unfused(i, compiled_unfused), sets)
    except Exception as exc:  # inductor unavailable on this machine: the eager chain still counts
        row["unfused_compiled_us"] = None
        row["compile_error"] = str(exc).splitlines()[0][:160]
    row["fused_gbs"] = moved / row["fused_us"] / 1e3
    row["speedup_vs_eager"] = row["unfused_eager_us"] / row["fused_us"]
    if row["unfused_compiled_us"]:
        row["speedup_vs_compiled"] = row["unfused_compiled_us"] / row["fused_us"]
    # Sanity: the fused op stores the same cache bytes and returns the same q as the unfused chain.
    qkv, cos, sin, caches, pos = data[0]
    fused_caches = [c.clone() for c in caches]
    q_fused = ops.rope_kv4_append(qkv, cos, sin, *fused_caches, pos, H_Q)
    q_plain = unfused_rope_append(qkv, cos, sin, caches, pos)
    row["bit_exact_vs_unfused"] = bool(torch.equal(q_fused, q_plain) and
                                       all(torch.equal(a, c) for a, c in zip(fused_caches, caches)))
    del data
    torch.cuda.empty_cache()
    return row


def run_rope_append(batches) -> list[dict]:
    compiled = torch.compile(unfused_rope_append)
    rows = []
    for b in batches:
        row = bench_rope_append(b, compiled)
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in ("batch", "fused_us", "unfused_eager_us", "unfused_compiled_us",
                                                  "bit_exact_vs_unfused")}), flush=True)
    return rows


def print_rope_append_table(rows: list[dict]) -> None:
    print(f"\nRoPE + KV4 append of one decode step ({torch.cuda.get_device_name()}, torch {torch.__version__}); "
          f"H_q={H_Q}, H_kv={H_KV}, D={HEAD_DIM}, bfloat16")
    print("| batch | fused µs | GB/s | unfused eager µs | unfused compiled µs | speed-up vs eager / compiled "
          "| exact |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        comp = f"{r['unfused_compiled_us']:.1f}" if r["unfused_compiled_us"] else "n/a"
        vs_comp = f"{r['speedup_vs_compiled']:.1f}x" if "speedup_vs_compiled" in r else "n/a"
        print(f"| {r['batch']} | {r['fused_us']:.1f} | {r['fused_gbs']:.0f} | {r['unfused_eager_us']:.1f} | {comp} | "
              f"{r['speedup_vs_eager']:.1f}x / {vs_comp} | {r['bit_exact_vs_unfused']} |")


def print_table(rows: list[dict], copy_gbs: float) -> None:
    print(f"\nKV4 decode attention vs bf16 SDPA ({torch.cuda.get_device_name()}, torch {torch.__version__}); "
          f"H_q={H_Q}, H_kv={H_KV}, D={HEAD_DIM}; copy bandwidth {copy_gbs:.0f} GB/s")
    print("| batch | context | SDPA bf16 µs (backend) | SDPA GB/s | KV4 µs | KV4 GB/s | % of copy | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        sd = f"{r['sdpa_best_us']:.1f} ({r['sdpa_best']})" if "sdpa_best" in r else "n/a"
        print(f"| {r['batch']} | {r['context']} | {sd} | {r.get('sdpa_gbs', float('nan')):.0f} | {r['ours_us']:.1f} | "
              f"{r['ours_gbs']:.0f} | {r['ours_pct_copy']:.0f}% | {r.get('speedup', float('nan')):.2f}x |")


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for b in sorted({r["batch"] for r in rows}):
        rs = [r for r in rows if r["batch"] == b and "speedup" in r]
        ax.plot([r["context"] for r in rs], [r["speedup"] for r in rs], marker="o", label=f"batch {b}")
    ax.set_xscale("log", base=2)
    ax.axhline(3.0, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("speed-up over bf16 SDPA")
    ax.set_title("KV4 decode attention, 32/8 heads, D=128")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def unfused_attention_quantize(q, caches, lens, starts, scale):
    """kv4_decode_attention, then quantize_per_token of its output in o_proj's layout [B * S_q, H_q * D]."""
    out = ops.kv4_decode_attention(q, *caches, lens, starts, scale)
    b, h_q, s_q, d = out.shape
    return ops.quantize_per_token(out.transpose(1, 2).reshape(b * s_q, h_q * d).contiguous())


def kv4_sets(b: int, t: int):
    """Input sets [(q [B, H_q, 1, D] bf16, KV4 caches of t slots)] covering >= ROTATE_BYTES, lens, starts, scale."""
    d = HEAD_DIM
    kv4_bytes = 2 * b * H_KV * t * (d // 2 + 4)
    data = []
    for _ in range(max(1, min(64, math.ceil(ROTATE_BYTES / kv4_bytes)))):
        k = torch.randn(b, H_KV, t, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, H_KV, t, d, device="cuda", dtype=torch.bfloat16)
        data.append((torch.randn(b, H_Q, 1, d, device="cuda", dtype=torch.bfloat16), make_kv4(k, v)))
        del k, v
    lens = torch.full((b,), t, dtype=torch.int32, device="cuda")
    starts = torch.zeros(b, dtype=torch.int32, device="cuda")
    return data, lens, starts, 1 / math.sqrt(d)


SPLIT_SWEEP = {1: (0, 4, 8, 16, 32, 64, 128), 4: (0, 2, 4, 8, 16, 32), 16: (0, 1, 2, 4, 8, 16), 64: (0, 1, 2, 4)}


def sweep_splits(contexts=(4096, 16384, 32768), batches=None) -> list[dict]:
    """kv4_decode_attention's µs at forced split counts (QOQ_KV4_SPLITS; 0 = the default choice)."""
    rows = []
    for b, choices in SPLIT_SWEEP.items():
        if batches and b not in batches:
            continue
        for t in contexts:
            data, lens, starts, scale = kv4_sets(b, t)
            kv4_bytes = 2 * b * H_KV * t * (HEAD_DIM // 2 + 4)
            row = {"batch": b, "context": t, "us": {}}
            for splits in choices:
                os.environ["QOQ_KV4_SPLITS"] = str(splits)
                row["us"][splits] = time_graph(
                    lambda i: ops.kv4_decode_attention(data[i][0], *data[i][1], lens, starts, scale), len(data))
            os.environ.pop("QOQ_KV4_SPLITS")
            row["gbs"] = {s: kv4_bytes / us / 1e3 for s, us in row["us"].items()}
            rows.append(row)
            print(f"sweep-splits b={b} t={t}: " + "  ".join(f"{s}:{us:.1f}" for s, us in row["us"].items()), flush=True)
            del data
            torch.cuda.empty_cache()
    return rows


def ab_env(assignment: str, batches, contexts, rounds: int = 3, quantize: bool = False) -> list[dict]:
    """kv4_decode_attention's µs (`quantize`: kv4_decode_attention_quantize's) by default and with the environment
    variable of `assignment` ("NAME=V1,V2,...") at each value, on the same inputs, `rounds` times in a rotated order
    (the variable is read at each launch, i.e. when the graph is recorded); a row's `us` is each setting's best
    round."""
    op = ops.kv4_decode_attention_quantize if quantize else ops.kv4_decode_attention
    name, values = assignment.split("=", 1)
    settings = [None] + values.split(",")
    label = {v: "default" if v is None else f"{name}={v}" for v in settings}
    rows = []
    for b in batches:
        for t in contexts:
            data, lens, starts, scale = kv4_sets(b, t)
            times = {label[v]: [] for v in settings}
            for r in range(rounds):
                for k in range(len(settings)):
                    value = settings[(k + r) % len(settings)]
                    if value is not None:
                        os.environ[name] = value
                    times[label[value]].append(time_graph(
                        lambda i: op(data[i][0], *data[i][1], lens, starts, scale), len(data)))
                    os.environ.pop(name, None)
            row = {"batch": b, "context": t, "op": op.__name__, "us": {k: min(v) for k, v in times.items()},
                   "all_us": times}
            rows.append(row)
            settings_us = "  ".join(f"{k} {us:.1f}" for k, us in row["us"].items())
            print(f"ab {'quantize ' if quantize else ''}b={b} t={t}: {settings_us}", flush=True)
            del data
            torch.cuda.empty_cache()
    return rows


def bench_attention_quantize(b: int, t: int) -> dict:
    """Fused kv4_decode_attention_quantize against the two-op chain at batch b, context t (one token per row)."""
    data, lens, starts, scale = kv4_sets(b, t)
    sets = len(data)

    def fused(i):
        q, caches = data[i]
        return ops.kv4_decode_attention_quantize(q, *caches, lens, starts, scale)

    def unfused(i):
        q, caches = data[i]
        return unfused_attention_quantize(q, caches, lens, starts, scale)

    row = {"batch": b, "context": t, "fused_us": time_graph(fused, sets), "unfused_us": time_graph(unfused, sets)}
    row["speedup"] = row["unfused_us"] / row["fused_us"]
    row["bit_exact_vs_unfused"] = all(torch.equal(x, y) for x, y in zip(fused(0), unfused(0)))
    del data
    torch.cuda.empty_cache()
    return row


def run_attention_quantize(batches, contexts) -> list[dict]:
    rows = []
    for b in batches:
        for t in contexts:
            row = bench_attention_quantize(b, t)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nKV4 decode attention + o_proj input quantization ({torch.cuda.get_device_name()}, torch "
          f"{torch.__version__}); H_q={H_Q}, H_kv={H_KV}, D={HEAD_DIM}, bfloat16, one token per row")
    print("| batch | context | fused µs | attention + quantize_per_token µs | speed-up | exact |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['context']} | {r['fused_us']:.1f} | {r['unfused_us']:.1f} | {r['speedup']:.2f}x "
              f"| {r['bit_exact_vs_unfused']} |")
    return rows


def check_small() -> None:
    """Small append + decode calls of every code path (for compute-sanitizer): values vs the CPU reference."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        for b, h_q, h_kv, s_q, d, t in ((2, 8, 2, 1, 128, 70), (1, 12, 4, 3, 64, 33), (1, 16, 2, 3, 256, 20),
                                        (1, 32, 8, 1, 128, 600), (1, 32, 8, 1, 128, 400)):
            k = torch.randn(b, h_kv, t, d, generator=gen).to(dtype)
            v = torch.randn(b, h_kv, t, d, generator=gen).to(dtype)
            caches = make_kv4(k.cuda(), v.cuda())
            q = torch.randn(b, h_q, s_q, d, generator=gen).to(dtype)
            lens = torch.randint(t // 2, t + 1, (b,), generator=gen, dtype=torch.int32)
            starts = torch.randint(0, 3, (b,), generator=gen, dtype=torch.int32)
            out = ops.kv4_decode_attention(q.cuda(), *caches, lens.cuda(), starts.cuda(), d ** -0.5)
            ref = torch.ops.qoq.kv4_decode_attention(q, *[c.cpu() for c in caches], lens, starts, d ** -0.5)
            err = float((out.cpu().float() - ref.float()).norm() / ref.float().norm())
            print(f"check {dtype} b={b} h={h_q}/{h_kv} s_q={s_q} d={d} t={t}: rel err {err:.1e}")
            assert err < 1e-2
            fused = ops.kv4_decode_attention_quantize(q.cuda(), *caches, lens.cuda(), starts.cuda(), d ** -0.5)
            plain = unfused_attention_quantize(q.cuda(), caches, lens.cuda(), starts.cuda(), d ** -0.5)
            exact = all(torch.equal(x, y) for x, y in zip(fused, plain))
            print(f"check kv4_decode_attention_quantize {dtype} b={b} s_q={s_q} d={d} t={t}: exact {exact}")
            assert exact
        # rope_kv4_append: vectorized layouts (64, 128, 256), the general one (96), batch-1 cos/sin.
        for b, s, h_q, h_kv, d in ((2, 1, 8, 2, 128), (3, 2, 4, 4, 64), (1, 3, 4, 2, 256), (2, 2, 6, 3, 96)):
            qkv = torch.randn(b, s, (h_q + 2 * h_kv) * d, generator=gen).to(dtype)
            cos = (torch.rand(1, s, d, generator=gen) * 2 - 1).to(dtype)
            sin = (torch.rand(b, s, d, generator=gen) * 2 - 1).to(dtype)
            caches = [torch.zeros(b, h_kv, 8, d // 2, dtype=torch.uint8), torch.zeros(b, h_kv, 8, 2, dtype=torch.half)]
            caches += [c.clone() for c in caches]
            pos = torch.arange(s) + 4
            got = [c.cuda() for c in caches]
            q = ops.rope_kv4_append(qkv.cuda(), cos.cuda(), sin.cuda(), *got, pos.cuda(), h_q)
            q_ref = torch.ops.qoq.rope_kv4_append(qkv, cos, sin, *caches, pos, h_q)
            exact = torch.equal(q.cpu(), q_ref) and all(torch.equal(g.cpu(), c) for g, c in zip(got, caches))
            print(f"check rope_kv4_append {dtype} b={b} s={s} h={h_q}/{h_kv} d={d}: exact {exact}")
            assert exact
    torch.cuda.synchronize()
    print("check-small ok")


def kernel_benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """Parser with the options every kernel benchmark takes (scripts/gpu_check.sh passes them): --json, --check-small."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--check-small", action="store_true", help="small correctness run (for the sanitizer)")
    return parser


def main() -> None:
    parser = kernel_benchmark_parser(__doc__)
    parser.add_argument("--png", help="write a speed-up plot here")
    parser.add_argument("--quick", action="store_true", help="batch 1 and 64 at 4k and 32k only")
    parser.add_argument("--append-only", action="store_true", help="only the RoPE + append comparison")
    parser.add_argument("--quantize-only", action="store_true",
                        help="only the attention + o_proj input quantization comparison (contexts 384 and 4096)")
    parser.add_argument("--sweep-splits", action="store_true",
                        help="only the decode kernel at forced split counts (batch 1 / 4 / 16 / 64, 4k-32k)")
    parser.add_argument("--batches", type=int, nargs="+",
                        help="with --sweep-splits, --ab or --quantize-only: only these batch sizes")
    parser.add_argument("--ab", metavar="NAME=V1,V2",
                        help="only our kernel, default against these environment settings, alternating (same inputs)")
    parser.add_argument("--contexts", type=int, nargs="+", help="with --ab or --quantize-only: only these contexts")
    parser.add_argument("--ab-quantize", action="store_true",
                        help="with --ab: time kv4_decode_attention_quantize instead of kv4_decode_attention")
    args = parser.parse_args()
    if args.ab:
        rows = ab_env(args.ab, args.batches or BATCHES, args.contexts or CONTEXTS, quantize=args.ab_quantize)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"meta": append_meta(), "ab_rows": rows}, fh, indent=1)
        return
    if args.sweep_splits:
        rows = sweep_splits(batches=args.batches)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"meta": append_meta(), "split_rows": rows}, fh, indent=1)
        return
    if args.check_small:
        check_small()
        return
    torch.manual_seed(0)
    if args.quantize_only:
        quantize_rows = run_attention_quantize(args.batches or BATCHES, args.contexts or (384, 4096))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"meta": append_meta(), "quantize_rows": quantize_rows}, fh, indent=1)
        return
    if args.append_only:
        append_rows = run_rope_append(BATCHES)
        print_rope_append_table(append_rows)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"meta": append_meta(), "append_rows": append_rows}, fh, indent=1)
        return
    warnings.filterwarnings("ignore", message="For dense input")  # SDPA backends declining GQA, once per call
    copy_gbs = copy_bandwidth_gbs()
    backends = sdpa_backends()
    batches, contexts = ((1, 64), (4096, 32768)) if args.quick else (BATCHES, CONTEXTS)
    rows = []
    for b in batches:
        for t in contexts:
            row = bench_case(b, t, copy_gbs, backends)
            if row is None:
                print(f"skip batch {b} context {t}: does not fit in memory")
                continue
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("batch", "context", "ours_us", "sdpa_us", "rel_err_vs_bf16")}),
                  flush=True)
    print_table(rows, copy_gbs)
    meta = {**append_meta(), "copy_gbs": copy_gbs}
    if args.json:  # written before the append comparison too, so a timeout there keeps the decode rows
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    if args.png:
        plot(rows, args.png)
    append_rows = run_rope_append(batches if args.quick else BATCHES)
    print_rope_append_table(append_rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows, "append_rows": append_rows}, fh, indent=1)


def append_meta() -> dict:
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "h_q": H_Q, "h_kv": H_KV,
            "head_dim": HEAD_DIM}


if __name__ == "__main__":
    main()
