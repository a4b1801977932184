"""Plots for docs/: GEMM layer-sum time vs M and end-to-end tokens/s vs batch, from the committed JSON results.

Usage: python benchmarks/plot.py [--gemm docs/results/gemm_h100_issue_table.json] [--e2e RUN.json [RUN2.json ...]]
                                 [--out docs/plots]   (needs matplotlib)
"""
from __future__ import annotations

import argparse
import json
import os

def plot_gemm_results(data: dict, path: str) -> None:
    """One panel per model: the layer-sum µs of our two formats (the default dispatch at each M) and of each
    baseline (every other column without the `qoq_` prefix), from `benchmarks/gemm.py --json` results; older
    single-model files hold Llama-3-8B's sums only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = data.get("models") or {"llama3-8b": {"layer_sum_us": data["layer_sum_us"]}}
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.5), squeeze=False)
    for ax, (model, entry) in zip(axes[0], models.items()):
        sums = entry["layer_sum_us"]
        ms = sorted(int(m) for m in sums)
        baselines = list(dict.fromkeys(name for row in sums.values() for name in row if not name.startswith("qoq_")))
        for name, label, style in [("qoq_per_group", "QoQ W4A8 per-group (g128)", "-"),
                                   ("qoq_per_channel", "QoQ W4A8 per-channel", "-")] + \
                                  [(b, b, "--") for b in baselines]:
            pts = [(m, sums[str(m)][name]) for m in ms if sums[str(m)].get(name)]
            if pts:
                ax.plot(*zip(*pts), linestyle=style, marker="o" if style == "-" else ".", label=label)
        ax.set(xscale="log", yscale="log", xlabel="M (tokens)", ylabel=f"µs, sum of the 4 {model} layer GEMMs",
               title=f"W4A8 GEMM, {model}, {data['device']}")
        ax.set_xticks(ms, [str(m) for m in ms])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_gemm(path: str, out: str) -> None:
    with open(path) as fh:
        plot_gemm_results(json.load(fh), os.path.join(out, "gemm.png"))


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
    parser.add_argument("--gemm", default="docs/results/gemm_h100_issue_table.json")
    parser.add_argument("--e2e", nargs="+",
                        default=["docs/results/e2e_h100_run17_a.json", "docs/results/e2e_h100_run17_b.json"])
    parser.add_argument("--out", default="docs/plots")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    plot_gemm(args.gemm, args.out)
    plot_e2e(args.e2e, args.out)


if __name__ == "__main__":
    main()
