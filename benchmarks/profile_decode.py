"""Where a decode step's time goes: wall time per generated token vs GPU kernel time, and the top kernels.

Usage: python benchmarks/profile_decode.py [--variants bf16 qoq-g128] [--batch 1 [16 ...]]
      [--stop-check MODE] [--compile-mode MODE] [--json OUT.json]
Runs HF generate (static cache, compiled decode step, as `qoq bench e2e`) on the Llama-3-8B-shaped
random-weight model, then profiles a short generate with torch.profiler. --stop-check: how generate reads its stop
flag (qoq_torch.benchmarking.StopCheckMode: model-default, per-step, deferred); --compile-mode: model-default
(generate's default: reduce-overhead) or a torch.compile mode. Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from qoq_torch.benchmarking import (MODEL_DEFAULT, StopCheckMode, build_float_model, build_quantized_model,
                                    run_generate)


def profile_variant(variant: str, shape: str, batch: int, prompt_len: int, steps: int, top: int,
                    stop_check: str = "model-default", compile_mode: str = MODEL_DEFAULT) -> dict:
    with StopCheckMode(stop_check) as stops:
        result = _profile(variant, shape, batch, prompt_len, steps, top, compile_mode)
    result["stop_check"] = "deferred" if stops.deferred else "per-step"
    result["compile_mode"] = compile_mode
    return result


def _profile(variant: str, shape: str, batch: int, prompt_len: int, steps: int, top: int, compile_mode: str) -> dict:
    model = (build_float_model(shape) if variant == "bf16"
             else build_quantized_model(shape, group_size=-1 if variant == "qoq-channel" else 128))
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
    counters = {k: dict(v) for k, v in torch._dynamo.utils.counters.items() if k in ("stats", "graph_break")}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        run_generate(model, ids, steps, compile_mode)
        torch.cuda.synchronize()
    kernels = {}
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(evt.name, [0, 0.0])
            k[0] += 1
            k[1] += evt.device_time  # us
    gpu_us = sum(v[1] for v in kernels.values())
    cpu_ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    top_k = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]
    # decode kernels dominate: per-step GPU time is approximated by the total over the generated steps
    result = {"variant": variant, "batch": batch, "wall_ms_per_step": step_ms,
              "gpu_ms_per_step": gpu_us / steps / 1e3,
              "top_kernels": [{"name": n[:120], "calls_per_step": c / steps, "us_per_step": t / steps}
                              for n, (c, t) in top_k],
              "top_cpu_ops": [{"name": e.key[:120], "calls_per_step": e.count / steps,
                               "self_cpu_us_per_step": e.self_cpu_time_total / steps} for e in cpu_ops],
              "dynamo_counters": counters}
    print(f"\n== {variant} batch {batch}: wall {step_ms:.3f} ms/step, GPU kernels {result['gpu_ms_per_step']:.3f} "
          f"ms/step (incl. prefill share)")
    for k in result["top_kernels"]:
        print(f"  {k['us_per_step']:9.1f} us  x{k['calls_per_step']:6.1f}  {k['name']}")
    print("  -- host (self CPU time per step)")
    for k in result["top_cpu_ops"]:
        print(f"  {k['self_cpu_us_per_step']:9.1f} us  x{k['calls_per_step']:6.1f}  {k['name']}")
    print("  dynamo:", counters)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["bf16", "qoq-g128"])
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--stop-check", default="model-default", choices=["model-default", "per-step", "deferred"])
    parser.add_argument("--compile-mode", default=MODEL_DEFAULT)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = [profile_variant(v, args.shape, b, args.prompt, args.steps, args.top, args.stop_check, args.compile_mode)
            for b in args.batch for v in args.variants]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
