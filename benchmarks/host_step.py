"""Host time of a batch-1 decode step's parts that the library controls, on the GPU.

Usage: python benchmarks/host_step.py [--variant qoq-channel] [--batch 1] [--json OUT.json]
Builds the Llama-3-8B-shaped random-weight model (as `qoq bench e2e`), runs generate once (static KV4 cache,
compiled decode step), then times on the host, median µs of a call:
  * the decode step's masks: transformers' ``create_masks_for_generate`` against ``decode_step_masks``;
  * ``decode_step_masks`` then the compiled decode forward up to its return (dynamo's guards, the CUDA-graph wrapper,
    the graph launch; the GPU is idle at each call's start), compiled with the default guard filter
    (``skip_fixed_layout_guards``) and with one that keeps the cache's guards (the filter before the cache part).
Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from qoq_torch.benchmarking import build_variant, compile_config_for, run_generate
from qoq_torch.nn.decode_mask import decode_step_masks
from qoq_torch.nn.generation import KEPT_CACHE, skip_fixed_layout_guards


def _host_us(call, calls: int, rounds: int, sync_each: bool) -> list[float]:
    """Per round, the median host µs of ``call()`` (after a sync when ``sync_each``)."""
    medians = []
    for _ in range(rounds):
        times = []
        for _ in range(calls):
            if sync_each:
                torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e6)
        torch.cuda.synchronize()
        medians.append(statistics.median(times))
    return medians


def keep_cache_guards(entries) -> list[bool]:
    """``skip_fixed_layout_guards`` without its cache part (every cache guard kept)."""
    keep = skip_fixed_layout_guards(entries)
    return [k or "past_key_values" in str(getattr(e, "name", "")) for k, e in zip(keep, entries)]


def measure(variant: str, shape: str, batch: int, prompt_len: int, rounds: int) -> dict:
    from transformers.masking_utils import create_masks_for_generate

    model = build_variant(shape, variant)
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt_len), device="cuda")
    run_generate(model, ids, 8, "model-default")
    cache = model.__dict__[KEPT_CACHE]
    step_mask = torch.ones(batch, prompt_len + 1, dtype=torch.long, device="cuda")
    mask_kwargs = dict(config=model.config, inputs_embeds=torch.empty(batch, 1, 0, dtype=model.dtype, device="cuda"),
                       attention_mask=step_mask, past_key_values=cache,
                       position_ids=torch.full((batch, 1), prompt_len, device="cuda"))
    ours, theirs = decode_step_masks(**mask_kwargs), create_masks_for_generate(**mask_kwargs)
    assert torch.equal(ours, theirs.expand_as(ours))
    row = {"variant": variant, "batch": batch, "prompt": prompt_len,
           "masks_transformers_us": _host_us(lambda: create_masks_for_generate(**mask_kwargs), 200, rounds, False),
           "masks_ours_us": _host_us(lambda: decode_step_masks(**mask_kwargs), 200, rounds, False)}
    config = compile_config_for(model, "model-default")
    token = torch.randint(1, model.config.vocab_size, (batch, 1), device="cuda")
    for name, guard_filter in (("forward_default_filter_us", skip_fixed_layout_guards),
                               ("forward_cache_guards_kept_us", keep_cache_guards)):
        options = dict(config.to_dict())
        options["options"] = {**options["options"], "guard_filter_fn": guard_filter}
        torch._dynamo.reset()
        forward = torch.compile(model.__call__, **options)

        def step():
            forward(input_ids=token, attention_mask=decode_step_masks(**mask_kwargs), past_key_values=cache,
                    position_ids=mask_kwargs["position_ids"], use_cache=True, logits_to_keep=1)

        with torch.no_grad():
            times = []
            for _ in range(rounds):
                cache.reset()
                for _ in range(3):  # warm-up, CUDA-graph recording
                    step()
                times += _host_us(step, 30, 1, True)
        row[name] = times
    print(json.dumps({k: (v if not isinstance(v, list) else [round(x, 1) for x in v]) for k, v in row.items()}))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="qoq-channel")
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    row = measure(args.variant, args.shape, args.batch, args.prompt, args.rounds)
    row["device"], row["torch"] = torch.cuda.get_device_name(), torch.__version__
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
