"""Plots for docs/: GEMM layer-sum time vs M and end-to-end tokens/s vs batch, from the committed JSON results.

Usage: python benchmarks/plot.py [--gemm docs/results/gemm_h100.json] [--e2e RUN.json [RUN2.json ...]]
                                 [--out docs/plots]   (needs matplotlib)
"""
from __future__ import annotations

import argparse
import json
import os

DEFAULT_PATHS = {  # the kernel each M runs by default (csrc/gemm/w4a8_gemm.cu dispatch): decode, mma.sync, wgmma
    "per-group": lambda m: "qoq_per_group" if m <= 2 else ("qoq_per_group_wgmma" if m >= 128 else "qoq_per_group_mma"),
    "per-channel": lambda m: ("qoq_per_channel" if m <= 2 else
                              "qoq_per_channel_wgmma" if m >= 128 else "qoq_per_channel_mma"),
}


def default_dispatch_us(sums: dict, m: int, fmt: str) -> float:
    """Layer-sum µs of the kernel the default dispatch picks at M (the dispatch columns predate the switch)."""
    row = sums[str(m)]
    key = DEFAULT_PATHS[fmt](m)
    return row.get(key) or row[key.replace("_mma", "")]


def plot_gemm(path: str, out: str) -> None:
    import matplotlib.pyplot as plt

    data = json.load(open(path))
    sums = data["layer_sum_us"]
    ms = sorted(int(m) for m in sums)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for fmt in DEFAULT_PATHS:
        ax.plot(ms, [default_dispatch_us(sums, m, fmt) for m in ms], marker="o", label=f"QoQ W4A8 {fmt}")
    for base in ("bf16", "fp8_rowwise", "int8_int_mm", "w4a16_int4pack"):
        pts = [(m, sums[str(m)][base]) for m in ms if sums[str(m)].get(base)]
        ax.plot(*zip(*pts), linestyle="--", marker=".", label=base)
    ax.set(xscale="log", yscale="log", xlabel="M (tokens)", ylabel="µs, sum of the 4 Llama-3-8B layer GEMMs",
           title=f"W4A8 GEMM, {data['device']}")
    ax.set_xticks(ms, [str(m) for m in ms])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "gemm.png"), dpi=110)


def plot_e2e(paths: list[str], out: str) -> None:
    """tokens/s against batch from one or more e2e JSON files of the same device (e.g. one per protocol); where
    the files repeat a (model, variant, protocol, batch), the first reading is drawn."""
    import matplotlib.pyplot as plt

    files = []
    for p in paths:
        with open(p) as fh:
            files.append(json.load(fh))
    device = files[0]["device"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[str, str, str], dict[int, float]] = {}
    for r in (row for f in files for row in f["rows"]):
        if r["tokens_per_s"]:
            protocol = f"{r['prompt_len']}/{r['new_tokens']}"
            # the first reading of a (variant, protocol, batch) is the one drawn (files repeat some as checks)
            series.setdefault((r["model"], r["variant"], protocol), {}).setdefault(r["batch"], r["tokens_per_s"])
    for (model, variant, protocol), pts in sorted(series.items()):
        ax.plot(*zip(*sorted(pts.items())), marker="o", linestyle="-" if protocol == "128/256" else "--",
                label=f"{model} {variant} {protocol}")
    ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="output tokens/s (prompt/new tokens in the legend)",
           title=f"HF generate + torch.compile, {device}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "e2e.png"), dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gemm", default="docs/results/gemm_h100.json")
    parser.add_argument("--e2e", nargs="+",
                        default=["docs/results/e2e_h100_run17_a.json", "docs/results/e2e_h100_run17_b.json"])
    parser.add_argument("--out", default="docs/plots")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    plot_gemm(args.gemm, args.out)
    plot_e2e(args.e2e, args.out)


if __name__ == "__main__":
    main()
