"""``dawnchorus bench report``: tables and mAP-over-rounds plots from ``bench run`` results."""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import numpy as np


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``dawnchorus bench report``."""
    parser.add_argument("results", type=pathlib.Path, help="results JSON of dawnchorus bench run")
    parser.add_argument("--plots", type=pathlib.Path, default=None,
                        help="write one PNG per domain (mAP over adaptation rounds) into this folder")


def plot_rounds(results: dict, folder: pathlib.Path) -> list[pathlib.Path]:
    """Plot the mean sample-wise mAP after each round, per method, one PNG per domain.

    Round 0 is the source model, so every curve starts from the same point.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for domain, methods in results["domains"].items():
        source = methods.get("source", [{}])
        start = float(np.mean([run["map"] for run in source if run.get("map") is not None] or [math.nan]))
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for method, runs in methods.items():
            curves = [run["map_by_round"] for run in runs if run.get("map_by_round")]
            if not curves:
                continue
            length = min(len(curve) for curve in curves)
            mean = np.nanmean(np.array([[v if v is not None else math.nan for v in curve[:length]]
                                        for curve in curves], dtype=float), axis=0)
            axes.plot(range(length + 1), [start, *mean], marker="o", markersize=3, label=method)
        axes.axhline(start, color="grey", linewidth=0.8, linestyle="--")
        axes.set_xlabel("adaptation round (epoch offline, update streaming)")
        axes.set_ylabel("sample-wise mAP")
        axes.set_title(f"{domain}: mAP over adaptation rounds")
        axes.legend(fontsize=8, ncol=2)
        figure.tight_layout()
        path = folder / f"{domain}-map-by-round.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def run_report(args: argparse.Namespace) -> int:
    """Print the summary tables and write the plots; return the exit status."""
    from dawnchorus.evaluation.runner import summary_table

    try:
        results = json.loads(args.results.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        print(f"error: cannot read {args.results}: {error}", file=sys.stderr)
        return 2
    print(summary_table(results))
    if args.plots is not None:
        for path in plot_rounds(results, args.plots):
            print(f"wrote {path}", file=sys.stderr)
    return 0
