"""Where a decode step's time goes: wall time per generated token vs GPU kernel time, and the top kernels.

Usage: python benchmarks/profile_decode.py [--variants bf16 qoq-g128] [--batch 1 [16 ...]]
      [--stop-check MODE] [--compile-mode MODE] [--python-profile] [--json OUT.json]
Runs HF generate (static cache, compiled decode step, as `qoq bench e2e`) on the Llama-3-8B-shaped
random-weight model, then profiles a one-token and a short generate with torch.profiler: per kernel, their
difference is the decode steps' share (no prefill); 48 consecutive kernels from mid-run show the gaps between
kernels; --python-profile adds a cProfile of the host's Python. --stop-check: how generate reads its stop
flag (qoq_torch.benchmarking.StopCheckMode: model-default, per-step, deferred); --compile-mode: model-default
(generate's default: reduce-overhead) or a torch.compile mode. Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import time

import torch

from qoq_torch.benchmarking import MODEL_DEFAULT, StopCheckMode, build_variant, run_generate


def profile_variant(variant: str, shape: str, batch: int, prompt_len: int, steps: int, top: int,
                    stop_check: str = "model-default", compile_mode: str = MODEL_DEFAULT,
                    python_profile: bool = False) -> dict:
    with StopCheckMode(stop_check) as stops:
        result = _profile(variant, shape, batch, prompt_len, steps, top, compile_mode, python_profile)
    result["stop_check"] = "deferred" if stops.deferred else "per-step"
    result["compile_mode"] = compile_mode
    return result


def _python_profile(model, ids: torch.Tensor, steps: int, compile_mode: str, top: int) -> str:
    """cProfile of a `steps`-token generate (after warm-up): the host's Python functions by self time."""
    profiler = cProfile.Profile()
    profiler.enable()
    run_generate(model, ids, steps, compile_mode)
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def _profile(variant: str, shape: str, batch: int, prompt_len: int, steps: int, top: int, compile_mode: str,
             python_profile: bool = False) -> dict:
    model = build_variant(shape, variant)
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt_len), device="cuda")
    wall = {}
    for n in (1, steps):
        run_generate(model, ids, n, compile_mode)  # compile + capture for this cache length
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run_generate(model, ids, n, compile_mode)
        torch.cuda.synchronize()
        wall[n] = time.perf_counter() - t0
    step_ms = (wall[steps] - wall[1]) / (steps - 1) * 1e3
    host_profile = _python_profile(model, ids, steps, compile_mode, 3 * top) if python_profile else None
    counters = {k: dict(v) for k, v in torch._dynamo.utils.counters.items() if k in ("stats", "graph_break")}
    # Profile a one-token generate and a `steps`-token one: their difference per kernel is the decode steps' share
    # without the prefill.
    profiles = {n: _kernel_times(model, ids, n, compile_mode) for n in (1, steps)}
    kernels = {}
    for name, (count, us) in profiles[steps]["kernels"].items():
        c1, t1 = profiles[1]["kernels"].get(name, (0, 0.0))
        kernels[name] = (count - c1, us - t1)
    gpu_us = sum(v[1] for v in kernels.values())
    span_us = profiles[steps]["span_us"] - profiles[1]["span_us"]
    cpu_ops = profiles[steps]["cpu_ops"][:top]
    top_k = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]
    decode_steps = steps - 1
    result = {"variant": variant, "batch": batch, "wall_ms_per_step": step_ms,
              "gpu_ms_per_step": gpu_us / decode_steps / 1e3,
              "gpu_span_ms_per_step": span_us / decode_steps / 1e3,
              "kernels_per_step": sum(v[0] for v in kernels.values()) / decode_steps,
              "top_kernels": [{"name": n[:120], "calls_per_step": c / decode_steps, "us_per_step": t / decode_steps}
                              for n, (c, t) in top_k],
              "top_cpu_ops": [{"name": e.key[:120], "calls_per_step": e.count / steps,
                               "self_cpu_us_per_step": e.self_cpu_time_total / steps} for e in cpu_ops],
              "dynamo_counters": counters, "timeline_sample": profiles[steps]["timeline"],
              "python_profile": host_profile}
    print(f"\n== {variant} batch {batch}: wall {step_ms:.3f} ms/step, GPU kernels {result['gpu_ms_per_step']:.3f} "
          f"ms/step busy, "
          f"{result['gpu_span_ms_per_step']:.3f} ms/step from first to last kernel, "
          f"{result['kernels_per_step']:.0f} kernels/step (decode steps only)")
    for k in result["top_kernels"]:
        print(f"  {k['us_per_step']:9.1f} us  x{k['calls_per_step']:6.1f}  {k['name']}")
    print("  -- 48 consecutive kernels mid-run (start offset us, duration us)")
    for k in result["timeline_sample"]:
        print(f"  {k['start_us']:9.2f} {k['us']:7.2f}  {k['name']}")
    print("  -- host (self CPU time per step)")
    for k in result["top_cpu_ops"]:
        print(f"  {k['self_cpu_us_per_step']:9.1f} us  x{k['calls_per_step']:6.1f}  {k['name']}")
    print("  dynamo:", counters)
    if host_profile:
        print(f"  -- Python functions by self time over a {steps}-token generate (cProfile)")
        print(host_profile)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return result


def _kernel_times(model, ids: torch.Tensor, new_tokens: int, compile_mode: str) -> dict:
    """Per-kernel (count, total µs) of one profiled generate, the first-to-last kernel span, and the host ops."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        run_generate(model, ids, new_tokens, compile_mode)
        torch.cuda.synchronize()
    kernels: dict[str, list] = {}
    events = []
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(evt.name, [0, 0.0])
            k[0] += 1
            k[1] += evt.device_time  # us
            events.append((evt.time_range.start, evt.time_range.end, evt.name))
    events.sort()
    span = events[-1][1] - events[0][0] if events else 0.0
    # 48 consecutive kernels from the middle of the run (a decode step's layers), with their start offsets: shows
    # the gaps between kernels that the busy-time sum does not
    mid = max(len(events) // 2 - 24, 0)
    sample = events[mid:mid + 48]
    timeline = [{"start_us": round(a - sample[0][0], 2), "us": round(b - a, 2), "name": n[:90]} for a, b, n in sample]
    cpu_ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return {"kernels": {n: tuple(v) for n, v in kernels.items()}, "span_us": span, "cpu_ops": cpu_ops,
            "timeline": timeline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["bf16", "qoq-g128"], help="keys of benchmarking.VARIANTS")
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--stop-check", default="model-default", choices=["model-default", "per-step", "deferred"])
    parser.add_argument("--compile-mode", default=MODEL_DEFAULT)
    parser.add_argument("--python-profile", action="store_true",
                        help="also cProfile the host's Python over one generate (self time per function)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = [profile_variant(v, args.shape, b, args.prompt, args.steps, args.top, args.stop_check, args.compile_mode,
                            args.python_profile)
            for b in args.batch for v in args.variants]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
