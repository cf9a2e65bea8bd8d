"""``dawnchorus bench run``: run adaptation methods on benchmark domains and score them.

Each (domain, method, seed) adapts the site head from the same source head
(BirdNET's weights cut to the domain's classes) on the domain's embeddings in
recording order. It is scored on the same windows, as in source-free
test-time adaptation, where the unlabeled target data are also the data to
be labeled.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import pathlib
import sys
import time
import tomllib
from typing import Any

import numpy as np

_LOGGER = logging.getLogger(__name__)

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_HYPERPARAMETERS = REPO / "benchmarks" / "hyperparameters.toml"

# --quick shrinks every mixed domain to this many windows and every offline
# method to this many epochs, so that CI runs all methods in about a minute.
QUICK_WINDOWS = 160
QUICK_EPOCHS = 2
QUICK_CHUNK = 64


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``dawnchorus bench run``."""
    from dawnchorus.edge.progress import add_progress_argument
    from dawnchorus.evaluation import METHOD_NAMES as METHODS
    from dawnchorus.evaluation.cli import DEFAULT_CACHE

    parser.add_argument("--domain", type=pathlib.Path, nargs="+", required=True, metavar="SPEC",
                        help="domain specs (TOML), e.g. benchmarks/domains/*.toml")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD",
                        help=f"methods to run (default: all of {', '.join(METHODS)})")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method (default %(default)s)")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="results JSON to write")
    parser.add_argument("--hyperparameters", type=pathlib.Path, default=DEFAULT_HYPERPARAMETERS,
                        help="frozen hyperparameters per method, TOML (default %(default)s)")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="detection threshold for precision, recall and false detections (default 0.5)")
    parser.add_argument("--cache", type=pathlib.Path, default=DEFAULT_CACHE,
                        help="folder of built domains (default: %(default)s)")
    parser.add_argument("--data-root", type=pathlib.Path, default=None,
                        help="root of the paths in the specs (default: ../shared/data beside the repository)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_WINDOWS} windows per mixed domain and {QUICK_EPOCHS} epochs: "
                             "a smoke run for CI, not a result")
    add_progress_argument(parser)


def load_hyperparameters(path: pathlib.Path | None) -> dict[str, dict[str, Any]]:
    """Read ``[default]`` and ``[<method>]`` tables; a method's table overrides the default."""
    if path is None or not path.is_file():
        return {}
    with open(path, "rb") as stream:
        tables = tomllib.load(stream)
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ValueError(f"{path}: {name!r} must be a table such as [notela], got {type(table).__name__}")
    return tables


def method_settings(tables: dict[str, dict[str, Any]], method: str, quick: bool) -> dict[str, Any]:
    """Return the hyperparameters of ``method``: the default table, then the method's own."""
    settings = dict(tables.get("default", {}))
    settings.update(tables.get(method, {}))
    if quick:
        settings["epochs"] = min(int(settings.get("epochs", QUICK_EPOCHS)), QUICK_EPOCHS)
        settings["chunk_size"] = QUICK_CHUNK
        settings["min_buffer"] = min(int(settings.get("min_buffer", QUICK_CHUNK)), QUICK_CHUNK)
    return settings


def _quick_spec(spec):
    if spec.kind != "mixed":
        return spec
    mixing = dataclasses.replace(spec.mixing, windows=min(spec.mixing.windows, QUICK_WINDOWS))
    return dataclasses.replace(spec, name=f"{spec.name}-quick", mixing=mixing)


def _finite(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def score_run(result, domain, threshold: float) -> dict[str, Any]:
    """Score one adaptation run in the JSON layout of ``bench run``."""
    from dawnchorus.evaluation.metrics import evaluate, sample_map

    final = evaluate(result.final_logits, domain, threshold)
    record = {
        "map": _finite(final["sample_map"]),
        "cmap": _finite(final["class_map"]),
        "top1": _finite(final["top1"]),
        "precision": _finite(final["precision"]),
        "recall": _finite(final["recall"]),
        "false_per_hour": _finite(final["false_detections_per_hour"]),
        "map_by_round": [_finite(sample_map(logits, domain.labels)) for logits in result.logits_by_round],
        "blocked_heads": int(result.blocked_heads),
    }
    if result.online_logits is not None:
        online = evaluate(result.online_logits, domain, threshold)
        record["online_map"] = _finite(online["sample_map"])
        record["online_cmap"] = _finite(online["class_map"])
    return record


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run every (domain, method, seed) of ``args`` and return the results document."""
    from dawnchorus.edge.progress import progress_bar
    from dawnchorus.evaluation.domains import load_domain, load_spec
    from dawnchorus.evaluation.methods import adapt
    from dawnchorus.models.backbone import load_source_model

    tables = load_hyperparameters(args.hyperparameters)
    source = load_source_model()
    domains = []
    for path in args.domain:
        spec = load_spec(path)
        domains.append(load_domain(_quick_spec(spec) if args.quick else spec, args.cache, args.data_root,
                                   progress=getattr(args, "progress", True)))

    results: dict[str, Any] = {"domains": {}, "settings": {
        "quick": bool(args.quick), "threshold": args.threshold, "seeds": args.seeds,
        "hyperparameters": {method: method_settings(tables, method, args.quick) for method in args.methods},
    }}
    tasks = [(domain, method, seed) for domain in domains for method in args.methods for seed in range(args.seeds)]
    progress = progress_bar(tasks, total=len(tasks), description="bench", unit="run", enabled=getattr(args, "progress", True))
    for domain, method, seed in progress:
        progress.set_postfix_str(f"{domain.name} {method} seed {seed}")
        head = source.head.select(domain.classes)
        started = time.perf_counter()
        result = adapt(method, head, domain.embeddings, method_settings(tables, method, args.quick), seed)
        record = {"seed": seed, **score_run(result, domain, args.threshold),
                  "seconds": round(time.perf_counter() - started, 2)}
        results["domains"].setdefault(domain.name, {}).setdefault(method, []).append(record)
        _LOGGER.info("%s %s seed %d: mAP %s cmAP %s, %d heads blocked", domain.name, method, seed,
                     record["map"], record["cmap"], record["blocked_heads"])
    return results


def summary_table(results: dict[str, Any]) -> str:
    """Render mean and standard deviation per domain and method, with the difference to the source."""
    lines = []
    for domain, methods in results["domains"].items():
        lines += [f"### {domain}", "",
                  "| method | mAP | cmAP | top-1 | precision | recall | false / h | Δ mAP | Δ cmAP | blocked |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        source = methods.get("source")

        def mean(runs, key):
            values = [run[key] for run in runs if run.get(key) is not None]
            return (float(np.mean(values)), float(np.std(values))) if values else (math.nan, math.nan)

        for method, runs in methods.items():
            cells = []
            for key in ("map", "cmap", "top1", "precision", "recall"):
                average, spread = mean(runs, key)
                cells.append(f"{100 * average:.1f} ± {100 * spread:.1f}")
            cells.append(f"{mean(runs, 'false_per_hour')[0]:.0f}")
            for key in ("map", "cmap"):
                delta = mean(runs, key)[0] - mean(source, key)[0] if source else math.nan
                cells.append(f"{100 * delta:+.1f}")
            cells.append(str(sum(run["blocked_heads"] for run in runs)))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``dawnchorus bench run`` and return the exit status."""
    from dawnchorus.evaluation.domains import DomainSpecError

    try:
        results = run_benchmark(args)
    except (DomainSpecError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(summary_table(results))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
